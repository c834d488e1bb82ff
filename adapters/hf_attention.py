"""Attention functions registered with transformers' ``AttentionInterface``.

A wrapped implementation ``spectralquant_<role>_<base>`` behaves exactly like the model's own
``<base>`` implementation (``sdpa``, ``eager``, ...) and uses the same mask builder, with one
addition per role: ``capture`` hands each layer's attention inputs (queries, keys and values as
the cache stores them, the mask and the call's options) to a callback during calibration.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

AttentionCallback = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, object, dict], None]
_capture_callback: list[AttentionCallback] = []


def base_attention(module: torch.nn.Module, base: str) -> Callable:
    """The attention function the model would use for implementation ``base``."""
    if base == "eager":
        # Each model defines its own eager attention (soft-capping, sinks, ...) next to its modules.
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _capture_attention(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        if _capture_callback:
            _capture_callback[-1](module, query, key, value, attention_mask, kwargs)
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
def capture_attention(model: torch.nn.Module, callback: AttentionCallback) -> Iterator[None]:
    """While active, every attention layer calls ``callback(module, query [B, Hq, L, D], key
    [B, H, T, D], value [B, H, T, D], attention_mask, options)`` before attending."""
    base = base_implementation(model)
    previous = model.config._attn_implementation
    model.set_attn_implementation(register_wrapped("capture", base, _capture_attention))
    _capture_callback.append(callback)
    try:
        yield
    finally:
        _capture_callback.pop()
        model.set_attn_implementation(previous)


def attention_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    softcap: float | None = None,
    stride: int = 1,
    block: int = 512,
) -> torch.Tensor:
    """Softmax attention weights summed over queries, per KV head: ``[B, H, T]``, the attention
    each key receives. ``query [B, Hq, L, D]`` (GQA groups share a KV head), ``key [B, H, T, D]``,
    ``attention_mask`` as transformers builds it (bool, True = attend, or additive float,
    ``[B, 1, L, T]``) or None for plain causal attention. Only every ``stride``-th query row is
    used (an unbiased estimate up to the factor ``stride``); computed in blocks of ``block`` rows."""
    b, hq, lq, d = query.shape
    h, t = key.shape[1], key.shape[2]
    scale = d**-0.5 if scaling is None else scaling
    rows_all = torch.arange(0, lq, stride, device=key.device)
    q = query.float()[:, :, rows_all].reshape(b, h, hq // h, rows_all.numel(), d)
    k = key.float()
    mass = torch.zeros(b, h, t, device=key.device)
    for start in range(0, rows_all.numel(), block):
        rows = rows_all[start : start + block]
        s = torch.einsum("bhgld,bhtd->bhglt", q[:, :, :, start : start + block], k) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        if attention_mask is None:
            s = s.masked_fill(torch.arange(t, device=key.device) > rows[:, None] + (t - lq), float("-inf"))
        else:
            m = attention_mask[:, :, rows][:, :, None]
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
        mass += torch.softmax(s, dim=-1).nan_to_num(0.0).sum((2, 3))
    return mass
