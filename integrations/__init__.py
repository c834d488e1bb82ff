"""Glue to ecosystems (``spectralquant.integrations``): transformers caches and attention,
generation helpers, the engine-style API, offline real models, the command line."""

from __future__ import annotations

from collections.abc import Callable

import torch
from spectralquant.adapters import Adapter

from spectralquant.codec import LayerCodec
from spectralquant.config import CompressionConfig


def make_cache_factory(
    adapter: Adapter, codecs: list[LayerCodec | None], config: CompressionConfig, fused: bool = False
) -> tuple[Callable, str | None]:
    """A function returning a fresh, empty compressed cache for ``adapter``'s model, and the
    attention implementation the model must switch to (``None``: keep its own)."""
    from spectralquant.adapters.hf_attention import base_implementation
    from spectralquant.adapters.hf_causal_lm import HFCausalLMAdapter

    if isinstance(adapter, HFCausalLMAdapter):
        from .hf_cache import SpectralQuantCache

        windows, ropes = adapter.sliding_windows(), adapter.rope_tables()
        attention = None
        if fused:
            from .fused_attention import register_fused

            attention = register_fused(base_implementation(adapter.model))
        return (lambda: SpectralQuantCache(codecs, config, windows, fused, ropes)), attention
    raise TypeError(f"no compressed cache is available for {adapter.family}")


def fused_available(device: torch.device) -> bool:
    """Whether the fused Triton kernels can run on ``device`` (CUDA with Triton installed)."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
