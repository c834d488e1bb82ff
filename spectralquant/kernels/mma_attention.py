"""Decode attention on integer tensor cores, for records in fragment order, in four launches.

Reference: :func:`~spectralquant.kernels.reference.compressed_attention_reference` (whole call),
:func:`query_fragments_reference` and :func:`history_partials_reference` (the first two steps).

It applies where every coordinate of a head has the same width (2 or 4 bits), the levels are
evenly spaced (``codebook="linear"``: level ``A (c - h)``, ``h = (2**b - 1) / 2``) and the records
are in fragment order (``QuantizerConfig.fragments``; :func:`spectralquant.packing.fragment_offsets`).
Then no code needs level arithmetic: keys enter an integer product as the unsigned bytes they are,
and values need one ``lop3`` and one exact fp16 subtraction per two codes.

1. ``_query_kernel`` (Triton), grid ``(H, B)``: rotates the ``G <= 8`` query rows of a KV head into
   the key basis with the decode scales folded in (``q_s = q (basis * level_scale * A) * qk_scale``,
   log2 units), writes them as 16-bit fixed point split into a high and a low signed byte, laid out
   as the B fragments of ``mma.m16n8k32`` (up to 4 rows: columns 0-3 high bytes, 4-7 low bytes, one
   product; 5-8 rows: one product of high bytes and one of low bytes), and per row the fixed-point
   step, ``step * h * sum(q_int)`` and ``q . mean``.
2. ``history_attention`` (CUDA C++, compiled at run time by NVRTC), grid ``(splits, B * H)``, one
   warp per split: for 16 tokens at a time, keys are the rows of the integer product (scores of
   both query pieces joined by one shuffle, or from the two products), then an online softmax over the split
   (rescaled only when a row maximum grows), and ``O^T += V^T P^T`` on fp16 tensor cores with the
   output coordinates as rows (``P^T`` by two ``movmatrix`` transposes of the score fragment).
   Writes normalized partials in the value basis, in units of the value levels' step. Sink
   positions and masked tokens are skipped.
3. ``_merge_kernel`` (Triton), grid ``(B * H, D / 32)``: merges the split partials, 32 output
   coordinates per program.
4. ``_finish_kernel`` (Triton), grid ``(H, B)``: runs the exact tokens (fp16 window and sinks) in
   the natural basis, rotates the merge back once (``x = (basis * level_scale * A) z + mean``) and
   merges the two.

On Hopper, 2-4 are programmatic dependent launches (2 through ``cuLaunchKernelEx``): each may start
while the previous kernel runs, does what does not depend on it (the history kernel loads its first
records, the finish kernel runs the exact tokens) and then waits for it.

Limits (the dispatcher uses the other kernels outside them): one query token, at most 8 query
heads per KV head, head_dim 64 or 128, 8-bit log scales, keys stored after RoPE, no soft-capping;
a CUDA GPU of compute capability >= 8.0 and ``torch.cuda._compile_kernel``.
"""

from __future__ import annotations

import ctypes
import functools
import math
import struct
import weakref

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..compressed_kv import CompressedKV
from ..packing import FRAGMENT_BITS
from ..quantizer import Quantizer, decode_scale
from .triton_attention import LOG2E, PDL_SUPPORTED, _softmax_step, _words, merge_partials_step

MAX_ROWS = 8  # query rows per KV head: up to 4 share one integer product (columns 4-7 hold their low
# bytes); 5-8 take two (high bytes, then low bytes, in all 8 columns)
QMAX = 32639  # fixed-point query range: 256 * hi + lo with hi, lo signed bytes
DIMS = (64, 128)
WARPS = 1  # warps per block; each is one split (fastest in the probe, benchmarks/results/cuda_probe_imma.json)
# Splits: warps' worth per multiprocessor (half as many while the grid has fewer than 64 KV-head rows),
# and at least MIN_SPLIT tokens each. H100, 4 / 4 bits (benchmarks/results/kernels_mma_tune.json):
# 8 per SM is fastest at batch 1 (4k: 17.7 us, 32k: 30.5 us; 16 per SM: 18.6, 36.0), 16 at batch 8 / 32k
# (118.2 us; 8 per SM: 132.8).
SPLITS_PER_SM = 16
FEW_ROWS = 64
MIN_SPLIT = 64  # tokens
MERGE_DC = 32  # output coordinates per merge program
MERGE_SPLITS = 32  # split partials a merge program loads at a time

