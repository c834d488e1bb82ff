"""What to compress and how: a :class:`CompressionConfig` (key and value quantizers, fp16 recent
window, sinks), the named presets, and parsing of user dials onto a preset."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .quantizer import QuantizerConfig

LAYER_BUDGETS = ("auto", "uniform", "sensitivity", "sensitivity_per_kind")
METHODS = ("spectralquant", "turboquant", "turboquant_qjl", "kivi", "int", "fp8")


@dataclass(frozen=True)
class CompressionConfig:
    """How a KV cache is compressed.

    key / value: the quantizer of each kind.
    window: the most recent tokens kept in fp16 (compressed in chunks as they age out).
    chunk: aged-out tokens are compressed once at least this many have accumulated past the window.
    sinks: the first tokens of every sequence (after left padding) kept in fp16.
    fp16_layers: layer indices left uncompressed (e.g. the most sensitive ones).
    layer_budget: ``uniform`` (every layer at ``key.bits`` / ``value.bits``), ``sensitivity``
        (the same total, redistributed across layers and between keys and values by the
        calibration's measured per-layer sensitivity; see :mod:`spectralquant.layer_budget`),
        ``sensitivity_per_kind`` (keys keep ``key.bits`` and values ``value.bits`` on average, each
        spread across layers by its own sensitivity), or ``auto``: ``sensitivity`` when the
        calibration has sensitivities, else ``uniform``.
    layer_min_bits: the fewest bits per coordinate the ``sensitivity`` budget gives any layer's keys
        or values. The sensitivities are measured on a short context, where layers that matter
        only for long-range retrieval look cheap to compress; a floor keeps them readable.
    budget_context: for the ``sensitivity`` budgets, the context length at which bits are counted
        as bytes held: a sliding-window layer holds at most its window of tokens, so a bit there
        costs ``window / budget_context`` of a bit in a full-attention layer, and ``key.bits`` /
        ``value.bits`` are the average over what is held at that length. ``None``: every layer
        counts as holding every token (the same bits per token everywhere). No effect on models
        without sliding windows.
    layer_bits: explicit per-layer ``(key_bits, value_bits)``, overriding both of the above.
    method: ``spectralquant``, or a baseline codec from :mod:`spectralquant.baselines`
        (``turboquant``, ``turboquant_qjl``, ``kivi``, ``int``, ``fp8``) run in the same cache at
        ``key.bits`` / ``value.bits`` (uniform across layers) for side-by-side measurement.
    """

    key: QuantizerConfig = field(default_factory=QuantizerConfig)
    value: QuantizerConfig = field(default_factory=QuantizerConfig)
    window: int = 64
    chunk: int = 32
    sinks: int = 4
    fp16_layers: tuple[int, ...] = ()
    layer_budget: str = "auto"
    layer_min_bits: float = 1.0
    budget_context: int | None = None
    layer_bits: tuple[tuple[float, float], ...] = ()
    method: str = "spectralquant"

    def __post_init__(self):
        for name in ("window", "sinks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"chunk must be a positive int, got {self.chunk!r}")
        object.__setattr__(self, "fp16_layers", tuple(sorted(int(i) for i in self.fp16_layers)))
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.layer_budget not in LAYER_BUDGETS:
            raise ValueError(f"unknown layer_budget {self.layer_budget!r}; choose one of {LAYER_BUDGETS}")
        ctx = self.budget_context
        if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1):
            raise ValueError(f"budget_context must be a positive int (tokens) or None, got {ctx!r}")
        object.__setattr__(self, "layer_bits", tuple((float(k), float(v)) for k, v in self.layer_bits))
        fragments = [k for k, q in (("key", self.key), ("value", self.value)) if q.fragments]
        if fragments and self.method == "spectralquant" and self.layer_budget != "uniform":
            raise ValueError(
                f"{' and '.join(fragments)} records in fragment order need every layer at the same widths: "
                f"set layer_budget='uniform' (got {self.layer_budget!r})"
            )
        if isinstance(self.layer_min_bits, bool) or not isinstance(self.layer_min_bits, (int, float)):
            raise ValueError(f"layer_min_bits must be a number, got {self.layer_min_bits!r}")
        if not 1 <= self.layer_min_bits <= min(self.key.bits, self.value.bits):
            raise ValueError(
                f"layer_min_bits={self.layer_min_bits} must be at least 1 and at most the key and value bits "
                f"({self.key.bits:g}, {self.value.bits:g})"
            )

    def describe(self) -> str:
        if self.method != "spectralquant":
            return f"{self.method} baseline: keys {self.key.bits:g} bits, values {self.value.bits:g} bits; " + (
                f"fp16 window {self.window}, {self.sinks} sink tokens"
            )
        def q(c: QuantizerConfig) -> str:
            extra = f", qjl {c.qjl_dims}" if c.qjl_dims else ""
            extra += {True: ", attention-aware", None: ", attention-aware if measured"}.get(c.attention_aware, "")
            extra += ", unbiased levels" if c.unbiased else ""
            extra += f", at least {c.min_bits} bit{'s' * (c.min_bits > 1)} per coordinate" if c.min_bits else ""
            return f"{c.bits:g} bits ({c.rotation}, {c.allocation}, {c.codebook}{extra})"

        budget = {
            "sensitivity": "; bits spread across layers by sensitivity",
            "sensitivity_per_kind": "; key and value bits each spread across layers by sensitivity",
            "auto": "; bits spread across layers by sensitivity when measured",
        }.get(self.layer_budget, "")
        if budget and self.layer_min_bits != 1:
            budget += f" (at least {self.layer_min_bits:g} bits per layer)"
        if budget and self.budget_context is not None:
            budget += f" (bytes held at {self.budget_context} tokens)"
        return (
            f"keys {q(self.key)}; values {q(self.value)}{budget}; fp16 window {self.window} (chunk {self.chunk}), "
            f"{self.sinks} sink tokens" + (f"; fp16 layers {list(self.fp16_layers)}" if self.fp16_layers else "")
        )


# Average bits per coordinate (keys and values alike; with a sensitivity-calibrated model the
# total is redistributed across layers and kinds). Measured on SmolLM2-135M at 4k context
# (benchmarks/quality.py): standard 4.2x, high 5.2x, max 6.2x fewer bytes than fp16. Key bits are
# allocated by their effect on scores when the calibration measured the queries (SmolLM2 at 2.25
# bits: KL 0.0083 against 0.0090 without; Gemma 3 at 2.75 bits: 0.0079 against 0.0084). Decoded
# levels are unbiased (not shrunk towards the mean): SmolLM2 at 2.25 bits KL 0.0071 against 0.0082,
# passkey 3/5 against 1/5 (benchmarks/results/unbiased_levels_smollm2.json). Every value coordinate
# keeps at least 1 bit: water-filling would drop the directions rare on ordinary text, which a
# retrieved token's value can use (SmolLM2 at 2.25 bits: passkey 18/20 against 14/20 at 1k-8k, FP16
# 19/20; KL 0.0081 against 0.0071; benchmarks/results/passkey_grid_smollm2.json).
PRESETS: dict[str, CompressionConfig] = {
    name: CompressionConfig(
        key=QuantizerConfig(bits=bits, attention_aware=None, unbiased=True),
        value=QuantizerConfig(bits=bits, unbiased=True, min_bits=1),
    )
    for name, bits in (("standard", 3.5), ("high", 2.75), ("max", 2.25))
}

# "fast": every coordinate at 4 bits with evenly spaced levels, records in the tensor-core fragment
# order, every layer alike: CUDA decode attention reads it on integer tensor cores
# (spectralquant.kernels.mma_attention), faster than bf16 SDPA at every batch and context measured.
# SmolLM2-135M at 4k: 3.70x fewer bytes, +0.24% perplexity, KL 0.0020
# (benchmarks/results/fast_codec_smollm2.json); ``value_bits=2`` gives 4.79x, +0.71%, KL 0.0084.
PRESETS["fast"] = CompressionConfig(
    key=QuantizerConfig(bits=4, allocation="uniform", codebook="linear", attention_aware=None, unbiased=True,
                        fragments="keys"),
    value=QuantizerConfig(bits=4, allocation="uniform", codebook="linear", unbiased=True, min_bits=1,
                          fragments="values"),
    layer_budget="uniform",
)

_QUANTIZER_DIALS = {f.name for f in fields(QuantizerConfig)}
_CACHE_DIALS = {
    "window", "chunk", "sinks", "fp16_layers", "layer_budget", "layer_min_bits", "budget_context", "layer_bits",
    "method",
}


def valid_dials() -> list[str]:
    """Every keyword :func:`resolve_config` accepts."""
    both = sorted(_QUANTIZER_DIALS)
    return sorted(_CACHE_DIALS) + both + [f"key_{d}" for d in both] + [f"value_{d}" for d in both]


def resolve_config(preset: str | CompressionConfig = "standard", **dials) -> CompressionConfig:
    """A preset (by name or as a config) with dials applied.

    A quantizer dial (``bits``, ``rotation``, ...) sets keys and values alike; ``key_<dial>`` or
    ``value_<dial>`` sets one kind; ``window``, ``chunk``, ``sinks``, ``fp16_layers``,
    ``layer_budget``, ``layer_min_bits``, ``budget_context``, ``layer_bits`` set the cache.
    Unknown preset names and dials raise ``ValueError`` listing what is valid.
    """
    if isinstance(preset, CompressionConfig):
        config = preset
    elif isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        config = PRESETS[preset]
    else:
        raise TypeError(f"preset must be a name or a CompressionConfig, got {type(preset).__name__}")
    key_changes, value_changes, cache_changes = {}, {}, {}
    for name, val in dials.items():
        if name in _CACHE_DIALS:
            cache_changes[name] = val
        elif name in _QUANTIZER_DIALS:
            key_changes[name] = val
            value_changes[name] = val
        elif name.startswith("key_") and name[4:] in _QUANTIZER_DIALS:
            key_changes[name[4:]] = val
        elif name.startswith("value_") and name[6:] in _QUANTIZER_DIALS:
            value_changes[name[6:]] = val
        else:
            raise ValueError(f"unknown option {name!r}; valid options are {valid_dials()}")
    return replace(
        config,
        key=replace(config.key, **key_changes),
        value=replace(config.value, **value_changes),
        **cache_changes,
    )


def describe_presets() -> str:
    """One line per preset: what it does."""
    return "\n".join(f"{name:>9}: {cfg.describe()}" for name, cfg in PRESETS.items())
