"""Glue to ecosystems (``spectralquant.integrations``): transformers caches and attention,
generation helpers, the engine-style API, offline real models, the command line."""

from __future__ import annotations

from collections.abc import Callable

from spectralquant.adapters import Adapter
from spectralquant.codec import LayerCodec
from spectralquant.config import CompressionConfig


def make_cache_factory(adapter: Adapter, codecs: list[LayerCodec | None], config: CompressionConfig) -> Callable:
    """A function returning a fresh, empty compressed cache for ``adapter``'s model."""
    from spectralquant.adapters.hf_causal_lm import HFCausalLMAdapter

    if isinstance(adapter, HFCausalLMAdapter):
        from .hf_cache import SpectralQuantCache

        windows = adapter.sliding_windows()
        return lambda: SpectralQuantCache(codecs, config, windows)
    raise TypeError(f"no compressed cache is available for {adapter.family}")
