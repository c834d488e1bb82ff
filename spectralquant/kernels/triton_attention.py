"""Fused decode attention over a :class:`CompressedKV`, flash-decoding style, in two launches.

Reference: :func:`~spectralquant.kernels.reference.compressed_attention_reference`.

1. ``_split_kernel``, grid ``(splits + 1, H, B)``: program ``(s, h, b)`` with ``s < splits`` runs
   an online softmax over one chunk of the compressed history of KV head ``h`` for all ``G * Lq``
   query rows that share it (GQA: every record is read once). Keys are never decoded: the query
   is rotated once into the key basis in stored order and scaled by sigma (``q_s``), so
   ``q.k = scale_t * (q_s . u_t) + q.mean`` with ``u_t`` the unit-codebook levels of the record,
   computed from the codes (a few multiply-adds for polynomial codebooks, a table lookup for
   others; on the GPU polynomial codes of units inside words come two at a time through inline PTX,
   :func:`~spectralquant.kernels.triton_codec.paired_codes`) and fed to a tensor-core dot in fp16. Values accumulate
   ``p_t * scale_t * u_t`` in the same unit basis; at the end the program multiplies the
   normalized partial by sigma and rotates it back (``x = V z + mean``). Sink positions are
   skipped here. Program ``s == splits`` handles the exact tokens (sinks and the fp16/bf16 window)
   in the natural basis.
2. ``_combine_kernel``, grid ``(H, B, D / 32)``: merges the normalized partial outputs of all
   splits in one online-softmax pass, for 32 output coordinates per program. On Hopper and later
   it is launched as a programmatic dependent launch: scheduled while the split kernel runs, it
   waits (``gdc_wait``) for that kernel's partials.

Keys stored before RoPE (``kv.key_rope``, a :class:`~spectralquant.rope.LinearRope`) cannot use
the rotated query: RoPE turns each key by its own position. The history program then decodes each
block's keys into the natural basis (a tensor-core product with the transposed basis, per RoPE
half), applies RoPE at the keys' positions and dots them with the query.

Limits (the dispatcher falls back to the reference outside them): quantizers the kernels
support (:func:`~spectralquant.kernels.tables.unsupported_reason`), ``G * Lq <= 128``; keys before
RoPE only with a full rotary dimension, head_dim >= 32 and fixed frequencies.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from triton.backends.nvidia.compiler import CUDAOptions
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..compressed_kv import CompressedKV
from ..rope import LinearRope
from .tables import KernelTables, tables_of, unsupported_reason
from .triton_codec import load_poly, load_slot_tables, load_units, stored_to_scale, unit_levels

LOG2E = 1.4426950408889634
PDL_SUPPORTED = any(f.name == "launch_pdl" for f in dataclasses.fields(CUDAOptions))  # Triton >= 3.4
MAX_ROWS = 128  # G * Lq query rows per program
# The rotations (query into the key basis, partials back from the value basis) go in chunks of
# coordinates whose basis slice holds at most this many entries: 64 coordinates at head_dim 128, one
# round of loads fewer than 32 (H100: batch 1 / 4k 19.5 -> 17.9 us at 4 bits, 2.25 bits batch 8 / 32k
# 378 -> 367 us); 32 at head_dim 256.
ROTATION_TILE = 8192
COMBINE_DC = 32  # output coordinates per combine program
COMBINE_TILE = 4096  # partial elements a combine program loads at a time (parts x rows x coordinates)
# Launch settings used when a call does not give them (benchmarks/kernels.py tunes them on the GPU):
# tokens per step, warps, blocks per split, least and most programs per multiprocessor (see
# _splits), register cap (word-aligned records, records whose units straddle words: those need
# more registers, and spill at 168), polynomial levels in fp16 (else float32).
TUNING = dict(block_t=64, num_warps=4, min_blocks=16, fill=2, per_sm=8, maxnreg=(168, 232), fp16_levels=True)
# Keys stored before RoPE decode a [BT, D] key tile per block: smaller blocks and no register cap
# (fastest of 7 settings on the H100 at batch 8, 32k context; kernels_notes.md).
ROPE_TUNING = dict(block_t=32, maxnreg=None)


@triton.jit
def _softmax_step(s, m_i, l_i):
    """One online-softmax step on log2-domain scores ``s [M, N]`` (-inf = masked): returns the new
    running max and sum, the rescale factor of the old accumulator, and the probabilities."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), alpha, p


