"""Decode-attention, encode and end-to-end speed of the fused kernels on a CUDA GPU.

Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), batch 1/8/32, context
4k/32k/128k, 4-bit and 3-bit quantizers (random, calibrated on anisotropic Gaussians): per-layer
time of bf16 ``scaled_dot_product_attention`` (GQA) vs the fused decode attention (section ``mma``:
the tensor-core kernel for records in fragment order, 4 or 2 bits per coordinate), bytes each must
read, achieved bandwidth against a measured device copy, the record layout against the plain
coordinate-order layout, encode throughput and encode time for a 32k prefill against that
prefill's attention, and an end-to-end decode of a Llama-8B-shaped model with random weights (also
with keys stored before RoPE in all or most layers, section ``e2e_rope``).

Timings: each input set is called once inside a CUDA graph that cycles through several input sets
(so the cache does not hold them), the graph is replayed many times after warm-up, and the median
replay time over the number of calls is reported ("graph", GPU time). "eager" is the median of
single calls timed with CUDA events (includes Python launch overhead). Prints tables; writes JSON.

    python benchmarks/kernels.py --out benchmarks/results/kernels.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
import traceback

import torch
import torch.nn.functional as F
from spectralquant.adapters.hf_cache_argument import with_cache

from spectralquant.kernels import compressed_attention_reference
from spectralquant.kernels.mma_attention import compressed_attention_mma
from spectralquant.kernels.random_cache import random_compressed_kv, random_quantizer, random_scales
from spectralquant.kernels.tables import tables_of
from spectralquant.kernels.triton_attention import TUNING, compressed_attention_triton
from spectralquant.kernels.triton_codec import encode
from spectralquant.packing import RecordLayout
from spectralquant.rope import LinearRope

HQ, HKV, DIM = 32, 8, 128
WINDOW, SINKS = 64, 4
L2_BYTES = 50 << 20
DEVICE = "cuda"  # the end-to-end helpers' device (a CPU smoke run may change it)


def graph_time_us(calls, reps: int = 30) -> float:
    """Median GPU time per call (us) of ``calls`` (one per input set) replayed as one CUDA graph."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    del graph
    return statistics.median(times)


