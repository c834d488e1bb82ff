"""How fast could a hand-written CUDA decode attention read packed records? A speed probe, not a
library kernel.

The Triton decode attention (``spectralquant/kernels/triton_attention.py``) spends about 9 SASS
instructions per code and is latency-bound (``benchmarks/results/kernels_notes.md``). This script
times a CUDA C++ kernel (compiled at run time by NVRTC through ``torch.cuda._compile_kernel``)
for the simplest record the method produces: every coordinate at 4 bits (``allocation="uniform"``),
the quintic polynomial codebook in packed fp16, an 8-bit log scale per vector, head_dim 128, up to 8
query rows per KV head (GQA). Codes sit in the order the tensor-core fragments read them, so each
thread extracts two codes per ``shift + lop3`` (as ``1024 + 2c + 1`` in fp16, which makes the
codebook's affine step a single exact ``fma``) and every warp runs its own online softmax: no
shared memory, no barriers. The query is taken already rotated into the key basis and the output is
left in the value basis (the library kernel does both rotations in each program; at batch 8 / 32k
they cost it 1-7%), and the partials are merged in PyTorch (the library's combine takes about
3.5 us). So the times are a floor for such a kernel, next to bf16 SDPA and the library kernel at 4
bits, measured in the same run.

    PYTHONPATH=. python benchmarks/cuda_probe.py --out benchmarks/results/cuda_probe.json

Checks the kernel against a PyTorch reference on the same codes first (relative error printed).
Needs a CUDA GPU with compute capability >= 8.0 and NVRTC.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from benchmarks.kernels import DIM, HKV, HQ, graph_time_us, quantizer_pair, sets_for, time_fused, time_sdpa
from spectralquant.codebook import gaussian_poly_coeffs
from spectralquant.quantizer import decode_scale

BITS = 4
ROWS = 8  # query rows per KV head the kernel handles (n = 8 of the m16n8k16 products)
WARPS = (1, 2, 4)  # warps per block the benchmark tries; each warp is one split with its own softmax

SOURCE = r"""
__device__ __forceinline__ unsigned hfma2(unsigned a, unsigned b, unsigned c) {
  unsigned d; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d; }
__device__ __forceinline__ unsigned hmul2(unsigned a, unsigned b) {
  unsigned d; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d; }
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  unsigned d; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d; }
__device__ __forceinline__ float ex2(float x) {
  float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
__device__ __forceinline__ unsigned prmt(unsigned a, unsigned b, unsigned s) {
  unsigned d; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s)); return d; }
// 1024 + 2c + 1 as fp16 in both halves, for the 4-bit codes at bits 4k..4k+3 of each half of t.
__device__ __forceinline__ unsigned codes2(unsigned t, int k) {
  unsigned s = k == 0 ? (t << 1) : (t >> (4 * k - 1)); unsigned d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(s), "r"(0x001E001Eu), "r"(0x64016401u)); return d; }
struct Poly { unsigned s, k, a1, a3, a5; };
// Levels of two codes: y = x s/2 - (512 s + 1) (exact), then y (a1 + y^2 (a3 + y^2 a5)).
__device__ __forceinline__ unsigned levels2(unsigned x, const Poly& p) {
  unsigned y = hfma2(x, p.s, p.k); unsigned y2 = hmul2(y, y);
  return hmul2(hfma2(hfma2(p.a5, y2, p.a3), y2, p.a1), y); }
__device__ __forceinline__ void mma(float* d, unsigned a0, unsigned a2, unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
    : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1)); }
#define NEG_INF __int_as_float(0xff800000)
__device__ __forceinline__ float scale_of(unsigned char c) { return c ? ex2(((float)c - 128.f) * 0.0625f) : 0.f; }

struct Tile { uint4 ka, kb; uint2 vw[4]; unsigned char ks[4], vs[4]; };
// The records a thread reads for the 16 tokens from t0: keys of tokens t0 + g and t0 + 8 + g (its
// B-fragment columns), values and both scales of tokens t0 + 2 tq + {0, 1, 8, 9}; indices clamped.
__device__ __forceinline__ Tile load_tile(const uint4* kr, const uint2* vr, const unsigned char* ks,
                                          const unsigned char* vs, int t0, int T, int g, int tq) {
  Tile x;
  x.ka = kr[(long)min(t0 + g, T - 1) * 4 + tq];
  x.kb = kr[(long)min(t0 + 8 + g, T - 1) * 4 + tq];
  for (int e = 0; e < 4; ++e) {
    const int t = min(t0 + 2 * tq + (e & 1) + 8 * (e >> 1), T - 1);
    x.vw[e] = vr[(long)t * 8 + g];
    x.ks[e] = ks[t];
    x.vs[e] = vs[t];
  }
  return x;
}

