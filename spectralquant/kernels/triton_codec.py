"""Triton encode and decode of packed records, all heads of a layer in one launch.

References: :meth:`Quantizer.encode` and :meth:`Quantizer.decode` (the kernels compute the same
function; a code may differ by one where a value sits within rounding of a codebook boundary,
since the rotation sums in another order). Both take token-major tensors ``[..., H, D]`` /
``[..., H, R]`` as the quantizer does. QJL quantizers are not supported (see
:func:`~spectralquant.kernels.tables.unsupported_reason`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quantizer import Encoded, Quantizer
from .tables import KernelTables, tables_of

BLOCK_N = 32  # vectors per program
ENCODE_TILE = 16384  # basis elements the encode reads per chunk ([D, KC]: registers and shared memory)
CHUNK = 32  # the decode rotates back in chunks of this many output coordinates


@triton.jit
def stored_to_scale(raw, LOG_SCALE: tl.constexpr):
    """Stored per-vector scales as float32: uint8 log codes (0 means zero) or fp16 values."""
    if LOG_SCALE:
        c = raw.to(tl.float32)
        return tl.where(c > 0, tl.exp2((c - 128.0) / 16.0), 0.0)
    return raw.to(tl.float32)


@triton.jit
def scale_to_stored(s, LOG_SCALE: tl.constexpr):
    """The inverse of :func:`stored_to_scale` (``spectralquant.quantizer.encode_scale``)."""
    # One return statement: Triton 3.6 rejects returns of different dtypes even in a constexpr branch.
    if LOG_SCALE:
        c = tl.minimum(tl.maximum(tl.floor(tl.log2(tl.maximum(s, 1e-30)) * 16.0 + 128.5), 1.0), 255.0)
        stored = tl.where(s > 0, c, 0.0).to(tl.uint8)
    else:
        stored = s.to(tl.float16)
    return stored


@triton.jit
def load_units(rec_ptr, row, row_ok, unit_word, NU: tl.constexpr, NW: tl.constexpr, ALIGNED: tl.constexpr,
               CROSSES: tl.constexpr):
    """The raw 32-bit words holding each unit of the records that start at word offsets ``row [R]``
    of ``rec_ptr``: ``(lo, hi)``, each ``[R, NU]`` int32 (``hi`` is ``lo`` unless units straddle
    words). Rows where ``row_ok`` is False read 0s. Split from :func:`unit_levels` so a caller can
    issue the loads of the next block before it works on this one."""
    j = tl.arange(0, NU)
    if ALIGNED:
        lo = tl.load(rec_ptr + row[:, None] + j[None, :], mask=row_ok[:, None], other=0)
    else:
        lo = tl.load(rec_ptr + row[:, None] + unit_word[None, :], mask=row_ok[:, None], other=0)
    hi = lo
    if CROSSES:
        nxt = tl.minimum(unit_word + 1, NW - 1)
        hi = tl.load(rec_ptr + row[:, None] + nxt[None, :], mask=row_ok[:, None], other=0)
    return lo, hi


@triton.jit
def unit_codes(lo, hi, unit_shift, slot_shift, slot_mask, ALIGNED: tl.constexpr, CROSSES: tl.constexpr):
    """Codes ``[R, NU, S]`` (uint32) from the unit words of :func:`load_units`; ``unit_shift`` is
    ``[NU]``, ``slot_shift``/``slot_mask`` ``[NU, S]`` uint32."""
    lo = lo.to(tl.uint32, bitcast=True)
    if ALIGNED:
        unit = lo
    elif CROSSES:
        both = (hi.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | lo.to(tl.uint64)
        unit = (both >> unit_shift.to(tl.uint64)[None, :]).to(tl.uint32)
    else:
        unit = lo >> unit_shift.to(tl.uint32)[None, :]
    return (unit[:, :, None] >> slot_shift[None, :, :]) & slot_mask[None, :, :]


@triton.jit
def poly_levels_at(code, s, h, a1, a3, a5):
    """Levels at codes ``code`` already converted to floats (fp16 or float32, as the coefficients)."""
    y = code * s - h
    y2 = y * y
    return y * (a1 + y2 * (a3 + y2 * a5))


@triton.jit
def poly_levels_of(c, s, h, a1, a3, a5, TERMS: tl.constexpr):
    """Levels at float codes ``c`` under polynomial codebooks of ``TERMS`` odd terms (1: linear, 3: quintic)."""
    if TERMS == 1:
        return (c * s - h) * a1
    return poly_levels_at(c, s, h, a1, a3, a5)


@triton.jit
def poly_levels(codes, s, h, a1, a3, a5, F16: tl.constexpr, TERMS: tl.constexpr):
    """Unit levels of ``codes`` under polynomial codebooks (``tables`` module doc) of ``TERMS`` odd
    terms (1: linear, 3: quintic), in fp16 or float32 as ``F16`` says; the coefficient tensors
    broadcast against ``codes`` and have that dtype. The code becomes a float by OR-ing it into the
    mantissa of a power of two (no int conversion)."""
    if F16:
        c = (codes | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True) - 1024.0
    else:
        c = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return poly_levels_of(c, s, h, a1, a3, a5, TERMS)


@triton.jit
def paired_codes(unit, shift, mask16):
    """``1024 + code`` as fp16 for the codes at bit ``shift`` (int32) of words ``unit`` (int32),
    ``mask16`` (int16) wide, two elements per step in PTX: shift both words, join their low halves
    with a byte permute and mask and OR the fp16 exponent into both halves at once (4 instructions
    per pair where the compiler emits 5). GPU only (inline PTX)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 a, b, c; shr.b32 a, $1, $3; shr.b32 b, $2, $4; prmt.b32 c, a, b, 0x5410; "
        "lop3.b32 $0, c, $5, 0x64006400, 0xEA; }",
        "=r,r,r,r,r,r", [unit, shift, mask16], dtype=tl.float16, is_pure=True, pack=2,
    )


