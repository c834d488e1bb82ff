"""Pre-RoPE vs post-RoPE keys on SmolLM2: how much the eigenbasis could gain by quantizing keys before
the rotary embedding (and applying it after decoding), before anyone builds that.

Keys are captured at ``k_proj`` (pre-RoPE) on the bundled book's calibration split; post-RoPE keys
are the same vectors through the model's own rotary embedding at their positions. Per layer and KV
head: the participation-ratio effective dimension of the centred covariance, and the relative
distortion ``sum(lambda_i * D(b_i)) / sum(lambda_i)`` of a water-filled Gaussian Lloyd-Max code at
``--bits`` per coordinate (the method's model of its own error). Prints a table, writes JSON:

    python benchmarks/key_spectra.py --bits 2.25 --out benchmarks/results/key_spectra_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from spectralquant.integrations.offline_models import load_offline_model

from spectralquant.allocation import waterfill
from spectralquant.codebook import MAX_BITS, gaussian_distortion
from spectralquant.corpus import book_text
from spectralquant.stats import participation_ratio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.pre_rope_keys import pre_rope_keys, rope, rotary  # noqa: E402

SKIP = 16  # leading tokens left out (attention sinks are kept exact anyway)


def spectrum_figures(keys: torch.Tensor, bits: float) -> tuple[float, float]:
    """``(effective dimension, relative water-filled distortion)`` of keys ``[T, D]``."""
    eig = torch.linalg.eigvalsh(torch.cov(keys.double().T)).flip(0).clamp_min(0)
    widths = waterfill(eig[None], bits)[0]
    distortion = torch.tensor([gaussian_distortion(int(b)) if b else 1.0 for b in widths], dtype=torch.float64)
    return float(participation_ratio(eig)), float((eig * distortion).sum() / eig.sum())


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=float, default=2.25, help="average bits per key coordinate")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args()
    if not 0 < args.bits <= MAX_BITS:
        raise SystemExit(f"--bits must be in (0, {MAX_BITS}], got {args.bits}")
    model, tok = load_offline_model("smollm2")
    ids = tok(book_text("calibration"), return_tensors="pt").input_ids[:, : args.tokens]
    cos, sin = rotary(model, ids.shape[1])
    heads = model.config.num_key_value_heads
    rows = []
    print(f"{'layer':>5s} {'head':>4s} {'d_eff pre':>9s} {'post':>6s} {'dist pre':>9s} {'post':>7s} {'post/pre':>8s}")
    for n, pre in enumerate(pre_rope_keys(model, ids)):
        post = rope(pre, cos, sin)
        for h in range(heads):
            d_pre, x_pre = spectrum_figures(pre[SKIP:, h], args.bits)
            d_post, x_post = spectrum_figures(post[SKIP:, h], args.bits)
            rows.append(dict(layer=n, head=h, d_eff_pre=d_pre, d_eff_post=d_post, distortion_pre=x_pre,
                             distortion_post=x_post))
            print(f"{n:5d} {h:4d} {d_pre:9.1f} {d_post:6.1f} {x_pre:9.4f} {x_post:7.4f} {x_post / x_pre:8.2f}")
    ratios = [r["distortion_post"] / r["distortion_pre"] for r in rows]
    summary = dict(
        mean_distortion_pre=statistics.mean(r["distortion_pre"] for r in rows),
        mean_distortion_post=statistics.mean(r["distortion_post"] for r in rows),
        median_post_over_pre=statistics.median(ratios),
        heads_where_pre_is_better=sum(x > 1 for x in ratios),
        heads=len(rows),
    )
    print(
        f"{args.bits:g} bits: mean relative distortion pre-RoPE {summary['mean_distortion_pre']:.4f}, "
        f"post-RoPE {summary['mean_distortion_post']:.4f}; median post/pre {summary['median_post_over_pre']:.2f}; "
        f"pre-RoPE lower in {summary['heads_where_pre_is_better']} of {len(rows)} heads"
    )
    if args.out:
        with open(args.out, "w") as f:
            result = dict(model="smollm2", bits=args.bits, tokens=ids.shape[1], skip=SKIP, summary=summary, rows=rows)
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