// Grid (ceil(splits / WARPS), B * H); warp w of block x handles split x * WARPS + w.
// KR [BH, T, 4] uint4: word 4 tq + i of a key record holds, for the thread with lane % 4 == tq,
//   the codes of coordinates 32 i + 2 tq + {0, 8, 16, 24} (nibbles 0-3) and + 1 (nibbles 4-7).
// VR [BH, T, 8] uint2: words 2 g, 2 g + 1 of a value record hold coordinates 8 c + g, c = 0..15.
// QS [BH, 8, 64] fp16 pairs (query in the key basis, times sigma, scale and log2 e); QM [BH, 8].
extern "C" __global__ void __launch_bounds__(32 * WARPS) probe_attention(
    const uint4* __restrict__ KR, const uint2* __restrict__ VR,
    const unsigned char* __restrict__ KS, const unsigned char* __restrict__ VS,
    const unsigned* __restrict__ QS, const float* __restrict__ QM,
    float* __restrict__ PO, float* __restrict__ PM, float* __restrict__ PL,
    int T, int split_len, int n_splits, int rows, unsigned s_, unsigned k_, unsigned a1_, unsigned a3_,
    unsigned a5_) {
  const Poly pp = {s_, k_, a1_, a3_, a5_};  // keys and values share the codebook (every coordinate at BITS)
  const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int split = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (split >= n_splits) return;
  const long bh = blockIdx.y;
  const uint4* kr = KR + bh * T * 4;
  const uint2* vr = VR + bh * T * 8;
  const unsigned char* ks = KS + bh * T;
  const unsigned char* vs = VS + bh * T;
  unsigned qa[8], qb[8];
  const float qm = g < rows ? QM[bh * 8 + g] : 0.f;
  for (int j = 0; j < 8; ++j) {
    qa[j] = g < rows ? QS[(bh * 8 + g) * 64 + 8 * j + tq] : 0u;
    qb[j] = g < rows ? QS[(bh * 8 + g) * 64 + 8 * j + 4 + tq] : 0u;
  }
  float o[16][4];
  for (int c = 0; c < 16; ++c) o[c][0] = o[c][1] = o[c][2] = o[c][3] = 0.f;
  float m = NEG_INF, l = 0.f;
  const int start = split * split_len, end = min(start + split_len, T);
  Tile cur = load_tile(kr, vr, ks, vs, start, T, g, tq);
  for (int t0 = start; t0 < end; t0 += 16) {
    const Tile nxt = load_tile(kr, vr, ks, vs, t0 + 16, T, g, tq);  // software pipelining by hand
    const int tv[4] = {t0 + 2 * tq, t0 + 2 * tq + 1, t0 + 2 * tq + 8, t0 + 2 * tq + 9};
    // Scores S[q, token] for n-tiles of tokens t0 + 0..7 (this thread's key: t0 + g) and t0 + 8..15;
    // even and odd k-slices in separate accumulators to halve the chain of dependent products.
    float s[4][4] = {};
    const unsigned kwa[4] = {cur.ka.x, cur.ka.y, cur.ka.z, cur.ka.w}, kwb[4] = {cur.kb.x, cur.kb.y, cur.kb.z, cur.kb.w};
    for (int i = 0; i < 4; ++i) {
      for (int h = 0; h < 2; ++h) {  // k-slice j = 2 i + h: nibbles 2 h (b0) and 2 h + 1 (b1)
        const int j = 2 * i + h;
        mma(s[h], qa[j], qb[j], levels2(codes2(kwa[i], 2 * h), pp), levels2(codes2(kwa[i], 2 * h + 1), pp));
        mma(s[2 + h], qa[j], qb[j], levels2(codes2(kwb[i], 2 * h), pp), levels2(codes2(kwb[i], 2 * h + 1), pp));
      }
    }
    // This thread's scores: row g, tokens tv[0..3] (c0, c1 of both n-tiles).
    float sc[4] = {s[0][0] + s[1][0], s[0][1] + s[1][1], s[2][0] + s[3][0], s[2][1] + s[3][1]};
    float mt = NEG_INF;
    for (int e = 0; e < 4; ++e) {
      sc[e] = tv[e] < end ? sc[e] * scale_of(cur.ks[e]) + qm : NEG_INF;
      mt = fmaxf(mt, sc[e]);
    }
    mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
    mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 2));
    if (__any_sync(0xffffffffu, mt > m)) {  // rescale only when some row's maximum grew
      const float mn = fmaxf(m, mt), alpha = ex2(m - (mn == NEG_INF ? 0.f : mn));
      l *= alpha;
      for (int c = 0; c < 16; ++c) { o[c][0] *= alpha; o[c][1] *= alpha; }
      m = mn;
    }
    const float mu = m == NEG_INF ? 0.f : m;
    float p[4];
    for (int e = 0; e < 4; ++e) p[e] = ex2(sc[e] - mu);
    l += (p[0] + p[1] + p[2] + p[3]);
    const unsigned pa = pack2(p[0] * scale_of(cur.vs[0]), p[1] * scale_of(cur.vs[1]));
    const unsigned pb = pack2(p[2] * scale_of(cur.vs[2]), p[3] * scale_of(cur.vs[3]));
    for (int half = 0; half < 2; ++half) {  // value words 2 g (coordinates 8 c + g, c < 8) and 2 g + 1
      const unsigned w0 = half ? cur.vw[0].y : cur.vw[0].x, w1 = half ? cur.vw[1].y : cur.vw[1].x;
      const unsigned w2 = half ? cur.vw[2].y : cur.vw[2].x, w3 = half ? cur.vw[3].y : cur.vw[3].x;
      // Two tokens' codes per half2: tokens 2 tq, 2 tq + 1 (b0) and 2 tq + 8, 2 tq + 9 (b1).
      const unsigned z01 = prmt(w0, w1, 0x5410), z01h = prmt(w0, w1, 0x7632);
      const unsigned z23 = prmt(w2, w3, 0x5410), z23h = prmt(w2, w3, 0x7632);
      for (int n = 0; n < 8; ++n) {
        const unsigned za = n < 4 ? z01 : z01h, zb = n < 4 ? z23 : z23h;
        mma(o[8 * half + n], pa, pb, levels2(codes2(za, n & 3), pp), levels2(codes2(zb, n & 3), pp));
      }
    }
    cur = nxt;
  }
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  if (g < rows) {
    const long part = (bh * n_splits + split) * 8 + g;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int c = 0; c < 16; ++c)
      *reinterpret_cast<float2*>(PO + part * 128 + 8 * c + 2 * tq) = make_float2(o[c][0] * inv, o[c][1] * inv);
    if (tq == 0) { PM[part] = m; PL[part] = l; }
  }
}
"""


QUINTIC = "return hmul2(hfma2(hfma2(p.a5, y2, p.a3), y2, p.a1), y); }"
# Timing-only variants (wrong results): what the quintic costs, and what decoding costs at all.
DIAGNOSTIC_LEVELS = {
    "quintic": QUINTIC,
    "linear": "return hmul2(y, p.a1); }",  # levels a1 y: 2 fp16 operations per pair of codes instead of 5
    "codes only": "return x; }",  # the extracted codes themselves: no level arithmetic
}


def key_order() -> torch.Tensor:
    """Coordinate at each nibble of a key record (``[128]``, nibble ``8 w + n`` of word ``w``)."""
    w, n = torch.arange(16)[:, None], torch.arange(8)[None, :]
    tq, i, k, hi = w // 4, w % 4, n % 4, n // 4
    return (32 * i + 16 * (k // 2) + 2 * tq + 8 * (k % 2) + hi).reshape(-1)


def value_order() -> torch.Tensor:
    """Coordinate at each nibble of a value record (``[128]``)."""
    w, n = torch.arange(16)[:, None], torch.arange(8)[None, :]
    return (8 * (8 * (w % 2) + n) + w // 2).reshape(-1)


def pack(codes: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[..., 128]`` to int32 words ``[..., 16]`` holding coordinate ``order[8 w + n]`` at nibble n."""
    c = codes[..., order.to(codes.device)].to(torch.int64).reshape(*codes.shape[:-1], 16, 8)
    words = (c << (4 * torch.arange(8, device=codes.device))).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def codebook(bits: int) -> tuple[list[float], list[float]]:
    """``(s / 2, -(512 s + 1), a1, a3, a5)`` for the fp16 kernel and ``(s, h, a1, a3, a5)`` for the reference."""
    c = gaussian_poly_coeffs(bits).tolist()
    s = 2.0 ** -(bits - 1)
    h = s * (2**bits - 1) / 2
    a = [c[0] / s, c[1] / s**3, c[2] / s**5]
    return [s / 2, -(512 * s + 1), *a], [s, h, *a]


