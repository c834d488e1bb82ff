"""Random quantizers of real shapes and random :class:`CompressedKV` snapshots, for kernel tests
and benchmarks (no model needed)."""

from __future__ import annotations

import torch

from ..compressed_kv import CompressedKV
from ..quantizer import Encoded, Quantizer, QuantizerConfig
from ..synthetic import anisotropic_gaussian


def random_quantizer(heads: int, dim: int, bits: float, seed: int = 0, decades: float = 3.0, **config) -> Quantizer:
    """A quantizer calibrated on an anisotropic Gaussian (eigenvalues over ``decades`` decades)."""
    samples = 512 if config.get("codebook") == "fitted" else 8
    x, stats = anisotropic_gaussian(samples, heads, dim, decades=decades, seed=seed)
    stats.samples = x
    return Quantizer.from_stats(stats, QuantizerConfig(bits=bits, **config))


def random_scales(shape: tuple[int, ...], q: Quantizer, device) -> torch.Tensor:
    """Per-vector scales in [0.5, 2] as ``q`` stores them (uint8 log codes or fp16)."""
    if q.config.scale_bits == 8:
        return torch.randint(112, 145, shape, dtype=torch.uint8, device=device)  # 2**((c - 128) / 16)
    return (0.5 + 1.5 * torch.rand(shape, device=device)).half()


def _encoded(q: Quantizer, batch: int, tokens: int, gen: torch.Generator, device, encode: bool) -> Encoded:
    """Head-major records ``[B, H, T, R]`` and scales ``[B, H, T]``: real encodings of Gaussian
    vectors, or (``encode=False``, for large benchmarks) uniformly random record bytes."""
    h, r = q.heads, q.record_bytes
    scales = None
    if encode:
        z = torch.randn(batch, tokens, h, q.dim, generator=gen) * q.sigma
        enc = q.encode(torch.einsum("bthe,hde->bthd", z, q.basis) + q.mean)
        records = enc.records.transpose(1, 2)
        scales = enc.scales.transpose(1, 2) if enc.scales is not None else None
        return Encoded(records.contiguous().to(device), scales.contiguous().to(device) if scales is not None else None)
    records = torch.randint(0, 256, (batch, h, tokens, r), dtype=torch.uint8, device=device)
    if q.config.scale:
        scales = random_scales((batch, h, tokens), q, device)
    return Encoded(records, scales)


def random_compressed_kv(
    batch: int,
    heads: int,
    dim: int,
    compressed: int,
    window: int,
    sinks: int = 4,
    key_bits: float = 4.0,
    value_bits: float = 4.0,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    seed: int = 0,
    encode: bool = True,
    quantizers: tuple[Quantizer, Quantizer] | None = None,
    **config,
) -> CompressedKV:
    """A snapshot with ``compressed`` history tokens, ``window`` exact recent tokens and
    ``sinks`` exact sink tokens per row (sink positions random in ``[0, 4)``), on ``device``.
    ``quantizers`` (key, value; on the CPU) default to :func:`random_quantizer` of the given bits
    and ``config``; ``encode=False`` fills records with random bytes instead of real encodings."""
    gen = torch.Generator().manual_seed(seed)
    if quantizers is None:
        quantizers = (
            random_quantizer(heads, dim, key_bits, seed=seed, **config),
            random_quantizer(heads, dim, value_bits, seed=seed + 1, **config),
        )
    cpu_k, cpu_v = quantizers
    kq, vq = cpu_k.to(device), cpu_v.to(device)
    key = _encoded(cpu_k, batch, compressed, gen, device, encode)
    value = _encoded(cpu_v, batch, compressed, gen, device, encode)

    def exact(n: int, spread: float) -> torch.Tensor:
        return (spread * torch.randn(batch, heads, n, dim, generator=gen)).to(device, dtype)

    return CompressedKV(
        key, value, kq, vq, exact(window, 2.0), exact(window, 1.0),
        exact(sinks, 2.0) if sinks else None, exact(sinks, 1.0) if sinks else None,
        torch.randint(0, 4, (batch,), generator=gen).to(device),
    )
