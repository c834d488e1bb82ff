"""Would quantizing keys before RoPE (and applying RoPE after decoding) help? A fake-quantization
comparison on SmolLM2, before anyone builds it into the cache and the kernels.

Only the keys are quantized (values stay exact, so the comparison isolates them), with the same
quantizer options in both arms (``--bits`` per coordinate, default spectral / water-filling /
polynomial codebook, one uniform width for every layer), each calibrated on the same
``--tokens`` of the bundled book's calibration split: on ``k_proj`` outputs (pre-RoPE) or on those
keys through the model's rotary embedding (post-RoPE, as the cache stores them today). The first
``SINKS`` tokens stay exact. Every key of a full forward pass is replaced by its reconstruction.
Reports perplexity change and KL against the unquantized model on the evaluation split, and
passkey prompts' teacher-forced key log-probability (nats) and whether every key token is the
argmax. Prints a table, writes JSON:

    python benchmarks/pre_rope_keys.py --bits 2.25 --out benchmarks/results/pre_rope_keys_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from spectralquant.adapters import find_adapter
from spectralquant.integrations.offline_models import load_offline_model

from spectralquant.calibration import KVStats
from spectralquant.corpus import book_text
from spectralquant.metrics import kl_divergence, token_nll
from spectralquant.quantizer import Quantizer, QuantizerConfig
from spectralquant.rope import apply_rope
from spectralquant.stats import CovarianceAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.quality import passkey_key, passkey_prompt, text_ids  # noqa: E402

SINKS = 4
ARMS = ("pre-RoPE", "post-RoPE")


def rotary(model, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own ``cos, sin`` ``[1, length, D]`` for positions ``0 .. length - 1``."""
    return find_adapter(model).rope_table(0)(torch.arange(length)[None])


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """RoPE of keys ``x [T, H, D]`` at positions ``0 .. T-1`` (``inverse``: rotate back)."""
    t = x.shape[0]
    return apply_rope(x.transpose(0, 1)[None], cos[:, :t], sin[:, :t], inverse)[0].transpose(0, 1)


@torch.inference_mode()
def projections(model, ids: torch.Tensor, kinds: str = "k") -> list[tuple[torch.Tensor, ...]]:
    """Per layer, the outputs of the attention's ``{kind}_proj`` for each letter of ``kinds``
    (``"k"``: pre-RoPE keys; ``"kv"``: keys and values), each ``[T, H, D]`` float32, of ``ids [1, T]``."""
    cfg = model.config
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = [
        getattr(layer.self_attn, f"{kind}_proj").register_forward_hook(
            lambda m, i, o, n=n, kind=kind: captured.__setitem__((n, kind), o)
        )
        for n, layer in enumerate(model.model.layers)
        for kind in kinds
    ]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    shape = (ids.shape[1], cfg.num_key_value_heads, cfg.head_dim)
    layers = range(len(model.model.layers))
    return [tuple(captured[(n, kind)][0].reshape(shape).float() for kind in kinds) for n in layers]


