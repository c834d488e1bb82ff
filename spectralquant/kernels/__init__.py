"""Attention and codec kernels over packed records, each with a pure-PyTorch reference beside it.

The dispatchers run the Triton kernels on CUDA tensors when Triton is installed and the kernels
support the inputs, and the PyTorch reference otherwise (CPU tensors; QJL quantizers; head dims
that are not a power of two in [16, 256]; more than 128 query rows per KV head; keys stored
before RoPE with dynamic frequencies, a partial rotary dimension or head_dim below 32). The kernels
themselves live in :mod:`.triton_codec`, :mod:`.triton_attention` and, for records in fragment
order (``QuantizerConfig.fragments``), :mod:`.mma_attention` (imported lazily, so the package works
without Triton).
"""

from __future__ import annotations

import importlib.util

import torch

from ..compressed_kv import CompressedKV
from ..quantizer import Encoded, Quantizer
from .reference import compressed_attention_reference

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_for(t: torch.Tensor) -> bool:
    return _HAS_TRITON and t.is_cuda


def compressed_attention(
    query: torch.Tensor,
    kv: CompressedKV,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of ``query [B, Hq, Lq, D]`` over a compressed cache (contract: the reference):
    the tensor-core kernel for records in fragment order where it applies, else the fused Triton
    kernel where it applies, else the reference."""
    if _triton_for(query):
        from .mma_attention import compressed_attention_mma, mma_unsupported_reason
        from .triton_attention import attention_unsupported_reason, compressed_attention_triton

        if mma_unsupported_reason(query, kv, mask, softcap) is None:
            return compressed_attention_mma(query, kv, mask, scaling, softcap)

        if attention_unsupported_reason(query, kv) is None:
            return compressed_attention_triton(query, kv, mask, scaling, softcap)
    return compressed_attention_reference(query, kv, mask, scaling, softcap)


def encode(quantizer: Quantizer, x: torch.Tensor) -> Encoded:
    """:meth:`Quantizer.encode` of ``x [..., H, D]``, by the Triton kernel where it applies."""
    if _triton_for(x):
        from .tables import unsupported_reason
        from .triton_codec import encode as triton_encode

        if unsupported_reason(quantizer) is None:
            return triton_encode(quantizer, x)
    return quantizer.encode(x)


def decode(quantizer: Quantizer, enc: Encoded) -> torch.Tensor:
    """:meth:`Quantizer.decode` of records ``[..., H, R]``, by the Triton kernel where it applies."""
    if _triton_for(enc.records):
        from .tables import unsupported_reason
        from .triton_codec import decode as triton_decode

        if unsupported_reason(quantizer) is None:
            return triton_decode(quantizer, enc)
    return quantizer.decode(enc)


__all__ = ["compressed_attention", "compressed_attention_reference", "decode", "encode"]