@triton.jit
def poly_codes(u, top, s, h, a1, a3, a5, TERMS: tl.constexpr):
    """Codes (int32) of unit values ``u`` under polynomial codebooks of ``TERMS`` odd terms with
    ``top = 2**b - 1``: the index of the nearest level, as the boundary search finds it, without a
    table. The level curve ``y * (a1 + y2 * (a3 + y2 * a5))`` (``y = code * s - h``) is inverted by
    two Newton steps from ``u / a1`` (within one code of the answer for every width, measured over
    ``|u| <= 12``; beyond that ``y`` is clamped to the end levels), then one step to a neighbour
    settles it against the midpoints between levels. NaN gives code 0 (as the table search does)."""
    # Reciprocals of the per-coordinate [1, D] rows, and fast divisions elsewhere: IEEE divisions
    # per element cost more than the rest of the search.
    y = tl.minimum(tl.maximum(u * (1.0 / tl.where(a1 > 0, a1, 1.0)), -h), h)
    if TERMS == 3:
        for _ in tl.static_range(2):
            y2 = y * y
            f = y * (a1 + y2 * (a3 + y2 * a5)) - u
            slope = a1 + y2 * (3.0 * a3 + 5.0 * a5 * y2)  # 0 only for 0-bit coordinates (h = 0)
            y = tl.minimum(tl.maximum(y - tl.fdiv(f, tl.where(slope > 0, slope, 1.0)), -h), h)
    code = tl.minimum(tl.maximum(tl.floor((y + h) * (1.0 / s) + 0.5), 0.0), top)
    level = poly_levels_at(code, s, h, a1, a3, a5)
    up = 0.5 * (level + poly_levels_at(code + 1.0, s, h, a1, a3, a5))
    down = 0.5 * (level + poly_levels_at(code - 1.0, s, h, a1, a3, a5))
    code += ((code < top) & (u > up)).to(tl.float32) - ((code > 0) & (u <= down)).to(tl.float32)
    return tl.where(u == u, code, 0.0).to(tl.int32)


