"""Baseline KV codecs, measured side by side with SpectralQuant inside the same compressed cache
(so memory is counted the same way: every byte a codec keeps is in its records).

- ``turboquant``: randomized Hadamard rotation, per-vector norm, Lloyd-Max codebook for the
  rotated coordinates at uniform bits, data-oblivious (no calibration); ``turboquant_qjl`` spends
  one of the bits on a 1-bit QJL sketch of the residual instead.
- ``kivi``: asymmetric integer quantization, keys per channel over groups of ``group`` tokens,
  values per token over groups of ``group`` channels (the fp16 recent window is the cache's).
- ``int``: per token and head, symmetric absmax integers (INT4 / INT8).
- ``fp8``: per token and head, e4m3 values with an fp16 absmax scale.

Each codec encodes ``x [..., H, D]`` to an :class:`Encoded` whose side data (scales, minima)
lives in the record bytes, and decodes it back; block codecs (KIVI keys) take tokens on dim -3.
"""

from __future__ import annotations

import torch

from .calibration import KVStats
from .config import METHODS
from .packing import RecordLayout
from .quantizer import Encoded, Quantizer, QuantizerConfig


def _fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    """fp16 values ``[..., k]`` as their raw bytes ``[..., 2k]`` (uint8)."""
    return t.to(torch.float16).contiguous().view(torch.uint8)


def _from_fp16_bytes(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


class _Codec:
    """Shared plumbing of the baseline codecs (no tables, no separate scale tensors)."""

    block = 1
    scale_dtype = None
    has_qjl = False

    def __init__(self, heads: int, dim: int):
        self.heads, self.dim = heads, dim

    def to(self, device) -> _Codec:
        return self

    def nbytes(self) -> int:
        return 0

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() < 2 or x.shape[-2:] != (self.heads, self.dim):
            raise ValueError(f"expected vectors [..., {self.heads}, {self.dim}], got {tuple(x.shape)}")


class IntCodec(_Codec):
    """Symmetric absmax integers per token and head: ``bits``-bit codes plus an fp16 scale."""

    def __init__(self, heads: int, dim: int, bits: int):
        super().__init__(heads, dim)
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"int codec supports 2, 3, 4 or 8 bits, got {bits}")
        self.bits = bits
        self.layout = RecordLayout(torch.full((dim,), bits), permute=False)
        self.record_bytes = self.layout.nbytes + 2

    def encode(self, x: torch.Tensor) -> Encoded:
        self._check(x)
        x = x.float()
        top = 2 ** (self.bits - 1) - 1
        scale = (x.abs().amax(-1) / top).to(torch.float16)
        s = scale.float().clamp_min(1e-30)[..., None]
        codes = (x / s).round().clamp(-top, top).long() + top
        return Encoded(torch.cat([self.layout.pack(codes), _fp16_bytes(scale[..., None])], -1))

    def decode(self, enc: Encoded) -> torch.Tensor:
        top = 2 ** (self.bits - 1) - 1
        r = enc.records
        codes = self.layout.unpack(r[..., : self.layout.nbytes]).float() - top
        return codes * _from_fp16_bytes(r[..., self.layout.nbytes :])


class FP8Codec(_Codec):
    """e4m3 values per token and head, scaled by an fp16 absmax / 448."""

    def __init__(self, heads: int, dim: int):
        super().__init__(heads, dim)
        self.record_bytes = dim + 2

    def encode(self, x: torch.Tensor) -> Encoded:
        self._check(x)
        x = x.float()
        scale = (x.abs().amax(-1) / 448.0).to(torch.float16)
        s = scale.float().clamp_min(1e-30)[..., None]
        values = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
        return Encoded(torch.cat([values, _fp16_bytes(scale[..., None])], -1))

    def decode(self, enc: Encoded) -> torch.Tensor:
        r = enc.records
        values = r[..., : self.dim].contiguous().view(torch.float8_e4m3fn).float()
        return values * _from_fp16_bytes(r[..., self.dim :])


