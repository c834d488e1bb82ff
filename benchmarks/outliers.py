"""Would dense-and-sparse outliers (KVQuant) help at the same bytes? A measurement on SmolLM2's
real keys and values, before anyone changes the record format for them.

Dense-and-sparse stores, per vector, the ``k`` coordinates with the largest quantization error
separately: an index (``ceil(log2 D)`` bits) and a correction. To hold the same bytes, the dense
code must give up those bits. Per layer and kind this compares, on the rotated, scaled coordinates
``z`` the codec quantizes:

- ``base``: the benchmark's codec (``--bits``, sensitivity layer budget measured after 1,536 tokens,
  query-aware keys, keys before RoPE: the best row of the passkey ablations; ``--key-domain auto``:
  keys before or after RoPE per layer);
- ``free k``: the same code with its ``k`` worst coordinates made exact at no cost (an upper bound
  on what sparse outliers can hold);
- ``paid k``: a codec built the same way with ``k * (ceil(log2 D) + 8)`` fewer bits per vector, plus
  its ``k`` worst coordinates corrected by an 8-bit residual code (``+-8`` sigma, 255 steps): what
  dense-and-sparse would give at the same bytes.

Errors are the squared error in ``z`` relative to ``|z|^2`` (plain) and the error weighted by the
calibration's importance (``q q^T`` moment for keys, ``W_o^T W_o`` for values), each summed over the
tokens after the exact sinks of ``--tokens`` of the evaluation text. Prints a table, writes JSON:

    python benchmarks/outliers.py --bits 2.25 --out benchmarks/results/outliers_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
from spectralquant.integrations.offline_models import load_offline_model

from spectralquant.codec import build_codecs, layer_bits
from spectralquant.config import resolve_config
from spectralquant.corpus import book_text
from spectralquant.quantizer import Quantizer, decode_scale

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.pre_rope_keys import projections, rope, rotary  # noqa: E402
from benchmarks.quality import load_calibration, text_ids  # noqa: E402

SINKS = 4
RESIDUAL_RANGE = 8.0  # sigmas covered by the 8-bit residual code
RESIDUAL_BITS = 8


def coded_error(q: Quantizer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, e)``: the scaled rotated coordinates of ``x [N, H, D]`` and the code's error on them."""
    enc = q.encode(x)
    z = q.rotate(x)
    return z, z - q.decode_rotated(enc)


def keep_outliers(q: Quantizer, z: torch.Tensor, e: torch.Tensor, k: int, exact: bool) -> torch.Tensor:
    """The error ``e [N, H, D]`` after the ``k`` largest entries per vector are corrected: exactly, or
    by the 8-bit residual code (in units of the coordinate's ``sigma`` times the vector's scale)."""
    if k == 0:
        return e
    idx = e.abs().topk(k, dim=-1).indices
    picked = e.gather(-1, idx)
    if exact:
        fixed = torch.zeros_like(picked)
    else:
        s = decode_scale(q._scale_of(z))[..., None] if q.config.scale else torch.ones_like(z[..., :1])
        unit = (q.sigma[None].expand_as(z).gather(-1, idx) * s).clamp_min(1e-30)
        step = 2 * RESIDUAL_RANGE / (2**RESIDUAL_BITS - 1)
        code = (picked / unit / step).round().clamp(-(2 ** (RESIDUAL_BITS - 1) - 1), 2 ** (RESIDUAL_BITS - 1) - 1)
        fixed = picked - code * step * unit
    return e.scatter(-1, idx, fixed)


