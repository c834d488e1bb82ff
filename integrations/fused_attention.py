"""The attention implementation a wrapped model uses in fused mode: registered with transformers
as ``spectralquant_fused_<base>``. When the cache hands it a :class:`CompressedKV` and there are
few query tokens (decoding, small speculative blocks), it runs attention straight over the packed
records; otherwise it dequantizes and calls the model's own ``<base>`` attention with its mask."""

from __future__ import annotations

import torch
from spectralquant.adapters.hf_attention import base_attention, register_wrapped

from spectralquant.compressed_kv import CompressedKV
from spectralquant.kernels import compressed_attention

MAX_FUSED_QUERIES = 16


def boolean_mask(attention_mask: torch.Tensor | None, kv_length: int) -> torch.Tensor | None:
    """transformers' 4D mask (bool, True = attend; or additive float) as bool ``[B, Lq, kv_length]``."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, 0]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    if mask.shape[-1] != kv_length:
        raise ValueError(f"attention mask covers {mask.shape[-1]} keys but the cache holds {kv_length}")
    return mask


def _fused(base: str):
    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        if not isinstance(key, CompressedKV):
            return base_attention(module, base)(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if query.shape[2] <= MAX_FUSED_QUERIES:
            mask = boolean_mask(attention_mask, key.length)
            out = compressed_attention(query, key, mask, scaling=scaling, softcap=kwargs.get("softcap"))
            return out.transpose(1, 2).contiguous(), None
        k, v = key.materialize(query.dtype)
        return base_attention(module, base)(module, query, k, v, attention_mask, scaling=scaling, **kwargs)

    return attention


def register_fused(base: str) -> str:
    """Register the fused implementation over ``base`` (``sdpa``, ``eager``...); returns its name."""
    return register_wrapped("fused", base, _fused)