class KIVICodec(_Codec):
    """KIVI-style asymmetric integers: ``per_channel`` (keys) quantizes each channel over a block
    of ``group`` tokens, else (values) each token over groups of ``group`` channels; minima and
    steps are fp16. A key block's ``4 * D`` side bytes are spread over its tokens' records."""

    def __init__(self, heads: int, dim: int, bits: int, per_channel: bool, group: int = 32):
        super().__init__(heads, dim)
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"kivi codec supports 2, 3, 4 or 8 bits, got {bits}")
        self.bits, self.per_channel = bits, per_channel
        self.group = group if per_channel else min(group, dim)
        if per_channel and (4 * dim) % self.group:
            raise ValueError(f"a key block's {4 * dim} side bytes do not split over {self.group} tokens")
        if not per_channel and dim % self.group:
            raise ValueError(f"head_dim {dim} is not a multiple of the channel group {self.group}")
        self.block = self.group if per_channel else 1
        self.layout = RecordLayout(torch.full((dim,), bits), permute=False)
        self.side_bytes = 4 * dim // self.group if per_channel else 4 * (dim // self.group)
        self.record_bytes = self.layout.nbytes + self.side_bytes

    def _quantize(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
        levels = 2**self.bits - 1
        lo, step = lo.to(torch.float16), ((hi - lo) / levels).to(torch.float16)
        codes = ((x - lo.float()) / step.float().clamp_min(1e-30)).round().clamp(0, levels).long()
        return codes, lo, step

    def encode(self, x: torch.Tensor) -> Encoded:
        self._check(x)
        x = x.float()
        if not self.per_channel:
            g = x.reshape(*x.shape[:-1], self.dim // self.group, self.group)
            codes, lo, step = self._quantize(g, g.amin(-1, keepdim=True), g.amax(-1, keepdim=True))
            side = _fp16_bytes(torch.cat([lo.squeeze(-1), step.squeeze(-1)], -1))  # all minima, then all steps
            return Encoded(torch.cat([self.layout.pack(codes.flatten(-2)), side], -1))
        n = x.shape[-3]
        if x.dim() < 3 or n % self.group:
            raise ValueError(f"KIVI keys are encoded in blocks of {self.group} tokens (dim -3), got {tuple(x.shape)}")
        blocks = x.reshape(*x.shape[:-3], n // self.group, self.group, self.heads, self.dim)
        codes, lo, step = self._quantize(blocks, blocks.amin(-3, keepdim=True), blocks.amax(-3, keepdim=True))
        side = _fp16_bytes(torch.cat([lo, step], -3))  # [..., nb, 2, H, 2D] bytes
        side = side.movedim(-3, -2).flatten(-2)  # [..., nb, H, 4D]
        side = side.reshape(*side.shape[:-1], self.group, self.side_bytes).movedim(-2, -3)  # [..., nb, G, H, 4D/G]
        return Encoded(torch.cat([self.layout.pack(codes), side], -1).flatten(-4, -3))

    def decode(self, enc: Encoded) -> torch.Tensor:
        r = enc.records
        codes = self.layout.unpack(r[..., : self.layout.nbytes]).float()
        side = r[..., self.layout.nbytes :]
        if not self.per_channel:
            lo, step = _from_fp16_bytes(side).reshape(*side.shape[:-1], 2, -1, 1).unbind(-3)
            g = codes.reshape(*codes.shape[:-1], self.dim // self.group, self.group)
            return (g * step + lo).flatten(-2)
        n = r.shape[-3]
        side = side.reshape(*side.shape[:-3], n // self.group, self.group, self.heads, self.side_bytes)
        side = side.movedim(-3, -2).flatten(-2)
        lo, step = _from_fp16_bytes(side.reshape(*side.shape[:-1], 2, 2 * self.dim)).unbind(-2)  # [..., nb, H, D]
        blocks = codes.reshape(*codes.shape[:-3], n // self.group, self.group, self.heads, self.dim)
        return (blocks * step[..., None, :, :] + lo[..., None, :, :]).flatten(-4, -3)


def turboquant_config(bits: float, qjl: bool, dim: int, seed: int = 0) -> QuantizerConfig:
    """TurboQuant as a :class:`QuantizerConfig`: data-oblivious Hadamard rotation, uniform bits,
    Lloyd-Max codebook, per-vector fp16 norm, optionally (``qjl``) one bit per coordinate moved
    to a QJL sketch of the whole residual."""
    return QuantizerConfig(
        bits=bits - 1 if qjl else bits,
        rotation="hadamard",
        allocation="uniform",
        codebook="gaussian",
        mix_bands=False,
        center=False,
        isotropic=True,
        scale=True,
        scale_bits=16,
        qjl_dims=dim if qjl else 0,
        seed=seed,
    )


def baseline_codec(method: str, kind: str, stats: KVStats, bits: float, seed: int = 0):
    """The ``method`` codec for ``kind`` ('key'/'value') of a layer with these statistics."""
    h, d = stats.heads, stats.dim
    if method in ("kivi", "int") and bits != int(bits):
        raise ValueError(f"{method} stores whole bits per value, got {bits}: use 2, 3, 4 or 8")
    if method == "fp8" and bits != 8:
        raise ValueError(f"fp8 stores 8 bits per value, got {bits}: use bits=8")
    if method in ("turboquant", "turboquant_qjl"):
        return Quantizer.from_stats(stats, turboquant_config(bits, method == "turboquant_qjl", d), seed_offset=seed)
    if method == "kivi":
        return KIVICodec(h, d, int(bits), per_channel=kind == "key")
    if method == "int":
        return IntCodec(h, d, int(bits))
    if method == "fp8":
        return FP8Codec(h, d)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