SOURCE = r"""
#define D __D__
#define R __R__              // query rows per KV head the kernel computes: 4 or 8
#define KB __KB__
#define VB __VB__
#define KW (D * KB / 128)    // key words per lane (lane % 4 picks which)
#define VW (D * VB / 256)    // value words per lane (lane / 4 picks which)
#define KR_PER_WORD (8 / KB) // key A-registers (4 codes each) per word
#define KMASK (KB == 4 ? 0x0F0F0F0Fu : 0x03030303u)
#define VPER (16 / VB)       // value codes per 16-bit half
#define VMASK2 (VB == 4 ? 0x001E001Eu : 0x00060006u)
#define NEG_INF __int_as_float(0xff800000)
#define FULL 0xffffffffu

__device__ __forceinline__ float ex2(float x) {
  float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  unsigned d; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d; }
__device__ __forceinline__ unsigned prmt(unsigned a, unsigned b, unsigned s) {
  unsigned d; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s)); return d; }
__device__ __forceinline__ unsigned and_or(unsigned a, unsigned m, unsigned c) {
  unsigned d; asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(m), "r"(c)); return d; }
__device__ __forceinline__ unsigned hsub2(unsigned a, unsigned b) {
  unsigned d; asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d; }
__device__ __forceinline__ unsigned trans(unsigned a) {
  unsigned d; asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(d) : "r"(a)); return d; }
__device__ __forceinline__ void imma(int* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, uint2 b) {
  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
    : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b.x), "r"(b.y)); }
__device__ __forceinline__ void hmma(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                     unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
    : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1)); }
__device__ __forceinline__ float scale_of(unsigned char c) { return c ? ex2(((float)c - 128.f) * 0.0625f) : 0.f; }

template <int N> __device__ __forceinline__ void load_words(unsigned* w, const unsigned* p) {
  if constexpr (N % 4 == 0) {
    #pragma unroll
    for (int i = 0; i < N; i += 4) {
      const uint4 v = *reinterpret_cast<const uint4*>(p + i);
      w[i] = v.x; w[i + 1] = v.y; w[i + 2] = v.z; w[i + 3] = v.w;
    }
  } else if constexpr (N == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(p); w[0] = v.x; w[1] = v.y;
  } else {
    w[0] = *p;
  }
}
// Key A-register j: the codes of coordinates 32 (j / 2) + 16 (j % 2) + 4 tq + 0..3, one per byte.
__device__ __forceinline__ unsigned key_reg(const unsigned* w, int j) {
  const int r = j % KR_PER_WORD; const unsigned x = w[j / KR_PER_WORD];
  return (r ? x >> (KB * r) : x) & KMASK; }
// 2 (c - h) in fp16 for the codes at slot k of both halves of z (two tokens): each code lands at bits 1.. of
// its half as 1024 + 2 c + 1; h2 holds 1024 + 2^VB in both halves (1024 + h itself is not an fp16).
__device__ __forceinline__ unsigned value_reg(unsigned z, int k, unsigned h2) {
  return hsub2(and_or(k ? z >> (VB * k - 1) : z << 1, VMASK2, 0x64016401u), h2); }

struct Tile { unsigned ka[KW], kb[KW], v[4][VW]; unsigned char ks0, ks1, vs0, vs1; bool oka, okb; };
// Keys, scales and mask of tokens t0 + g and t0 + 8 + g (the rows this lane holds in both products);
// values of tokens t0 + 2 tq + {0, 1, 8, 9} (its columns of V^T). Indices are clamped to the history.
__device__ __forceinline__ Tile load_tile(
    const unsigned* kr, int skt, const unsigned* vr, int svt, const unsigned char* ks, int sst,
    const unsigned char* vs, int svst, const unsigned char* mask, int smt, int t0, int end, int T, long sink_lo,
    int n_sinks, int g, int tq) {
  Tile x;
  const long ta = min(t0 + g, T - 1), tb = min(t0 + 8 + g, T - 1);
  load_words<KW>(x.ka, kr + ta * skt + tq * KW);
  load_words<KW>(x.kb, kr + tb * skt + tq * KW);
  #pragma unroll
  for (int e = 0; e < 4; ++e)
    load_words<VW>(x.v[e], vr + (long)min(t0 + 2 * tq + (e & 1) + 8 * (e >> 1), T - 1) * svt + g * VW);
  x.ks0 = ks[ta * sst]; x.ks1 = ks[tb * sst]; x.vs0 = vs[ta * svst]; x.vs1 = vs[tb * svst];
  x.oka = t0 + g < end && (t0 + g < sink_lo || t0 + g >= sink_lo + n_sinks);
  x.okb = t0 + 8 + g < end && (t0 + 8 + g < sink_lo || t0 + 8 + g >= sink_lo + n_sinks);
  if (mask) { x.oka = x.oka && mask[ta * smt]; x.okb = x.okb && mask[tb * smt]; }
  return x;
}

// Grid (ceil(splits / WARPS), B * H); warp w of block x handles split x * WARPS + w of row y = b * H + h.
// KR, VR: records as 32-bit words [B, H, T, R / 4] (strides in words); KS, VS: uint8 log scales [B, H, T].
// MASK: uint8 [B, T] (strides b, t), read if has_mask. QF [B * H, D / 32, R / 4, 32] uint2, QP [B * H, R, 3].
// Integer arguments are C ints: torch's launcher passes Python ints so.
// PO [B * H, S, R, D], PM / PL [B * H, S, R]: normalized partials in the value basis (units of the step).
extern "C" __global__ void __launch_bounds__(32 * __WARPS__) history_attention(
    const unsigned* __restrict__ KR, int skb, int skh, int skt,
    const unsigned* __restrict__ VR, int svb, int svh, int svt,
    const unsigned char* __restrict__ KS, int ssb, int ssh, int sst,
    const unsigned char* __restrict__ VS, int svsb, int svsh, int svst,
    const unsigned char* __restrict__ MASK, int has_mask, int smb, int smt, const long long* __restrict__ SPOS,
    int n_sinks,
    const uint2* __restrict__ QF, const float* __restrict__ QP,
    float* __restrict__ PO, float* __restrict__ PM, float* __restrict__ PL,
    int H, int T, int split_len, int n_splits, unsigned h2) {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");  // the merge kernel may be scheduled now; it waits for us
#endif
  const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int split = blockIdx.x * __WARPS__ + (threadIdx.x >> 5);
  if (split >= n_splits) return;
  const long row = blockIdx.y, b = row / H, h = row % H;
  const unsigned* kr = KR + b * skb + h * skh;
  const unsigned* vr = VR + b * svb + h * svh;
  const unsigned char* ks = KS + b * ssb + h * ssh;
  const unsigned char* vs = VS + b * svsb + h * svsh;
  const unsigned char* mask = has_mask ? MASK + b * smb : nullptr;
  const long sink_lo = SPOS[b];
  // Lanes whose score columns are query rows 2 tq, 2 tq + 1 (with 4 rows, columns 4-7 are their low pieces).
  const bool live = R == 8 || tq < 2;
  const int start = split * split_len, end = min(start + split_len, T);
  Tile cur = load_tile(kr, skt, vr, svt, ks, sst, vs, svst, mask, smt, start, end, T, sink_lo, n_sinks, g, tq);
#if __CUDA_ARCH__ >= 900
  // Launched while the query kernel may still run (a programmatic dependent launch): the first records are
  // on their way; wait for the query fragments. A no-op for a plain launch.
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  uint2 qf[D / 32], ql[R == 8 ? D / 32 : 1];  // high pieces (and low pieces with 4 rows); low pieces with 8
  #pragma unroll
  for (int i = 0; i < D / 32; ++i) {
    qf[i] = QF[((row * (D / 32) + i) * (R / 4)) * 32 + lane];
    if constexpr (R == 8) ql[i] = QF[((row * (D / 32) + i) * 2 + 1) * 32 + lane];
  }
  float qstep[2], qh[2], qm[2];
  #pragma unroll
  for (int e = 0; e < 2; ++e) {
    const float* p = QP + (row * R + (live ? 2 * tq + e : 0)) * 3;
    qstep[e] = p[0]; qh[e] = p[1]; qm[e] = p[2];
  }
  float o[D / 16][4];
  #pragma unroll
  for (int c = 0; c < D / 16; ++c) o[c][0] = o[c][1] = o[c][2] = o[c][3] = 0.f;
  float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
  for (int t0 = start; t0 < end; t0 += 16) {
    const Tile nxt = load_tile(kr, skt, vr, svt, ks, sst, vs, svst, mask, smt, t0 + 16, end, T, sink_lo, n_sinks,
                               g, tq);  // software pipelining by hand
    int acc[2][4] = {}, accl[2][4] = {};  // two accumulators each halve the chain of dependent products
    #pragma unroll
    for (int i = 0; i < D / 32; ++i) {
      const unsigned a0 = key_reg(cur.ka, 2 * i), a1 = key_reg(cur.kb, 2 * i);
      const unsigned a2 = key_reg(cur.ka, 2 * i + 1), a3 = key_reg(cur.kb, 2 * i + 1);
      imma(acc[i & 1], a0, a1, a2, a3, qf[i]);
      if constexpr (R == 8) imma(accl[i & 1], a0, a1, a2, a3, ql[i]);
    }
    float sc[4];
    const float ksa = scale_of(cur.ks0), ksb = scale_of(cur.ks1);
    #pragma unroll
    for (int e = 0; e < 4; ++e) {  // e: (token g | g + 8) x (row 2 tq | 2 tq + 1)
      const int hi = acc[0][e] + acc[1][e];
      int lo;
      if constexpr (R == 8) lo = accl[0][e] + accl[1][e];
      else lo = __shfl_xor_sync(FULL, hi, 2);  // the low piece, two lanes over
      const bool ok = live && (e < 2 ? cur.oka : cur.okb);
      sc[e] = ok ? (e < 2 ? ksa : ksb) * (qstep[e & 1] * (float)(256 * hi + lo) - qh[e & 1]) + qm[e & 1] : NEG_INF;
    }
    float mt[2] = {fmaxf(sc[0], sc[2]), fmaxf(sc[1], sc[3])};
    if (__any_sync(FULL, mt[0] > m[0] || mt[1] > m[1])) {  // rescale only when a row maximum grew
      #pragma unroll
      for (int x = 4; x < 32; x <<= 1) {
        mt[0] = fmaxf(mt[0], __shfl_xor_sync(FULL, mt[0], x));
        mt[1] = fmaxf(mt[1], __shfl_xor_sync(FULL, mt[1], x));
      }
      float alpha[2];
      #pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float mn = fmaxf(m[e], mt[e]);
        alpha[e] = ex2(m[e] - (mn == NEG_INF ? 0.f : mn));
        l[e] *= alpha[e];
        m[e] = mn;
      }
      #pragma unroll
      for (int c = 0; c < D / 16; ++c) {
        o[c][0] *= alpha[0]; o[c][1] *= alpha[1]; o[c][2] *= alpha[0]; o[c][3] *= alpha[1];
      }
    }
    float p[4];
    #pragma unroll
    for (int e = 0; e < 4; ++e) p[e] = ex2(sc[e] - (m[e & 1] == NEG_INF ? 0.f : m[e & 1]));
    l[0] += p[0] + p[2];
    l[1] += p[1] + p[3];
    const float vsa = scale_of(cur.vs0), vsb = scale_of(cur.vs1);
    // This lane holds P[token g][rows 2 tq, 2 tq + 1] (and token g + 8); transposed, it holds
    // P[tokens 2 tq, 2 tq + 1][row g]: the B fragment of V^T P^T.
    const unsigned b0 = trans(pack2(p[0] * vsa, p[1] * vsa)), b1 = trans(pack2(p[2] * vsb, p[3] * vsb));
    #pragma unroll
    for (int c = 0; c < D / 16; ++c) {  // output coordinates 16 c + g (slot 2 c) and 16 c + 8 + g (slot 2 c + 1)
      const int zi = (2 * c) / VPER, k = (2 * c) % VPER, u = zi >> 1;
      const unsigned sel = (zi & 1) ? 0x7632u : 0x5410u;
      const unsigned za = prmt(cur.v[0][u], cur.v[1][u], sel), zb = prmt(cur.v[2][u], cur.v[3][u], sel);
      hmma(o[c], value_reg(za, k, h2), value_reg(za, k + 1, h2), value_reg(zb, k, h2), value_reg(zb, k + 1, h2),
           b0, b1);
    }
    cur = nxt;
  }
  #pragma unroll
  for (int x = 4; x < 32; x <<= 1) {
    l[0] += __shfl_xor_sync(FULL, l[0], x);
    l[1] += __shfl_xor_sync(FULL, l[1], x);
  }
  if (live) {
    #pragma unroll
    for (int e = 0; e < 2; ++e) {
      const long part = (row * n_splits + split) * R + 2 * tq + e;
      const float inv = l[e] > 0.f ? 0.5f / l[e] : 0.f;  // the values were 2 (c - h)
      #pragma unroll
      for (int c = 0; c < D / 16; ++c) {
        PO[part * D + 16 * c + g] = o[c][e] * inv;
        PO[part * D + 16 * c + 8 + g] = o[c][2 + e] * inv;
      }
      if (g == 0) { PM[part] = m[e]; PL[part] = l[e]; }
    }
  }
}
"""