@triton.jit
def merge_partials_step(PO, PM, PL, rows, ok, c, D: tl.constexpr, m_run, l_run, o_run):
    """One round of merging normalized split partials: loads the maxima and sums ``[SB, R]`` at
    ``rows`` and the partial outputs ``[SB, R, DC]`` (coordinates ``c`` of rows of ``D``), where ``ok``
    ``[SB, R]``, and folds them into the running ``m_run, l_run [R]`` and ``o_run [R, DC]``."""
    pm = tl.load(PM + rows, mask=ok, other=float("-inf"))
    pl = tl.load(PL + rows, mask=ok, other=0.0)
    po = tl.load(PO + rows[:, :, None] * D + c[None, None, :], mask=ok[:, :, None], other=0.0)
    m_new = tl.maximum(m_run, tl.max(pm, 0))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    w = tl.exp2(pm - m_use[None, :]) * pl
    alpha = tl.exp2(m_run - m_use)
    return m_new, l_run * alpha + tl.sum(w, 0), o_run * alpha[:, None] + tl.sum(w[:, :, None] * po, 0)


@triton.jit
def _finish_scores(s, SOFTCAP: tl.constexpr, softcap):
    """Scores in natural units (if soft-capped) to log2 units; otherwise already log2."""
    if SOFTCAP:
        # softcap * tanh(s / softcap), with tanh(x) = 1 - 2 / (exp(2x) + 1).
        s = softcap * (1.0 - 2.0 / (tl.exp2((2.0 * 1.4426950408889634 / softcap) * s) + 1.0))
        s = s * 1.4426950408889634
    return s


@triton.jit
def _load_scales(ptr, offsets, ok, SCALED: tl.constexpr, LOG_SCALE: tl.constexpr):
    """Per-token scales as float32 (ones when the quantizer stores none)."""
    if SCALED:
        return stored_to_scale(tl.load(ptr + offsets, mask=ok, other=0), LOG_SCALE)
    return tl.full(offsets.shape, 1.0, tl.float32)


