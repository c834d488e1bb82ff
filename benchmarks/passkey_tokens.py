"""What limits passkey retrieval at 6x: the needle's own keys and values, and whether a rule an
encoder could apply finds them.

Runs the passkey prompts of ``benchmarks/quality.py`` (``--length`` tokens, the key at 5 depths)
through SmolLM2 wrapped with ``sq.wrap(model, calib, bits=--bits)`` (the ``max`` preset by
default), with the keys and/or values of chosen compressed tokens read exactly instead of from
their records:

- ``needle``: the tokens of the needle sentence (an oracle: it knows where the key is);
- ``error`` / ``norm``: in every layer and forward, the ``fraction`` of compressed tokens with the
  largest squared quantization error (mean over heads) or the largest norm: rules an encoder could
  apply, since it has the vectors and their codes.

``tokens`` is the share of compressed tokens read exactly. The exact copies are not counted as
bytes held (these rows are upper bounds); ``ratio if stored`` counts the chosen tokens' chosen kinds
at fp16 on top of the cache's bytes. (The prompts end with about 90 tokens in the fp16 window, so
the ratio is below the 6.15x that the same preset holds at exactly 4,096 tokens of text.)
Prints a table, writes JSON:

    python benchmarks/passkey_tokens.py --out benchmarks/results/passkey_tokens_smollm2.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from spectralquant.adapters import find_adapter
from spectralquant.integrations.hf_cache import CompressedLayer
from spectralquant.integrations.offline_models import load_offline_model
from transformers import DynamicCache

import spectralquant as sq
from spectralquant.compressed_kv import CompressedKV

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.quality import load_calibration, passkey_key, passkey_prompt, passkey_trial  # noqa: E402

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
# (name, kinds read exactly, fraction of compressed tokens for the encoder rules)
RULES = (
    ("none", "", 0.0),
    ("needle", "kv", 0.0),
    ("needle", "v", 0.0),
    ("needle", "k", 0.0),
    ("error", "kv", 0.01),
    ("norm", "kv", 0.01),
    ("error", "v", 0.03),
)


@dataclasses.dataclass
class Choice:
    """Which compressed tokens attention reads exactly: ``rule`` (``none``, ``needle``, ``error``,
    ``norm``), ``kinds`` (a subset of ``"kv"``), ``fraction`` (error and norm rules) and the needle's
    token positions."""

    rule: str = "none"
    kinds: str = ""
    fraction: float = 0.0
    needle: tuple[int, ...] = ()

    def tokens(self, exact: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        """Chosen positions ``[T]`` (bool) among the compressed tokens ``exact [1, H, T, D]``, whose
        records decode to ``decoded``."""
        t = exact.shape[2]
        chosen = torch.zeros(t, dtype=torch.bool)
        if self.rule == "needle":
            chosen[[p for p in self.needle if p < t]] = True
        elif self.rule in ("error", "norm"):
            score = (exact - decoded if self.rule == "error" else exact).pow(2).sum(-1).mean(1)[0]
            chosen[score.topk(max(1, int(self.fraction * t))).indices] = True
        return chosen


@dataclasses.dataclass
class ExactTokensKV(CompressedKV):
    """A layer's contents whose materialized history reads the chosen tokens from exact copies
    (``exact_keys`` / ``exact_values [B, H, Tc, D]``, the compressed tokens as they entered)."""

    exact_keys: torch.Tensor | None = None
    exact_values: torch.Tensor | None = None
    choice: Choice = dataclasses.field(default_factory=Choice)

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = super().materialize(dtype)
        if self.exact_keys is None or self.choice.rule == "none":
            return k, v
        k, v = k.clone(), v.clone()
        for kind, full, exact in (("k", k, self.exact_keys), ("v", v, self.exact_values)):
            if kind in self.choice.kinds:
                t = exact.shape[2]
                chosen = self.choice.tokens(exact.float(), full[:, :, :t].float())
                full[:, :, :t][:, :, chosen] = exact[:, :, chosen].to(dtype)
        return k, v


class ExactTokensLayer(CompressedLayer):
    """A compressed layer that also keeps exact copies of the tokens it compresses (a diagnostic:
    they are not counted in its bytes)."""

    choice: Choice

    def _age_out(self) -> None:
        if self.is_sliding:
            raise ValueError("this diagnostic supports full-attention layers only")
        before, keys, values = self.compressed_length, self.keys, self.values
        super()._age_out()
        moved = self.compressed_length - before
        if moved:
            old = getattr(self, "exact", None)
            new = (keys[:, :, :moved], values[:, :, :moved])
            self.exact = new if old is None else tuple(torch.cat([o, n], 2) for o, n in zip(old, new))

    def snapshot(self) -> CompressedKV:
        view = super().snapshot()
        exact_keys, exact_values = getattr(self, "exact", (None, None))
        fields = {f.name: getattr(view, f.name) for f in dataclasses.fields(CompressedKV)}
        return ExactTokensKV(**fields, exact_keys=exact_keys, exact_values=exact_values, choice=self.choice)


def needle_positions(tok, length: int, depth: float, key: int, ids: torch.Tensor) -> tuple[int, ...]:
    """Positions of the needle sentence in ``ids``: where the prompt differs from the same prompt with
    a key that differs in every digit, widened to the sentence around both copies of the key."""
    other = passkey_prompt(tok, length, depth, int("".join(str(1 + int(c) % 9) for c in str(key))))
    if other.shape != ids.shape:
        raise ValueError("the two prompts tokenize to different lengths: cannot locate the needle")
    diff = (ids[0] != other[0]).nonzero().flatten().tolist()
    return tuple(range(min(diff) - 6, max(diff) + 8))


def run(model, tok, make_cache, choice: Choice | None, length: int) -> dict:
    """Passkey hits and the key's teacher-forced log-probability (nats) over :data:`DEPTHS`."""
    hits, logprobs, shares, stats = 0, [], [], None
    for i, depth in enumerate(DEPTHS):
        key = passkey_key(i, length)
        ids = passkey_prompt(tok, length, depth, key)
        cache = make_cache()
        if choice is not None:
            choice.needle = needle_positions(tok, length, depth, key, ids)
            for layer in cache.layers:
                layer.__class__ = ExactTokensLayer
                layer.choice = choice
        hit, logprob = passkey_trial(model, tok, ids, key, cache, 256)
        hits += hit
        logprobs.append(logprob)
        if choice is not None:
            # measured after the 7 answer tokens: still in the fp16 window, so the records are the prompt's
            stats = cache.compression_stats()
            compressed = cache.layers[0].compressed_length
            chosen = {"none": 0, "needle": len(choice.needle)}.get(choice.rule, choice.fraction * compressed)
            shares.append(chosen / compressed)
    row = dict(hits=hits, trials=len(DEPTHS), logprob=sum(logprobs) / len(logprobs), logprobs=logprobs)
    if stats is not None:
        # A chosen token's chosen kinds stored at fp16 add their fp16 bytes; its record stays (an upper
        # bound on the cost).
        share = sum(shares) / len(shares)
        compressed_fp16 = stats.fp16_bytes * cache.layers[0].compressed_length / cache.get_seq_length()
        added = share * compressed_fp16 * len(choice.kinds) / 2  # keys and values each hold half the fp16 bytes
        row.update(share=share, ratio=stats.ratio, ratio_if_stored=stats.fp16_bytes / (stats.held_bytes + added))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=float, default=2.25)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_offline_model("smollm2")
    calib = load_calibration(model, tok, "smollm2", None)
    rows = []
    t = time.time()
    fp16 = run(model, tok, lambda: DynamicCache(config=model.config), None, args.length)
    print(f"FP16: passkey {fp16['hits']}/{len(DEPTHS)}, key log-prob {fp16['logprob']:+.2f} ({time.time() - t:.0f}s)")
    print(f"{'rule':8s} {'exact':5s} {'tokens':>7s} {'passkey':>7s} {'logprob':>8s} {'ratio':>6s} {'if stored':>9s}")
    sq.wrap(model, calib, bits=args.bits)
    try:
        state = find_adapter(model).state()
        for rule, kinds, fraction in RULES:
            t = time.time()
            row = dict(rule=rule, kinds=kinds, fraction=fraction)
            row.update(run(model, tok, state.make_cache, Choice(rule, kinds, fraction), args.length))
            rows.append(row)
            print(
                f"{rule:8s} {kinds or '-':5s} {row['share']:7.2%} {row['hits']:5d}/{len(DEPTHS)} "
                f"{row['logprob']:+8.2f} {row['ratio']:5.2f}x {row['ratio_if_stored']:8.2f}x ({time.time() - t:.0f}s)",
                flush=True,
            )
    finally:
        sq.unwrap(model)
    if args.out:
        result = dict(
            model="smollm2", bits=args.bits, length=args.length, depths=DEPTHS, fp16=fp16, rows=rows,
            command="python benchmarks/passkey_tokens.py " + " ".join(sys.argv[1:]),
        )
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