def error_figures(
    q: Quantizer, z: torch.Tensor, e: torch.Tensor, importance: torch.Tensor | None
) -> tuple[float, float]:
    """``(relative squared error, importance-weighted error)`` of errors ``e`` on coordinates ``z``."""
    plain = float((e**2).sum() / (z**2).sum())
    if importance is None:
        return plain, math.nan
    # Rotated errors back to the vector's axes, then e^T M e per head.
    ex = torch.einsum("nhe,hde->nhd", e, q.basis)
    return plain, float(torch.einsum("nhd,hde,nhe->", ex, importance.float(), ex))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=float, default=2.25, help="budget (bits per coordinate, layer budget pooled)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--outliers", default="1,2,4", help="outliers per vector to try")
    p.add_argument("--key-domain", default="before", choices=("before", "auto"),
                   help="keys before RoPE in every layer, or per layer where less sensitive ('auto')")
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args()
    counts = [int(c) for c in args.outliers.split(",") if c]
    if not counts or min(counts) < 1:
        raise SystemExit(f"--outliers needs positive counts, got {args.outliers!r}")
    torch.manual_seed(0)
    model, tok = load_offline_model("smollm2")
    calib = load_calibration(model, tok, "smollm2", None, pre_rope_keys=True if args.key_domain == "before" else "auto",
                             sensitivity_prefix=1536)
    config = resolve_config("max", bits=args.bits, key_attention_aware=True)
    codecs = build_codecs(calib, config)
    bits = layer_bits(calib, config)
    ids = text_ids(tok, book_text("evaluation"), args.tokens)
    cos, sin = rotary(model, ids.shape[1])
    d = model.config.head_dim
    cost = math.ceil(math.log2(d)) + RESIDUAL_BITS
    rows = []
    print(f"{'layer':>5s} {'kind':>5s} {'bits':>5s} {'base':>7s} " + " ".join(
        f"{'free ' + str(k):>7s} {'paid ' + str(k):>7s}" for k in counts) + "   (relative squared error)")
    for n, (keys, values) in enumerate(projections(model, ids, "kv")):
        if not calib.layer_keys_pre_rope(n):
            keys = rope(keys, cos, sin)
        layer = calib.layers[n]
        for kind, x, q, b in (("key", keys, codecs[n].key, bits[n][0]), ("value", values, codecs[n].value, bits[n][1])):
            x = x[SINKS:]
            importance = layer.importance(kind)
            z, e = coded_error(q, x)
            row = dict(layer=n, kind=kind, bits=b, base=error_figures(q, z, e, importance))
            for k in counts:
                row[f"free {k}"] = error_figures(q, z, keep_outliers(q, z, e, k, exact=True), importance)
                fewer = b - k * cost / d
                if fewer < q.config.min_bits:
                    row[f"paid {k}"] = (math.nan, math.nan)
                    continue
                cfg = q.config.with_(bits=fewer)
                q2 = Quantizer.from_stats(getattr(layer, kind), cfg, 2 * n + (kind == "value"), importance)
                z2, e2 = coded_error(q2, x)
                row[f"paid {k}"] = error_figures(q2, z2, keep_outliers(q2, z2, e2, k, exact=False), importance)
            rows.append(row)
            print(f"{n:5d} {kind:>5s} {b:5.2f} {row['base'][0]:7.4f} " + " ".join(
                f"{row[f'free {k}'][0]:7.4f} {row[f'paid {k}'][0]:7.4f}" for k in counts), flush=True)
    summary = {}
    for kind in ("key", "value"):
        sel = [r for r in rows if r["kind"] == kind]
        for col in [f"{w} {k}" for k in counts for w in ("free", "paid")]:
            for j, what in enumerate(("plain", "weighted")):
                ratios = [r[col][j] / r["base"][j] for r in sel if r["base"][j] > 0 and not math.isnan(r[col][j])]
                if ratios:
                    summary[f"{kind} {col} {what}"] = dict(
                        median=statistics.median(ratios), better_in=sum(x < 1 for x in ratios), layers=len(ratios)
                    )
    print("\nerror relative to the base codec (median over layers; layers where it is lower):")
    for name, s in summary.items():
        print(f"  {name:>24s}: {s['median']:.3f}  ({s['better_in']}/{s['layers']})")
    if args.out:
        result = dict(args=vars(args), cost_bits=cost, rows=rows, summary=summary)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