@triton.jit
def _mask_cols(MASK, smb, sml, smt, b, l, cols, col_ok, row_ok, HAS_MASK: tl.constexpr):
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_MASK:
        ptr = MASK + b.to(tl.int64) * smb + l[:, None] * sml + cols[None, :].to(tl.int64) * smt
        ok = ok & (tl.load(ptr, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _layout_fence(x, PTX: tl.constexpr):
    """``x`` (fp16) unchanged. On the GPU (``PTX``; the interpreter has no inline PTX) an opaque copy
    stops the compiler from computing ``x`` in the tensor-core operand layout it feeds: the key
    levels of a block are then decoded with each thread on few coordinates and many tokens, so the
    per-coordinate shift, mask and polynomial tables take a few registers instead of a few hundred,
    and the levels reach the operand layout through shared memory."""
    if PTX:
        x = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float16, is_pure=False, pack=2)
    return x


@triton.jit
def _load_block(k_rec, v_rec, k_sc, v_sc, skt, svt, skst, svst, t, t_ok, k_uw, v_uw,
                K_NU: tl.constexpr, K_NW: tl.constexpr, K_ALIGNED: tl.constexpr, K_CROSSES: tl.constexpr,
                V_NU: tl.constexpr, V_NW: tl.constexpr, V_ALIGNED: tl.constexpr, V_CROSSES: tl.constexpr,
                K_SCALED: tl.constexpr, V_SCALED: tl.constexpr, K_LOG: tl.constexpr, V_LOG: tl.constexpr):
    """The key and value unit words and scales of tokens ``t`` (zeros where not ``t_ok``)."""
    t64 = t.to(tl.int64)
    k_lo, k_hi = load_units(k_rec, t64 * skt, t_ok, k_uw, K_NU, K_NW, K_ALIGNED, K_CROSSES)
    v_lo, v_hi = load_units(v_rec, t64 * svt, t_ok, v_uw, V_NU, V_NW, V_ALIGNED, V_CROSSES)
    ksc = _load_scales(k_sc, t64 * skst, t_ok, K_SCALED, K_LOG)
    vsc = _load_scales(v_sc, t64 * svst, t_ok, V_SCALED, V_LOG)
    return k_lo, k_hi, v_lo, v_hi, ksc, vsc


@triton.jit
def _rope_scores(uk, ksc, t, t0, q1, q2, kb1, kb2, km1, km2, inv_freq, hd, rope_scale, pos0, ROPE_D):
    """Scores ``[M, BT]`` of keys stored before RoPE: each key is decoded into its two RoPE halves
    (``x = scale * (basis * sigma) u + mean``), rotated at its position and dotted with the query
    halves ``q1, q2`` (``qk_scale`` applied). Angles come by angle addition from the block's first
    position ``t0 + pos0`` (cos and sin of ``position * inv_freq`` in float32, per frequency) and
    the table ``ROPE_D`` of the offsets ``0 .. BT-1`` (``[2, BT, D/2]``), so no per-key
    trigonometry is needed. Padding slots (clamped to position 0 by the reference) are masked."""
    a0 = (t0 + pos0).to(tl.float32) * inv_freq
    c0 = tl.cos(a0) * rope_scale
    s0 = tl.sin(a0) * rope_scale
    off = ((t - t0)[:, None] * hd.shape[0] + hd[None, :])
    cd = tl.load(ROPE_D + off)
    sd = tl.load(ROPE_D + hd.shape[0] * t.shape[0] + off)
    c = c0[None, :] * cd - s0[None, :] * sd
    sn = s0[None, :] * cd + c0[None, :] * sd
    x1 = tl.dot(uk, kb1) * ksc[:, None] + km1[None, :]
    x2 = tl.dot(uk, kb2) * ksc[:, None] + km2[None, :]
    y1 = (x1 * c - x2 * sn).to(tl.float16)
    y2 = (x2 * c + x1 * sn).to(tl.float16)
    return tl.dot(q1, tl.trans(y1)) + tl.dot(q2, tl.trans(y2))


@triton.jit
def _attend_block(
    qs, qm, m_i, l_i, acc, t0, t, t_ok, b, l, row_ok, sink_lo, n_sinks, MASK, smb, sml, smt, softcap,
    k_lo, k_hi, ksc, k_ush, k_ssh, k_smask, k_lut, k_s, k_h, k_a1, k_a3, k_a5,
    v_lo, v_hi, vsc, v_ush, v_ssh, v_smask, v_lut, v_s, v_h, v_a1, v_a3, v_a5,
    q1, q2, kb1, kb2, km1, km2, inv_freq, hd, rope_scale, pos0, ROPE_D,
    K_NU: tl.constexpr, K_S: tl.constexpr, K_ALIGNED: tl.constexpr, K_CROSSES: tl.constexpr, K_POLY: tl.constexpr,
    V_NU: tl.constexpr, V_S: tl.constexpr, V_ALIGNED: tl.constexpr, V_CROSSES: tl.constexpr, V_POLY: tl.constexpr,
    F16: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr, PTX: tl.constexpr, ROPE: tl.constexpr,
):
    """One online-softmax step over a block of compressed tokens ``t``: returns ``m_i, l_i, acc``."""
    uk = unit_levels(k_lo, k_hi, k_ush, k_ssh, k_smask, k_lut, k_s, k_h, k_a1, k_a3, k_a5, K_NU, K_S, K_ALIGNED,
                     K_CROSSES, K_POLY, F16, PTX)
    uk = _layout_fence(uk.to(tl.float16), PTX)
    if ROPE:
        s = _rope_scores(uk, ksc, t, t0, q1, q2, kb1, kb2, km1, km2, inv_freq, hd, rope_scale, pos0, ROPE_D)
    else:
        s = tl.dot(qs, tl.trans(uk)) * ksc[None, :] + qm[:, None]
    s = _finish_scores(s, SOFTCAP, softcap)
    not_sink = (t < sink_lo) | (t >= sink_lo + n_sinks)
    ok = _mask_cols(MASK, smb, sml, smt, b, l, t, t_ok & not_sink, row_ok, HAS_MASK)
    m_i, l_i, alpha, p = _softmax_step(tl.where(ok, s, float("-inf")), m_i, l_i)
    uv = unit_levels(v_lo, v_hi, v_ush, v_ssh, v_smask, v_lut, v_s, v_h, v_a1, v_a3, v_a5, V_NU, V_S, V_ALIGNED,
                     V_CROSSES, V_POLY, F16, PTX)
    p = p * vsc[None, :]
    acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), uv.to(tl.float16))
    return m_i, l_i, acc


