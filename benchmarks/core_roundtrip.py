"""Reconstruction and inner-product error of the core quantizer against bits, on synthetic
anisotropic Gaussian data: spectral vs random rotation, water-filling vs uniform bits.

    python benchmarks/core_roundtrip.py [--dim 64] [--decades 3] [--out benchmarks/results/core_roundtrip.json]

Errors are relative: E|x_hat - x|^2 / E|x - mean|^2, and for inner products with random
queries q ~ N(0, I): E(<q, x_hat> - <q, x>)^2 / E<q, x - mean>^2.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from spectralquant.quantizer import Quantizer, QuantizerConfig
from spectralquant.synthetic import anisotropic_gaussian

METHODS = {
    "spectral+waterfill": dict(rotation="spectral", allocation="waterfill"),
    "spectral+uniform": dict(rotation="spectral", allocation="uniform"),
    "random+waterfill": dict(rotation="random", allocation="waterfill"),
    "random+uniform": dict(rotation="random", allocation="uniform"),
    "hadamard+uniform": dict(rotation="hadamard", allocation="uniform"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--decades", type=float, default=3.0, help="eigenvalue spread, orders of magnitude")
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--bits", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--out", default="benchmarks/results/core_roundtrip.json")
    args = ap.parse_args()

    # The quantizers are built from the exact population statistics the data is drawn from.
    x, stats = anisotropic_gaussian(args.n, args.heads, args.dim, args.decades, seed=0)
    q = torch.randn(args.n, args.heads, args.dim, generator=torch.Generator().manual_seed(2))
    centred = x - stats.mean
    signal = float((centred**2).sum(-1).mean())
    ip_signal = float(((q * centred).sum(-1) ** 2).mean())

    rows = []
    for bits in [float(b) for b in args.bits.split(",")]:
        row = {"bits": bits}
        for name, opts in METHODS.items():
            quant = Quantizer.from_stats(stats, QuantizerConfig(bits=bits, scale=False, **opts))
            x_hat = quant.decode(quant.encode(x))
            row[f"{name}.mse"] = float(((x_hat - x) ** 2).sum(-1).mean()) / signal
            row[f"{name}.ip"] = float((((x_hat - x) * q).sum(-1) ** 2).mean()) / ip_signal
            row["record_bytes"] = quant.record_bytes
        rows.append(row)

    names = list(METHODS)
    print(f"relative reconstruction MSE (dim {args.dim}, eigenvalues over {args.decades:g} decades, n={args.n})")
    print(f"{'bits':>5} {'bytes':>5} " + " ".join(f"{n:>18}" for n in names))
    for r in rows:
        print(f"{r['bits']:>5g} {r['record_bytes']:>5} " + " ".join(f"{r[n + '.mse']:>18.3e}" for n in names))
    print("\nrelative inner-product error, random Gaussian queries")
    print(f"{'bits':>5} {'bytes':>5} " + " ".join(f"{n:>18}" for n in names))
    for r in rows:
        print(f"{r['bits']:>5g} {r['record_bytes']:>5} " + " ".join(f"{r[n + '.ip']:>18.3e}" for n in names))

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "rows": rows}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