def eager_time_us(calls, reps: int = 30) -> float:
    """Median time (us) of single calls, each between two CUDA events (launch overhead included)."""
    for c in calls:
        c()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        calls[i % len(calls)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) over 2 GiB buffers."""
    a = torch.empty(1 << 31, dtype=torch.uint8, device="cuda")
    a.random_(0, 255)
    b = torch.empty_like(a)
    return 2 * (1 << 31) / (graph_time_us([lambda: b.copy_(a)], reps=20) * 1e-6)


def fused_bytes(kv) -> int:
    """Bytes the fused kernel must read: records and scales of K and V, window and sinks."""
    n = sum(t.numel() * t.element_size() for e in (kv.key, kv.value) for t in e.tensors())
    exact = [kv.window_keys, kv.window_values, kv.sink_keys, kv.sink_values]
    return n + sum(t.numel() * t.element_size() for t in exact if t is not None)


def sets_for(bytes_per_set: int, budget: int) -> int:
    """Input sets to cycle through: together at least 3x the L2 cache, at least 2, within budget."""
    want = max(2, min(8, math.ceil(3 * L2_BYTES / bytes_per_set)))
    return min(want, budget // bytes_per_set)


LAYOUTS = {  # record layouts the layout section compares: RecordLayout options
    "units inside words": dict(),
    "units back to back": dict(word_units=False),
    "coordinate order": dict(permute=False),
}


def quantizer_pair(bits: float, layout: str = "units inside words", value_config: dict | None = None, **config):
    """Key and value quantizers of Llama-8B KV shape, their records in ``layout`` (a key of
    :data:`LAYOUTS`); ``config``: quantizer options for both (e.g. ``codebook``), ``value_config``:
    more for the values only (e.g. ``allocation="uniform"``, ``min_bits=1``)."""
    pair = []
    for seed, extra in ((0, {}), (1, value_config or {})):
        q = random_quantizer(HKV, DIM, bits, seed=seed, **config, **extra)
        if LAYOUTS[layout]:
            q.layout = RecordLayout(q.widths, **LAYOUTS[layout])
        pair.append(q)
    return tuple(pair)


def query(batch: int, seed: int, heads: int = HQ) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(batch, heads, 1, DIM, generator=g, device="cuda", dtype=torch.bfloat16)


def time_fused(pair, batch: int, context: int, budget: int, check: bool, rope=None, attend=None, heads: int = HQ,
               **tuning) -> dict:
    """``rope``: a :class:`LinearRope` for keys stored before RoPE (None: after); ``attend``: the
    attention function timed (default: the Triton kernel with ``tuning``); ``heads``: query heads."""
    attend = attend or (lambda q, kv: compressed_attention_triton(q, kv, **tuning))
    tc = context - WINDOW
    probe = random_compressed_kv(batch, HKV, DIM, tc, WINDOW, SINKS, dtype=torch.bfloat16, device="cuda",
                                 encode=False, quantizers=pair)
    nbytes = fused_bytes(probe)
    n = sets_for(nbytes, budget)
    if n < 1:
        return dict(skipped=f"needs {nbytes / 2**30:.1f} GiB per input set")
    kvs = [probe] + [
        random_compressed_kv(batch, HKV, DIM, tc, WINDOW, SINKS, dtype=torch.bfloat16, device="cuda", seed=i,
                             encode=False, quantizers=pair)
        for i in range(1, n)
    ]
    for kv in kvs:
        kv.key_rope = rope
    qs = [query(batch, i, heads) for i in range(n)]
    calls = [lambda q=q, kv=kv: attend(q, kv) for q, kv in zip(qs, kvs)]
    row = dict(sets=n, bytes=nbytes, graph_us=graph_time_us(calls), eager_us=eager_time_us(calls))
    if check:
        ref = compressed_attention_reference(qs[0], kvs[0])
        got = attend(qs[0], kvs[0])
        row["rel_err_vs_reference"] = float((got.double() - ref.double()).norm() / ref.double().norm())
    return row


def time_sdpa(batch: int, context: int, budget: int, heads: int = HQ) -> dict:
    nbytes = 2 * batch * HKV * context * DIM * 2
    n = sets_for(nbytes, budget)
    if n < 1:
        return dict(skipped=f"needs {nbytes / 2**30:.1f} GiB per input set")
    kv = [
        (torch.randn(batch, HKV, context, DIM, device="cuda", dtype=torch.bfloat16),
         torch.randn(batch, HKV, context, DIM, device="cuda", dtype=torch.bfloat16))
        for _ in range(n)
    ]
    qs = [query(batch, i, heads) for i in range(n)]
    calls = [
        lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True) for q, (k, v) in zip(qs, kv)
    ]
    return dict(sets=n, bytes=nbytes, graph_us=graph_time_us(calls), eager_us=eager_time_us(calls))


def _setting(block_t: int, warps: int, per_sm: int, maxnreg: int | None):
    return dict(block_t=block_t, num_warps=warps, per_sm=per_sm, maxnreg=maxnreg)


# Launch settings the tune section times (fp16 polynomial levels throughout; float32 was slower).
TUNE_SETTINGS = (
    _setting(64, 8, 8, 128), _setting(64, 4, 8, 168), _setting(64, 4, 16, 168), _setting(64, 4, 4, 168),
    _setting(64, 4, 8, None), _setting(64, 4, 8, 200), _setting(64, 4, 8, 232), _setting(32, 4, 16, 128),
)


def tune(bits: float, budget: int, log) -> dict:
    """Time launch settings (:data:`TUNE_SETTINGS`) at batch 8, 32k context; returns the fastest."""
    pair = quantizer_pair(bits)
    best, rows = None, []
    for setting in TUNE_SETTINGS:
        try:
            r = time_fused(pair, 8, 32768, budget, False, **setting)
        except Exception as exc:  # a setting that does not compile on this GPU is skipped, not fatal
            log(f"  tune bits={bits} {setting}: {type(exc).__name__}: {exc}")
            continue
        rows.append(dict(**setting, graph_us=r["graph_us"]))
        log(f"  tune bits={bits} {setting}: {r['graph_us']:.1f} us")
        if best is None or r["graph_us"] < best[0]:
            best = (r["graph_us"], setting)
        torch.cuda.empty_cache()
    return dict(settings=rows, best=best[1])


def codebook_comparison(args, budget: int, log) -> list[dict]:
    """The same records read through polynomial levels (fp16 or float32) vs the level lookup table,
    and records of the linear codebook (evenly spaced levels: two operations per code)."""
    rows = []
    for bits in args.bits:
        for kind in ("poly fp16", "poly fp32", "linear fp16", "lookup table"):
            pair = quantizer_pair(bits, codebook="linear" if kind.startswith("linear") else "poly")
            tuning = dict(args.tuned[bits])
            if kind == "lookup table":
                for q in pair:
                    q.poly_coeffs = None
            else:
                tuning["fp16_levels"] = kind.endswith("fp16")
            r = time_fused(pair, 8, 32768, budget, True, **tuning)
            rows.append(dict(bits=bits, levels=kind, graph_us=r["graph_us"],
                             rel_err_vs_reference=r["rel_err_vs_reference"]))
            log(f"  codebook bits={bits} {kind:>12}: {r['graph_us']:.1f} us, rel err {r['rel_err_vs_reference']:.1e}")
            torch.cuda.empty_cache()
    return rows


# Llama 3's RoPE frequencies (base 500000, head_dim 128) without its long-context rescaling.
LLAMA3_ROPE = LinearRope(1.0 / 500000.0 ** (torch.arange(0, DIM, 2) / DIM))


def rope_comparison(args, budget: int, log) -> list[dict]:
    """Keys stored after RoPE (the query is rotated into the key basis once) against keys stored
    before RoPE (each block's keys are decoded and rotated at their positions), with bf16 SDPA."""
    rows = []
    for batch, context in ((1, 4096), (8, 32768), (32, 32768)):
        sdpa = time_sdpa(batch, context, budget)["graph_us"]
        for bits in args.bits:
            pair = quantizer_pair(bits)
            for keys, rope in (("after RoPE", None), ("before RoPE", LinearRope(LLAMA3_ROPE.inv_freq.cuda()))):
                tuning = args.tuned[bits] if rope is None else {}  # ROPE_TUNING applies before RoPE
                r = time_fused(pair, batch, context, budget, True, rope=rope, **tuning)
                rows.append(dict(batch=batch, context=context, bits=bits, keys=keys, graph_us=r["graph_us"],
                                 sdpa_us=sdpa, rel_err_vs_reference=r["rel_err_vs_reference"]))
                log(f"  rope B={batch} T={context} bits={bits} keys {keys:>11}: {r['graph_us']:.1f} us "
                    f"(sdpa {sdpa:.1f}, {sdpa / r['graph_us']:.2f}x), rel err {r['rel_err_vs_reference']:.1e}")
                torch.cuda.empty_cache()
    return rows


def attention_table(args, budget: int, copy_bw: float, log) -> list[dict]:
    rows = []
    for bits in args.bits:
        tuning = args.tuned[bits]
        pair = quantizer_pair(bits, value_config=dict(allocation=args.value_allocation, min_bits=args.value_min_bits))
        for batch in args.batches:
            for context in args.contexts:
                row = dict(bits=bits, batch=batch, context=context, tuning=tuning,
                           value_allocation=args.value_allocation, value_min_bits=args.value_min_bits)
                try:
                    row["sdpa"] = time_sdpa(batch, context, budget)
                    torch.cuda.empty_cache()
                    row["fused"] = time_fused(pair, batch, context, budget, batch * context <= 8 * 32768, **tuning)
                except torch.OutOfMemoryError as exc:
                    row["skipped"] = f"out of memory: {exc}".split("\n")[0]
                torch.cuda.empty_cache()
                for kind in ("sdpa", "fused"):
                    r = row.get(kind, {})
                    if "graph_us" in r:
                        r["bandwidth_TBps"] = r["bytes"] / (r["graph_us"] * 1e-6) / 1e12
                        r["fraction_of_copy_bw"] = r["bytes"] / (r["graph_us"] * 1e-6) / copy_bw
                if "graph_us" in row.get("sdpa", {}) and "graph_us" in row.get("fused", {}):
                    row["speedup"] = row["sdpa"]["graph_us"] / row["fused"]["graph_us"]
                log(format_row(row))
                rows.append(row)
    return rows


FRAGMENT_WIDTHS = ((4, 4), (4, 2), (2, 2))  # (key bits, value bits) of the tensor-core section


def fragment_pair(kbits: int, vbits: int):
    """Key and value quantizers of Llama-8B KV shape whose records the tensor-core kernel reads."""
    fast = dict(allocation="uniform", codebook="linear")
    return (random_quantizer(HKV, DIM, kbits, seed=0, fragments="keys", **fast),
            random_quantizer(HKV, DIM, vbits, seed=1, fragments="values", **fast))


def tensor_core_table(args, budget: int, copy_bw: float, log) -> list[dict]:
    """bf16 SDPA against the tensor-core kernel (the whole call: query, history and combine launches)
    and the Triton kernel on the same records in fragment order."""
    rows = []
    log(" k/v batch context    sdpa_us     mma_us speedup mmaTB/s  %copy mma_eagr  triton_us speedup   relerr")
    for kbits, vbits, heads in [(k, v, HQ) for k, v in FRAGMENT_WIDTHS] + [(4, 4, 2 * HQ)] * args.mma_gqa8:
        pair = fragment_pair(kbits, vbits)
        if heads != HQ:
            log(f"{heads} query heads (8 per KV head, as in Llama-3-70B):")
        for batch in args.batches:
            for context in args.contexts:
                row = dict(key_bits=kbits, value_bits=vbits, query_heads=heads, batch=batch, context=context)
                try:
                    row["sdpa"] = time_sdpa(batch, context, budget, heads)
                    torch.cuda.empty_cache()
                    row["mma"] = time_fused(pair, batch, context, budget, batch * context <= 8 * 32768,
                                            attend=compressed_attention_mma, heads=heads)
                    torch.cuda.empty_cache()
                    row["triton"] = time_fused(pair, batch, context, budget, False, heads=heads)
                except torch.OutOfMemoryError as exc:
                    row["skipped"] = f"out of memory: {exc}".split("\n")[0]
                torch.cuda.empty_cache()
                s, m, t = (row.get(k, {}) for k in ("sdpa", "mma", "triton"))
                if not all("graph_us" in r for r in (s, m, t)):
                    log(f"{kbits}/{vbits} {batch:>5} {context:>7}  skipped: {row.get('skipped') or s or m or t}")
                    rows.append(row)
                    continue
                m["bandwidth_TBps"] = m["bytes"] / (m["graph_us"] * 1e-6) / 1e12
                m["fraction_of_copy_bw"] = m["bytes"] / (m["graph_us"] * 1e-6) / copy_bw
                row["speedup"] = s["graph_us"] / m["graph_us"]
                row["triton_speedup"] = s["graph_us"] / t["graph_us"]
                err = f"{m['rel_err_vs_reference']:.1e}" if "rel_err_vs_reference" in m else "-"
                log(f"{kbits}/{vbits} {batch:>5} {context:>7} {s['graph_us']:>10.1f} {m['graph_us']:>10.1f} "
                    f"{row['speedup']:>6.2f}x {m['bandwidth_TBps']:>7.2f} {100 * m['fraction_of_copy_bw']:>5.0f}% "
                    f"{m['eager_us']:>8.1f} {t['graph_us']:>10.1f} {row['triton_speedup']:>6.2f}x {err:>8}")
                rows.append(row)
    return rows


def tensor_core_tune(args, budget: int, log) -> list[dict]:
    """The tensor-core kernel's split rule (least tokens per split, warps' worth of splits per
    multiprocessor) at 4 / 4 bits, batch 1 / 4k, 1 / 32k and 8 / 32k; keeps the module's defaults."""
    from spectralquant.kernels import mma_attention

    defaults = mma_attention.MIN_SPLIT, mma_attention.SPLITS_PER_SM, mma_attention.FEW_ROWS
    pair, rows = fragment_pair(4, 4), []
    for min_split in (64, 128, 256):
        for per_sm in (8, 16, 32):
            # FEW_ROWS = 0: every grid gets per_sm splits' worth per multiprocessor
            mma_attention.MIN_SPLIT, mma_attention.SPLITS_PER_SM, mma_attention.FEW_ROWS = min_split, per_sm, 0
            row = dict(min_split=min_split, splits_per_sm=per_sm)
            for batch, context in ((1, 4096), (1, 32768), (8, 32768)):
                row[f"{batch}/{context}"] = time_fused(pair, batch, context, budget, False,
                                                       attend=compressed_attention_mma)["graph_us"]
            log(f"  min split {min_split:>4}, {per_sm:>2} splits per SM: " + ", ".join(
                f"{k} {v:.1f} us" for k, v in row.items() if "/" in k))
            rows.append(row)
    mma_attention.MIN_SPLIT, mma_attention.SPLITS_PER_SM, mma_attention.FEW_ROWS = defaults
    return rows


def host_overhead(log) -> dict:
    """Host (Python) time per call of the decode attention, batch 1 / 4k, where the GPU finishes
    first: the tensor-core path as a whole and its query and history steps, and the Triton path."""
    from spectralquant.kernels import mma_attention

    def per_call(fn, n: int = 200) -> float:
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        spent = time.perf_counter() - start
        torch.cuda.synchronize()
        return spent / n * 1e6

    pair = fragment_pair(4, 4)
    kv = random_compressed_kv(1, HKV, DIM, 4096 - WINDOW, WINDOW, SINKS, dtype=torch.bfloat16, device="cuda",
                              encode=False, quantizers=pair)
    q = query(1, 0)
    tables = mma_attention.tables_of(kv.key_quantizer, kv.value_quantizer)
    qf, qp = mma_attention.query_fragments(q, tables, 0.1)
    out = {
        "tensor-core path": per_call(lambda: compressed_attention_mma(q, kv)),
        "  query kernel": per_call(lambda: mma_attention.query_fragments(q, tables, 0.1)),
        "  history kernel (with its checks and buffers)": per_call(
            lambda: mma_attention.history_partials(kv, None, qf, qp, tables)),
        "Triton path": per_call(lambda: compressed_attention_triton(q, kv)),
    }
    for name, us in out.items():
        log(f"  {name}: {us:.1f} us per call")
    return out


def format_row(row: dict) -> str:
    s, f = row.get("sdpa", {}), row.get("fused", {})
    head = f"{row['bits']:>4} {row['batch']:>5} {row['context']:>7}"
    if "graph_us" not in s or "graph_us" not in f:
        return f"{head}  skipped: {row.get('skipped') or s.get('skipped') or f.get('skipped')}"
    err = f"{f['rel_err_vs_reference']:.1e}" if "rel_err_vs_reference" in f else "-"
    return (
        f"{head} {s['graph_us']:>10.1f} {f['graph_us']:>10.1f} {row['speedup']:>7.2f}x "
        f"{s['bytes'] / 2**20:>9.1f} {f['bytes'] / 2**20:>9.1f} "
        f"{s['bandwidth_TBps']:>6.2f} {f['bandwidth_TBps']:>6.2f} "
        f"{100 * f['fraction_of_copy_bw']:>5.0f}% {s['eager_us']:>9.1f} {f['eager_us']:>9.1f} {err:>8}"
    )


TABLE_HEAD = (
    "bits batch context    sdpa_us   fused_us speedup  sdpa_MiB fused_MiB sdpaTB/s fusTB/s  %copy "
    "sdpa_eagr fusd_eagr   relerr"
)


def layout_kind(q) -> str:
    """Whether a quantizer's units fill whole words, lie inside words, or straddle words."""
    t = tables_of(q)
    return "whole words" if t.aligned else "straddling" if t.crosses else "inside words"


def layout_comparison(args, budget: int, log) -> list[dict]:
    """The same kernel on each record layout of :data:`LAYOUTS` (batch 8, 32k context)."""
    rows = []
    for bits in args.bits:
        for layout in LAYOUTS:
            pair = quantizer_pair(bits, layout)
            r = time_fused(pair, 8, 32768, budget, True, **args.tuned[bits])
            kinds = [layout_kind(q) for q in pair]
            rows.append(dict(bits=bits, layout=layout, slots=pair[0].layout.slots, key_units=kinds[0],
                             value_units=kinds[1], graph_us=r["graph_us"],
                             rel_err_vs_reference=r["rel_err_vs_reference"]))
            log(f"  layout bits={bits} {layout:>18} (slots {rows[-1]['slots']:>2}, K {kinds[0]}, V {kinds[1]}): "
                f"{r['graph_us']:.1f} us, rel err {r['rel_err_vs_reference']:.1e}")
            torch.cuda.empty_cache()
    return rows


def encode_benchmark(args, log) -> list[dict]:
    """Encode throughput, and the K+V encode time of a 32k-token prefill vs its causal attention."""
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, HQ, 32768, DIM, generator=g, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HKV, 32768, DIM, generator=g, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    prefill_us = graph_time_us([lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)],
                               reps=10)
    log(f"  32k prefill attention (bf16 SDPA, causal, 1 sequence): {prefill_us / 1000:.2f} ms per layer")
    for bits in args.bits:
        kq, vq = (x.to("cuda") for x in quantizer_pair(bits))
        for tokens in (32768, 8 * 32768):
            xs = [torch.randn(tokens, HKV, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
            us = graph_time_us([lambda x=x, kq=kq: encode(kq, x) for x in xs], reps=10)
            row = dict(bits=bits, tokens=tokens, encode_us=us, vectors_per_s=tokens * HKV / (us * 1e-6),
                       input_GBps=tokens * HKV * DIM * 2 / (us * 1e-6) / 1e9)
            if tokens == 32768:
                both = us + graph_time_us([lambda x=x, vq=vq: encode(vq, x) for x in xs], reps=10)
                row.update(prefill_attention_us=prefill_us, kv_encode_us=both, fraction_of_prefill=both / prefill_us)
                ref_us = eager_time_us([lambda x=xs[0], kq=kq: kq.encode(x)], reps=3)
                row["reference_encode_us"] = ref_us
            rows.append(row)
            log(f"  encode bits={bits} tokens={tokens}: {us:.0f} us, {row['vectors_per_s'] / 1e9:.2f} G vectors/s"
                + (f"; K+V {row['kv_encode_us']:.0f} us = {100 * row['fraction_of_prefill']:.2f}% of prefill attention"
                   f" (torch reference encode of K: {row['reference_encode_us']:.0f} us)" if tokens == 32768 else ""))
    return rows


CONTEXT_E2E = 32768


def synthetic_calibration(layers: int, keys_pre_rope: bool | tuple[bool, ...] = False):
    """A Llama-8B-shaped calibration (8 KV heads, head_dim 128) from anisotropic Gaussians, its keys
    taken as ``keys_pre_rope`` says (one flag, or one per layer)."""
    from spectralquant.calibration import Calibration, LayerCalibration, ModelSignature
    from spectralquant.synthetic import anisotropic_gaussian

    _, keys = anisotropic_gaussian(8, HKV, DIM, seed=0)
    _, values = anisotropic_gaussian(8, HKV, DIM, seed=1)
    signature = ModelSignature(layers, [HKV] * layers, [DIM] * layers, model_type="llama")
    return Calibration(signature, [LayerCalibration(keys, values) for _ in range(layers)], keys_pre_rope=keys_pre_rope)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fill_compressed(cache, batch: int, context: int) -> None:
    """Put ``context`` tokens of random records (and random window and sinks) in every layer."""
    from spectralquant.quantizer import Encoded

    for layer in cache.layers:
        seed = torch.zeros(batch, HKV, 1, DIM, device=DEVICE, dtype=torch.bfloat16)
        layer.lazy_initialization(seed, seed)
        held = context - layer.window
        for kind, store in (("key", layer.k_store), ("value", layer.v_store)):
            r = getattr(layer.codec, kind).record_bytes
            records = torch.randint(0, 256, (batch, held, HKV, r), dtype=torch.uint8, device=DEVICE)
            scales = random_scales((batch, held, HKV), getattr(layer.codec, kind), DEVICE)
            store.append(Encoded(records, scales))
            del records
        layer.keys = torch.randn(batch, HKV, layer.window, DIM, device=DEVICE, dtype=torch.bfloat16)
        layer.values = torch.randn_like(layer.keys)
        layer.sink_keys.normal_()
        layer.sink_values.normal_()
        layer.cumulative_length = context


def fill_dynamic(model, batch: int, context: int):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i in range(model.config.num_hidden_layers):
        k = torch.randn(batch, HKV, context, DIM, device=DEVICE, dtype=torch.bfloat16)
        cache.update(k, torch.randn_like(k), i)
        del k
    return cache


def decode_rate(model, cache, batch: int, context: int, steps: int = 40, warmup: int = 40) -> float:
    """Tokens per second of ``steps`` greedy decode steps (eager, as ``generate`` runs them) after
    ``warmup`` steps: enough for a compressed cache's first window flush (window 64 + chunk 32), so
    the Triton kernels of every layer are compiled before the clock starts."""
    ids = torch.randint(0, 90, (batch, 1), device=DEVICE)
    cached = with_cache(model, cache)  # the same cache object every step, extended in place
    with torch.no_grad():
        for i in range(steps + warmup):
            if i == warmup:
                sync()
                start = time.time()
            pos = torch.full((batch, 1), context + i, device=DEVICE)
            logits = model(input_ids=ids, position_ids=pos, use_cache=True, **cached).logits
            ids = logits[:, -1:].argmax(-1)
        sync()
    return batch * steps / (time.time() - start)


def llama_8b_shaped(layers: int):
    """A Llama-3-8B-shaped causal LM with random bf16 weights on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=DIM, max_position_embeddings=131072,
        rope_theta=500000.0,
    )
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    return model


def end_to_end_key_domains(layers: int, log) -> dict:
    """Decode tokens/s at batch 8, 32k context of the Llama-8B-shaped model with the ``max`` cache
    (fused), keys stored after RoPE in every layer, before RoPE in every layer except 3-10 (the
    share ``pre_rope_keys="auto"`` chose on SmolLM2), and before RoPE in every layer."""
    from spectralquant.adapters import find_adapter

    import spectralquant as sq

    model = llama_8b_shaped(layers)
    batch, out = 8, {}
    domains = {
        "after RoPE": False,
        "before RoPE except layers 3-10": tuple(i not in range(3, 11) for i in range(layers)),
        "before RoPE": True,
    }
    for name, flags in domains.items():
        sq.wrap(model, synthetic_calibration(layers, flags), preset="max", fused=True)
        cache = find_adapter(model).state().make_cache()
        fill_compressed(cache, batch, CONTEXT_E2E)
        rate = decode_rate(model, cache, batch, CONTEXT_E2E)
        before = sum(layer.rope is not None for layer in cache.layers)
        out[name] = dict(tokens_per_s=rate, layers_before_rope=before)
        log(f"  keys {name} ({before} of {layers} layers before RoPE), batch {batch}: {rate:.0f} tokens/s")
        del cache
        sq.unwrap(model)
        torch.cuda.empty_cache()
    return out


def end_to_end(layers: int, presets: list[str], log) -> dict:
    """Decode tokens/s of a Llama-8B-shaped model (random bf16 weights) at 32k context: FP16
    DynamicCache vs the fused compressed cache at the same batch, and the largest batch whose cache
    fits in the same GPU memory for each (computed from the bytes each holds per sequence, then
    checked by running decode steps at that batch)."""
    from spectralquant.adapters import find_adapter

    import spectralquant as sq

    model = llama_8b_shaped(layers)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    total = torch.cuda.get_device_properties(0).total_memory
    out = dict(layers=layers, context=CONTEXT_E2E, weights_GiB=weights / 2**30, total_GiB=total / 2**30)
    log(f"  model: {layers} layers, {weights / 2**30:.1f} GiB of bf16 weights; GPU {total / 2**30:.1f} GiB")
    batch = 8

    def fits(make_cache, per_seq: int, activation: int, name: str) -> dict:
        usable = total - weights - (2 << 30)
        guess = int(usable // (per_seq + activation))
        for _ in range(6):
            rate = None
            try:
                rate = decode_rate(model, make_cache(guess), guess, CONTEXT_E2E, steps=4, warmup=3)
            except torch.OutOfMemoryError:
                pass
            # Free the failed attempt's cache (held by the traceback until here) before retrying.
            gc.collect()
            torch.cuda.empty_cache()
            if rate is not None:
                log(f"  {name}: max batch {guess} runs ({rate:.0f} tokens/s over 4 steps)")
                return dict(max_batch=guess, tokens_per_s_at_max=rate, per_sequence_MiB=per_seq / 2**20)
            log(f"  {name}: batch {guess} ran out of memory")
            guess = int(guess * 0.95)
        return dict(max_batch=None, per_sequence_MiB=per_seq / 2**20)

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    cache = fill_dynamic(model, batch, CONTEXT_E2E)
    held = torch.cuda.memory_allocated() - base
    rate = decode_rate(model, cache, batch, CONTEXT_E2E)
    act = max(0, torch.cuda.max_memory_allocated() - base - held) // batch
    del cache
    torch.cuda.empty_cache()
    per_seq = 2 * layers * HKV * CONTEXT_E2E * DIM * 2
    out["fp16"] = dict(tokens_per_s=rate, **fits(lambda b: fill_dynamic(model, b, CONTEXT_E2E), per_seq, act, "fp16"))
    log(f"  fp16 DynamicCache, batch {batch}: {rate:.0f} tokens/s")

    calib = synthetic_calibration(layers)
    for preset in presets:
        sq.wrap(model, calib, preset=preset, fused=True)
        make = find_adapter(model).state().make_cache

        def compressed(b: int, make=make):
            c = make()
            fill_compressed(c, b, CONTEXT_E2E)
            return c

        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        cache = compressed(batch)
        held = torch.cuda.memory_allocated() - base
        stats = cache.compression_stats()
        rate = decode_rate(model, cache, batch, CONTEXT_E2E)
        act = max(0, torch.cuda.max_memory_allocated() - base - held) // batch
        del cache
        torch.cuda.empty_cache()
        row = dict(tokens_per_s=rate, ratio=stats.ratio, **fits(compressed, stats.held_bytes // batch, act, preset))
        row["speedup_vs_fp16"] = rate / out["fp16"]["tokens_per_s"]
        if row["max_batch"] and out["fp16"]["max_batch"]:
            row["max_batch_vs_fp16"] = row["max_batch"] / out["fp16"]["max_batch"]
        out[preset] = row
        log(f"  {preset} ({stats.ratio:.2f}x smaller), batch {batch}: {rate:.0f} tokens/s "
            f"({row['speedup_vs_fp16']:.2f}x fp16); max batch {row['max_batch']} vs fp16 {out['fp16']['max_batch']}")
        sq.unwrap(model)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/kernels.json")
    parser.add_argument("--bits", type=float, nargs="+", default=[4.0, 3.0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument(
        "--sections", nargs="+",
        default=["tune", "attention", "mma", "codebook", "rope", "layout", "encode", "e2e", "e2e_rope"],
    )
    parser.add_argument(
        "--value-allocation", default="waterfill", choices=("waterfill", "uniform"),
        help="value widths of the attention section's random quantizers (keys are always water-filled)",
    )
    parser.add_argument("--value-min-bits", type=int, default=0,
                        help="fewest bits per value coordinate in the attention section (keys: 0)")
    parser.add_argument("--mma-gqa8", type=int, default=1, choices=(0, 1),
                        help="the mma section also times 4/4 bits with 64 query heads (8 per KV head)")
    parser.add_argument("--e2e-layers", type=int, default=32)
    parser.add_argument("--e2e-presets", nargs="+", default=["standard", "high", "max", "fast"],
                        help="presets the e2e section runs (after FP16)")
    parser.add_argument("--budget-gib", type=float, default=40.0, help="memory for one timing's input sets")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA GPU")
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    props = torch.cuda.get_device_properties(0)
    result = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__)
    import transformers
    import triton

    result.update(triton=triton.__version__, transformers=transformers.__version__)
    budget = int(args.budget_gib * 2**30)
    start = time.time()

    def save() -> None:
        result["log"] = lines
        result["seconds"] = time.time() - start
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)

    copy_bw = copy_bandwidth()
    torch.cuda.empty_cache()
    result["copy_bandwidth_TBps"] = copy_bw / 1e12
    log(f"{props.name}: {props.multi_processor_count} SMs; device copy {copy_bw / 1e12:.2f} TB/s (read + write)")
    args.tuned = {b: {} for b in args.bits}
    sections = [
        ("tune", lambda: {b: tune(b, budget, log) for b in args.bits}),
        ("attention", lambda: attention_table(args, budget, copy_bw, log)),
        ("mma_tune", lambda: tensor_core_tune(args, budget, log)),
        ("host", lambda: host_overhead(log)),
        ("mma", lambda: tensor_core_table(args, budget, copy_bw, log)),
        ("codebook", lambda: codebook_comparison(args, budget, log)),
        ("rope", lambda: rope_comparison(args, budget, log)),
        ("layout", lambda: layout_comparison(args, budget, log)),
        ("encode", lambda: encode_benchmark(args, log)),
        ("e2e", lambda: end_to_end(args.e2e_layers, args.e2e_presets, log)),
        ("e2e_rope", lambda: end_to_end_key_domains(args.e2e_layers, log)),
    ]
    for name, fn in sections:
        if name not in args.sections:
            continue
        log(f"== {name}" + (f"\n{TABLE_HEAD}" if name == "attention" else ""))
        try:
            result[name] = fn()
            if name == "tune":
                args.tuned = {b: r["best"] for b, r in result[name].items()}
                # The end-to-end run goes through the dispatcher: give it the 4-bit setting.
                TUNING.update(args.tuned[max(args.tuned)])
        except Exception:
            log(traceback.format_exc())
            result[name] = dict(error=traceback.format_exc())
        torch.cuda.empty_cache()
        save()
    save()


if __name__ == "__main__":
    main()
