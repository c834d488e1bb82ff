"""Per-layer key/value quantizer pairs built from a calibration and a compression config."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .baselines import baseline_codec
from .calibration import Calibration
from .config import CompressionConfig
from .layer_budget import allocate_layer_bits
from .packing import UNIT_BITS, word_aligned
from .quantizer import Quantizer


@dataclass
class LayerCodec:
    """The key and value quantizers of one layer; ``keys_pre_rope``: the key quantizer encodes
    keys before RoPE (the cache takes RoPE off before encoding and puts it back after decoding)."""

    key: Quantizer  # or a baseline codec with the same encode/decode contract
    value: Quantizer
    keys_pre_rope: bool = False

    def to(self, device: torch.device | str) -> LayerCodec:
        return LayerCodec(self.key.to(device), self.value.to(device), self.keys_pre_rope)

    def nbytes(self) -> int:
        return self.key.nbytes() + self.value.nbytes()

    def __deepcopy__(self, memo) -> LayerCodec:
        # Codecs are read-only tables: a copied cache shares them.
        return self


def layer_bits(
    calibration: Calibration, config: CompressionConfig, windows: list[int | None] | None = None
) -> list[tuple[float, float]]:
    """The (key, value) average bits of every layer under ``config``; ``windows``: each layer's
    sliding attention window (``None``: full attention), which ``config.budget_context`` uses."""
    sig = calibration.signature
    n = sig.num_layers
    if config.layer_bits:
        if len(config.layer_bits) != n:
            raise ValueError(f"layer_bits lists {len(config.layer_bits)} layers but the model has {n}")
        return list(config.layer_bits)
    if config.method != "spectralquant":
        return [(config.key.bits, config.value.bits)] * n
    if config.layer_budget == "uniform" or (config.layer_budget == "auto" and calibration.sensitivity is None):
        _warn_if_padded(config, sig.head_dims)
        return [(config.key.bits, config.value.bits)] * n
    if calibration.sensitivity is None:
        raise ValueError(
            f"layer_budget={config.layer_budget!r} needs a calibration with measured sensitivities: "
            "calibrate with sq.calibrate(model, tokenizer) (sensitivity=True), or use layer_budget='uniform'"
        )
    pooled = config.layer_budget != "sensitivity_per_kind"
    if pooled and config.key.bits != config.value.bits:
        warnings.warn(
            f"key_bits={config.key.bits} and value_bits={config.value.bits} are pooled by the sensitivity layer "
            "budget, which splits their total between keys and values itself; to fix the split, set "
            "layer_budget='sensitivity_per_kind' (or 'uniform') or give layer_bits",
            stacklevel=3,
        )
    sizes = torch.tensor([h * d for h, d in zip(sig.kv_heads, sig.head_dims)], dtype=torch.float64)
    ctx = config.budget_context
    if ctx is not None and windows is not None:
        if len(windows) != n:
            raise ValueError(f"windows lists {len(windows)} layers but the model has {n}")
        # Bits of a sliding layer cost only what it holds at that context.
        sizes = sizes * torch.tensor([min(w, ctx) / ctx if w else 1.0 for w in windows], dtype=torch.float64)
    lo = max(config.key.min_bits, config.value.min_bits, config.layer_min_bits)
    hi = min(config.key.max_bits, config.value.max_bits)
    # Steps of one 32-bit word per head: records are padded to whole words (see packing).
    step = 32 / min(sig.head_dims)
    bits = allocate_layer_bits(
        calibration.sensitivity,
        sizes,
        config.key.bits,
        config.value.bits,
        float(calibration.info.get("sensitivity_bits", 2.0)),
        step=step,
        min_bits=lo,
        max_bits=hi,
        pooled=pooled,
    )
    return [(float(k), float(v)) for k, v in bits.tolist()]


def _warn_if_padded(config: CompressionConfig, head_dims: list[int]) -> None:
    """Warn where a uniform width leaves records part-empty: for power-of-two head dims they are
    whole 32-bit words, so e.g. 2.25 bits at head_dim 64 (144 bits) take the bytes of 2.5 bits."""
    for kind, quantizer in (("key", config.key), ("value", config.value)):
        for d in sorted({d for d in head_dims if word_aligned(d)}):
            used = round(quantizer.bits * d) + quantizer.qjl_dims
            padded = -(-used // UNIT_BITS) * UNIT_BITS
            if used < padded:
                warnings.warn(
                    f"{kind}_bits={quantizer.bits:g} leaves at least {padded - used} bits of every record unused "
                    f"(records of head_dim {d} are whole 32-bit words); "
                    f"{(padded - quantizer.qjl_dims) / d:g} bits would take the same bytes",
                    stacklevel=4,
                )


def build_codecs(
    calibration: Calibration, config: CompressionConfig, windows: list[int | None] | None = None
) -> list[LayerCodec | None]:
    """One codec per layer (``None`` for layers listed in ``config.fp16_layers``), encoding keys in
    the calibration's domain (before RoPE if it was measured there, baselines included);
    ``windows`` as in :func:`layer_bits`."""
    n = calibration.signature.num_layers
    bad = [i for i in config.fp16_layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"fp16_layers {bad} are out of range for a {n}-layer model")
    codecs: list[LayerCodec | None] = []
    for i, (layer, (kb, vb)) in enumerate(zip(calibration.layers, layer_bits(calibration, config, windows))):
        if i in config.fp16_layers:
            codecs.append(None)
            continue
        if config.method != "spectralquant":
            codecs.append(
                LayerCodec(
                    baseline_codec(config.method, "key", layer.key, kb, seed=2 * i),
                    baseline_codec(config.method, "value", layer.value, vb, seed=2 * i + 1),
                    calibration.layer_keys_pre_rope(i),
                )
            )
            continue
        pair = []
        for j, (kind, cfg, bits) in enumerate((("key", config.key, kb), ("value", config.value, vb))):
            importance = layer.importance(kind)
            if cfg.attention_aware and importance is None:
                what = "query second moments" if kind == "key" else "output projections"
                raise ValueError(
                    f"attention_aware {kind}s need the calibration's {what}, which layer {i} lacks: "
                    "recalibrate with this version's sq.calibrate, or set attention_aware=False"
                )
            pair.append(Quantizer.from_stats(getattr(layer, kind), cfg.with_(bits=bits), 2 * i + j, importance))
        codecs.append(LayerCodec(*pair, calibration.layer_keys_pre_rope(i)))
    return codecs