@triton.jit
def unit_levels(lo, hi, unit_shift, slot_shift, slot_mask, lut_ptr, s, h, a1, a3, a5, NU: tl.constexpr,
                S: tl.constexpr, ALIGNED: tl.constexpr, CROSSES: tl.constexpr, POLY: tl.constexpr,
                F16: tl.constexpr, PAIRED: tl.constexpr = False):
    """Levels ``[R, NU * S]`` (stored order) of the records whose unit words are ``lo``/``hi``:
    computed from the polynomial coefficients ``[NU, S]`` of :func:`load_poly` if ``POLY`` (its
    number of odd terms, ``KernelTables.poly_terms``; fp16 if ``F16``, else float32), else looked
    up in ``lut_ptr`` (the table's dtype). ``PAIRED`` (GPU only) extracts fp16 polynomial codes of
    units inside words with :func:`paired_codes`."""
    if PAIRED and F16 and POLY and not CROSSES:
        shift = (unit_shift[:, None] + slot_shift).to(tl.int32)  # 0 + slot shift for word-aligned units
        c = paired_codes(lo[:, :, None], shift[None, :, :], slot_mask.to(tl.int16)[None, :, :]) - 1024.0
        levels = poly_levels_of(c, s[None, :, :], h[None, :, :], a1[None, :, :], a3[None, :, :], a5[None, :, :], POLY)
        return tl.reshape(levels, (lo.shape[0], NU * S))
    codes = unit_codes(lo, hi, unit_shift, slot_shift, slot_mask, ALIGNED, CROSSES)
    if POLY:
        levels = poly_levels(codes, s[None, :, :], h[None, :, :], a1[None, :, :], a3[None, :, :], a5[None, :, :], F16,
                             POLY)
    else:
        levels = tl.load(lut_ptr + (codes | (slot_mask + 1)[None, :, :]).to(tl.int32))
    return tl.reshape(levels, (lo.shape[0], NU * S))


@triton.jit
def load_slot_tables(uw_ptr, ush_ptr, ssh_ptr, smask_ptr, NU: tl.constexpr, S: tl.constexpr):
    """One head's unit tables ``[NU]`` (int32) and slot tables ``[NU, S]`` (uint32)."""
    j = tl.arange(0, NU)
    p = j[:, None] * S + tl.arange(0, S)[None, :]
    unit_word = tl.load(uw_ptr + j)
    unit_shift = tl.load(ush_ptr + j)
    slot_shift = tl.load(ssh_ptr + p).to(tl.uint32)
    slot_mask = tl.load(smask_ptr + p).to(tl.uint32)
    return unit_word, unit_shift, slot_shift, slot_mask


@triton.jit
def load_poly(poly_ptr, NU: tl.constexpr, S: tl.constexpr, POLY: tl.constexpr, F16: tl.constexpr):
    """One head's polynomial coefficients ``s, h, a1, a3, a5`` as ``[NU, S]`` tensors (fp16 if
    ``F16``), from its ``[5, D]`` rows of ``KernelTables.poly``; zeros (unused) unless ``POLY``."""
    p = tl.arange(0, NU)[:, None] * S + tl.arange(0, S)[None, :]
    dtype = tl.float16 if F16 else tl.float32
    if POLY:
        rows = poly_ptr + p
        return (tl.load(rows).to(dtype), tl.load(rows + NU * S).to(dtype), tl.load(rows + 2 * NU * S).to(dtype),
                tl.load(rows + 3 * NU * S).to(dtype), tl.load(rows + 4 * NU * S).to(dtype))
    zero = tl.zeros((NU, S), dtype)
    return zero, zero, zero, zero, zero


@triton.jit
def _byte_weights(byte, word, part):
    """``[NW, D]`` fp16 weights that put byte ``byte [1, D]`` of each code into 16-bit half ``part``
    of word ``word [NW, 1]``: 1 or 256 by the byte's place in that half, 0 elsewhere."""
    at = ((byte >> 2) == word) & (((byte >> 1) & 1) == part)
    return tl.where(at, tl.where((byte & 1) == 1, 256.0, 1.0), 0.0).to(tl.float16)


@triton.jit
def pack_words(code, bit_offset, NWP: tl.constexpr):
    """The words ``[NWP, BN]`` (int32) of records whose codes ``[D, BN]`` (int32, at most 8 bits;
    one column per record) start at record bits ``bit_offset [D]``, computed on tensor cores: each
    code, shifted to its bit within its byte, is split into that byte's part and the next byte's,
    and 0/1 matrices with byte weights 1 or 256 sum them into the low and high halves of their
    words. Every operand is an integer below 2**11 (exact in fp16) and every half below 2**16
    (exact in the float32 accumulator); the bits of different codes are disjoint, so the sums are
    ORs."""
    v = code << (bit_offset & 7)[:, None]
    lo = (v & 255).to(tl.float16)
    hi = (v >> 8).to(tl.float16)
    byte = (bit_offset >> 3)[None, :]
    word = tl.arange(0, NWP)[:, None]
    low = tl.dot(_byte_weights(byte + 1, word, 0), hi, tl.dot(_byte_weights(byte, word, 0), lo))
    high = tl.dot(_byte_weights(byte + 1, word, 1), hi, tl.dot(_byte_weights(byte, word, 1), lo))
    return low.to(tl.int32) | (high.to(tl.int32) << 16)


