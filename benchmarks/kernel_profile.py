"""Where the fused decode attention's time goes: split vs combine kernel, and the split count.

For 4- and 2.25-bit quantizers of Llama-3-8B shape at batch 1/8 and 4k/32k context: the graph-replayed
time per call (as ``benchmarks/kernels.py`` times it) and each kernel's mean GPU time from the torch
profiler; with ``--sweep``, the same at batch 1 over ``min_blocks`` (the split count). Prints a table;
writes JSON.

    python benchmarks/kernel_profile.py --sweep --out benchmarks/results/kernel_profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.kernels import DIM, HKV, SINKS, WINDOW, graph_time_us, quantizer_pair, query, time_sdpa  # noqa: E402
from spectralquant.kernels.random_cache import random_compressed_kv  # noqa: E402
from spectralquant.kernels.triton_attention import TUNING, _splits, compressed_attention_triton  # noqa: E402

SETS = 4  # input sets cycled through per timing


def kernel_times_us(calls, reps: int = 5) -> dict[str, float]:
    """Mean GPU time per launch (us) of each kernel the calls run, from the torch profiler."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            for c in calls:
                c()
        torch.cuda.synchronize()
    times = {}
    for e in prof.key_averages():
        total = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if total and e.count:
            times[e.key] = total / e.count
    return times


def measure(pair, batch: int, context: int, **tuning) -> dict:
    kvs = [random_compressed_kv(batch, HKV, DIM, context - WINDOW, WINDOW, SINKS, dtype=torch.bfloat16,
                                device="cuda", seed=i, encode=False, quantizers=pair) for i in range(SETS)]
    qs = [query(batch, i) for i in range(SETS)]
    calls = [lambda q=q, kv=kv: compressed_attention_triton(q, kv, **tuning) for q, kv in zip(qs, kvs)]
    opts = {**TUNING, **tuning}
    splits = _splits(context - WINDOW, batch * HKV, opts["block_t"], torch.device("cuda"), opts["min_blocks"],
                     opts["per_sm"], opts["fill"])
    kernels = kernel_times_us(calls)
    row = dict(batch=batch, context=context, tuning=tuning, splits=splits[0], split_tokens=splits[1],
               graph_us=graph_time_us(calls),
               split_us=sum(v for k, v in kernels.items() if "split" in k),
               combine_us=sum(v for k, v in kernels.items() if "combine" in k))
    del kvs
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/kernel_profile.json")
    parser.add_argument("--sweep", action="store_true", help="also sweep min_blocks at batch 1")
    args = parser.parse_args()
    rows = []
    print(f"{'bits':>5} {'batch':>5} {'context':>7} {'tuning':>18} {'splits':>6} {'graph_us':>9} {'split_us':>9} "
          f"{'combine_us':>10}")
    for bits in (4.0, 2.25):
        pair = quantizer_pair(bits)
        settings = [((1, 4096), {}), ((1, 32768), {}), ((8, 32768), {})]
        if args.sweep and bits == 4.0:
            settings += [((1, ctx), dict(min_blocks=mb)) for ctx in (4096, 32768) for mb in (1, 2, 4, 8)]
        for (batch, context), tuning in settings:
            row = dict(bits=bits, **measure(pair, batch, context, **tuning))
            rows.append(row)
            print(f"{bits:>5} {batch:>5} {context:>7} {json.dumps(tuning):>18} {row['splits']:>6} "
                  f"{row['graph_us']:>9.1f} {row['split_us']:>9.1f} {row['combine_us']:>10.1f}", flush=True)
    sdpa = {f"{b}/{c}": time_sdpa(b, c, 20 << 30)["graph_us"] for b, c in ((1, 4096), (1, 32768), (8, 32768))}
    print("bf16 SDPA graph_us:", {k: round(v, 1) for k, v in sdpa.items()})
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows, sdpa_graph_us=sdpa)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
