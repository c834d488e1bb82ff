"""Quality per byte, side by side: SpectralQuant against TurboQuant, KIVI, INT and FP8 baselines
running inside the same compressed cache (so every method's bytes are counted the same way).

For each method and budget (bits per coordinate), on a real model and real text, all on the real
code path (chunked prefill through the wrapped model's compressed cache, DESIGN.md section 4):

- measured compression ratio (bytes held vs fp16 bytes of the same K/V, at the evaluation length),
- perplexity change, KL divergence to FP16 and top-1 agreement on the held-out split of the
  bundled book (Debian ``cfi-en``) and on Python's help text (``pydoc``),
- per-layer cosine similarity of the attention output (input of ``o_proj``) to FP16,
- passkey retrieval at several context lengths and depths (greedy, after a chunked prefill) and the
  key's teacher-forced log-probability (a margin the pass/fail count hides),
- greedy generation: tokens until the first divergence from FP16.

Prints a table, writes JSON and a PNG (ratio against perplexity change and KL, one line per method):

    python benchmarks/quality.py --model smollm2 --methods spectralquant,turboquant,kivi,int,fp8 \
        --bits 2,2.5,3,4 --out benchmarks/results/quality_smollm2

``--bits`` applies to every method that can store it (KIVI and INT take whole bits, FP8 only 8);
``--method-bits name=b1,b2`` adds or replaces one method's budgets. ``--pre-rope-keys`` runs the
SpectralQuant rows on a calibration of keys before RoPE (``sq.calibrate(..., pre_rope_keys=True)``;
``--pre-rope-keys auto``: before or after RoPE per layer, ``pre_rope_keys="auto"``).
``--replot A.json B.json --out P`` draws the rows of earlier runs in one plot, running nothing.

``--ablations all`` (or a comma list of names from ``ABLATIONS``) instead measures SpectralQuant at
``--ablation-bits`` with one lever changed per row (calibration levers recalibrate, cached):

    python benchmarks/quality.py --model smollm2 --ablations all --ablation-bits 2.25 \
        --passkey 4096 --passkey-depths 0.1,0.3,0.5,0.7,0.9 --out benchmarks/results/ablations_smollm2
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from spectralquant.adapters import find_adapter
from spectralquant.adapters.hf_cache_argument import with_cache
from spectralquant.integrations.calibrate import SENSITIVITY_PREFIX
from spectralquant.integrations.evaluation import chunked_logits, compare_to_reference, reference_chunks
from spectralquant.integrations.offline_models import cache_dir, load_offline_model
from transformers import DynamicCache

import spectralquant as sq
from spectralquant.calibration import Calibration
from spectralquant.config import METHODS
from spectralquant.corpus import book_text, pydoc_topics
from spectralquant.metrics import token_nll

PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class Ablation:
    """One lever changed from the default SpectralQuant configuration at a budget of ``b`` bits:
    ``dials`` for ``sq.wrap``, ``calibration`` options for ``sq.calibrate`` (recalibrates),
    ``key_shift`` bits moved from values to keys (keys ``b + shift``, values ``b - shift``), or one
    kind held at a fixed width (``key_bits`` / ``value_bits``; the other stays at ``b``)."""

    dials: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    key_shift: float = 0.0
    key_bits: float | None = None
    value_bits: float | None = None

    def wrap_options(self, bits: float) -> dict:
        if self.key_shift or self.key_bits is not None or self.value_bits is not None:
            # The sensitivity layer budget pools key and value bits, so a split only holds under a
            # uniform one (compare these rows with "uniform layer budget") unless the row sets
            # layer_budget="sensitivity_per_kind".
            keys = self.key_bits if self.key_bits is not None else bits + self.key_shift
            values = self.value_bits if self.value_bits is not None else bits - self.key_shift
            return dict({"layer_budget": "uniform", **self.dials}, key_bits=keys, value_bits=values)
        return dict(self.dials, bits=bits)


_FAST = dict(allocation="uniform", codebook="linear", layer_budget="uniform")
ABLATIONS: dict[str, Ablation] = {
    "default": Ablation(),
    "random rotation": Ablation(dict(rotation="random")),
    "uniform bits": Ablation(dict(allocation="uniform")),
    "random rotation, uniform bits": Ablation(dict(rotation="random", allocation="uniform")),
    "no band mixing": Ablation(dict(mix_bands=False)),
    "gaussian codebook (table)": Ablation(dict(codebook="gaussian")),
    "linear codebook": Ablation(dict(codebook="linear")),
    "fitted codebook": Ablation(dict(codebook="fitted"), dict(samples_per_layer=4096)),
    "no mean-centering": Ablation(dict(center=False)),
    "no per-vector scale": Ablation(dict(scale=False)),
    "fp16 per-vector scale": Ablation(dict(scale_bits=16)),
    "QJL on (16 dims)": Ablation(dict(qjl_dims=16)),
    "uniform layer budget": Ablation(dict(layer_budget="uniform")),
    # Sliding-window layers hold at most their window: count their bits by bytes held at 4k.
    "layer budget by bytes held at 4k": Ablation(dict(budget_context=4096)),
    "keys +0.5 / values -0.5": Ablation(key_shift=0.5),
    "keys -0.5 / values +0.5": Ablation(key_shift=-0.5),
    # Diagnostics, not levers (they spend more bytes): which side limits passkey retrieval.
    "keys 8 bits (diagnostic)": Ablation(key_bits=8.0),
    "values 8 bits (diagnostic)": Ablation(value_bits=8.0),
    # The codec the tensor-core kernel reads (spectralquant/kernels/mma_attention.py): every coordinate of a
    # head at the same width (2 or 4 bits), evenly spaced levels, every layer at the same budget.
    "fast kernel codec: keys 4 / values 4": Ablation(_FAST, key_bits=4.0, value_bits=4.0),
    "fast kernel codec: keys 4 / values 2": Ablation(_FAST, key_bits=4.0, value_bits=2.0),
    "fast kernel codec: keys 2 / values 2": Ablation(_FAST, key_bits=2.0, value_bits=2.0),
    "fast kernel codec: keys 4 / values 4 without band mixing": Ablation(
        dict(_FAST, mix_bands=False), key_bits=4.0, value_bits=4.0
    ),
    "query-aware keys": Ablation(dict(key_attention_aware=True)),
    "output-aware values": Ablation(dict(value_attention_aware=True)),
    "window 0": Ablation(dict(window=0)),
    "window 256": Ablation(dict(window=256)),
    "no sinks": Ablation(dict(sinks=0)),
    "unweighted calibration": Ablation(calibration=dict(attention_weighted=False)),
    "no position copies": Ablation(calibration=dict(position_copies=0)),
    "calibration 2k tokens": Ablation(calibration=dict(max_tokens=2048)),
    "calibration 16k tokens": Ablation(calibration=dict(max_tokens=16384)),
    "pre-RoPE keys": Ablation(calibration=dict(pre_rope_keys=True)),
    "pre-RoPE query-aware keys": Ablation(dict(key_attention_aware=True), dict(pre_rope_keys=True)),
    "pre-RoPE query-aware keys + uniform layer budget": Ablation(
        dict(key_attention_aware=True, layer_budget="uniform"), dict(pre_rope_keys=True)
    ),
    "pre-RoPE query-aware keys + values 8 bits (diagnostic)": Ablation(
        dict(key_attention_aware=True), dict(pre_rope_keys=True), value_bits=8.0
    ),
    "pre-RoPE query-aware keys + keys 8 bits (diagnostic)": Ablation(
        dict(key_attention_aware=True), dict(pre_rope_keys=True), key_bits=8.0
    ),
    "pre-RoPE query-aware keys 2 / values 2.5": Ablation(
        dict(key_attention_aware=True), dict(pre_rope_keys=True), key_bits=2.0, value_bits=2.5
    ),
    "pre-RoPE query-aware keys 1.5 / values 3": Ablation(
        dict(key_attention_aware=True), dict(pre_rope_keys=True), key_bits=1.5, value_bits=3.0
    ),
    "pre-RoPE query-aware keys + layer floor 1.5 bits": Ablation(
        dict(key_attention_aware=True, layer_min_bits=1.5), dict(pre_rope_keys=True)
    ),
    "pre-RoPE query-aware keys + layer floor 2 bits": Ablation(
        dict(key_attention_aware=True, layer_min_bits=2.0), dict(pre_rope_keys=True)
    ),
    "layer floor 1.5 bits": Ablation(dict(layer_min_bits=1.5)),
    "pre-RoPE query-aware keys + sensitivity at 1536 tokens": Ablation(
        dict(key_attention_aware=True), dict(pre_rope_keys=True, sensitivity_prefix=1536)
    ),
    "pre-RoPE query-aware keys + sensitivity at 1536 tokens with recall": Ablation(
        dict(key_attention_aware=True),
        dict(pre_rope_keys=True, sensitivity_prefix=1536, sensitivity_recall=True),
    ),
    "sensitivity at 1536 tokens with recall": Ablation(
        calibration=dict(sensitivity_prefix=1536, sensitivity_recall=True)
    ),
    # Keys after RoPE, so neither costs decode speed; query-aware keys became the presets' default,
    # the 1,536-token prefix did not (it loses on Gemma 3).
    "sensitivity at 1536 tokens": Ablation(calibration=dict(sensitivity_prefix=1536)),
    "query-aware keys + sensitivity at 1536 tokens": Ablation(
        dict(key_attention_aware=True), dict(sensitivity_prefix=1536)
    ),
    "pre-RoPE query-aware keys + sensitivity at 1536 tokens + budget per kind": Ablation(
        dict(key_attention_aware=True, layer_budget="sensitivity_per_kind"),
        dict(pre_rope_keys=True, sensitivity_prefix=1536),
    ),
    "pre-RoPE query-aware keys 2 / values 2.5 + sensitivity at 1536 tokens + budget per kind": Ablation(
        dict(key_attention_aware=True, layer_budget="sensitivity_per_kind"),
        dict(pre_rope_keys=True, sensitivity_prefix=1536),
        key_bits=2.0,
        value_bits=2.5,
    ),
    "key domain per layer (auto)": Ablation(calibration=dict(pre_rope_keys="auto")),
    "key domain per layer (auto) query-aware keys + sensitivity at 1536 tokens": Ablation(
        dict(key_attention_aware=True), dict(pre_rope_keys="auto", sensitivity_prefix=1536)
    ),
    # Fewer fp16 window tokens buy more bits for the history at the same bytes (run at 2.375 bits).
    "key domain per layer (auto) query-aware keys + window 32": Ablation(
        dict(key_attention_aware=True, window=32), dict(pre_rope_keys="auto")
    ),
    "pre-RoPE query-aware keys + sensitivity at 1536 tokens + window 32": Ablation(
        dict(key_attention_aware=True, window=32), dict(pre_rope_keys=True, sensitivity_prefix=1536)
    ),
    "pre-RoPE query-aware keys + sensitivity at 1536 tokens + values Hadamard uniform bits": Ablation(
        dict(key_attention_aware=True, value_rotation="hadamard", value_allocation="uniform"),
        dict(pre_rope_keys=True, sensitivity_prefix=1536),
    ),
    "pre-RoPE query-aware keys + sensitivity at 1536 tokens + values uniform bits": Ablation(
        dict(key_attention_aware=True, value_allocation="uniform"), dict(pre_rope_keys=True, sensitivity_prefix=1536)
    ),
    "pre-RoPE query-aware keys + sensitivity at 1536 tokens + values at least 1 bit per coordinate": Ablation(
        dict(key_attention_aware=True, value_min_bits=1), dict(pre_rope_keys=True, sensitivity_prefix=1536)
    ),
    "values uniform bits": Ablation(dict(value_allocation="uniform")),
    "sensitivity at 1536 tokens + values uniform bits": Ablation(
        dict(value_allocation="uniform"), dict(sensitivity_prefix=1536)
    ),
    "values at least 1 bit per coordinate": Ablation(dict(value_min_bits=1)),
    # The presets keep every value coordinate at >= 1 bit since this row was measured against them.
    "values water-filled down to 0 bits": Ablation(dict(value_min_bits=0)),
    "keys at least 1 bit per coordinate": Ablation(dict(key_min_bits=1)),
    "values Hadamard uniform bits": Ablation(dict(value_rotation="hadamard", value_allocation="uniform")),
    "pre-RoPE keys + values uniform bits": Ablation(dict(value_allocation="uniform"), dict(pre_rope_keys=True)),
    "key domain per layer (auto) + sensitivity at 1536 tokens + values uniform bits": Ablation(
        dict(value_allocation="uniform"), dict(pre_rope_keys="auto", sensitivity_prefix=1536)
    ),
    # The presets decode unbiased levels (times 1 / E[q(z) z]); these rows decode the MSE-optimal,
    # shrunk ones instead (same codes and bytes).
    "MSE levels": Ablation(dict(unbiased=False)),
    "MSE keys": Ablation(dict(key_unbiased=False)),
    "MSE values": Ablation(dict(value_unbiased=False)),
    "pre-RoPE query-aware keys + output-aware values": Ablation(
        dict(key_attention_aware=True, value_attention_aware=True), dict(pre_rope_keys=True)
    ),
}


def valid_bits(method: str, bits: float) -> bool:
    """Whether ``method`` can store ``bits`` per coordinate."""
    if method in ("kivi", "int"):
        return bits in (2, 3, 4, 8)
    if method == "fp8":
        return bits == 8
    if method == "turboquant_qjl":
        return bits >= 2
    return 1 <= bits <= 8


def text_ids(tok, text: str, length: int) -> torch.Tensor:
    """``[1, length]`` token ids of ``text`` with the tokenizer's BOS token first (if it has one)."""
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[:, : length - 1]
    bos = tok.bos_token_id if tok.bos_token_id is not None else ids[0, 0].item()
    out = torch.cat([torch.tensor([[bos]]), ids], 1)
    if out.shape[1] < length:
        raise ValueError(f"the text has only {out.shape[1]} tokens, fewer than the {length} asked for")
    return out


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """Chunked prefill of ``ids [1, T]`` through ``cache``; returns the last position's logits ``[1, V]``."""
    last = None
    for logits in chunked_logits(model, ids, cache, chunk):
        last = logits[:, -1]
    return last


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, cache, new_tokens: int, chunk: int) -> list[int]:
    """Greedy continuation of ``ids [1, T]`` after a chunked prefill through ``cache``."""
    return continue_greedy(model, prefill(model, ids, cache, chunk), cache, new_tokens)


