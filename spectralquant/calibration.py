"""The calibration artifact: per layer and KV head, what encoding needs (mean, spectrum), plus the
model signature it belongs to; built from streaming accumulators and saved as safetensors.

File format (version 1): a safetensors file whose tensors are
``layers.{l}.{kind}.{mean|eigenvalues|eigenvectors}`` (float32; ``kind`` in ``key``/``value``),
optional ``layers.{l}.query.moment`` and ``layers.{l}.{kind}.samples``, and whose string metadata
holds ``format``, ``format_version``, ``signature`` (JSON), ``counts`` (JSON), ``info`` (JSON) and
``sha256`` of all tensor bytes, and ``keys_pre_rope`` (``"1"`` when key statistics were measured
before RoPE, ``"0"`` after, or one such digit per layer when the domain differs across layers;
absent in older files, which are post-RoPE); an optional ``sensitivity [L, 2]``
tensor holds measured per-layer costs. Loading validates all of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .rotation import is_orthonormal
from .stats import CovarianceAccumulator, Spectrum, participation_ratio, threshold_dim

FORMAT = "spectralquant.calibration"
FORMAT_VERSION = 1
KINDS = ("key", "value")


@dataclass(frozen=True)
class ModelSignature:
    """What a calibration fits: per-layer KV head counts and head dims, and which tensors were
    captured (``key``/``value``, optionally ``query`` and ``output``)."""

    num_layers: int
    kv_heads: tuple[int, ...]
    head_dims: tuple[int, ...]
    captured: tuple[str, ...] = KINDS
    model_type: str = ""
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "kv_heads", tuple(int(h) for h in self.kv_heads))
        object.__setattr__(self, "head_dims", tuple(int(d) for d in self.head_dims))
        object.__setattr__(self, "captured", tuple(self.captured))
        if len(self.kv_heads) != self.num_layers or len(self.head_dims) != self.num_layers:
            raise ValueError(
                f"signature lists {len(self.kv_heads)} head counts and {len(self.head_dims)} head dims "
                f"for {self.num_layers} layers"
            )
        if any(h < 1 for h in self.kv_heads) or any(d < 1 for d in self.head_dims):
            raise ValueError("head counts and head dims must be positive")
        unknown = set(self.captured) - {"key", "value", "query", "output"}
        if unknown or not set(KINDS) <= set(self.captured):
            raise ValueError(
                f"captured must include key and value (and may include query and output), got {self.captured}"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ModelSignature:
        return cls(**json.loads(text))

    def mismatch(self, other: ModelSignature) -> str | None:
        """A sentence naming the first difference from ``other`` (the model), or None if compatible."""
        if self.model_type and other.model_type and self.model_type != other.model_type:
            return f"calibration is for a {self.model_type!r} model but this model is {other.model_type!r}"
        if self.num_layers != other.num_layers:
            return f"calibration has {self.num_layers} layers but the model has {other.num_layers}"
        for layer, (h, d, oh, od) in enumerate(zip(self.kv_heads, self.head_dims, other.kv_heads, other.head_dims)):
            if d != od:
                return f"calibration has head_dim {d} but the model's layer {layer} has {od}"
            if h != oh:
                return f"calibration has {h} KV heads but the model's layer {layer} has {oh}"
        return None


@dataclass
class KVStats:
    """Statistics of one kind (keys or values) in one layer: ``mean [H, D]``, ``eigenvalues [H, D]``
    (descending), ``eigenvectors [H, D, D]`` (columns), sample ``count``, and optionally a small
    reservoir of raw ``samples [N, H, D]`` for fitting codebooks. Tensors are float32."""

    mean: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    count: int
    samples: torch.Tensor | None = None

    def __post_init__(self):
        self.mean = self.mean.detach().to("cpu", torch.float32).contiguous()
        self.eigenvalues = self.eigenvalues.detach().to("cpu", torch.float32).contiguous()
        self.eigenvectors = self.eigenvectors.detach().to("cpu", torch.float32).contiguous()
        if self.samples is not None:
            self.samples = self.samples.detach().to("cpu", torch.float32).contiguous()

    @classmethod
    def from_accumulator(cls, acc: CovarianceAccumulator, samples: torch.Tensor | None = None) -> KVStats:
        spec = acc.spectrum()
        return cls(acc.mean, spec.eigenvalues, spec.eigenvectors, acc.count, samples)

    @property
    def heads(self) -> int:
        return self.mean.shape[0]

    @property
    def dim(self) -> int:
        return self.mean.shape[1]

    @property
    def spectrum(self) -> Spectrum:
        return Spectrum(self.eigenvalues, self.eigenvectors)


@dataclass
class LayerCalibration:
    """One layer's key and value statistics, and optionally, per KV head, the query second moment
    ``query_moment [H, D, D]`` and the output projection's ``output_moment [H, D, D]``
    (``W_o^T W_o`` restricted to the head's value coordinates), each averaged over the query heads
    that share the KV head."""

    key: KVStats
    value: KVStats
    query_moment: torch.Tensor | None = None
    output_moment: torch.Tensor | None = None

    def __post_init__(self):
        for name in ("query_moment", "output_moment"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.detach().to("cpu", torch.float32).contiguous())

    def importance(self, kind: str) -> torch.Tensor | None:
        """How errors of ``kind`` reach the attention output: the query moment for keys, the output
        moment for values (None when not measured)."""
        return self.query_moment if kind == "key" else self.output_moment


@dataclass
class Calibration:
    """Per-layer statistics for a model with the given signature, plus free-form ``info`` (corpus,
    token count, ...) that is saved alongside. ``keys_pre_rope``: key statistics (and the query
    moments that weight them) were measured before RoPE, so caches built from this calibration
    store keys before RoPE; a tuple of one flag per layer when the domain differs across layers
    (see :func:`merge_key_domains`; a tuple whose flags all agree becomes that bool)."""

    signature: ModelSignature
    layers: list[LayerCalibration]
    info: dict = field(default_factory=dict)
    sensitivity: torch.Tensor | None = None  # [L, 2]: KL cost of compressing each layer's keys / values
    keys_pre_rope: bool | tuple[bool, ...] = False

    def __post_init__(self):
        if isinstance(self.keys_pre_rope, (tuple, list)):
            flags = tuple(bool(f) for f in self.keys_pre_rope)
            if len(flags) != self.signature.num_layers:
                raise ValueError(f"keys_pre_rope lists {len(flags)} layers; the model has {self.signature.num_layers}")
            self.keys_pre_rope = flags[0] if len(set(flags)) == 1 else flags
        else:
            self.keys_pre_rope = bool(self.keys_pre_rope)
        if self.sensitivity is not None:
            self.sensitivity = self.sensitivity.detach().to("cpu", torch.float32).contiguous()
            if self.sensitivity.shape != (self.signature.num_layers, 2):
                raise ValueError(
                    f"sensitivity must be [{self.signature.num_layers}, 2], got {tuple(self.sensitivity.shape)}"
                )
        if len(self.layers) != self.signature.num_layers:
            raise ValueError(f"{len(self.layers)} layer entries for a {self.signature.num_layers}-layer signature")
        for i, layer in enumerate(self.layers):
            h, d = self.signature.kv_heads[i], self.signature.head_dims[i]
            for kind in KINDS:
                stats = getattr(layer, kind)
                if (stats.heads, stats.dim) != (h, d):
                    raise ValueError(
                        f"layer {i} {kind} statistics have {stats.heads} heads of dim {stats.dim}, "
                        f"the signature says {h} heads of dim {d}"
                    )

    def layer_keys_pre_rope(self, layer: int) -> bool:
        """Whether layer ``layer``'s key statistics were measured before RoPE."""
        if isinstance(self.keys_pre_rope, tuple):
            return self.keys_pre_rope[layer]
        return self.keys_pre_rope

    def key_domain(self) -> str:
        """``"after RoPE"``, ``"before RoPE"`` or ``"before RoPE in layers [...]"``, for messages."""
        if isinstance(self.keys_pre_rope, tuple):
            return f"before RoPE in layers {[i for i, f in enumerate(self.keys_pre_rope) if f]}"
        return "before RoPE" if self.keys_pre_rope else "after RoPE"

    def effective_dims(self, fraction: float = 0.9) -> list[dict[str, torch.Tensor]]:
        """Per layer and kind, d_eff by participation ratio and by the ``fraction`` variance threshold."""
        out = []
        for layer in self.layers:
            row = {}
            for kind in KINDS:
                lam = getattr(layer, kind).eigenvalues
                row[f"{kind}_participation"] = participation_ratio(lam)
                row[f"{kind}_threshold"] = threshold_dim(lam, fraction)
            out.append(row)
        return out

    def nbytes(self) -> int:
        """Bytes of the tensors an encoder needs (means, eigenvalues, eigenvectors), all layers."""
        return sum(
            t.numel() * t.element_size()
            for layer in self.layers
            for kind in KINDS
            for t in (getattr(layer, kind).mean, getattr(layer, kind).eigenvalues, getattr(layer, kind).eigenvectors)
        )

    # ----------------------------------------------------------------------------------------- I/O

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for i, layer in enumerate(self.layers):
            for kind in KINDS:
                stats = getattr(layer, kind)
                tensors[f"layers.{i}.{kind}.mean"] = stats.mean
                tensors[f"layers.{i}.{kind}.eigenvalues"] = stats.eigenvalues
                tensors[f"layers.{i}.{kind}.eigenvectors"] = stats.eigenvectors
                if stats.samples is not None:
                    tensors[f"layers.{i}.{kind}.samples"] = stats.samples
            if layer.query_moment is not None:
                tensors[f"layers.{i}.query.moment"] = layer.query_moment
            if layer.output_moment is not None:
                tensors[f"layers.{i}.output.moment"] = layer.output_moment
        if self.sensitivity is not None:
            tensors["sensitivity"] = self.sensitivity
        return tensors

    def save(self, path: str | os.PathLike) -> None:
        """Write the calibration to ``path`` (safetensors + JSON metadata)."""
        tensors = self._tensors()
        counts = [[layer.key.count, layer.value.count] for layer in self.layers]
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "signature": self.signature.to_json(),
            "counts": json.dumps(counts),
            "info": json.dumps(self.info, default=str),
            "sha256": _digest(tensors),
            "keys_pre_rope": "".join(str(int(f)) for f in self.keys_pre_rope)
            if isinstance(self.keys_pre_rope, tuple)
            else str(int(self.keys_pre_rope)),
        }
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        """Read and validate a calibration file; raises ``ValueError`` naming the problem if the file
        is missing, truncated, corrupt, of another format or version, or inconsistent."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no calibration file at {path!r}")
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for malformed files
            raise ValueError(f"{path!r} is not a readable calibration file (truncated or corrupt?): {exc}") from exc
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not a SpectralQuant calibration file (format={metadata.get('format')!r})")
        version = metadata.get("format_version", "")
        if not version.isdigit() or int(version) > FORMAT_VERSION:
            raise ValueError(
                f"{path!r} has calibration format version {version!r}; this library reads up to {FORMAT_VERSION}: "
                "upgrade spectralquant or recalibrate"
            )
        if metadata.get("sha256") != _digest(tensors):
            raise ValueError(f"{path!r} is corrupt: its tensor checksum does not match")
        try:
            signature = ModelSignature.from_json(metadata["signature"])
            counts = json.loads(metadata["counts"])
            info = json.loads(metadata.get("info", "{}"))
            layers = [_read_layer(tensors, i, counts[i]) for i in range(signature.num_layers)]
            pre_rope = metadata.get("keys_pre_rope", "0")
            if pre_rope not in ("0", "1") and (len(pre_rope) != signature.num_layers or set(pre_rope) - {"0", "1"}):
                raise ValueError(
                    f"{path!r} has keys_pre_rope={pre_rope!r}; expected '0', '1' or one such digit per layer"
                )
            flags = pre_rope == "1" if len(pre_rope) == 1 else tuple(c == "1" for c in pre_rope)
            calib = cls(signature, layers, info, tensors.get("sensitivity"), flags)
        except (KeyError, TypeError, IndexError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path!r} is missing or has malformed calibration entries: {exc!r}") from exc
        _validate(calib, path)
        return calib


def merge_key_domains(after: Calibration, before: Calibration, layers: list[int] | tuple[int, ...]) -> Calibration:
    """One calibration whose ``layers`` take their key statistics, query moments and key
    sensitivities from ``before`` (keys measured before RoPE) and every other layer from ``after``
    (keys after RoPE); values, output moments and the rest come from ``after``. Both must be of
    the same model; caches built from the result store keys before RoPE in ``layers`` only."""
    mismatch = after.signature.mismatch(before.signature)
    if mismatch:
        raise ValueError(f"the two calibrations are of different models: {mismatch}")
    n = after.signature.num_layers
    if after.keys_pre_rope is not False or before.keys_pre_rope is not True:
        raise ValueError(
            f"merge_key_domains needs one calibration with keys after RoPE and one before, got keys "
            f"{after.key_domain()} and {before.key_domain()}"
        )
    chosen = set(int(i) for i in layers)
    bad = sorted(i for i in chosen if not 0 <= i < n)
    if bad:
        raise ValueError(f"layers {bad} are out of range for a {n}-layer model")
    merged = [
        LayerCalibration(b.key, a.value, b.query_moment, a.output_moment) if i in chosen else a
        for i, (a, b) in enumerate(zip(after.layers, before.layers))
    ]
    sensitivity = None
    if after.sensitivity is not None and before.sensitivity is not None:
        sensitivity = after.sensitivity.clone()
        for i in chosen:
            sensitivity[i, 0] = before.sensitivity[i, 0]
    info = dict(after.info, keys_pre_rope_layers=sorted(chosen))
    return Calibration(after.signature, merged, info, sensitivity, tuple(i in chosen for i in range(n)))


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read_layer(tensors: dict[str, torch.Tensor], i: int, counts: list[int]) -> LayerCalibration:
    kinds = {}
    for k, kind in enumerate(KINDS):
        p = f"layers.{i}.{kind}."
        kinds[kind] = KVStats(
            tensors[p + "mean"],
            tensors[p + "eigenvalues"],
            tensors[p + "eigenvectors"],
            int(counts[k]),
            tensors.get(p + "samples"),
        )
    return LayerCalibration(
        kinds["key"], kinds["value"], tensors.get(f"layers.{i}.query.moment"), tensors.get(f"layers.{i}.output.moment")
    )


def _validate(calib: Calibration, path: str) -> None:
    if calib.sensitivity is not None and (not torch.isfinite(calib.sensitivity).all() or (calib.sensitivity < 0).any()):
        raise ValueError(f"{path!r}: sensitivities must be finite and non-negative")
    for i, layer in enumerate(calib.layers):
        for kind in KINDS:
            s = getattr(layer, kind)
            where = f"{path!r} layer {i} {kind}"
            if s.eigenvectors.shape != (s.heads, s.dim, s.dim) or s.eigenvalues.shape != s.mean.shape:
                raise ValueError(f"{where}: tensor shapes disagree")
            if s.count < 1:
                raise ValueError(f"{where}: statistics were computed from no samples")
            for name in ("mean", "eigenvalues", "eigenvectors"):
                if not torch.isfinite(getattr(s, name)).all():
                    raise ValueError(f"{where}: {name} contains NaN or Inf")
            lam = s.eigenvalues
            if (lam < 0).any() or (lam[:, 1:] > lam[:, :-1] * (1 + 1e-5) + 1e-12).any():
                raise ValueError(f"{where}: eigenvalues are not non-negative and descending")
            if not is_orthonormal(s.eigenvectors, atol=1e-3):
                raise ValueError(f"{where}: eigenvectors are not orthonormal")