_COMPILED: dict[tuple[int, ...], object] = {}


def _history_kernel(d: int, rows: int, kbits: int, vbits: int, device: torch.device):
    """The CUDA history kernel for head_dim ``d``, ``rows`` query rows and key / value widths,
    compiled once per process and GPU (a compiled module belongs to the device it was loaded on)."""
    key = (d, rows, kbits, vbits, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _COMPILED:
        source = SOURCE
        for name, value in (("__D__", d), ("__R__", rows), ("__KB__", kbits), ("__VB__", vbits), ("__WARPS__", WARPS)):
            source = source.replace(name, str(value))
        with torch.cuda.device(key[-1]):
            _COMPILED[key] = torch.cuda._compile_kernel(source, "history_attention")
    return _COMPILED[key]


# ------------------------------------------------------------------------------------- tables


class MmaTables:
    """What the kernels need about a key and a value quantizer: widths, the key basis with the decode
    scales folded in (``basis * level_scale * A``, fp16 ``[H, D, D]``, natural x coordinate), the value
    basis likewise transposed (``[H, D, D]``, coordinate x natural), both means, ``h`` of the keys."""

    def __init__(self, key: Quantizer, value: Quantizer):
        self.kbits, self.vbits = int(key.widths[0, 0]), int(value.widths[0, 0])
        self.key_basis16 = (key.basis * (key.level_scale * _step(key))[:, None, :]).half().contiguous()
        value_basis = value.basis * (value.level_scale * _step(value))[:, None, :]
        self.value_basis16 = value_basis.transpose(1, 2).half().contiguous()
        self.key_mean, self.value_mean = key.mean.float().contiguous(), value.mean.float().contiguous()
        self.key_h = (2**self.kbits - 1) / 2
        # 1024 + 2**vbits as an fp16 pair (the history kernel's value offset), as a C int
        half = int(torch.tensor(1024 + 2**self.vbits, dtype=torch.float16).view(torch.int16)) & 0xFFFF
        self.value_offset2 = half * 0x10001 - 2**32 if half * 0x10001 >= 2**31 else half * 0x10001


_TABLES: weakref.WeakKeyDictionary[Quantizer, tuple[Quantizer, MmaTables]] = weakref.WeakKeyDictionary()


def tables_of(key: Quantizer, value: Quantizer) -> MmaTables:
    """Cached :class:`MmaTables` of a quantizer pair (built once per pair of objects)."""
    entry = _TABLES.get(key)
    if entry is None or entry[0] is not value:
        entry = _TABLES[key] = (value, MmaTables(key, value))
    return entry[1]


def _step(q: Quantizer) -> torch.Tensor:
    """``[H, 1]``: the spacing ``A`` of the evenly spaced unit levels at the quantizer's width."""
    b = int(q.widths[0, 0])
    return (q.unit_levels[:, b, 1] - q.unit_levels[:, b, 0])[:, None]


def _linear_levels(q: Quantizer) -> bool:
    b = int(q.widths[0, 0])
    levels = q.unit_levels[:, b, : 2**b].double().cpu()
    want = (levels[:, 1:2] - levels[:, :1]) * (torch.arange(2**b, dtype=torch.float64) - (2**b - 1) / 2)
    return bool(torch.allclose(levels, want, rtol=1e-5, atol=1e-6))


_REASONS: weakref.WeakKeyDictionary[Quantizer, dict[str, str | None]] = weakref.WeakKeyDictionary()


def quantizer_unsupported_reason(q: Quantizer, kind: str) -> str | None:
    """Why the tensor-core kernel cannot read ``q``'s ``kind`` (``keys`` / ``values``) records, or None.
    Cached per quantizer object (the answer reads its device tensors once)."""
    if not isinstance(q, Quantizer):
        return f"{type(q).__name__} is a baseline codec"
    known = _REASONS.setdefault(q, {})
    if kind not in known:
        known[kind] = _quantizer_reason(q, kind)
    return known[kind]


def _quantizer_reason(q: Quantizer, kind: str) -> str | None:
    if q.layout.fragments != kind:
        return f"the {kind} records are not in {kind} fragment order (QuantizerConfig.fragments={kind!r})"
    if q.dim not in DIMS:
        return f"head_dim {q.dim} is not one of {DIMS}"
    if int(q.widths[0, 0]) not in FRAGMENT_BITS or (q.widths != q.widths[0, 0]).any():
        return "coordinates of different widths"
    if q.config.codebook != "linear" or not _linear_levels(q):
        return "levels that are not evenly spaced (codebook='linear')"
    if not q.config.scale or q.config.scale_bits != 8:
        return "no 8-bit log scale per vector"
    return None


def mma_unsupported_reason(
    query: torch.Tensor, kv: CompressedKV, mask: torch.Tensor | None = None, softcap: float | None = None
) -> str | None:
    """Why :func:`compressed_attention_mma` cannot take these inputs, or None if it can."""
    if not query.is_cuda:
        return "the query is not on a CUDA device"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return "this torch has no torch.cuda._compile_kernel (NVRTC)"
    if _capability(query.device)[0] < 8:
        return "the GPU's compute capability is below 8.0"
    return inputs_unsupported_reason(query, kv, mask, softcap)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def inputs_unsupported_reason(
    query: torch.Tensor, kv: CompressedKV, mask: torch.Tensor | None = None, softcap: float | None = None
) -> str | None:
    """The device-independent part of :func:`mma_unsupported_reason`."""
    for q, kind in ((kv.key_quantizer, "keys"), (kv.value_quantizer, "values")):
        reason = quantizer_unsupported_reason(q, kind)
        if reason:
            return reason
    b, hq, lq, d = query.shape
    h = kv.key_quantizer.heads
    if lq != 1:
        return f"{lq} query tokens (the kernel takes one)"
    if hq % h or hq // h > MAX_ROWS:
        return f"{hq} query heads over {h} KV heads (the kernel takes at most {MAX_ROWS} per KV head)"
    if d != kv.key_quantizer.dim or d != kv.value_quantizer.dim:
        return "query, key and value head dims differ"
    if kv.key_rope is not None:
        return "keys stored before RoPE"
    if kv.key_skip or kv.value_skip:
        return "the history starts inside a block of a block codec"
    if softcap is not None:
        return "soft-capped scores"
    if mask is not None and mask.shape != (b, lq, kv.length):
        return f"mask must be [B, Lq, Tc + W] = {(b, lq, kv.length)}, got {tuple(mask.shape)}"
    return None


# -------------------------------------------------------------------------------- query kernel


def rows_for(groups: int) -> int:
    """Query rows per KV head the kernels compute for ``groups`` query heads per KV head: 4 or 8."""
    return 4 if groups <= 4 else 8


@triton.jit
def _query_kernel(Q, sqb, sqh, KB16, KMEAN, QF, QP, qk_scale, key_h,
                  G: tl.constexpr, R: tl.constexpr, D: tl.constexpr, RP: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()  # the history kernel may start loading records; it waits for QF and QP
    h = tl.program_id(0)
    b = tl.program_id(1)
    n_heads = tl.num_programs(0)
    r = tl.arange(0, RP)
    d = tl.arange(0, D)
    row_ok = r < G
    q = tl.load(Q + b.to(tl.int64) * sqb + (h * G + r).to(tl.int64)[:, None] * sqh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    basis = tl.load(KB16 + h * D * D + d[:, None] * D + d[None, :])
    qs = tl.dot(q.to(tl.float16), basis) * qk_scale  # [RP, D] in log2 units
    qm = tl.sum(q.to(tl.float32) * tl.load(KMEAN + h * D + d)[None, :], 1) * qk_scale
    amax = tl.max(tl.abs(qs), 1)
    step = tl.where(amax > 0, amax / 32639.0, 1.0)
    qi = tl.minimum(tl.maximum(tl.floor(qs / step[:, None] + 0.5), -32639.0), 32639.0)
    hi = tl.floor((qi + 128.0) / 256.0)
    lo = qi - 256.0 * hi
    # Byte of coordinate c for column n of B operand s: fragment set (c // 32) * R / 4 + s, lane
    # 4 n + (c % 16) // 4, register (c % 32) // 16, byte c % 4. With 4 rows the low bytes are columns
    # 4-7 of set 0; with 8, set 1.
    base = ((d // 32) * (R // 4) * 32 * 2 + ((d % 32) // 16)) * 4 + d % 4
    lane = 4 * r[:, None] + ((d % 16) // 4)[None, :]
    out = QF + (b * n_heads + h).to(tl.int64) * (2 * R * D)
    keep = (r < R)[:, None]
    tl.store(out + base[None, :] + lane * 8, hi.to(tl.int8), mask=keep)
    tl.store(out + base[None, :] + (lane + 16 * (R // 4)) * 8, lo.to(tl.int8), mask=keep)
    qp = QP + ((b * n_heads + h).to(tl.int64) * R + r) * 3
    tl.store(qp, step, mask=r < R)
    tl.store(qp + 1, key_h * step * tl.sum(qi, 1), mask=r < R)
    tl.store(qp + 2, qm, mask=r < R)


def query_fragments(query: torch.Tensor, tables: MmaTables, qk_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(QF [B * H, D / 32, R / 4, 32, 2] int32, QP [B * H, R, 3] float32)`` for ``query [B, Hq, 1, D]``,
    ``R = rows_for(Hq / H)`` (contract: :func:`query_fragments_reference`)."""
    b, hq, _, d = query.shape
    h = tables.key_basis16.shape[0]
    rows = rows_for(hq // h)
    if query.stride(-1) != 1:
        query = query.contiguous()
    qf = torch.empty(b * h, d // 32, rows // 4, 32, 2, dtype=torch.int32, device=query.device)
    qp = torch.empty(b * h, rows, 3, dtype=torch.float32, device=query.device)
    _query_kernel[(h, b)](
        query, query.stride(0), query.stride(1), tables.key_basis16, tables.key_mean, qf.view(torch.int8), qp,
        qk_scale, tables.key_h, G=hq // h, R=rows, D=d, RP=16, PDL=_pdl(query.device), num_warps=4,
    )
    return qf, qp


def query_fragments_reference(
    query: torch.Tensor, tables: MmaTables, qk_scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch spec of :func:`query_fragments`: also returns the fixed-point query ``[B * H, R, D]``
    (int32) as the third element, which the history reference reads."""
    b, hq, _, d = query.shape
    h = tables.key_basis16.shape[0]
    g = hq // h
    rows = rows_for(g)
    q = torch.zeros(b, h, 16, d, dtype=torch.float32, device=query.device)
    q[:, :, :g] = query[:, :, 0].float().reshape(b, h, g, d)
    qs = torch.einsum("bhrd,hde->bhre", q.half().float(), tables.key_basis16.float()) * qk_scale
    qm = torch.einsum("bhrd,hd->bhr", q, tables.key_mean) * qk_scale
    amax = qs.abs().amax(-1)
    step = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    qi = torch.floor(qs / step[..., None] + 0.5).clamp(-QMAX, QMAX)[:, :, :rows]
    hi = torch.floor((qi + 128) / 256)
    lo = qi - 256 * hi
    # The 8 columns of each B operand: (high bytes of rows 0-3, low bytes of rows 0-3), or with 8 rows
    # (high bytes of rows 0-7) then (low bytes of rows 0-7).
    operands = torch.cat([hi, lo], 2).reshape(b * h, rows // 4, 8, d)
    c = torch.arange(d, device=query.device)
    frag = torch.empty(b * h, d // 32, rows // 4, 32, 2, 4, dtype=torch.int8, device=query.device)
    for s in range(rows // 4):
        for n in range(8):
            frag[:, c // 32, s, 4 * n + (c % 16) // 4, (c % 32) // 16, c % 4] = operands[:, s, n].to(torch.int8)
    step = step[:, :, :rows].reshape(b * h, rows)
    qi = qi.reshape(b * h, rows, d)
    qp = torch.stack([step, tables.key_h * step * qi.sum(-1), qm[:, :, :rows].reshape(b * h, rows)], -1)
    return frag.view(torch.int32).reshape(b * h, d // 32, rows // 4, 32, 2), qp, qi.to(torch.int32)


# ----------------------------------------------------------------------------- history partials


def splits_of(n_compressed: int, rows: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, tokens per split) for ``rows`` (batch x KV heads) histories: about
    :data:`SPLITS_PER_SM` warps' worth of splits per multiprocessor (half that below
    :data:`FEW_ROWS` rows), at least :data:`MIN_SPLIT` tokens each, in multiples of 16."""
    if n_compressed == 0:
        return 0, MIN_SPLIT
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    per_sm = SPLITS_PER_SM if rows >= FEW_ROWS else SPLITS_PER_SM // 2
    want = max(1, per_sm * sms // rows)
    length = max(MIN_SPLIT, 16 * math.ceil(n_compressed / want / 16))
    return math.ceil(n_compressed / length), length


def _mask_bytes(mask: torch.Tensor) -> torch.Tensor:
    """The single query row of ``mask [B, 1, T]`` as uint8 ``[B, T]`` (1 = attend), without a copy for bool."""
    m = mask[:, 0]
    return m.view(torch.uint8) if m.dtype == torch.bool else (m != 0).view(torch.uint8)


def history_partials(
    kv: CompressedKV, mask: torch.Tensor | None, qf: torch.Tensor, qp: torch.Tensor, tables: MmaTables
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(PO [B * H, S, R, D], PM, PL [B * H, S, R], S)`` by the CUDA kernel, ``R`` the query rows of
    ``qp`` (contract: :func:`history_partials_reference`)."""
    b, h, tc, _ = kv.key.records.shape
    d = kv.key_quantizer.dim
    rows = qp.shape[1]
    n, length = splits_of(tc, b * h, qf.device)
    po = torch.empty(b * h, n, rows, d, dtype=torch.float32, device=qf.device)
    pm = torch.empty(b * h, n, rows, dtype=torch.float32, device=qf.device)
    pl = torch.empty_like(pm)
    if n == 0:
        return po, pm, pl, n
    kw, vw = _words(kv.key.records), _words(kv.value.records)
    ks, vs = kv.key.scales, kv.value.scales
    if mask is not None:
        m = _mask_bytes(mask)[:, :tc]
        mask_args = [m, 1, m.stride(0), m.stride(1)]
    else:
        mask_args = [ks, 0, 0, 0]  # any pointer: the kernel reads the mask only with has_mask
    args = [kw, *kw.stride()[:3], vw, *vw.stride()[:3], ks, *ks.stride(), vs, *vs.stride(), *mask_args,
            kv.sink_pos.to(torch.int64), kv.sink_keys.shape[2] if kv.sink_keys is not None else 0,
            qf, qp, po, pm, pl, h, tc, length, n, tables.value_offset2]
    launch(_history_kernel(d, rows, tables.kbits, tables.vbits, qf.device), (math.ceil(n / WARPS), b * h, 1),
           (32 * WARPS, 1, 1), args, qf.device, programmatic=_pdl(qf.device))
    return po, pm, pl, n


class _LaunchAttribute(ctypes.Structure):
    """``CUlaunchAttribute`` with an int value (``id``, padding, a 64-byte value union)."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    """``CUlaunchConfig``."""

    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


@functools.cache
def _driver():
    """The CUDA driver library with ``cuLaunchKernelEx`` (CUDA >= 12), or None."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        return lib if hasattr(lib, "cuLaunchKernelEx") else None
    except OSError:
        return None


@functools.cache
def _param_layout(pointers: tuple[bool, ...]) -> tuple[struct.Struct, tuple[int, ...]]:
    """How kernel arguments sit in one buffer (pointers 8 bytes, C ints 4, each naturally aligned): the
    packing and the offset of each argument."""
    fmt, offsets, offset = "<", [], 0
    for is_pointer in pointers:
        size = 8 if is_pointer else 4
        pad = -offset % size
        fmt += f"{pad}x" * bool(pad) + ("Q" if is_pointer else "i")
        offsets.append(offset + pad)
        offset += pad + size
    return struct.Struct(fmt), tuple(offsets)


def launch(kernel, grid: tuple, block: tuple, args: list, device: torch.device, programmatic: bool) -> None:
    """Launch an NVRTC kernel from ``torch.cuda._compile_kernel`` on ``device``'s current stream through
    ``cuLaunchKernelEx``; with ``programmatic``, as a programmatic dependent launch (it may start while
    the previous kernel runs; the kernel waits with ``griddepcontrol.wait``). Tensors are passed as
    pointers and ints as C ints (as torch's launcher passes them; out-of-range ints raise), all packed
    into one buffer (a ctypes object per argument cost about 150 us per call on the H100 host)."""
    stream = torch.cuda.current_stream(device)
    lib = _driver()
    if lib is None:
        kernel(grid=grid, block=block, args=args, stream=stream)
        return
    pointers = tuple(isinstance(a, torch.Tensor) for a in args)
    layout, offsets = _param_layout(pointers)
    values = layout.pack(*(a.data_ptr() if p else a for a, p in zip(args, pointers)))
    buffer = ctypes.create_string_buffer(values, layout.size)
    base = ctypes.addressof(buffer)
    params = (ctypes.c_void_p * len(offsets))(*(base + o for o in offsets))
    attr = _LaunchAttribute(id=PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), 0,
                           ctypes.c_void_p(stream.cuda_stream), ctypes.pointer(attr), int(programmatic))
    err = lib.cuLaunchKernelEx(ctypes.byref(config), kernel.func, params, None)
    if err:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA error {err}")


def _pdl(device: torch.device) -> bool:
    """Programmatic dependent launches: Hopper and later, with Triton >= 3.4."""
    return PDL_SUPPORTED and device.type == "cuda" and _capability(device)[0] >= 9


def history_partials_reference(
    kv: CompressedKV, mask: torch.Tensor | None, qi: torch.Tensor, qp: torch.Tensor, tables: MmaTables, n: int,
    length: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch spec of the history kernel over ``n`` splits of ``length`` tokens, from the fixed-point
    query ``qi [B * H, R, D]``: per split and row the max ``PM`` and sum ``PL`` of ``p = 2**(s - PM)``
    over its tokens (sinks and masked tokens excluded), ``s = scale * (step * qi . c - qp[1]) +
    qp[2]``, and ``PO = sum p vscale (c_v - h_v) / PL``."""
    b, h, tc, _ = kv.key.records.shape
    rows = qi.shape[1]
    if n == 0:
        empty = torch.zeros(b * h, 0, rows, device=qi.device)
        return empty[..., None].expand(-1, -1, -1, qi.shape[-1]), empty, empty

    def codes(q: Quantizer, records: torch.Tensor) -> torch.Tensor:  # [B, H, T, D]
        return q.layout.unpack(records.transpose(1, 2)).transpose(1, 2).double()

    kc = codes(kv.key_quantizer, kv.key.records)
    vc = codes(kv.value_quantizer, kv.value.records) - (2**tables.vbits - 1) / 2
    ks, vs = decode_scale(kv.key.scales).double(), decode_scale(kv.value.scales).double()
    qpd = qp.double().reshape(b, h, rows, 3)
    s = torch.einsum("bhrd,bhtd->bhrt", qi.double().reshape(b, h, rows, -1) * qpd[..., :1], kc)
    s = ks[:, :, None] * (s - qpd[..., 1:2]) + qpd[..., 2:3]
    t = torch.arange(tc, device=s.device)
    n_sinks = kv.sink_keys.shape[2] if kv.sink_keys is not None else 0
    ok = ~((t >= kv.sink_pos[:, None]) & (t < kv.sink_pos[:, None] + n_sinks))  # [B, T]
    if mask is not None:
        ok = ok & mask[:, 0, :tc]
    s = s.masked_fill(~ok[:, None, None], -math.inf)
    pad = n * length - tc
    s = torch.nn.functional.pad(s, (0, pad), value=-math.inf).reshape(b, h, rows, n, length)
    pm = s.amax(-1)
    p = torch.exp2(s - torch.where(pm == -math.inf, 0.0, pm)[..., None])
    pl = p.sum(-1)
    pv = torch.nn.functional.pad(p.reshape(b, h, rows, -1)[..., :tc] * vs[:, :, None], (0, pad))
    po = torch.einsum("bhrst,bhstd->bhrsd", pv.reshape(b, h, rows, n, length),
                      torch.nn.functional.pad(vc, (0, 0, 0, pad)).reshape(b, h, n, length, -1))
    po = po / torch.where(pl > 0, pl, 1.0)[..., None]
    flat = (b * h, n, rows)
    return tuple(x.float().contiguous() for x in (po.permute(0, 1, 3, 2, 4).reshape(*flat, -1),
                                                 pm.transpose(2, 3).reshape(flat), pl.transpose(2, 3).reshape(flat)))


# ------------------------------------------------------------------------------------- combine


@triton.jit
def _merge_kernel(PO, PM, PL, Z, ZM, ZL, n_splits, R: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
                  SB: tl.constexpr, PDL: tl.constexpr):
    """Program ``(bh, c)``: the split partials of one KV head merged for output coordinates
    ``[c DC, (c + 1) DC)`` of its R rows (one online pass, SB splits at a time)."""
    if PDL:
        gdc_launch_dependents()  # the finish kernel may start its exact tokens now
        gdc_wait()  # launched while the history kernel runs: wait for its partials
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * DC + tl.arange(0, DC)
    r = tl.arange(0, R)
    m_run = tl.full((R,), float("-inf"), tl.float32)
    l_run = tl.zeros((R,), tl.float32)
    z = tl.zeros((R, DC), tl.float32)
    for k0 in range(0, n_splits, SB):
        k = k0 + tl.arange(0, SB)
        ok = (k < n_splits)[:, None]
        rows = (bh * n_splits + k)[:, None] * R + r[None, :]
        m_run, l_run, z = merge_partials_step(PO, PM, PL, rows, ok, c, D, m_run, l_run, z)
    tl.store(Z + (bh * R + r)[:, None] * D + c[None, :], z / tl.where(l_run > 0, l_run, 1.0)[:, None])
    if tl.program_id(1) == 0:
        tl.store(ZM + bh * R + r, m_run)
        tl.store(ZL + bh * R + r, l_run)


@triton.jit
def _finish_kernel(
    Q, sqb, sqh, Z, ZM, ZL, VB16, VMEAN,
    WK, swkb, swkh, swkt, WV, swvb, swvh, swvt, n_window,
    SK, sskb, sskh, sskt, SV, ssvb, ssvh, ssvt, n_sinks, SPOS, n_compressed,
    MASK, smb, smt, O, sob, soh, qk_scale,
    G: tl.constexpr, R: tl.constexpr, D: tl.constexpr, RP: tl.constexpr, BW: tl.constexpr,
    HAS_MASK: tl.constexpr, PDL: tl.constexpr,
):
    """Program ``(h, b)``: the exact tokens in the natural basis (while the merge may still run), the
    merged history rotated back once, and one softmax over both."""
    h = tl.program_id(0)
    b = tl.program_id(1)
    n_heads = tl.num_programs(0)
    r = tl.arange(0, RP)
    d = tl.arange(0, D)
    row_ok = r < G
    b64 = b.to(tl.int64)
    bh = b64 * n_heads + h
    # 1. The exact tokens in the natural basis: the window, then the sinks that replace history slots.
    q = tl.load(Q + b64 * sqb + (h * G + r).to(tl.int64)[:, None] * sqh + d[None, :], mask=row_ok[:, None],
                other=0.0).to(tl.float32)
    m_e = tl.full((RP,), float("-inf"), tl.float32)
    l_e = tl.zeros((RP,), tl.float32)
    acc = tl.zeros((RP, D), tl.float32)
    for w0 in range(0, n_window, BW):
        w = w0 + tl.arange(0, BW)
        w_ok = w < n_window
        w64 = w.to(tl.int64)
        kw = tl.load(WK + b64 * swkb + h * swkh + w64[:, None] * swkt + d[None, :], mask=w_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(kw.to(tl.float32))) * qk_scale
        ok = row_ok[:, None] & w_ok[None, :]
        if HAS_MASK:
            ok = ok & (tl.load(MASK + b64 * smb + (n_compressed + w64) * smt, mask=w_ok, other=0) != 0)[None, :]
        m_e, l_e, alpha, p = _softmax_step(tl.where(ok, s, float("-inf")), m_e, l_e)
        vw = tl.load(WV + b64 * swvb + h * swvh + w64[:, None] * swvt + d[None, :], mask=w_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p, vw.to(tl.float32))
    if n_sinks > 0:
        j = tl.arange(0, BW)
        pos = tl.load(SPOS + b) + j
        j_ok = (j < n_sinks) & (pos < n_compressed)
        j64 = j.to(tl.int64)
        ks = tl.load(SK + b64 * sskb + h * sskh + j64[:, None] * sskt + d[None, :], mask=j_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(ks.to(tl.float32))) * qk_scale
        ok = row_ok[:, None] & j_ok[None, :]
        if HAS_MASK:
            ok = ok & (tl.load(MASK + b64 * smb + pos * smt, mask=j_ok, other=0) != 0)[None, :]
        m_e, l_e, alpha, p = _softmax_step(tl.where(ok, s, float("-inf")), m_e, l_e)
        vs = tl.load(SV + b64 * ssvb + h * ssvh + j64[:, None] * ssvt + d[None, :], mask=j_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p, vs.to(tl.float32))
    # 2. The history: x = (basis * level_scale * A) z + mean.
    basis = tl.load(VB16 + h * D * D + d[:, None] * D + d[None, :])  # [D coordinate, D natural]
    mean = tl.load(VMEAN + h * D + d)
    if PDL:
        gdc_wait()  # launched while the merge runs: wait for its results
    z = tl.load(Z + (bh * R + r)[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
    m_h = tl.load(ZM + bh * R + r, mask=row_ok, other=float("-inf"))
    l_h = tl.load(ZL + bh * R + r, mask=row_ok, other=0.0)
    x_h = tl.dot(z.to(tl.float16), basis) + mean[None, :]
    # 3. One softmax over both (acc is not normalized: its weight is exp2(m_e - m), its mass l_e).
    m = tl.maximum(m_h, m_e)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w_h = tl.exp2(m_h - m_use) * l_h
    w_e = tl.exp2(m_e - m_use)
    total = w_h + w_e * l_e
    out = (w_h[:, None] * x_h + w_e[:, None] * acc) / tl.where(total > 0, total, 1.0)[:, None]
    ptr = O + b64 * sob + (h * G + r).to(tl.int64)[:, None] * soh + d[None, :]
    tl.store(ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None])


def compressed_attention_mma(
    query: torch.Tensor,
    kv: CompressedKV,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
    history: str = "cuda",
) -> torch.Tensor:
    """Attention of ``query [B, Hq, 1, D]`` over ``kv`` (contract: the reference). ``history="reference"``
    computes the history partials with :func:`history_partials_reference` instead of the CUDA kernel
    (so the Triton steps can be tested without a GPU)."""
    reason = (mma_unsupported_reason if history == "cuda" else inputs_unsupported_reason)(query, kv, mask, softcap)
    if reason:
        raise ValueError(f"the tensor-core kernel cannot run this attention: {reason}; use compressed_attention")
    b, hq, _, d = query.shape
    tables = tables_of(kv.key_quantizer, kv.value_quantizer)
    h = kv.key_quantizer.heads
    scale = d**-0.5 if scaling is None else scaling
    qk_scale = scale * LOG2E
    if query.stride(-1) != 1:
        query = query.contiguous()
    tc = kv.compressed_length
    if history == "cuda":
        qf, qp = query_fragments(query, tables, qk_scale)
        po, pm, pl, n = history_partials(kv, mask, qf, qp, tables)
    else:
        _, qp, qi = query_fragments_reference(query, tables, qk_scale)
        n, length = splits_of(tc, b * h, query.device)
        po, pm, pl = history_partials_reference(kv, mask, qi, qp, tables, n, length)
    out = torch.empty_like(query)
    n_window = kv.window_keys.shape[2]
    n_sinks = kv.sink_keys.shape[2] if kv.sink_keys is not None else 0
    sk = kv.sink_keys if n_sinks else kv.window_keys
    sv = kv.sink_values if n_sinks else kv.window_values
    if mask is not None:
        mask_arg = _mask_bytes(mask)
        mask_strides = mask_arg.stride()
    else:
        mask_arg, mask_strides = query, (0, 0)
    rows = rows_for(hq // h)
    z = torch.empty(b * h, rows, d, dtype=torch.float32, device=query.device)
    zm = torch.empty(b * h, rows, dtype=torch.float32, device=query.device)
    zl = torch.empty_like(zm)
    # Programmatic dependent launches (Hopper and later): the merge starts while the history kernel
    # runs and the finish kernel's exact tokens while the merge runs; each waits before reading.
    pdl = _pdl(query.device)
    pdl_launch = {"launch_pdl": True} if pdl else {}
    _merge_kernel[(b * h, d // MERGE_DC)](
        po, pm, pl, z, zm, zl, n, R=rows, D=d, DC=MERGE_DC,
        SB=max(1, min(MERGE_SPLITS * 4 // rows, triton.next_power_of_2(max(n, 1)))), PDL=pdl, num_warps=4, **pdl_launch,
    )
    _finish_kernel[(h, b)](
        query, query.stride(0), query.stride(1), z, zm, zl, tables.value_basis16, tables.value_mean,
        kv.window_keys, *kv.window_keys.stride()[:3], kv.window_values, *kv.window_values.stride()[:3], n_window,
        sk, *sk.stride()[:3], sv, *sv.stride()[:3], n_sinks, kv.sink_pos, tc,
        mask_arg, *mask_strides, out, out.stride(0), out.stride(1), qk_scale,
        G=hq // h, R=rows, D=d, RP=16, BW=max(32, triton.next_power_of_2(n_sinks)), HAS_MASK=mask is not None,
        PDL=pdl, num_warps=4, **pdl_launch,
    )
    return out


__all__ = [
    "compressed_attention_mma",
    "history_partials_reference",
    "mma_unsupported_reason",
    "query_fragments",
    "query_fragments_reference",
]