def pre_rope_keys(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the pre-RoPE keys ``[T, H, D]`` (float32, ``k_proj`` outputs) of ``ids [1, T]``."""
    return [keys for (keys,) in projections(model, ids)]


def calibrate(model, ids: torch.Tensor, bits: float) -> dict[str, list[Quantizer]]:
    """Per arm, one key quantizer per layer from the keys of ``ids``."""
    cfg = model.config
    cos, sin = rotary(model, ids.shape[1])
    config = QuantizerConfig(bits=bits)
    out: dict[str, list[Quantizer]] = {arm: [] for arm in ARMS}
    for n, pre in enumerate(pre_rope_keys(model, ids)):
        for arm, keys in zip(ARMS, (pre, rope(pre, cos, sin))):
            acc = CovarianceAccumulator(cfg.num_key_value_heads, cfg.head_dim).update(keys[SINKS:])
            out[arm].append(Quantizer.from_stats(KVStats.from_accumulator(acc), config, seed_offset=n))
    return out


def fake_quantized_logits(model, ids: torch.Tensor, arm: str | None, quantizers: dict) -> torch.Tensor:
    """Logits ``[T, V]`` of one forward pass with every key past the sinks replaced by its
    reconstruction under ``arm`` (None: unquantized)."""
    cfg = model.config
    cos, sin = rotary(model, ids.shape[1])

    def hook(n):
        def replace(module, inputs, out):
            x = out[0].reshape(ids.shape[1], cfg.num_key_value_heads, cfg.head_dim).float()
            q = quantizers[arm][n]
            if arm == "pre-RoPE":
                y = q.decode(q.encode(x))
            else:
                y = rope(q.decode(q.encode(rope(x, cos, sin))), cos, sin, inverse=True)
            y[:SINKS] = x[:SINKS]
            return y.reshape(out.shape).to(out.dtype)

        return replace

    hooks = [] if arm is None else [
        layer.self_attn.k_proj.register_forward_hook(hook(n)) for n, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.inference_mode():
            return model(ids).logits[0].float()
    finally:
        for h in hooks:
            h.remove()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=float, default=2.25, help="key bits per coordinate")
    p.add_argument("--tokens", type=int, default=4096, help="calibration and evaluation length")
    p.add_argument("--passkey-length", type=int, default=4096)
    p.add_argument("--passkey-depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_offline_model("smollm2")
    quantizers = calibrate(model, text_ids(tok, book_text("calibration"), args.tokens), args.bits)
    ids = text_ids(tok, book_text("evaluation"), args.tokens)
    depths = [float(d) for d in args.passkey_depths.split(",") if d]
    prompts = []
    for i, depth in enumerate(depths):
        key = passkey_key(i, args.passkey_length)
        prompt = passkey_prompt(tok, args.passkey_length, depth, key)
        answer = tok(f" {key}", return_tensors="pt", add_special_tokens=False).input_ids
        prompts.append((torch.cat([prompt, answer], 1), answer.shape[1]))

    rows = []
    reference = fake_quantized_logits(model, ids, None, quantizers)
    nll_ref = float(token_nll(reference[:-1], ids[0, 1:]).mean())
    print(f"{'keys':10s} {'ppl change':>10s} {'KL':>8s} {'passkey logprob':>16s} {'retrieved':>9s}")
    for arm in (None, *ARMS):
        logits = reference if arm is None else fake_quantized_logits(model, ids, arm, quantizers)
        nll = float(token_nll(logits[:-1], ids[0, 1:]).mean())
        kl = float(kl_divergence(reference[:-1], logits[:-1]).mean())
        logprobs, retrieved = [], 0
        for full, n in prompts:
            lp = torch.log_softmax(fake_quantized_logits(model, full, arm, quantizers)[-n - 1 : -1], -1)
            target = full[0, -n:]
            logprobs.append(float(lp[torch.arange(n), target].sum()))
            retrieved += bool((lp.argmax(-1) == target).all())
        row = dict(
            keys=arm or "fp16",
            bits=args.bits if arm else 16,
            ppl_change=math.exp(nll - nll_ref) - 1,
            kl=kl,
            passkey_logprob=sum(logprobs) / len(logprobs),
            passkey_logprobs=logprobs,
            passkey_retrieved=retrieved,
        )
        rows.append(row)
        print(f"{row['keys']:10s} {100 * row['ppl_change']:+9.2f}% {kl:8.4f} {row['passkey_logprob']:16.2f} "
              f"{retrieved:5d}/{len(prompts)}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(model="smollm2", tokens=args.tokens, sinks=SINKS, passkey_length=args.passkey_length,
                           passkey_depths=depths, rows=rows,
                           command="python benchmarks/pre_rope_keys.py " + " ".join(sys.argv[1:])), f, indent=1)


if __name__ == "__main__":
    main()
