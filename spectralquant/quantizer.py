"""Encode K/V vectors of one layer's heads into packed records and decode them back.

Encoding ``x [..., H, D]`` (DESIGN.md section 3): centre, rotate ``z = (x - mean) @ V``,
optionally divide by a per-vector scale ``s = |z| / sqrt(trace)`` (stored as fp16), quantize each
coordinate with its own codebook (width ``b_i``, levels scaled to that coordinate), pack the codes
into records of ``ceil(sum b / 8)`` bytes. An optional QJL sketch appends sign bits of a random
projection of the leading coordinates' residual (plus an fp16 residual norm).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields, replace

import torch

from .allocation import uniform_bits, waterfill
from .calibration import KVStats
from .codebook import (
    MAX_BITS,
    fit_lloyd,
    gaussian_correlation,
    gaussian_levels,
    gaussian_poly_coeffs,
    poly_basis,
    quantize,
)
from .packing import FRAGMENT_BITS, FRAGMENTS, RecordLayout, fragment_unsupported_reason
from .rotation import random_orthogonal, randomized_hadamard
from .stats import Spectrum

ROTATIONS = ("spectral", "random", "hadamard", "identity")
ALLOCATIONS = ("waterfill", "uniform")
CODEBOOKS = ("gaussian", "poly", "linear", "fitted")


@dataclass(frozen=True)
class QuantizerConfig:
    """How to encode one kind of vector.

    bits: average bits per coordinate (fractional allowed; the total is ``round(bits * D)``).
    min_bits / max_bits: bounds on any coordinate's width (0 drops a coordinate).
    rotation: ``spectral`` (calibrated eigenbasis), ``random`` (Haar orthogonal), ``hadamard``
        (randomized Hadamard) or ``identity``.
    allocation: ``waterfill`` (by per-coordinate variance) or ``uniform``.
    codebook: ``gaussian`` (Lloyd-Max for a normal, scaled per coordinate), ``poly`` (levels on an
        odd quintic of the centred code index, optimal for a normal among those; fused kernels
        compute them without a table lookup), ``linear`` (evenly spaced levels, the optimal
        uniform quantizer for a normal: a little more error than ``poly``, fewer operations per
        code in the fused kernels) or ``fitted`` (Lloyd fit to the calibration's sample reservoir).
    mix_bands: after allocation, rotate each group of equal-width coordinates among themselves
        (randomized Hadamard for power-of-two group sizes, else random orthogonal): the group's
        coordinates become equal-variance and near-Gaussian while the allocation stays.
    isotropic: give every rotated coordinate the same scale, ``sqrt(trace / D)``, instead of its
        calibrated variance (with a per-vector scale this makes the codec data-oblivious, as in
        TurboQuant).
    center: subtract the calibrated mean first.
    scale: store a per-vector scale ``s`` and quantize ``z / s``.
    scale_bits: how the scale is stored: 8 (a log-scale byte, 1/16-octave steps, at most 2.2%
        off) or 16 (fp16).
    qjl_dims: if > 0, a 1-bit QJL sketch of the residual of that many leading coordinates.
    attention_aware: water-fill by each coordinate's effect on attention rather than its variance
        alone: ``sigma_i**2 * m_i`` where ``m_i`` is the importance matrix's weight on axis ``i``
        (keys: the query second moment, as scores are ``q . k``; values: ``W_o^T W_o``, as the
        output is ``W_o v``). True needs a calibration that measured them; None uses them when
        the calibration has them (the presets' keys), else plain variances.
    unbiased: decode each ``b``-bit coordinate's level times ``1 / E[q(z) z]`` (``z`` standard
        normal, ``q`` its codebook), so a decoded vector's inner products are unbiased given the
        input instead of shrunk towards the mean (a Lloyd-Max codebook shrinks by ``1 -`` its
        distortion: 36% at 1 bit, 12% at 2). More squared error, but attention keeps its contrast:
        shrunk keys flatten the softmax and shrunk values weaken what a retrieved token carries.
        Codes and bytes are unchanged.
    seed: seed for random rotations and the QJL projection.
    fragments: ``None`` (records in the default order) or ``"keys"`` / ``"values"``: the order the
        tensor-core decode attention reads (:func:`spectralquant.packing.fragment_offsets`; needs
        ``allocation="uniform"`` at 2 or 4 bits). With ``codebook="linear"`` on both kinds, CUDA
        decode attention then runs :mod:`spectralquant.kernels.mma_attention`.
    """

    bits: float = 4.0
    min_bits: int = 0
    max_bits: int = MAX_BITS
    rotation: str = "spectral"
    allocation: str = "waterfill"
    codebook: str = "poly"
    mix_bands: bool = True
    isotropic: bool = False
    center: bool = True
    scale: bool = True
    scale_bits: int = 8
    qjl_dims: int = 0
    attention_aware: bool | None = False
    unbiased: bool = False
    seed: int = 0
    fragments: str | None = None

    def __post_init__(self):
        for name, allowed in (("rotation", ROTATIONS), ("allocation", ALLOCATIONS), ("codebook", CODEBOOKS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {allowed}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, float)) or not math.isfinite(self.bits):
            raise TypeError(f"bits must be a finite number, got {self.bits!r}")
        if not (0 <= self.min_bits <= self.max_bits <= MAX_BITS):
            raise ValueError(f"need 0 <= min_bits <= max_bits <= {MAX_BITS}, got {self.min_bits}, {self.max_bits}")
        if not self.min_bits <= self.bits <= self.max_bits:
            raise ValueError(f"bits={self.bits} is outside [min_bits, max_bits] = [{self.min_bits}, {self.max_bits}]")
        if self.scale_bits not in (8, 16):
            raise ValueError(f"scale_bits must be 8 (log byte) or 16 (fp16), got {self.scale_bits}")
        if self.qjl_dims < 0:
            raise ValueError(f"qjl_dims must be >= 0, got {self.qjl_dims}")
        if self.fragments is not None:
            if self.fragments not in FRAGMENTS:
                raise ValueError(f"unknown fragments {self.fragments!r}; choose None or one of {FRAGMENTS}")
            if self.allocation != "uniform" or self.bits not in FRAGMENT_BITS or self.qjl_dims:
                raise ValueError(
                    f"fragments={self.fragments!r} needs every coordinate at the same width: allocation='uniform', "
                    f"bits 2 or 4 and no QJL (got allocation={self.allocation!r}, bits={self.bits}, "
                    f"qjl_dims={self.qjl_dims})"
                )
        if not (self.attention_aware is None or isinstance(self.attention_aware, bool)):
            raise ValueError(
                f"attention_aware must be True, False or None (when measured), got {self.attention_aware!r}"
            )

    @classmethod
    def from_dict(cls, options: dict) -> QuantizerConfig:
        """Build from a dict, rejecting unknown keys with a ``ValueError`` that lists the valid ones."""
        names = {f.name for f in fields(cls)}
        unknown = set(options) - names
        if unknown:
            raise ValueError(f"unknown quantizer option(s) {sorted(unknown)}; valid options are {sorted(names)}")
        return cls(**options)

    def with_(self, **changes) -> QuantizerConfig:
        return replace(self, **changes)


@dataclass
class Encoded:
    """Encoded vectors: ``records`` uint8 ``[..., H, R]``, per-vector ``scales`` ``[..., H]`` (uint8
    log-scale codes or fp16, see :func:`encode_scale`)
    (None without scaling) and QJL residual norms fp16 ``[..., H]`` (None without QJL)."""

    records: torch.Tensor
    scales: torch.Tensor | None = None
    qjl_norms: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.records, self.scales, self.qjl_norms) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class Quantizer:
    """Encoder/decoder for vectors ``[..., H, D]`` of ``H`` heads (one layer, one kind).

    Per head it holds ``basis [H, D, D]`` (columns are the axes), ``mean [H, D]``, per-coordinate
    standard deviations ``sigma [H, D]`` and widths ``widths [H, D]`` (every head the same total),
    and small unit-variance codebooks ``unit_levels [H, 9, K]``: row ``b`` holds the ``2**b``
    levels used by every ``b``-bit coordinate of that head (padded to ``K = 2**max(widths)`` by
    repeating its top level). Coordinate ``i`` is encoded against ``sigma[i] * unit_levels[w_i]``
    and decodes as ``level_scale[i] * unit_levels[w_i, code]``, where ``level_scale`` is ``sigma``
    times ``gain [H, D]`` (None: 1; see ``QuantizerConfig.unbiased``). ``trace [H]`` normalizes
    the per-vector scale. ``head(h)`` gives a single-head quantizer.
    """

    def __init__(
        self,
        basis: torch.Tensor,
        mean: torch.Tensor,
        sigma: torch.Tensor,
        widths: torch.Tensor,
        unit_levels: torch.Tensor,
        trace: torch.Tensor,
        config: QuantizerConfig,
        qjl_matrix: torch.Tensor | None = None,
        gain: torch.Tensor | None = None,
    ):
        h, d = mean.shape
        if (
            basis.shape != (h, d, d)
            or sigma.shape != (h, d)
            or widths.shape != (h, d)
            or unit_levels.shape[:2] != (h, MAX_BITS + 1)
            or trace.shape != (h,)
            or (gain is not None and gain.shape != (h, d))
        ):
            raise ValueError("basis, mean, sigma, widths, unit_levels, trace and gain disagree on heads/head_dim")
        self.config = config
        self.heads, self.dim = h, d
        self.basis = basis.float().contiguous()
        self.mean = mean.float().contiguous() if config.center else torch.zeros(h, d)
        self.sigma = sigma.float().contiguous()
        self.widths = widths.to(torch.int64).contiguous()
        self.unit_levels = unit_levels.float().contiguous()
        self.trace = trace.float()
        self.qjl_matrix = qjl_matrix.float() if qjl_matrix is not None else None
        self.gain = gain.float().contiguous() if gain is not None else None
        # [H, 9, 3] odd-polynomial coefficients when unit_levels come from them ("poly", "linear").
        self.poly_coeffs: torch.Tensor | None = None
        qjl = config.qjl_dims
        stream = self.widths if not qjl else torch.cat([self.widths, torch.ones(h, qjl, dtype=torch.int64)], -1)
        fragments = config.fragments
        if fragments is not None and (reason := fragment_unsupported_reason(fragments, d, int(self.widths.max()))):
            warnings.warn(f"records stay in the default order ({reason}): decode attention will not use the "
                          "tensor-core kernel", stacklevel=2)
            fragments = None
        self.layout = RecordLayout(stream, fragments=fragments)

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def from_stats(
        cls, stats: KVStats, config: QuantizerConfig, seed_offset: int = 0, importance: torch.Tensor | None = None
    ) -> Quantizer:
        """Build from calibration statistics: choose the basis, allocate bits, set the codebooks.

        ``importance [H, D, D]`` (positive semi-definite) is how errors reach what matters; with
        ``config.attention_aware`` it weights the allocation (required then; used if given when
        ``attention_aware`` is None; ignored otherwise).
        """
        h, d = stats.heads, stats.dim
        aware = importance is not None if config.attention_aware is None else config.attention_aware
        if aware and (importance is None or importance.shape != (h, d, d)):
            got = None if importance is None else tuple(importance.shape)
            raise ValueError(f"attention_aware needs an importance matrix [{h}, {d}, {d}], got {got}")
        if config.qjl_dims > d:
            raise ValueError(f"qjl_dims={config.qjl_dims} exceeds head_dim {d}")
        lam, vecs = stats.eigenvalues.double(), stats.eigenvectors.double()
        cov = vecs @ torch.diag_embed(lam) @ vecs.transpose(-1, -2)
        if not config.center:
            # Uncentred coding sees the second moment E[x x^T], mean direction included.
            mean = stats.mean.double()
            spectrum = Spectrum.from_covariance(cov + torch.einsum("hi,hj->hij", mean, mean))
            lam, vecs = spectrum.eigenvalues, spectrum.eigenvectors
            cov = vecs @ torch.diag_embed(lam) @ vecs.transpose(-1, -2)
        # Salted so the rotation is unrelated to other streams seeded with small integers.
        gen = torch.Generator().manual_seed(0x5EC7A1 + config.seed * 1_000_003 + seed_offset)
        if config.rotation == "spectral":
            basis = vecs
        elif config.rotation == "random":
            basis = torch.stack([random_orthogonal(d, gen) for _ in range(h)])
        elif config.rotation == "hadamard":
            basis = torch.stack([randomized_hadamard(d, gen) for _ in range(h)])
        else:
            basis = torch.eye(d, dtype=torch.float64).expand(h, d, d)
        variances = _axis_weights(basis, cov)
        weights = variances
        if aware:
            weights = variances * _axis_weights(basis, importance.double())
        if config.allocation == "waterfill":
            widths = waterfill(weights, config.bits, config.min_bits, config.max_bits)
        else:
            widths = uniform_bits(d, config.bits, config.min_bits, config.max_bits).expand(h, d)
        if config.mix_bands:
            basis = basis @ _band_mixing(widths, gen)
            variances = _axis_weights(basis, cov)
        if config.isotropic:
            variances = (lam.sum(-1, keepdim=True) / d).expand(h, d)
        trace = lam.sum(-1)
        qjl = None
        if config.qjl_dims:
            qjl = torch.randn(h, config.qjl_dims, config.qjl_dims, generator=gen, dtype=torch.float64)
        if config.codebook in ("poly", "linear"):
            terms = 1 if config.codebook == "linear" else 3
            coeffs = torch.stack([gaussian_poly_coeffs(b, terms) for b in range(MAX_BITS + 1)])
            units = _poly_unit_levels(coeffs, int(widths.max())).expand(h, -1, -1)
            quantizer = cls(basis, stats.mean, variances.sqrt(), widths, units, trace, config, qjl)
            quantizer.poly_coeffs = coeffs.float().expand(h, -1, -1).contiguous()
            return quantizer._with_gain()
        gaussian = _gaussian_unit_levels(int(widths.max())).expand(h, -1, -1)
        quantizer = cls(basis, stats.mean, variances.sqrt(), widths, gaussian, trace, config, qjl)
        if config.codebook == "gaussian":
            return quantizer._with_gain()
        if stats.samples is None or stats.samples.shape[0] < 2:
            raise ValueError(
                "codebook='fitted' needs calibration samples: calibrate with samples_per_layer > 0 "
                "(or use codebook='gaussian')"
            )
        quantizer.unit_levels = _fitted_unit_levels(widths, quantizer.unit_coordinates(stats.samples)).float()
        return quantizer._with_gain()

    def _with_gain(self) -> Quantizer:
        """Set ``gain`` from the final codebooks when ``config.unbiased`` (see there)."""
        if self.config.unbiased:
            self.gain = _unbiased_gains(self.unit_levels, self.widths)
        return self

    def head(self, h: int) -> Quantizer:
        """The quantizer of head ``h`` alone (inputs ``[..., 1, D]``)."""
        sl = slice(h, h + 1)
        qjl = self.qjl_matrix[sl] if self.qjl_matrix is not None else None
        one = Quantizer(
            self.basis[sl], self.mean[sl], self.sigma[sl], self.widths[sl], self.unit_levels[sl], self.trace[sl],
            self.config, qjl, self.gain[sl] if self.gain is not None else None,
        )
        one.poly_coeffs = self.poly_coeffs[sl] if self.poly_coeffs is not None else None
        return one

    # -------------------------------------------------------------------------------- properties

    @property
    def level_scale(self) -> torch.Tensor:
        """``[H, D]``: what each coordinate's unit level is multiplied by when decoding."""
        return self.sigma if self.gain is None else self.sigma * self.gain

    @property
    def record_bytes(self) -> int:
        """Bytes of one vector's packed record (codes and QJL bits)."""
        return self.layout.nbytes

    @property
    def scale_dtype(self) -> torch.dtype | None:
        """dtype of the stored per-vector scales (None without scaling)."""
        if not self.config.scale:
            return None
        return torch.uint8 if self.config.scale_bits == 8 else torch.float16

    @property
    def has_qjl(self) -> bool:
        return self.config.qjl_dims > 0

    #: Tokens encoded together (1: every vector on its own).
    block = 1

    @property
    def bytes_per_vector(self) -> int:
        """Record plus the fp16 side values (scale, QJL norm) stored per vector."""
        return (
            self.record_bytes + self.config.scale_bits // 8 * int(self.config.scale) + 2 * int(self.config.qjl_dims > 0)
        )

    def nbytes(self) -> int:
        """Bytes of this quantizer's own tables (basis, mean, sigma, codebooks)."""
        tabs = [self.basis, self.mean, self.sigma, self.unit_levels, self.trace]
        tabs += [t for t in (self.qjl_matrix, self.gain) if t is not None]
        return sum(t.numel() * t.element_size() for t in tabs)

    def to(self, device: torch.device | str) -> Quantizer:
        """A copy whose tables live on ``device``."""
        out = object.__new__(Quantizer)
        out.__dict__.update(self.__dict__)
        for name in ("basis", "mean", "sigma", "widths", "unit_levels", "trace", "qjl_matrix", "poly_coeffs", "gain"):
            t = getattr(self, name)
            setattr(out, name, t.to(device) if t is not None else None)
        return out

    # ---------------------------------------------------------------------------------- encoding

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"expected a floating tensor, got {x.dtype}")
        if x.dim() < 2 or x.shape[-1] != self.dim or x.shape[-2] != self.heads:
            raise ValueError(
                f"expected vectors [..., {self.heads}, {self.dim}] (heads, head_dim), got {tuple(x.shape)}"
            )

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Centred, rotated coordinates ``z [..., H, D]`` (float32)."""
        self._check(x)
        return torch.einsum("...hd,hde->...he", x.float() - self.mean.to(x.device), self.basis.to(x.device))

    def _scale_of(self, z: torch.Tensor) -> torch.Tensor:
        """Stored per-vector scale of ``|z| / sqrt(trace)`` (``trace`` = 0 falls back to ``|z|``)."""
        norm = torch.linalg.vector_norm(z, dim=-1)
        trace = self.trace.to(z.device)
        ref = torch.where(trace > 0, trace, torch.ones_like(trace)).sqrt()
        return encode_scale(norm / ref, self.config.scale_bits)

    def _normalize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(z / s, stored s)`` with the per-vector scale as stored (``(z, None)`` without scaling)."""
        if not self.config.scale:
            return z, None
        scales = self._scale_of(z)
        s = decode_scale(scales)[..., None]
        return torch.where(s > 0, z / s.clamp_min(1e-30), torch.zeros_like(z)), scales

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """The coordinates that get quantized: rotated, then divided by the stored scale if any."""
        return self._normalize(self.rotate(x))[0]

    def unit_coordinates(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized coordinates divided by their ``sigma`` (0 where ``sigma`` is 0): what the
        unit codebooks quantize."""
        return self._unit(self.normalized(x))

    def _unit(self, zn: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma.to(zn.device)
        return torch.where(sigma > 0, zn / sigma.clamp_min(1e-30), torch.zeros_like(zn))

    def _codes(self, zn: torch.Tensor) -> torch.Tensor:
        units = self.unit_levels.to(zn.device)
        heads = torch.arange(self.heads, device=zn.device)[:, None]
        levels = units[heads, self.widths.to(zn.device)]  # [H, D, K]
        k = levels.shape[-1]
        mids = 0.5 * (levels[..., 1:] + levels[..., :-1])
        # +inf past each coordinate's own top level, so a code never exceeds 2**b - 1.
        valid = torch.arange(k - 1, device=zn.device) < (2 ** self.widths.to(zn.device) - 1)[..., None]
        bounds = torch.where(valid, mids, torch.full_like(mids, math.inf))
        lead = zn.shape[:-2]
        flat = self._unit(zn).reshape(-1, self.heads, self.dim).permute(1, 2, 0)  # [H, D, N]
        codes = quantize(flat, bounds)
        return codes.permute(2, 0, 1).reshape(*lead, self.heads, self.dim)

    def _levels_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Decoded coordinates ``level_scale_i * unit_levels[w_i, code_i]`` for codes ``[..., H, D]``."""
        units = self.unit_levels.to(codes.device)
        k = units.shape[-1]
        flat_index = self.widths.to(codes.device) * k + codes
        table = units.reshape(self.heads, -1).expand(*codes.shape[:-2], self.heads, units.shape[1] * k)
        return torch.gather(table, -1, flat_index) * self.level_scale.to(codes.device)

    def encode(self, x: torch.Tensor) -> Encoded:
        """Encode ``x [..., H, D]`` into packed records (and fp16 side values)."""
        zn, scales = self._normalize(self.rotate(x))
        codes = self._codes(zn)
        qjl_norms = None
        if self.config.qjl_dims:
            k = self.config.qjl_dims
            resid = (zn - self._levels_of(codes))[..., :k]
            proj = torch.einsum("...hk,hjk->...hj", resid, self.qjl_matrix.to(resid.device))
            codes = torch.cat([codes, (proj >= 0).to(torch.int64)], -1)
            qjl_norms = torch.linalg.vector_norm(resid, dim=-1).to(torch.float16)
        return Encoded(self.layout.pack(codes), scales, qjl_norms)

    def decode(self, enc: Encoded) -> torch.Tensor:
        """Reconstruct ``x_hat [..., H, D]`` (float32) from :meth:`encode`'s output."""
        z = self.decode_rotated(enc)
        return torch.einsum("...he,hde->...hd", z, self.basis.to(z.device)) + self.mean.to(z.device)

    def decode_rotated(self, enc: Encoded) -> torch.Tensor:
        """Reconstructed coordinates in the rotated basis, scale applied, ``[..., H, D]`` float32."""
        if enc.records.shape[-2:] != (self.heads, self.record_bytes):
            raise ValueError(
                f"records of shape {tuple(enc.records.shape)} do not match this quantizer "
                f"([..., {self.heads}, {self.record_bytes}])"
            )
        codes = self.layout.unpack(enc.records)
        z = self._levels_of(codes[..., : self.dim])
        if self.config.qjl_dims:
            k = self.config.qjl_dims
            signs = codes[..., self.dim :].float() * 2 - 1
            est = torch.einsum("...hj,hjk->...hk", signs, self.qjl_matrix.to(z.device))
            z = torch.cat(
                [z[..., :k] + est * (math.sqrt(math.pi / 2) / k) * enc.qjl_norms.float()[..., None], z[..., k:]], -1
            )
        if enc.scales is not None:
            z = z * decode_scale(enc.scales)[..., None]
        return z


SCALE_STEPS_PER_OCTAVE = 16


def encode_scale(s: torch.Tensor, bits: int) -> torch.Tensor:
    """Store non-negative scales: ``bits=16`` as fp16; ``bits=8`` as a uint8 log code,
    ``round(16 * log2(s)) + 128`` clamped to [1, 255] (about 2**-7.9 to 2**7.9), 0 for ``s = 0``."""
    if bits == 16:
        return s.to(torch.float16)
    code = (torch.log2(s.float().clamp_min(1e-30)) * SCALE_STEPS_PER_OCTAVE).round() + 128
    return torch.where(s > 0, code.clamp(1, 255), torch.zeros_like(code)).to(torch.uint8)


def decode_scale(stored: torch.Tensor) -> torch.Tensor:
    """Scales as float32 from :func:`encode_scale`'s output (uint8 log codes or fp16)."""
    if stored.dtype != torch.uint8:
        return stored.float()
    value = torch.exp2((stored.float() - 128) / SCALE_STEPS_PER_OCTAVE)
    return torch.where(stored > 0, value, torch.zeros_like(value))


def _axis_weights(basis: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``[H, D]``: the weight ``b_i^T M b_i >= 0`` of ``matrix [H, D, D]`` on each column ``b_i`` of ``basis``."""
    return torch.einsum("hji,hjk,hki->hi", basis, matrix, basis).clamp_min(0)


def _unbiased_gains(unit_levels: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """``[H, D]``: ``1 / E[q(z) z]`` for each coordinate's codebook (``unit_levels [H, 9, K]``, row
    ``widths [H, D]``) on a standard normal ``z``; 1 for 0-bit coordinates (decoded as 0 anyway)."""
    h = widths.shape[0]
    table = torch.ones(h, MAX_BITS + 1, dtype=torch.float64)
    for b in range(1, int(widths.max()) + 1):
        table[:, b] = 1.0 / gaussian_correlation(unit_levels[:, b, : 2**b])
    return torch.gather(table, 1, widths.cpu()).float()


def _band_mixing(widths: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per head, an orthogonal ``[D, D]`` that mixes only coordinates of equal width."""
    h, d = widths.shape
    mix = torch.zeros(h, d, d, dtype=torch.float64)
    for head in range(h):
        for b in widths[head].unique().tolist():
            idx = (widths[head] == b).nonzero().flatten()
            n = idx.numel()
            block = randomized_hadamard(n, gen) if n & (n - 1) == 0 else random_orthogonal(n, gen)
            mix[head][idx[:, None], idx[None, :]] = block
    return mix


def _padded(levels: torch.Tensor, k: int) -> torch.Tensor:
    """Levels ``[n]`` padded to ``[k]`` by repeating the top level (so the row stays sorted)."""
    return torch.cat([levels, levels[-1:].expand(k - levels.numel())])


def _gaussian_unit_levels(max_width: int) -> torch.Tensor:
    """``[9, 2**max_width]``: row ``b`` holds the ``b``-bit Lloyd-Max Gaussian levels, padded;
    rows wider than ``max_width`` are unused and left at zero."""
    k = 2**max_width
    table = torch.zeros(MAX_BITS + 1, k, dtype=torch.float64)
    for b in range(max_width + 1):
        table[b] = _padded(gaussian_levels(b), k)
    return table


def _poly_unit_levels(coeffs: torch.Tensor, max_width: int) -> torch.Tensor:
    """``[9, 2**max_width]`` levels of the odd quintics ``coeffs [9, 3]``, evaluated in float32
    (as kernels evaluate them), padded; unused rows zero."""
    k = 2**max_width
    table = torch.zeros(MAX_BITS + 1, k, dtype=torch.float64)
    for b in range(max_width + 1):
        levels = poly_basis(b).float() @ coeffs[b].float()
        table[b] = _padded(levels.double(), k)
    return table


def _fitted_unit_levels(widths: torch.Tensor, units: torch.Tensor, max_samples: int = 200_000) -> torch.Tensor:
    """Per head and width, Lloyd levels fitted to the pooled unit coordinates ``units [N, H, D]`` of
    every coordinate with that width; widths no coordinate uses keep their Gaussian levels.
    Returns ``[H, 9, 2**max(widths)]`` (float64)."""
    h = widths.shape[0]
    k = 2 ** int(widths.max())
    table = _gaussian_unit_levels(int(widths.max())).repeat(h, 1, 1)
    g = torch.Generator().manual_seed(0)
    for head in range(h):
        for b in widths[head].unique().tolist():
            if b == 0:
                continue
            pool = units[:, head, widths[head] == b].reshape(-1).double()
            if pool.numel() > max_samples:
                pool = pool[torch.randperm(pool.numel(), generator=g)[:max_samples]]
            table[head, b] = _padded(fit_lloyd(pool, b), k)
    return table