@triton.jit
def _centred(X, sxn, sxh, mean, h, n64, n_ok, k):
    """Coordinates ``k [KC]`` of head ``h``'s input vectors ``n64 [BN]`` minus ``mean`` (that head's
    row), as float32 ``[KC, BN]``."""
    x = tl.load(X + n64[None, :] * sxn + h * sxh + k[:, None], mask=n_ok[None, :], other=0.0).to(tl.float32)
    return x - tl.load(mean + k)[:, None]


@triton.jit
def _encode_kernel(
    X, sxn, sxh, BASIS_HI, BASIS_LO, MEAN, SIGMA, NORM_REF, BOUNDS, POLY, SSHIFT, SMASK, BIT_OFFSET,
    REC, srn, srh, SCALES, ssn, n_vectors,
    LUT: tl.constexpr, D: tl.constexpr, S: tl.constexpr, NU: tl.constexpr, NW: tl.constexpr,
    NWP: tl.constexpr, MAXW: tl.constexpr, IS_POLY: tl.constexpr, ALIGNED: tl.constexpr, SCALED: tl.constexpr,
    LOG_SCALE: tl.constexpr, BN: tl.constexpr, KC: tl.constexpr,
):
    # Vectors are columns ([D, BN]): the rotation's output then gives each thread few coordinates
    # and many vectors, so the per-coordinate tables of the code search take few registers.
    h = tl.program_id(1)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_ok = n < n_vectors
    n64 = n.to(tl.int64)
    p = tl.arange(0, D)
    # The rotation runs on tensor cores: x, brought to unit norm (where fp16 keeps its relative
    # precision), and the basis are each split into an fp16 leading part and an fp16 rest; three
    # products give z / norm to about 2**-21 (the dropped rest x rest term is 2**-22 of a product).
    # Float32 FMAs took half the kernel's time. The basis is read in [D, KC] chunks (shared memory).
    norm = tl.zeros((BN,), tl.float32)
    for k0 in tl.static_range(0, D, KC):
        x = _centred(X, sxn, sxh, MEAN + h * D, h, n64, n_ok, k0 + tl.arange(0, KC))
        norm += tl.sum(x * x, 0)
    norm = tl.sqrt(norm)
    inv_norm = tl.where(norm > 0, 1.0 / tl.where(norm > 0, norm, 1.0), 0.0)[None, :]
    z = tl.zeros((D, BN), tl.float32)
    for k0 in tl.static_range(0, D, KC):
        k = k0 + tl.arange(0, KC)
        x = _centred(X, sxn, sxh, MEAN + h * D, h, n64, n_ok, k) * inv_norm
        x_hi = x.to(tl.float16)
        b_rows = h * D * D + p[:, None] * D + k[None, :]
        b_hi = tl.load(BASIS_HI + b_rows)
        z = tl.dot(b_hi, (x - x_hi.to(tl.float32)).to(tl.float16), z)
        z = tl.dot(tl.load(BASIS_LO + b_rows), x_hi, z)
        z = tl.dot(b_hi, x_hi, z)
    if SCALED:
        scale = scale_to_stored(norm * tl.sqrt(tl.sum(z * z, 0)) / tl.load(NORM_REF + h), LOG_SCALE)
        tl.store(SCALES + n64 * ssn + h, scale, mask=n_ok)
        s = stored_to_scale(scale, LOG_SCALE)
        # Multiplying by reciprocals (of [BN] scales and [D] sigmas) instead of dividing every
        # element: a code may move by one where u sits within an ulp of a boundary.
        z = z * tl.where(s > 0, norm / tl.maximum(s, 1e-30), 0.0)[None, :]
    else:
        z = z * norm[None, :]
    sigma = tl.load(SIGMA + h * D + p)[:, None]
    u = z * tl.where(sigma > 0, 1.0 / tl.maximum(sigma, 1e-30), 0.0)
    count = tl.load(SMASK + h * D + p)[:, None]  # a b-bit codebook has 2**b - 1 boundaries
    if IS_POLY:
        # Computed (scattered table loads were a third of the kernel's time on the H100).
        row = POLY + h * 5 * D + p
        code = poly_codes(u, count.to(tl.float32), tl.load(row)[:, None], tl.load(row + D)[:, None],
                          tl.load(row + 2 * D)[:, None], tl.load(row + 3 * D)[:, None], tl.load(row + 4 * D)[:, None],
                          IS_POLY)
    else:
        # Boundary search in each coordinate's own codebook: code = number of boundaries below u.
        code = tl.zeros((D, BN), tl.int32)
        for b in tl.static_range(MAXW - 1, -1, -1):
            cand = code + (1 << b)
            ok = (cand <= count) & n_ok[None, :]
            bound = tl.load(BOUNDS + h * LUT + count + cand, mask=ok, other=0.0)
            code = tl.where(ok & (bound < u), cand, code)
    if ALIGNED:
        # Unit j is word j: it sums its codes at their slot shifts (the bits are disjoint).
        j = tl.arange(0, NU)
        slot_shift = tl.load(SSHIFT + h * D + j[:, None] * S + tl.arange(0, S)[None, :]).to(tl.uint32)
        words = tl.sum(tl.reshape(code, (NU, S, BN)).to(tl.uint32) << slot_shift[:, :, None], 1).to(tl.int32,
                                                                                                    bitcast=True)
        wi = j
    else:
        words = pack_words(code, tl.load(BIT_OFFSET + h * D + p), NWP)
        wi = tl.arange(0, NWP)
    tl.store(REC + n64[None, :] * srn + h * srh + wi[:, None], words, mask=n_ok[None, :] & (wi < NW)[:, None])