def half2_words(values: list[float]) -> list[int]:
    """Each value as an fp16 pair in one 32-bit word, as a signed int (the launcher passes C ints)."""
    h = torch.tensor(values, dtype=torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    return [w - 2**32 if w >= 2**31 else w for w in (int(x) * 0x10001 for x in h)]


def reference(qs, qm, kc, vc, ks, vs, ref_poly) -> torch.Tensor:
    """Attention output ``[BH, 8, 128]`` (value basis) over all ``T`` tokens, in float64."""
    s, h, a1, a3, a5 = ref_poly

    def lv(c):
        y = c.double() * s - h
        return y * (a1 + y * y * (a3 + y * y * a5))

    scores = torch.einsum("bqd,btd->bqt", qs.double(), lv(kc)) * decode_scale(ks).double()[:, None, :]
    scores = scores + qm.double()[..., None]
    p = torch.softmax(scores * math.log(2), -1) * decode_scale(vs).double()[:, None, :]
    return torch.einsum("bqt,btd->bqd", p, lv(vc))


def merge(po, pm, pl) -> torch.Tensor:
    """Merge split partials ``po [BH, S, 8, 128]``, ``pm, pl [BH, S, 8]`` (log2 domain)."""
    mx = pm.max(1, keepdim=True).values
    w = torch.exp2(pm - mx) * pl
    return (po * w[..., None]).sum(1) / w.sum(1)[..., None]


class Probe:
    """The kernel compiled for ``warps`` warps per block, with at most ``maxreg`` registers (None: no
    cap); ``levels`` other than ``quintic`` builds a timing-only diagnostic (:data:`DIAGNOSTIC_LEVELS`)."""

    def __init__(self, warps: int, maxreg: int | None = None, levels: str = "quintic"):
        options = [f"--maxrregcount={maxreg}"] if maxreg else None
        source = SOURCE.replace("WARPS", str(warps)).replace(QUINTIC, DIAGNOSTIC_LEVELS[levels])
        self.kernel = torch.cuda._compile_kernel(source, "probe_attention", nvcc_options=options)
        self.warps = warps
        kern, ref = codebook(BITS)
        self.poly = half2_words(kern)
        self.ref_poly = ref

    def inputs(self, batch: int, context: int, seed: int) -> dict:
        g = torch.Generator(device="cuda").manual_seed(seed)
        bh = batch * HKV

        def codes():
            return torch.randint(0, 2**BITS, (bh, context, DIM), generator=g, device="cuda", dtype=torch.uint8)

        def scales():
            return torch.randint(120, 136, (bh, context), generator=g, device="cuda", dtype=torch.uint8)

        kc, vc = codes(), codes()
        qs = (torch.randn(bh, ROWS, DIM, generator=g, device="cuda") * 0.1).half()
        qs[:, HQ // HKV :] = 0  # rows beyond the GQA group are padding
        return dict(kc=kc, vc=vc, ks=scales(), vs=scales(), qs=qs, qm=torch.randn(bh, ROWS, generator=g, device="cuda"),
                    kr=pack(kc, key_order()), vr=pack(vc, value_order()))

    def splits(self, batch: int, context: int) -> tuple[int, int]:
        """(split length, splits): about 16 warps' worth of splits per multiprocessor, 16-token multiples."""
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        want = max(1, 16 * sms // (batch * HKV))
        length = max(64, 16 * math.ceil(context / want / 16))
        return length, math.ceil(context / length)

    def run(self, x: dict, batch: int, context: int, out: tuple | None = None):
        length, n = self.splits(batch, context)
        bh = batch * HKV
        if out is None:
            out = (torch.empty(bh, n, ROWS, DIM, device="cuda"), torch.empty(bh, n, ROWS, device="cuda"),
                   torch.empty(bh, n, ROWS, device="cuda"))
        po, pm, pl = out
        self.kernel(
            grid=(math.ceil(n / self.warps), bh, 1), block=(32 * self.warps, 1, 1),
            args=[x["kr"], x["vr"], x["ks"], x["vs"], x["qs"].view(torch.int32), x["qm"], po, pm, pl,
                  context, length, n, HQ // HKV, *self.poly],
        )
        return out


def check(probe: Probe) -> list[dict]:
    """Relative error to the reference on a small ragged case (context not a multiple of 16) and a long one."""
    out = []
    for batch, context in ((2, 1000), (1, 32768)):
        x = probe.inputs(batch, context, 0)
        got = merge(*probe.run(x, batch, context))[:, : HQ // HKV]
        ref = reference(x["qs"], x["qm"], x["kc"], x["vc"], x["ks"], x["vs"], probe.ref_poly)[:, : HQ // HKV]
        out.append(dict(batch=batch, context=context, rel_err=float((got.double() - ref).norm() / ref.norm())))
    return out


def time_probe(probe: Probe, batch: int, context: int, budget: int) -> tuple[float, int]:
    """(graph time per call in us, bytes of records and scales read) over enough input sets to exceed L2."""
    nbytes = 2 * batch * HKV * context * (DIM * BITS // 8 + 1)
    n = max(1, sets_for(nbytes, budget))
    xs = [probe.inputs(batch, context, i) for i in range(n)]
    outs = [probe.run(x, batch, context) for x in xs]
    us = graph_time_us([lambda x=x, o=o: probe.run(x, batch, context, o) for x, o in zip(xs, outs)])
    del xs, outs
    torch.cuda.empty_cache()
    return us, nbytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    budget = int(torch.cuda.mem_get_info()[0] * 0.3)
    settings = []
    for warps in WARPS:
        for maxreg in (None, 168, 128):
            probe = Probe(warps, maxreg)
            errs = check(probe)
            us, _ = time_probe(probe, 8, 32768, budget)
            settings.append(dict(warps=warps, maxreg=maxreg, us_batch8_32k=us, checks=errs))
            print(f"warps {warps} maxreg {maxreg}: batch 8 / 32k {us:.1f} us, relative errors "
                  + ", ".join(f"{e['rel_err']:.1e}" for e in errs), flush=True)
    best = min(settings, key=lambda r: r["us_batch8_32k"])
    diagnostics = {}
    for levels in DIAGNOSTIC_LEVELS:
        diagnostics[levels] = time_probe(Probe(best["warps"], best["maxreg"], levels), 8, 32768, budget)[0]
        print(f"levels {levels}: batch 8 / 32k {diagnostics[levels]:.1f} us (timing only)", flush=True)
    probe = Probe(best["warps"], best["maxreg"])
    pair = quantizer_pair(BITS)
    rows = []
    print(f"best: warps {best['warps']} maxreg {best['maxreg']}")
    print(f"{'batch':>5} {'context':>7} {'sdpa_us':>9} {'triton_us':>9} {'probe_us':>9} {'probe_x':>8} {'triton_x':>8} "
          f"{'probe_TB/s':>10}")
    for batch in args.batches:
        for context in args.contexts:
            us, nbytes = time_probe(probe, batch, context, budget)
            sdpa = time_sdpa(batch, context, budget)["graph_us"]
            tri = time_fused(pair, batch, context, budget, False)["graph_us"]
            torch.cuda.empty_cache()
            row = dict(batch=batch, context=context, sdpa_us=sdpa, triton_us=tri, probe_us=us, probe_bytes=nbytes,
                       probe_vs_sdpa=sdpa / us, triton_vs_sdpa=sdpa / tri, probe_TBps=nbytes / us * 1e-6)
            rows.append(row)
            print(f"{batch:5d} {context:7d} {sdpa:9.1f} {tri:9.1f} {us:9.1f} {sdpa / us:7.2f}x {sdpa / tri:7.2f}x "
                  f"{row['probe_TBps']:10.2f}", flush=True)
    if args.out:
        result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, bits=BITS, rows_per_head=ROWS,
                      settings=settings, best=dict(warps=best["warps"], maxreg=best["maxreg"]),
                      diagnostic_levels_us_batch8_32k=diagnostics, rows=rows,
                      command="PYTHONPATH=. python benchmarks/cuda_probe.py " + " ".join(sys.argv[1:]))
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
