"""The ``spectralquant`` command: calibrate a model, generate with compression, inspect a calibration."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MODEL_HELP = "an offline model name (smollm2, gemma3) or a local Hugging Face model folder"


def _load_model(spec: str, dtype: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .offline_models import MODELS, load_offline_model

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if spec in MODELS:
        return load_offline_model(spec, dtype=torch_dtype, device=device)
    if not Path(spec).is_dir():
        raise SystemExit(f"error: --model {spec!r} is neither {sorted(MODELS)} nor a model folder")
    tok = AutoTokenizer.from_pretrained(spec)
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype).to(device).eval()
    return model, tok


def _dials(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"error: --set expects NAME=VALUE, got {pair!r}")
        name, raw = pair.split("=", 1)
        for cast in (int, float):
            try:
                out[name] = cast(raw)
                break
            except ValueError:
                continue
        else:
            out[name] = {"true": True, "false": False}.get(raw.lower(), raw)
    return out


def _key_domain(text: str) -> bool | str | list[int]:
    """``--pre-rope-keys`` value: ``none``/``all`` (False/True), ``auto``, or ``1,3,5``."""
    if text in ("none", "all", "auto"):
        return {"none": False, "all": True}.get(text, text)
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'all', 'auto' or comma-separated layer indices, got {text!r}"
        ) from None


def cmd_calibrate(args) -> None:
    import spectralquant as sq

    model, tok = _load_model(args.model, args.dtype, args.device)
    texts = [Path(p).read_text() for p in args.texts] if args.texts else None
    calib = sq.calibrate(
        model, tok, texts, seq_len=args.seq_len, max_tokens=args.max_tokens, pre_rope_keys=args.pre_rope_keys
    )
    calib.save(args.out)
    print(f"calibrated {calib.signature.num_layers} layers on {calib.info['tokens']} tokens "
          f"(keys {calib.key_domain()}) -> {args.out}")


def cmd_generate(args) -> None:
    import spectralquant as sq

    model, tok = _load_model(args.model, args.dtype, args.device)
    engine = sq.SpectralQuant(args.preset, **_dials(args.set))
    if args.calibration:
        engine.load_calibration(args.calibration)
    else:
        print("no --calibration given: calibrating on the bundled corpus first", file=sys.stderr)
        engine.calibrate(model, tok)
    result = engine.generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens)
    if args.compare:
        ids = tok(args.prompt, return_tensors="pt").to(model.device)
        ref = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        print("FP16:       ", tok.decode(ref[0, ids.input_ids.shape[1] :], skip_special_tokens=True))
        print("compressed: ", end="")
    print(result.text)
    print(f"[{result.new_tokens} tokens, {result.tokens_per_second:.1f} tok/s] {result.stats.summary()}")


def cmd_inspect(args) -> None:
    import spectralquant as sq
    from spectralquant.codec import build_codecs

    calib = sq.Calibration.load(args.calibration)
    sig = calib.signature
    config = sq.resolve_config(args.preset, **_dials(args.set))
    windows = None
    if args.model is not None:
        from spectralquant.adapters import find_adapter

        windows = find_adapter(_load_model(args.model, "float32", "cpu")[0]).sliding_windows()
    elif config.budget_context is not None:
        raise SystemExit(
            "error: budget_context counts each layer's bits by its sliding attention window, which the "
            "calibration file does not record: pass --model (the model it was measured on)"
        )
    codecs = build_codecs(calib, config, windows)
    print(f"model {sig.name or '?'} ({sig.model_type or '?'}): {sig.num_layers} layers, "
          f"KV heads {sorted(set(sig.kv_heads))}, head_dim {sorted(set(sig.head_dims))}; "
          f"keys {calib.key_domain()}; {calib.info}")
    print(f"preset {args.preset}: {config.describe()}")
    print("d_eff = participation ratio / dims holding 90% of variance; widths = count of coordinates per bit width")
    eff = calib.effective_dims()
    layers = range(sig.num_layers) if args.layer is None else [args.layer]
    for i in layers:
        for kind in ("key", "value"):
            codec = codecs[i]
            for h in range(sig.kv_heads[i]):
                pr = float(eff[i][f"{kind}_participation"][h])
                th = int(eff[i][f"{kind}_threshold"][h])
                if codec is None:
                    alloc = "fp16"
                else:
                    q = getattr(codec, kind)
                    counts = q.widths[h].bincount(minlength=9).tolist()
                    alloc = " ".join(f"{b}b:{n}" for b, n in enumerate(counts) if n) + f" ({q.record_bytes} B/record)"
                print(f"layer {i:>3} {kind:<5} head {h}: d_eff {pr:6.1f} / {th:>3}   {alloc}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="spectralquant", description="Calibrated spectral KV-cache compression.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", default="smollm2", help=MODEL_HELP)
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        p.add_argument("--device", default="cpu")

    p = sub.add_parser("calibrate", help="measure K/V statistics and save a calibration file")
    common(p)
    p.add_argument("--texts", nargs="*", help="text files to calibrate on (default: the bundled English corpus)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument(
        "--pre-rope-keys", nargs="?", const="all", default="none", type=_key_domain,
        help="measure (and later store) keys before RoPE: better quality, slower fused decode on CUDA; "
             "'all' (the flag alone), 'auto' (per layer, whichever domain measures less sensitive) or "
             "comma-separated layer indices",
    )
    p.add_argument("--out", required=True, help="where to write the .safetensors calibration")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("generate", help="generate text with a compressed KV cache")
    common(p)
    p.add_argument("--calibration", help="a calibration file (default: calibrate now)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--preset", default="standard", help="standard, high or max")
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="dials, e.g. key_bits=4 window=128")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--compare", action="store_true", help="also print the uncompressed generation")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="per-layer/head effective dimension and bit allocation of a calibration")
    p.add_argument("calibration")
    p.add_argument("--preset", default="standard")
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE")
    p.add_argument("--layer", type=int, help="only this layer")
    p.add_argument("--model", help="the calibrated model (" + MODEL_HELP + "), for its sliding windows: "
                   "needed with budget_context, as sq.wrap counts bits with them")
    p.set_defaults(func=cmd_inspect)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    main()