@torch.inference_mode()
def continue_greedy(model, last: torch.Tensor, cache, new_tokens: int) -> list[int]:
    """``new_tokens`` greedy tokens from the logits ``last [1, V]`` of a prefilled ``cache``."""
    out, cached = [], with_cache(model, cache)
    for _ in range(new_tokens):
        nxt = last.argmax(-1, keepdim=True)
        out.append(int(nxt))
        last = model(input_ids=nxt, use_cache=True, **cached).logits[:, -1]
    return out


def passkey_prompt(tok, length: int, depth: float, key: int) -> torch.Tensor:
    """A prompt of about ``length`` tokens with ``The pass key is <key>`` at relative ``depth``."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    per = len(tok(FILLER, add_special_tokens=False).input_ids)
    fixed = len(tok(PASSKEY_INTRO + needle + PASSKEY_QUESTION, add_special_tokens=False).input_ids) + 1
    n = max(1, (length - fixed) // per)
    before = int(round(n * depth))
    text = PASSKEY_INTRO + FILLER * before + needle + FILLER * (n - before) + PASSKEY_QUESTION
    return text_ids(tok, text, len(tok(text, add_special_tokens=False).input_ids) + 1)


@torch.inference_mode()
def answer_logprob(model, last: torch.Tensor, cache, answer: torch.Tensor) -> float:
    """Teacher-forced log-probability (nats) of the tokens ``answer [1, A]`` after a prefilled
    ``cache`` whose last logits are ``last [1, V]``."""
    total, cached = 0.0, with_cache(model, cache)
    for j in range(answer.shape[1]):
        total += float(torch.log_softmax(last.float(), -1)[0, answer[0, j]])
        last = model(input_ids=answer[:, j : j + 1], use_cache=True, **cached).logits[:, -1]
    return total


def passkey_key(trial: int, length: int) -> int:
    """The 5-digit key of passkey trial ``trial`` (0-based) at prompt length ``length``."""
    return 10000 + (7919 * (trial + 1) * length) % 90000


def passkey_trial(model, tok, ids: torch.Tensor, key: int, cache, chunk: int) -> tuple[bool, float]:
    """Whether the greedy answer to the passkey prompt ``ids [1, T]``, prefilled through ``cache``,
    contains ``key``, and the key's teacher-forced log-probability (nats). Both read one prefill
    (the cache is copied; ``cache`` holds the greedy answer afterwards)."""
    last = prefill(model, ids, cache, chunk)
    snapshot = copy.deepcopy(cache)
    answer = tok.decode(continue_greedy(model, last, cache, 7))
    key_ids = tok(f" {key}", return_tensors="pt", add_special_tokens=False).input_ids
    return str(key) in answer.replace(" ", ""), answer_logprob(model, last, snapshot, key_ids)


def passkey_accuracy(model, tok, make_cache: Callable, lengths, depths, chunk: int) -> dict[str, dict[str, float]]:
    """Per length: ``accuracy``, the fraction of (depth) trials whose greedy answer contains the
    key, and ``logprob``, the mean over trials of the key's teacher-forced log-probability (nats;
    a margin that a pass/fail count hides; ``logprobs`` per trial)."""
    result = {}
    for length in lengths:
        hits, logprobs = 0, []
        for i, depth in enumerate(depths):
            key = passkey_key(i, length)
            hit, logprob = passkey_trial(model, tok, passkey_prompt(tok, length, depth, key), key, make_cache(), chunk)
            hits += hit
            logprobs.append(logprob)
        result[str(length)] = dict(accuracy=hits / len(depths), logprob=sum(logprobs) / len(depths), logprobs=logprobs)
    return result


def passkey_text(pk: dict | None) -> str:
    """``length:accuracy (logprob)`` per length, for the printed table."""
    return " ".join(f"{k}:{v['accuracy']:.2f} ({v['logprob']:+.2f})" for k, v in pk.items()) if pk else "-"


@torch.inference_mode()
def attention_cosine(model, ids: torch.Tensor, make_cache: Callable, chunk: int, reference: list) -> list[float]:
    """Per layer, the mean cosine similarity between the attention outputs (``o_proj`` inputs) of
    the last chunk of ``ids`` and ``reference`` (those of the FP16 run; filled when empty)."""
    outputs: list[torch.Tensor] = []
    layers = model.model.layers
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, args: outputs.append(args[0][0].float()))
        for layer in layers
    ]
    try:
        for _ in chunked_logits(model, ids, make_cache(), chunk):
            pass
    finally:
        for h in hooks:
            h.remove()
    last = outputs[-len(layers) :]
    if not reference:
        reference.extend(last)
        return [1.0] * len(layers)
    return [float(torch.nn.functional.cosine_similarity(a, r, dim=-1).mean()) for a, r in zip(last, reference)]


def first_divergence(a: list[int], b: list[int]) -> int:
    """Tokens until ``a`` and ``b`` first differ (their length if they never do)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def reference_perplexity(ids: torch.Tensor, chunks: list[torch.Tensor]) -> float:
    """Perplexity of ``ids [1, T]`` from the FP16 chunked logits of :func:`reference_chunks`."""
    nll, start = 0.0, 0
    for logits in chunks:
        c = min(logits.shape[1], ids.shape[1] - 1 - start)
        nll += float(token_nll(logits[:, :c], ids[:, start + 1 : start + 1 + c]).sum())
        start += logits.shape[1]
    return math.exp(nll / (ids.shape[1] - 1))