@triton.jit
def _split_kernel(
    Q, sqb, sqh, sql,
    KR, skb, skh, skt, KSC, sksb, sksh, skst,
    VR, svb, svh, svt, VSC, svsb, svsh, svst,
    WK, swkb, swkh, swkt, WV, swvb, swvh, swvt,
    SK, sskb, sskh, sskt, SV, ssvb, ssvh, ssvt, SPOS,
    MASK, smb, sml, smt,
    K_UW, K_USH, K_SSH, K_SMASK, K_LUT, K_POLY, K_BASIS, K_MEAN,
    V_UW, V_USH, V_SSH, V_SMASK, V_LUT, V_POLY,
    V_BASIS, V_MEAN, PO, PM, PL,
    n_compressed, n_window, n_sinks, n_splits, split_len, qk_scale, softcap,
    ROPE_F, ROPE_D, rope_scale, key_first,
    K_LUTN: tl.constexpr, V_LUTN: tl.constexpr,
    G: tl.constexpr, LQ: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    K_S: tl.constexpr, K_NU: tl.constexpr, K_NW: tl.constexpr, K_ALIGNED: tl.constexpr, K_CROSSES: tl.constexpr,
    V_S: tl.constexpr, V_NU: tl.constexpr, V_NW: tl.constexpr, V_ALIGNED: tl.constexpr, V_CROSSES: tl.constexpr,
    K_SCALED: tl.constexpr, V_SCALED: tl.constexpr, K_LOG: tl.constexpr, V_LOG: tl.constexpr,
    K_IS_POLY: tl.constexpr, V_IS_POLY: tl.constexpr, F16: tl.constexpr,
    HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
    BT: tl.constexpr, BW: tl.constexpr, KC: tl.constexpr,
    PTX: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()  # the combine may be scheduled now; it waits for this grid's results
    split = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    n_heads = tl.num_programs(1)
    m = tl.arange(0, M)
    row_ok = m < G * LQ
    g = m // LQ
    l = m % LQ
    d = tl.arange(0, D)
    b64 = b.to(tl.int64)
    q_rows = Q + b64 * sqb + (h * G + g).to(tl.int64) * sqh + l * sql
    sink_lo = tl.load(SPOS + b).to(tl.int32)
    m_i = tl.full((M,), float("-inf"), tl.float32)
    l_i = tl.zeros((M,), tl.float32)
    acc = tl.zeros((M, D), tl.float32)
    if split < n_splits:
        pos0 = key_first - sink_lo
        k_uw, k_ush, k_ssh, k_smask = load_slot_tables(
            K_UW + h * K_NU, K_USH + h * K_NU, K_SSH + h * D, K_SMASK + h * D, K_NU, K_S
        )
        v_uw, v_ush, v_ssh, v_smask = load_slot_tables(
            V_UW + h * V_NU, V_USH + h * V_NU, V_SSH + h * D, V_SMASK + h * D, V_NU, V_S
        )
        k_ps, k_ph, k_a1, k_a3, k_a5 = load_poly(K_POLY + h * 5 * D, K_NU, K_S, K_IS_POLY, F16)
        v_ps, v_ph, v_a1, v_a3, v_a5 = load_poly(V_POLY + h * 5 * D, V_NU, V_S, V_IS_POLY, F16)
        k_lut = K_LUT + h * K_LUTN
        v_lut = V_LUT + h * V_LUTN
        k_rec = KR + b64 * skb + h.to(tl.int64) * skh
        v_rec = VR + b64 * svb + h.to(tl.int64) * svh
        k_sc = KSC + b64 * sksb + h * sksh
        v_sc = VSC + b64 * svsb + h * svsh
        start = split * split_len
        end = tl.minimum(start + split_len, n_compressed)
        # Software pipelining by hand: the records of block i+1 are loaded while block i is worked on
        # (faster than the compiler's ``tl.range`` pipelining in every setting measured on the H100).
        # The first block's loads go out before the query's rotation (1-3% faster on the H100).
        t = start + tl.arange(0, BT)
        k_lo, k_hi, v_lo, v_hi, ksc, vsc = _load_block(
            k_rec, v_rec, k_sc, v_sc, skt, svt, skst, svst, t, t < end, k_uw, v_uw, K_NU, K_NW, K_ALIGNED,
            K_CROSSES, V_NU, V_NW, V_ALIGNED, V_CROSSES, K_SCALED, V_SCALED, K_LOG, V_LOG,
        )
        if ROPE:
            # Keys stored before RoPE: the query stays in the natural basis, split into its RoPE
            # halves, and each block's keys are decoded into those halves (basis * sigma, transposed).
            hd = tl.arange(0, D // 2)
            q1 = tl.load(q_rows[:, None] + hd[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
            q2 = tl.load(q_rows[:, None] + (D // 2 + hd)[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
            q1, q2 = (q1 * qk_scale).to(tl.float16), (q2 * qk_scale).to(tl.float16)
            kb1 = tl.load(K_BASIS + h * D * D + hd[None, :] * D + d[:, None])  # [D stored, D/2 natural]
            kb2 = tl.load(K_BASIS + h * D * D + (D // 2 + hd)[None, :] * D + d[:, None])
            km1 = tl.load(K_MEAN + h * D + hd)
            km2 = tl.load(K_MEAN + h * D + D // 2 + hd)
            inv_freq = tl.load(ROPE_F + hd)
            qs, qm = q1, km1  # unused
        else:
            # Query rotated into the key basis (stored order) and scaled by sigma (K_BASIS holds
            # basis * sigma in fp16); q.mean separately.
            qs = tl.zeros((M, D), tl.float32)
            qm = tl.zeros((M,), tl.float32)
            for k0 in tl.static_range(0, D, KC):
                k = k0 + tl.arange(0, KC)
                qc = tl.load(q_rows[:, None] + k[None, :], mask=row_ok[:, None], other=0.0)
                qs += tl.dot(qc.to(tl.float16), tl.load(K_BASIS + h * D * D + k[:, None] * D + d[None, :]))
                qm += tl.sum(qc.to(tl.float32) * tl.load(K_MEAN + h * D + k)[None, :], 1)
            qs = (qs * qk_scale).to(tl.float16)
            qm = qm * qk_scale
            q1, q2, kb1, kb2, km1, km2, inv_freq, hd = qs, qs, qs, qs, qm, qm, qm, d  # unused
        for t0 in range(start, end, BT):
            t = t0 + tl.arange(0, BT)
            nt = t + BT
            k_lo_n, k_hi_n, v_lo_n, v_hi_n, ksc_n, vsc_n = _load_block(
                k_rec, v_rec, k_sc, v_sc, skt, svt, skst, svst, nt, nt < end, k_uw, v_uw, K_NU, K_NW, K_ALIGNED,
                K_CROSSES, V_NU, V_NW, V_ALIGNED, V_CROSSES, K_SCALED, V_SCALED, K_LOG, V_LOG,
            )
            m_i, l_i, acc = _attend_block(
                qs, qm, m_i, l_i, acc, t0, t, t < end, b, l, row_ok, sink_lo, n_sinks, MASK, smb, sml, smt, softcap,
                k_lo, k_hi, ksc, k_ush, k_ssh, k_smask, k_lut, k_ps, k_ph, k_a1, k_a3, k_a5,
                v_lo, v_hi, vsc, v_ush, v_ssh, v_smask, v_lut, v_ps, v_ph, v_a1, v_a3, v_a5,
                q1, q2, kb1, kb2, km1, km2, inv_freq, hd, rope_scale, pos0, ROPE_D,
                K_NU, K_S, K_ALIGNED, K_CROSSES, K_IS_POLY, V_NU, V_S, V_ALIGNED, V_CROSSES, V_IS_POLY,
                F16, HAS_MASK, SOFTCAP, PTX, ROPE,
            )
            k_lo, k_hi, v_lo, v_hi, ksc, vsc = k_lo_n, k_hi_n, v_lo_n, v_hi_n, ksc_n, vsc_n
    else:
        # Exact tokens in the natural basis: the window, then the sinks that replace compressed slots.
        q = tl.load(q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        for w0 in range(0, n_window, BW):
            w = w0 + tl.arange(0, BW)
            w_ok = w < n_window
            w64 = w.to(tl.int64)
            kw = tl.load(WK + b64 * swkb + h * swkh + w64[:, None] * swkt + d[None, :], mask=w_ok[:, None], other=0.0)
            s = _finish_scores(tl.dot(q, tl.trans(kw.to(tl.float32))) * qk_scale, SOFTCAP, softcap)
            ok = _mask_cols(MASK, smb, sml, smt, b, l, n_compressed + w, w_ok, row_ok, HAS_MASK)
            m_i, l_i, alpha, p = _softmax_step(tl.where(ok, s, float("-inf")), m_i, l_i)
            vw = tl.load(WV + b64 * swvb + h * swvh + w64[:, None] * swvt + d[None, :], mask=w_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p, vw.to(tl.float32))
        if n_sinks > 0:
            j = tl.arange(0, BW)
            pos = sink_lo + j
            j_ok = (j < n_sinks) & (pos < n_compressed)
            j64 = j.to(tl.int64)
            ks = tl.load(SK + b64 * sskb + h * sskh + j64[:, None] * sskt + d[None, :], mask=j_ok[:, None], other=0.0)
            s = _finish_scores(tl.dot(q, tl.trans(ks.to(tl.float32))) * qk_scale, SOFTCAP, softcap)
            ok = _mask_cols(MASK, smb, sml, smt, b, l, pos, j_ok, row_ok, HAS_MASK)
            m_i, l_i, alpha, p = _softmax_step(tl.where(ok, s, float("-inf")), m_i, l_i)
            vs = tl.load(SV + b64 * ssvb + h * ssvh + j64[:, None] * ssvt + d[None, :], mask=j_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p, vs.to(tl.float32))
    part = ((b64 * n_heads + h) * (n_splits + 1) + split) * (G * LQ)
    tl.store(PM + part + m, m_i, mask=row_ok)
    tl.store(PL + part + m, l_i, mask=row_ok)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_rows = PO + (part + m)[:, None] * D
    if split < n_splits:
        # History partials are in the value basis: x = (basis * sigma) z + mean, rotated here (once
        # per split, in chunks of output coordinates) so the combine is a plain merge it parallelizes.
        z = o.to(tl.float16)
        for c0 in tl.static_range(0, D, KC):
            c = c0 + tl.arange(0, KC)
            basis_t = tl.load(V_BASIS + h * D * D + c[None, :] * D + d[:, None])  # [D stored, KC natural]
            x = tl.dot(z, basis_t) + tl.load(V_MEAN + h * D + c)[None, :]
            tl.store(o_rows + c[None, :], x, mask=row_ok[:, None])
    else:
        tl.store(o_rows + d[None, :], o, mask=row_ok[:, None])


@triton.jit
def _combine_kernel(
    PO, PM, PL, O, sob, soh, sol, n_parts,
    G: tl.constexpr, LQ: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, SB: tl.constexpr,
    PDL: tl.constexpr,
):
    h = tl.program_id(0)
    b = tl.program_id(1)
    c = tl.program_id(2) * DC + tl.arange(0, DC)
    n_heads = tl.num_programs(0)
    r = tl.arange(0, R)
    row_ok = r < G * LQ
    first = (b.to(tl.int64) * n_heads + h) * n_parts
    # One online pass over the normalized partials, SB parts at a time (their loads are in flight together).
    m_run = tl.full((R,), float("-inf"), tl.float32)
    l_run = tl.zeros((R,), tl.float32)
    o_run = tl.zeros((R, DC), tl.float32)
    if PDL:
        gdc_wait()  # launched early (programmatic dependent launch): wait for the split kernel's partials
    for k0 in range(0, n_parts, SB):
        k = k0 + tl.arange(0, SB)
        ok = (k < n_parts)[:, None] & row_ok[None, :]
        rows = (first + k)[:, None] * (G * LQ) + r[None, :]
        m_run, l_run, o_run = merge_partials_step(PO, PM, PL, rows, ok, c, D, m_run, l_run, o_run)
    out = tl.where(l_run[:, None] > 0, o_run / tl.where(l_run > 0, l_run, 1.0)[:, None], 0.0)
    g = r // LQ
    l = r % LQ
    ptr = O + b.to(tl.int64) * sob + (h * G + g).to(tl.int64)[:, None] * soh + l[:, None] * sol + c[None, :]
    tl.store(ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None])


def attention_unsupported_reason(query: torch.Tensor, kv: CompressedKV) -> str | None:
    """Why :func:`compressed_attention_triton` cannot take these inputs, or None if it can."""
    for q in (kv.key_quantizer, kv.value_quantizer):
        reason = unsupported_reason(q)
        if reason:
            return reason
    if kv.key_skip or kv.value_skip:
        return "the history starts inside a block of a block codec"
    b, hq, lq, d = query.shape
    if kv.key_rope is not None:
        if not isinstance(kv.key_rope, LinearRope):
            return "keys are stored before RoPE with a RoPE whose frequencies change with length"
        if 2 * kv.key_rope.inv_freq.numel() != d or d < 32:
            return "keys are stored before RoPE with a partial rotary dimension or a head_dim below 32"
    h = kv.key_quantizer.heads
    if hq % h:
        return f"{hq} query heads cannot share {h} KV heads"
    if (hq // h) * lq > MAX_ROWS:
        return f"{hq // h} query heads per KV head x {lq} query tokens exceeds {MAX_ROWS} rows"
    if d != kv.key_quantizer.dim or d != kv.value_quantizer.dim:
        return "query, key and value head dims differ"
    return None


def _splits(
    n_compressed: int, rows: int, block: int, device: torch.device, min_blocks: int, per_sm: int, fill: int
) -> tuple[int, int]:
    """(number of splits, tokens per split) for ``rows`` (batch x KV heads) histories of ``block``-token
    blocks: splits of ``min_blocks`` blocks each (a program's set-up and rotation back cost about a
    block, so long splits amortize them), but at least ``fill`` programs per multiprocessor and at
    most ``per_sm`` (several waves keep the last one short), and never more splits than blocks."""
    blocks = triton.cdiv(n_compressed, block)
    if blocks == 0:
        return 0, block
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = max(triton.cdiv(blocks, min_blocks), triton.cdiv(fill * sms, rows))
    want = max(1, min(want, triton.cdiv(per_sm * sms, rows), blocks))
    per = triton.cdiv(blocks, want)
    return triton.cdiv(blocks, per), per * block


def _poly_arg(tables: KernelTables) -> torch.Tensor:
    """The polynomial coefficient table, or any tensor where the codebook is a lookup table."""
    return tables.poly if tables.poly is not None else tables.levels32


def _words(records: torch.Tensor) -> torch.Tensor:
    """uint8 records ``[B, H, T, R]`` (R a multiple of 4) as int32 words ``[B, H, T, R/4]``, no copy."""
    if records.stride(-1) != 1 or records.storage_offset() % 4 or any(s % 4 for s in records.stride()[:-1]):
        records = records.contiguous()
    return records.view(torch.int32)


def compressed_attention_triton(
    query: torch.Tensor,
    kv: CompressedKV,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
    **tuning,
) -> torch.Tensor:
    """Fused attention of ``query [B, Hq, Lq, D]`` over ``kv`` (contract: the reference).
    ``tuning`` overrides :data:`TUNING` (and, for keys before RoPE, :data:`ROPE_TUNING`):
    ``block_t`` (tokens per step; halved for head_dim 256), ``num_warps``, ``min_blocks`` (blocks
    per split), ``fill`` and ``per_sm`` (least and most programs per multiprocessor), ``maxnreg``
    (register cap per thread, None for none, or a pair: for word-aligned records and for records
    whose units straddle words), ``fp16_levels`` (polynomial codebook levels computed in fp16, else
    float32)."""
    unknown = set(tuning) - set(TUNING)
    if unknown:
        raise ValueError(f"unknown tuning option(s) {sorted(unknown)}; valid: {sorted(TUNING)}")
    opts = {**TUNING, **(ROPE_TUNING if kv.key_rope is not None else {}), **tuning}
    reason = attention_unsupported_reason(query, kv)
    if reason:
        raise ValueError(f"the fused kernel cannot run this attention: {reason}; use compressed_attention")
    kt: KernelTables = tables_of(kv.key_quantizer)
    vt: KernelTables = tables_of(kv.value_quantizer)
    b, hq, lq, d = query.shape
    h = kt.heads
    g = hq // h
    rows = g * lq
    m_rows = max(16, triton.next_power_of_2(rows))
    tc = kv.compressed_length
    n_window = kv.window_keys.shape[2]
    if query.stride(-1) != 1:
        query = query.contiguous()
    bt = opts["block_t"] if d <= 128 else max(16, opts["block_t"] // 2)
    n_splits, split_len = _splits(tc, b * h, bt, query.device, opts["min_blocks"], opts["per_sm"], opts["fill"])
    kw, vw = _words(kv.key.records), _words(kv.value.records)
    ksc = kv.key.scales if kt.scaled else kv.window_keys
    vsc = kv.value.scales if vt.scaled else kv.window_keys
    n_sinks = kv.sink_keys.shape[2] if kv.sink_keys is not None else 0
    sk = kv.sink_keys if n_sinks else kv.window_keys
    sv = kv.sink_values if n_sinks else kv.window_values
    if mask is not None:
        if mask.shape != (b, lq, kv.length):
            raise ValueError(f"mask must be [B, Lq, Tc + W] = {(b, lq, kv.length)}, got {tuple(mask.shape)}")
        mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)
        mask_strides = mask_arg.stride()
    else:
        mask_arg, mask_strides = query, (0, 0, 0)
    scale = d**-0.5 if scaling is None else scaling
    qk_scale = scale if softcap is not None else scale * LOG2E
    parts = n_splits + 1
    po = torch.empty(b, h, parts, rows, d, dtype=torch.float32, device=query.device)
    pm = torch.empty(b, h, parts, rows, dtype=torch.float32, device=query.device)
    pl = torch.empty_like(pm)
    out = torch.empty_like(query)
    kc = min(d, ROTATION_TILE // d)
    rope = kv.key_rope
    rope_freq = rope.inv_freq.to(query.device) if rope is not None else pm
    rope_offsets = rope.offset_table(bt, query.device) if rope is not None else pm
    # Programmatic dependent launch (Hopper and later): the combine is launched while the split kernel
    # runs and waits for its results, hiding part of its launch latency (H100, batch 1 / 4k with inputs
    # in L2: 17.5 -> 16.9 us; within noise when they come from memory).
    pdl = PDL_SUPPORTED and query.is_cuda and torch.cuda.get_device_capability(query.device)[0] >= 9
    maxnreg = opts["maxnreg"]
    if isinstance(maxnreg, tuple):
        maxnreg = maxnreg[kt.crosses or vt.crosses]
    _split_kernel[(parts, h, b)](
        query, query.stride(0), query.stride(1), query.stride(2),
        kw, kw.stride(0), kw.stride(1), kw.stride(2), ksc, *ksc.stride()[:3],
        vw, vw.stride(0), vw.stride(1), vw.stride(2), vsc, *vsc.stride()[:3],
        kv.window_keys, *kv.window_keys.stride()[:3], kv.window_values, *kv.window_values.stride()[:3],
        sk, *sk.stride()[:3], sv, *sv.stride()[:3], kv.sink_pos,
        mask_arg, *mask_strides,
        kt.unit_word, kt.unit_shift, kt.slot_shift, kt.slot_mask, kt.levels16, _poly_arg(kt), kt.basis_sigma16,
        kt.mean, vt.unit_word, vt.unit_shift, vt.slot_shift, vt.slot_mask, vt.levels16, _poly_arg(vt),
        vt.basis_sigma16, vt.mean, po, pm, pl,
        tc, n_window, n_sinks, n_splits, split_len, qk_scale, softcap if softcap is not None else 1.0,
        rope_freq, rope_offsets, rope.scaling if rope is not None else 1.0, kv.key_first,
        K_LUTN=kt.table_size, V_LUTN=vt.table_size,
        G=g, LQ=lq, M=m_rows, D=d,
        K_S=kt.slots, K_NU=kt.units, K_NW=kt.words, K_ALIGNED=kt.aligned, K_CROSSES=kt.crosses,
        V_S=vt.slots, V_NU=vt.units, V_NW=vt.words, V_ALIGNED=vt.aligned, V_CROSSES=vt.crosses,
        K_SCALED=kt.scaled, V_SCALED=vt.scaled, K_LOG=kt.log_scale, V_LOG=vt.log_scale,
        K_IS_POLY=kt.poly_terms, V_IS_POLY=vt.poly_terms, F16=opts["fp16_levels"],
        HAS_MASK=mask is not None, SOFTCAP=softcap is not None,
        BT=bt, BW=max(32, triton.next_power_of_2(n_sinks)), KC=kc,
        PTX=query.is_cuda, ROPE=rope is not None, PDL=pdl,
        num_warps=opts["num_warps"],
        **({"maxnreg": maxnreg} if maxnreg and query.is_cuda else {}),
    )
    r_rows = triton.next_power_of_2(rows)
    dc = min(COMBINE_DC, d)
    sb = max(1, min(triton.next_power_of_2(parts), COMBINE_TILE // (r_rows * dc)))
    _combine_kernel[(h, b, d // dc)](
        po, pm, pl, out, out.stride(0), out.stride(1), out.stride(2), parts,
        G=g, LQ=lq, R=r_rows, D=d, DC=dc, SB=sb, PDL=pdl, num_warps=4, **({"launch_pdl": True} if pdl else {}),
    )
    return out


__all__ = ["attention_unsupported_reason", "compressed_attention_triton"]
