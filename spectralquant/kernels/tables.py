"""Per-quantizer tables the Triton kernels read: how to pull each code out of a record, the
codebooks as flat lookup tables, and the rotation in the records' stored coordinate order.

Kernels work in *stored order* (position ``p`` holds coordinate ``layout.order[h, p]``), grouped
into ``units`` of ``slots`` consecutive codes that each span at most 32 bits
(:mod:`spectralquant.packing`). Unit ``j`` starts at bit ``unit_word * 32 + unit_shift`` of the
record; its slot ``s`` code is ``(unit >> slot_shift) & slot_mask``. The flat codebook of a head
holds the ``b``-bit levels at ``[2**b, 2**(b+1))``, so a code's entry is ``code | (slot_mask + 1)``
(one bitwise op; entry 1 is the 0-bit level). ``basis_p [H, D, D]`` holds the basis columns in
stored order, ``sigma_p [H, D]`` the matching per-coordinate scales that encoding divides by, and
``level_p [H, D]`` those that decoded levels are multiplied by (``Quantizer.level_scale``: ``sigma``
unless the codebook is unbiased).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from ..packing import UNIT_BITS, RecordLayout, word_aligned
from ..quantizer import Quantizer

MIN_DIM, MAX_DIM = 16, 256
FP16_MAX = 65504.0
_REASONS: weakref.WeakKeyDictionary[Quantizer, str | None] = weakref.WeakKeyDictionary()


@dataclass
class KernelTables:
    """Everything a kernel needs about one quantizer, on the quantizer's device (see module doc).

    Shapes: ``unit_word``/``unit_shift`` int32 ``[H, NU]``; ``slot_shift``/``slot_mask`` int32
    ``[H, D]`` (stored order); ``levels16``/``levels32``/``bounds`` ``[H, L]`` with
    ``L = 2**(max_width + 1)``; ``basis_p [H, D, D]``, ``sigma_p [H, D]``, ``level_p [H, D]``,
    ``mean [H, D]``, ``norm_ref [H]`` float32; ``basis_sigma16 [H, D, D]`` fp16 (``basis_p * level_p``,
    for the attention's rotations); ``basis_hi16``/``basis_lo16 [H, D, D]`` fp16 (``basis_p`` transposed, split
    into a leading part and the rest, for the encode's tensor-core rotation); ``bit_offset [H, D]`` int32
    (first record bit of each stored position); ``poly [H, 5, D]`` float32 for polynomial codebooks, else None;
    ``poly_terms``: 0 without ``poly``, 1 if every cubic and quintic coefficient is 0 (linear
    codebooks: kernels skip those terms), else 3.
    """

    heads: int
    dim: int
    slots: int
    units: int
    words: int
    record_bytes: int
    aligned: bool  # unit j is exactly word j
    crosses: bool  # some unit straddles two words
    max_width: int
    scaled: bool
    log_scale: bool  # scales stored as uint8 log codes (else fp16)
    unit_word: torch.Tensor
    unit_shift: torch.Tensor
    slot_shift: torch.Tensor
    slot_mask: torch.Tensor
    bit_offset: torch.Tensor
    levels16: torch.Tensor
    levels32: torch.Tensor
    bounds: torch.Tensor
    basis_p: torch.Tensor
    sigma_p: torch.Tensor
    level_p: torch.Tensor
    basis_sigma16: torch.Tensor
    basis_hi16: torch.Tensor
    basis_lo16: torch.Tensor
    mean: torch.Tensor
    norm_ref: torch.Tensor
    poly: torch.Tensor | None
    poly_terms: int

    @property
    def table_size(self) -> int:
        return self.levels32.shape[-1]


def unsupported_reason(quantizer: Quantizer) -> str | None:
    """Why the Triton kernels cannot run this quantizer (then callers use the PyTorch reference),
    or None if they can. Cached per quantizer object (the answer reads its device tensors once)."""
    if isinstance(quantizer, Quantizer) and quantizer in _REASONS:
        return _REASONS[quantizer]
    reason = _unsupported_reason(quantizer)
    if isinstance(quantizer, Quantizer):
        _REASONS[quantizer] = reason
    return reason


def _unsupported_reason(quantizer: Quantizer) -> str | None:
    if not isinstance(quantizer, Quantizer):
        return f"{type(quantizer).__name__} is a baseline codec (the kernels read SpectralQuant records)"
    d = quantizer.dim
    if quantizer.config.qjl_dims:
        return "the QJL sketch is not implemented in the kernels"
    if not (MIN_DIM <= d <= MAX_DIM and word_aligned(d)):
        return f"head_dim {d} is not a power of two in [{MIN_DIM}, {MAX_DIM}]"
    if quantizer.layout.total_bits == 0:
        return "records are empty (0 bits per vector)"
    if float(quantizer.level_scale.abs().max()) > FP16_MAX:
        return (
            f"a coordinate's decode scale (sigma, times the unbiased gain if any) exceeds {FP16_MAX:g}, "
            "the fp16 range the attention's rotations use"
        )
    return None


def layout_tables(layout: RecordLayout) -> dict[str, torch.Tensor | int | bool]:
    """Unit and slot tables of a layout whose widths are ``[H, D]`` with ``D = units * slots``."""
    widths, order, offsets = layout.widths, layout.order, layout.offsets
    h, d = widths.shape
    if layout.units * layout.slots != d:
        raise ValueError(f"layout has {layout.units} units of {layout.slots} slots for {d} coordinates")
    w_p = torch.gather(widths, 1, order)
    o_p = torch.gather(offsets, 1, order)
    unit_bits = w_p.reshape(h, layout.units, layout.slots).sum(-1)
    # First bit of each unit. A unit of only 0-bit codes reads nothing it uses, but may start at the
    # record's end (units back to back in coordinate order): it reads word 0 instead, so no kernel
    # loads a word past the record (past the tensor, for the last token).
    start = torch.where(unit_bits > 0, o_p[:, :: layout.slots], 0)  # [H, NU]
    rel = o_p - start.repeat_interleave(layout.slots, 1)
    words = layout.words
    return dict(
        unit_word=(start // UNIT_BITS).to(torch.int32),
        unit_shift=(start % UNIT_BITS).to(torch.int32),
        slot_shift=torch.where(w_p > 0, rel, 0).to(torch.int32),
        slot_mask=((1 << w_p) - 1).to(torch.int32),
        bit_offset=o_p.to(torch.int32),
        aligned=bool(words == layout.units and (start == UNIT_BITS * torch.arange(layout.units)).all()),
        crosses=bool(((start % UNIT_BITS) + unit_bits > UNIT_BITS).any()),
        words=words,
    )


def _flat_codebooks(quantizer: Quantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels and boundaries ``[H, 2**(max_width+1)]`` (float32): width ``b`` at ``[2**b, 2**(b+1))``.
    Boundaries are computed exactly as :meth:`Quantizer.encode` computes them (float32 midpoints)."""
    units = quantizer.unit_levels.float().cpu()
    h = units.shape[0]
    top = int(quantizer.widths.max())
    size = 2 ** (top + 1)
    levels = torch.zeros(h, size)
    bounds = torch.full((h, size), math.inf)
    for b in range(top + 1):
        row = units[:, b, : 2**b]
        levels[:, 2**b : 2 ** (b + 1)] = row
        bounds[:, 2**b : 2 ** (b + 1) - 1] = 0.5 * (row[:, 1:] + row[:, :-1])
    return levels, bounds


def poly_tables(quantizer: Quantizer) -> torch.Tensor | None:
    """``[H, 5, D]`` float32 rows ``s, h, a1, a3, a5`` per coordinate in stored order (module doc),
    or None if the quantizer's codebook is not polynomial."""
    coeffs = quantizer.poly_coeffs
    if coeffs is None:
        return None
    widths = torch.gather(quantizer.widths.cpu(), 1, quantizer.layout.order.cpu())  # [H, D] stored order
    c = torch.gather(coeffs.double().cpu(), 1, widths[..., None].expand(-1, -1, 3))  # [H, D, 3]
    s = torch.exp2(-(widths - 1).clamp_min(0).double())
    half = (torch.exp2(widths.double()) - 1) / 2
    rows = [s, s * half, c[..., 0] / s, c[..., 1] / s**3, c[..., 2] / s**5]
    return torch.stack(rows, 1).float().contiguous()


def build_tables(quantizer: Quantizer) -> KernelTables:
    """The kernel tables of ``quantizer`` (raises ``ValueError`` if the kernels cannot run it)."""
    reason = unsupported_reason(quantizer)
    if reason:
        raise ValueError(f"the Triton kernels cannot run this quantizer: {reason}; use the reference path")
    layout = quantizer.layout
    device = quantizer.basis.device
    order = layout.order.to(device)
    levels, bounds = _flat_codebooks(quantizer)
    lt = layout_tables(layout)
    trace = quantizer.trace.float()
    basis_p = torch.gather(quantizer.basis, 2, order[:, None, :].expand_as(quantizer.basis)).contiguous()
    sigma_p = torch.gather(quantizer.sigma, 1, order).contiguous()
    level_p = torch.gather(quantizer.level_scale, 1, order).contiguous()
    basis_t = basis_p.transpose(1, 2).contiguous()
    basis_hi16 = basis_t.half()
    on = {k: v.to(device).contiguous() if isinstance(v, torch.Tensor) else v for k, v in lt.items()}
    return KernelTables(
        heads=quantizer.heads,
        dim=quantizer.dim,
        slots=layout.slots,
        units=layout.units,
        words=on.pop("words"),
        record_bytes=layout.nbytes,
        aligned=on.pop("aligned"),
        crosses=on.pop("crosses"),
        max_width=int(quantizer.widths.max()),
        scaled=quantizer.config.scale,
        log_scale=quantizer.config.scale_bits == 8,
        **on,
        levels16=levels.to(device, torch.float16),
        levels32=levels.to(device),
        bounds=bounds.to(device),
        basis_p=basis_p,
        sigma_p=sigma_p,
        level_p=level_p,
        basis_sigma16=(basis_p * level_p[:, None, :]).half(),
        basis_hi16=basis_hi16,
        basis_lo16=(basis_t - basis_hi16.float()).half(),
        mean=quantizer.mean.to(device).float().contiguous(),
        norm_ref=torch.where(trace > 0, trace, torch.ones_like(trace)).sqrt().to(device),
        poly=poly.to(device) if (poly := poly_tables(quantizer)) is not None else None,
        poly_terms=0 if poly is None else 1 if not poly[:, 3:].any() else 3,
    )


_CACHE: weakref.WeakKeyDictionary[Quantizer, KernelTables] = weakref.WeakKeyDictionary()


def tables_of(quantizer: Quantizer) -> KernelTables:
    """Cached :func:`build_tables` (built once per quantizer object)."""
    tables = _CACHE.get(quantizer)
    if tables is None:
        tables = _CACHE[quantizer] = build_tables(quantizer)
    return tables