def load_calibration(model, tok, name: str, path: str | None, **options) -> Calibration:
    """The benchmark's calibration of ``model`` with ``sq.calibrate`` ``options`` (cached by options)."""
    slug = "".join(f"-{k}={v}" for k, v in sorted(options.items()))
    path = path or os.path.join(cache_dir(), f"{name}-benchmark-calibration{slug}.safetensors")
    if os.path.exists(path):
        calib = Calibration.load(path)
        prefix = options.get("sensitivity_prefix", SENSITIVITY_PREFIX)
        measured = calib.info.get("sensitivity_tokens", [None])[0]
        if "output" in calib.signature.captured and measured == prefix:
            return calib
        why = "output moments" if measured == prefix else f"sensitivities after {prefix} tokens (has {measured})"
        print(f"{path} predates {why}: recalibrating", flush=True)
    calib = sq.calibrate(model, tok, **options)
    calib.save(path)
    return calib


def plot(rows: list[dict], reference_ppl: float, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in dict.fromkeys(label(r) for r in rows):
        pts = sorted((r for r in rows if label(r) == method), key=lambda r: r["ratio"])
        x = [r["ratio"] for r in pts]
        style = dict(marker="o", linewidth=2.5 if method == "spectralquant" else 1.2, label=method)
        axes[0].plot(x, [100 * r["book"]["ppl_change"] for r in pts], **style)
        axes[1].plot(x, [r["book"]["kl"] for r in pts], **style)
        for r in pts:
            axes[0].annotate(f"{r['bits']:g}", (r["ratio"], 100 * r["book"]["ppl_change"]), fontsize=7)
    axes[0].set_ylabel(f"perplexity change vs FP16 (%), FP16 ppl {reference_ppl:.2f}")
    axes[1].set_ylabel("KL(FP16 || compressed), nats/token")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("measured compression ratio (bytes held vs FP16)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].axhline(0, color="black", linewidth=0.6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def label(row: dict) -> str:
    return f"{row['method']}: {row['variant']}" if row.get("variant") else row["method"]


def measure(model, calib, options: dict, inputs: dict, args, lengths: list[int], depths: list[float]) -> dict:
    """The metrics of ``model`` wrapped with ``sq.wrap`` ``options``."""
    sq.wrap(model, calib, **options)
    state = find_adapter(model).state()
    made = []

    def make_cache():
        made.append(state.make_cache())
        return made[-1]

    try:
        book = compare_to_reference(model, inputs["book"], make_cache, args.chunk, inputs["ref_book"])
        stats = made[-1].compression_stats()
        pydoc = None
        if inputs["pydoc"] is not None:
            pydoc = compare_to_reference(model, inputs["pydoc"], make_cache, args.chunk, inputs["ref_pydoc"])
        cos = attention_cosine(model, inputs["book"][:, :1024], make_cache, args.chunk, inputs["ref_attn"])
        div = [
            first_divergence(greedy(model, p, make_cache(), args.greedy_tokens, args.chunk), r)
            for p, r in zip(inputs["greedy_prompts"], inputs["ref_greedy"])
        ]
        pk = passkey_accuracy(model, inputs["tok"], make_cache, lengths, depths, args.chunk) if lengths else None
    finally:
        sq.unwrap(model)
    return dict(
        ratio=stats.ratio,
        held_bytes=stats.held_bytes,
        fp16_bytes=stats.fp16_bytes,
        book=book.as_dict(),
        pydoc=pydoc.as_dict() if pydoc else None,
        attention_cosine=cos,
        greedy_divergence=div,
        passkey=pk,
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    p.add_argument("--methods", default="spectralquant,turboquant,turboquant_qjl,kivi,int,fp8")
    p.add_argument("--bits", default="2,2.5,3,4", help="budgets (bits per coordinate) for every method")
    p.add_argument("--method-bits", action="append", default=[], help="e.g. spectralquant=2.25,2.75,3.5")
    p.add_argument("--tokens", type=int, default=4096, help="evaluation length (the ratio is measured here)")
    p.add_argument("--pydoc-tokens", type=int, default=2048, help="second text's length (0: skip)")
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk through the cache")
    p.add_argument("--passkey", default="1024,2048,4096,8192", help="passkey lengths ('' to skip)")
    p.add_argument("--passkey-depths", default="0.1,0.5,0.9")
    p.add_argument("--passkey-for", default="", help="method=bits pairs that get passkey runs (default: all)")
    p.add_argument("--greedy-prompts", type=int, default=3, help="prompts for the greedy-divergence test")
    p.add_argument("--greedy-tokens", type=int, default=48)
    p.add_argument("--ablations", default="", help="'all' or comma-separated names from ABLATIONS")
    p.add_argument("--ablation-bits", type=float, default=2.25, help="budget of the ablation rows")
    p.add_argument("--calibration", default=None, help="calibration file (default: calibrate once, cache)")
    p.add_argument(
        "--pre-rope-keys", nargs="?", const="all", default=None, choices=("all", "auto"),
        help="SpectralQuant rows use a calibration of keys before RoPE ('all', the flag alone) or, with "
             "'auto', before or after RoPE per layer (baselines keep theirs after RoPE)",
    )
    p.add_argument("--out", default=None, help="output prefix for .json and .png")
    p.add_argument("--replot", nargs="+", default=None, metavar="JSON",
                   help="only plot the rows of these result files together (to --out .png); runs nothing")
    return p.parse_args()


def budgets(args) -> list[tuple[str, float]]:
    bits = [float(b) for b in args.bits.split(",") if b]
    per = {m: [b for b in bits if valid_bits(m, b)] for m in args.methods.split(",") if m}
    for spec in args.method_bits:
        name, _, values = spec.partition("=")
        per[name] = [float(b) for b in values.split(",")]
    for name, values in per.items():
        if name not in METHODS:
            raise SystemExit(f"unknown method {name!r}; choose from {METHODS}")
        for b in values:
            if not valid_bits(name, b):
                raise SystemExit(f"{name} cannot store {b:g} bits per coordinate")
    if "fp8" in per and not per["fp8"]:
        per["fp8"] = [8.0]
    return [(m, b) for m, values in per.items() for b in values]


def runs(args, model, tok, calib: Calibration):
    """``(row metadata, sq.wrap options, calibration)`` for every row asked for."""
    if not args.ablations:
        pre = None
        if args.pre_rope_keys:
            domain = True if args.pre_rope_keys == "all" else "auto"
            pre = load_calibration(model, tok, args.model, None, pre_rope_keys=domain)
            variant = "pre-RoPE keys" if domain is True else "key domain per layer (auto)"
        for method, bits in budgets(args):
            if pre is not None and method == "spectralquant":
                yield dict(method=method, bits=bits, variant=variant), dict(method=method, bits=bits), pre
            else:
                yield dict(method=method, bits=bits), dict(method=method, bits=bits), calib
        return
    names = list(ABLATIONS) if args.ablations == "all" else [n.strip() for n in args.ablations.split(",")]
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise SystemExit(f"unknown ablation(s) {unknown}; choose from {list(ABLATIONS)}")
    for name in names:
        ablation = ABLATIONS[name]
        options = ablation.wrap_options(args.ablation_bits)
        calibration = (
            load_calibration(model, tok, args.model, None, **ablation.calibration) if ablation.calibration else calib
        )
        yield dict(method="spectralquant", bits=args.ablation_bits, variant=name, options=options), options, calibration


def replot(paths: list[str], out: str) -> None:
    """One plot of the rows of several result files of the same model, context and FP16 reference."""
    results = [json.load(open(p)) for p in paths]
    first = results[0]

    def setting(r: dict) -> tuple:
        return r["model"], r["tokens"], r["fp16"]["ppl_book"]

    for path, r in zip(paths, results):
        if setting(r) != setting(first):
            raise SystemExit(f"{path} is for another model, context or FP16 reference than {paths[0]}")
    rows = [row for r in results for row in r["rows"]]
    title = f"{first['model']}, {first['tokens']}-token context (cfi-en evaluation split)"
    plot(rows, first["fp16"]["ppl_book"], title, out + ".png")
    print(f"wrote {out}.png")


def main() -> None:
    args = parse_args()
    if args.replot:
        if not args.out:
            raise SystemExit("--replot needs --out")
        return replot(args.replot, args.out)
    torch.manual_seed(0)
    model, tok = load_offline_model(args.model)
    calib = load_calibration(model, tok, args.model, args.calibration)
    book = text_ids(tok, book_text("evaluation"), args.tokens)
    pydoc = text_ids(tok, pydoc_topics(), args.pydoc_tokens) if args.pydoc_tokens else None
    lengths = [int(n) for n in args.passkey.split(",") if n]
    depths = [float(d) for d in args.passkey_depths.split(",") if d]
    passkey_for = {tuple(s.split("=")) for s in args.passkey_for.split(",") if s}
    greedy_prompts = [
        text_ids(tok, book_text("evaluation")[20000 * (i + 1) :], 512) for i in range(args.greedy_prompts)
    ]

    t0 = time.time()
    ref_book = reference_chunks(model, book, args.chunk)
    ref_pydoc = reference_chunks(model, pydoc, args.chunk) if pydoc is not None else None
    ref_attn: list[torch.Tensor] = []
    attention_cosine(model, book[:, :1024], lambda: DynamicCache(config=model.config), args.chunk, ref_attn)
    ref_greedy = [
        greedy(model, p, DynamicCache(config=model.config), args.greedy_tokens, args.chunk) for p in greedy_prompts
    ]
    fp16_passkey = passkey_accuracy(model, tok, lambda: DynamicCache(config=model.config), lengths, depths, args.chunk)
    ppl_book = reference_perplexity(book, ref_book)
    ppl_pydoc = reference_perplexity(pydoc, ref_pydoc) if pydoc is not None else None
    print(
        f"{args.model}: FP16 ppl {ppl_book:.3f} on {args.tokens} tokens, passkey {passkey_text(fp16_passkey)} "
        f"({time.time() - t0:.0f}s)",
        flush=True,
    )

    rows = []
    width = 15 if not args.ablations else 48
    header = (
        f"{'method':{width}s} {'bits':>5s} {'ratio':>6s} {'ppl%':>7s} {'KL':>7s} {'top1':>6s} {'pydoc%':>7s} "
        f"{'cos min':>7s} {'greedy':>6s}  passkey"
    )
    print(header, flush=True)
    inputs = dict(
        tok=tok,
        book=book,
        pydoc=pydoc,
        ref_book=ref_book,
        ref_pydoc=ref_pydoc,
        ref_attn=ref_attn,
        greedy_prompts=greedy_prompts,
        ref_greedy=ref_greedy,
    )
    for meta, options, calibration in runs(args, model, tok, calib):
        t = time.time()
        run_passkey = not passkey_for or (meta["method"], f"{meta['bits']:g}") in passkey_for
        row = dict(meta, **measure(model, calibration, options, inputs, args, lengths if run_passkey else [], depths))
        rows.append(row)
        pk_text = passkey_text(row["passkey"])
        pydoc_change = 100 * row["pydoc"]["ppl_change"] if row["pydoc"] else math.nan
        divergence = row["greedy_divergence"]
        greedy_mean = sum(divergence) / len(divergence) if divergence else math.nan
        print(
            f"{label(row):{width}s} {row['bits']:5g} {row['ratio']:6.2f} {100 * row['book']['ppl_change']:+7.2f} "
            f"{row['book']['kl']:7.4f} {row['book']['top1']:6.3f} {pydoc_change:+7.2f} "
            f"{min(row['attention_cosine']):7.4f} {greedy_mean:6.1f}"
            f"  {pk_text}  ({time.time() - t:.0f}s)",
            flush=True,
        )
        if args.out:  # after every row, so an interrupted run keeps what it measured
            save(args, rows, ppl_book, ppl_pydoc, fp16_passkey, depths)
    if args.out:
        plot(rows, ppl_book, f"{args.model}, {args.tokens}-token context (cfi-en evaluation split)", args.out + ".png")
        print(f"wrote {args.out}.json and {args.out}.png")


def save(args, rows: list[dict], ppl_book: float, ppl_pydoc: float | None, passkey: dict, depths: list) -> None:
    result = dict(
        model=args.model,
        tokens=args.tokens,
        pydoc_tokens=args.pydoc_tokens,
        chunk=args.chunk,
        fp16=dict(ppl_book=ppl_book, ppl_pydoc=ppl_pydoc, passkey=passkey),
        passkey_depths=depths,
        greedy_tokens=args.greedy_tokens,
        rows=rows,
        command="python benchmarks/quality.py " + " ".join(sys.argv[1:]),
    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