@triton.jit
def _decode_kernel(
    REC, srn, srh, SCALES, ssn, BASIS, MEAN, LEVEL_SCALE, LEVELS, POLY, UWORD, USHIFT, SSHIFT, SMASK,
    OUT, son, soh, n_vectors,
    LUT: tl.constexpr, D: tl.constexpr, S: tl.constexpr, NU: tl.constexpr, NW: tl.constexpr,
    ALIGNED: tl.constexpr, CROSSES: tl.constexpr, SCALED: tl.constexpr, LOG_SCALE: tl.constexpr,
    IS_POLY: tl.constexpr, BN: tl.constexpr, KC: tl.constexpr,
):
    h = tl.program_id(1)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_ok = n < n_vectors
    n64 = n.to(tl.int64)
    p = tl.arange(0, D)
    uw, ush, ssh, smask = load_slot_tables(UWORD + h * NU, USHIFT + h * NU, SSHIFT + h * D, SMASK + h * D, NU, S)
    ps, ph, a1, a3, a5 = load_poly(POLY + h * 5 * D, NU, S, IS_POLY, False)
    lo, hi = load_units(REC + h * srh, n64 * srn, n_ok, uw, NU, NW, ALIGNED, CROSSES)
    z = unit_levels(lo, hi, ush, ssh, smask, LEVELS + h * LUT, ps, ph, a1, a3, a5, NU, S, ALIGNED, CROSSES, IS_POLY,
                    False)
    z = z * tl.load(LEVEL_SCALE + h * D + p)[None, :]
    if SCALED:
        z = z * stored_to_scale(tl.load(SCALES + n64 * ssn + h, mask=n_ok, other=0), LOG_SCALE)[:, None]
    for k0 in tl.static_range(0, D, KC):
        k = k0 + tl.arange(0, KC)
        basis_t = tl.load(BASIS + h * D * D + k[None, :] * D + p[:, None])  # [D (stored order), KC]
        x = tl.dot(z, basis_t, input_precision="ieee") + tl.load(MEAN + h * D + k)[None, :]
        tl.store(OUT + n64[:, None] * son + h * soh + k[None, :], x, mask=n_ok[:, None])


def _check(tables: KernelTables, t: torch.Tensor, last: int, what: str) -> None:
    if t.dim() < 2 or t.shape[-2:] != (tables.heads, last):
        raise ValueError(f"{what} must be [..., {tables.heads}, {last}], got {tuple(t.shape)}")


