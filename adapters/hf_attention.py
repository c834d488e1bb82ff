"""Attention functions registered with transformers' ``AttentionInterface``.

A wrapped implementation ``spectralquant_<role>_<base>`` behaves exactly like the model's own
``<base>`` implementation (``sdpa``, ``eager``, ...) and uses the same mask builder, with one
addition per role: ``capture`` hands each layer's queries to a callback during calibration.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

QueryCallback = Callable[[int, torch.Tensor], None]
_capture_callback: list[QueryCallback] = []


def base_attention(module: torch.nn.Module, base: str) -> Callable:
    """The attention function the model would use for implementation ``base``."""
    if base == "eager":
        # Each model defines its own eager attention (soft-capping, sinks, ...) next to its modules.
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _capture_attention(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        if _capture_callback:
            _capture_callback[-1](module.layer_idx, query)
        return base_attention(module, base)(module, query, key, value, attention_mask, **kwargs)

    return attention


def register_wrapped(role: str, base: str, factory: Callable[[str], Callable]) -> str:
    """Register ``factory(base)`` as ``spectralquant_<role>_<base>`` with ``base``'s mask builder."""
    if base not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise ValueError(
            f"attention implementation {base!r} is not supported; load the model with "
            "attn_implementation='sdpa' or 'eager'"
        )
    name = f"spectralquant_{role}_{base}"
    AttentionInterface.register(name, factory(base))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def base_implementation(model: torch.nn.Module) -> str:
    """The model's attention implementation, unwrapped if SpectralQuant wrapped it."""
    impl = model.config._attn_implementation or "eager"
    if impl.startswith("spectralquant_"):
        impl = impl.split("_", 2)[2]
    return impl


@contextlib.contextmanager
def capture_queries(model: torch.nn.Module, callback: QueryCallback) -> Iterator[None]:
    """While active, every attention layer calls ``callback(layer_idx, query [B, Hq, L, D])``."""
    base = base_implementation(model)
    previous = model.config._attn_implementation
    model.set_attn_implementation(register_wrapped("capture", base, _capture_attention))
    _capture_callback.append(callback)
    try:
        yield
    finally:
        _capture_callback.pop()
        model.set_attn_implementation(previous)
