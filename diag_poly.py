"""Scratch (deleted after): what the quintic polynomial costs in the decode attention (linear levels instead: wrong
results, timing only)."""
import statistics, sys, torch
sys.path.insert(0, "benchmarks")
import kernels as kb
from spectralquant.kernels import diag_attn as da
from spectralquant.kernels.random_cache import random_compressed_kv
for bits, batch, ctx in ((4, 8, 32768), (2.25, 8, 32768), (2.25, 32, 32768), (4, 1, 4096)):
    p = kb.quantizer_pair(bits)
    tc = ctx - kb.WINDOW
    kvs = [random_compressed_kv(batch, kb.HKV, kb.DIM, tc, kb.WINDOW, kb.SINKS, dtype=torch.bfloat16, device="cuda",
                                seed=i, encode=False, quantizers=p) for i in range(2 if batch > 1 else 8)]
    qs = [kb.query(batch, i) for i in range(len(kvs))]
    res = {m: [] for m in (0, 1, 2, 3)}
    for rep in range(3):
        for m in res:
            res[m].append(kb.graph_time_us([lambda q=q, kv=kv, m=m: da.compressed_attention_triton(q, kv, diag=m)
                                            for q, kv in zip(qs, kvs)]))
    print(f"bits {bits} batch {batch} ctx {ctx}: " + "  ".join(
        f"{name} {statistics.median(res[m]):.1f}" for m, name in
        ((0, "quintic"), (1, "keys linear"), (2, "values linear"), (3, "both linear"))), flush=True)
    del kvs
    torch.cuda.empty_cache()