def _encode_launch(tables: KernelTables) -> tuple[int, int]:
    """(vectors per program, warps) of the encode. H100, 32k tokens x 8 heads of 128: word-aligned
    records are fastest with 8 warps (261 us against 281 with 4), others with 4 (313 against 374);
    head_dim 256 spills with 32 vectors or 4 warps, so it takes 16 and 8."""
    if tables.dim > 128:
        return BLOCK_N // 2, 8
    return BLOCK_N, 8 if tables.aligned else 4


def encode(quantizer: Quantizer, x: torch.Tensor) -> Encoded:
    """Triton :meth:`Quantizer.encode`: ``x [..., H, D]`` (any float dtype) to records
    ``[..., H, R]`` uint8 and scales ``[..., H]`` as the quantizer stores them (None without scaling)."""
    tables = tables_of(quantizer)
    _check(tables, x, tables.dim, "x")
    lead = x.shape[:-2]
    flat = x.reshape(-1, tables.heads, tables.dim)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    n = flat.shape[0]
    records = torch.empty(n, tables.heads, tables.record_bytes, dtype=torch.uint8, device=x.device)
    scale_dtype = torch.uint8 if tables.log_scale else torch.float16
    scales = torch.empty(n, tables.heads, dtype=scale_dtype, device=x.device) if tables.scaled else None
    words = records.view(torch.int32)
    bn, warps = _encode_launch(tables)
    _encode_kernel[(triton.cdiv(n, bn), tables.heads)](
        flat, flat.stride(0), flat.stride(1), tables.basis_hi16, tables.basis_lo16, tables.mean, tables.sigma_p,
        tables.norm_ref, tables.bounds, tables.poly if tables.poly is not None else tables.bounds,
        tables.slot_shift, tables.slot_mask, tables.bit_offset,
        words, words.stride(0), words.stride(1), scales if scales is not None else records, tables.heads, n,
        LUT=tables.table_size, D=tables.dim, S=tables.slots, NU=tables.units, NW=tables.words,
        NWP=max(16, triton.next_power_of_2(tables.words)), MAXW=tables.max_width, IS_POLY=tables.poly_terms,
        ALIGNED=tables.aligned, SCALED=tables.scaled, LOG_SCALE=tables.log_scale,
        BN=bn, KC=min(tables.dim, ENCODE_TILE // tables.dim), num_warps=warps,
    )
    return Encoded(
        records.reshape(*lead, tables.heads, tables.record_bytes),
        scales.reshape(*lead, tables.heads) if scales is not None else None,
    )


def decode(quantizer: Quantizer, enc: Encoded) -> torch.Tensor:
    """Triton :meth:`Quantizer.decode`: records ``[..., H, R]`` (and scales) to ``x_hat [..., H, D]``
    float32."""
    tables = tables_of(quantizer)
    _check(tables, enc.records, tables.record_bytes, "records")
    lead = enc.records.shape[:-2]
    records = enc.records.reshape(-1, tables.heads, tables.record_bytes).contiguous()
    n = records.shape[0]
    words = records.view(torch.int32)
    scales = enc.scales.reshape(-1, tables.heads).contiguous() if tables.scaled else None
    out = torch.empty(n, tables.heads, tables.dim, dtype=torch.float32, device=records.device)
    _decode_kernel[(triton.cdiv(n, BLOCK_N), tables.heads)](
        words, words.stride(0), words.stride(1), scales if scales is not None else out, tables.heads,
        tables.basis_p, tables.mean, tables.level_p, tables.levels32,
        tables.poly if tables.poly is not None else tables.levels32,
        tables.unit_word, tables.unit_shift, tables.slot_shift, tables.slot_mask,
        out, out.stride(0), out.stride(1), n,
        LUT=tables.table_size, D=tables.dim, S=tables.slots, NU=tables.units, NW=tables.words,
        ALIGNED=tables.aligned, CROSSES=tables.crosses, SCALED=tables.scaled, LOG_SCALE=tables.log_scale,
        IS_POLY=tables.poly_terms, BN=BLOCK_N, KC=min(CHUNK, tables.dim),
    )
    return out.reshape(*lead, tables.heads, tables.dim)
