"""Turns a stream of captured K/V (and optionally query) tensors into a :class:`Calibration`.

Model-agnostic: whoever captures the tensors (an adapter's hooks) calls :meth:`add` with
``[..., H, D]`` vectors per layer; nothing but running sums and a bounded reservoir is kept.
"""

from __future__ import annotations

import torch

from .calibration import KINDS, Calibration, KVStats, LayerCalibration, ModelSignature
from .stats import CovarianceAccumulator


class Reservoir:
    """A uniform sample without replacement of at most ``size`` vectors ``[H, D]`` from a stream
    (bottom-k of seeded random keys), so memory stays bounded however much data passes."""

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.keys = torch.empty(0)
        self.items: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Offer vectors ``x [N, H, D]``."""
        if self.size == 0 or x.shape[0] == 0:
            return
        x = x.detach().to("cpu", torch.float32)
        keys = torch.rand(x.shape[0], generator=self.generator)
        items = x if self.items is None else torch.cat([self.items, x])
        keys = torch.cat([self.keys, keys])
        if keys.numel() > self.size:
            keep = torch.topk(keys, self.size, largest=False).indices.sort().values
            items, keys = items[keep], keys[keep]
        self.items, self.keys = items, keys


class CalibrationBuilder:
    """Accumulates per-layer key/value covariances (and query second moments) for ``signature``.

    ``samples_per_layer > 0`` also keeps that many raw vectors per layer and kind (for codebooks
    fitted to data rather than a Gaussian).
    """

    def __init__(self, signature: ModelSignature, samples_per_layer: int = 0, seed: int = 0):
        self.signature = signature
        self.acc = {
            (i, kind): CovarianceAccumulator(signature.kv_heads[i], signature.head_dims[i])
            for i in range(signature.num_layers)
            for kind in KINDS
        }
        self.reservoirs = {
            key: Reservoir(samples_per_layer, seed=seed + 7919 * n) for n, key in enumerate(self.acc)
        }
        self.query_sums: dict[int, torch.Tensor] = {}
        self.query_counts: dict[int, int] = {}
        self.output_moments: dict[int, torch.Tensor] = {}

    def add(self, layer: int, kind: str, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add vectors ``x [..., H, D]`` of ``kind`` ('key' or 'value') captured at ``layer``,
        optionally weighted by ``weights [..., H]`` (e.g. the attention each token receives)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not 0 <= layer < self.signature.num_layers:
            raise ValueError(f"layer {layer} is out of range for a {self.signature.num_layers}-layer model")
        acc = self.acc[(layer, kind)]
        acc.update(x, weights)
        self.reservoirs[(layer, kind)].add(x.reshape(-1, acc.heads, acc.dim))

    def add_query(self, layer: int, q: torch.Tensor) -> None:
        """Add queries ``q [..., Hq, D]``; query heads are grouped onto their KV head (GQA order:
        query head ``j`` reads KV head ``j // (Hq // H)``)."""
        h, d = self.signature.kv_heads[layer], self.signature.head_dims[layer]
        if q.shape[-1] != d or q.shape[-2] % h:
            raise ValueError(f"queries of shape {tuple(q.shape)} do not fit {h} KV heads of dim {d}")
        q = q.detach().to(torch.float64).reshape(-1, h, q.shape[-2] // h, d)
        if not torch.isfinite(q).all():
            raise ValueError("calibration queries contain NaN or Inf")
        s = torch.einsum("nhgi,nhgj->hij", q, q).cpu()
        self.query_sums[layer] = self.query_sums.get(layer, 0) + s
        self.query_counts[layer] = self.query_counts.get(layer, 0) + q.shape[0] * q.shape[2]

    def set_output_projection(self, layer: int, weight: torch.Tensor) -> None:
        """Record the attention output projection ``weight [hidden, Hq * D]`` of ``layer`` (columns
        ordered by query head), kept as ``W_o^T W_o`` per KV head averaged over its query heads."""
        h, d = self.signature.kv_heads[layer], self.signature.head_dims[layer]
        if weight.dim() != 2 or weight.shape[1] % (h * d):
            raise ValueError(f"output projection of shape {tuple(weight.shape)} does not fit {h} KV heads of dim {d}")
        w = weight.detach().to("cpu", torch.float64).reshape(weight.shape[0], h, -1, d)
        self.output_moments[layer] = torch.einsum("ohgi,ohgj->hij", w, w) / w.shape[2]

    def build(self, info: dict | None = None, keys_pre_rope: bool = False) -> Calibration:
        """The finished calibration (``keys_pre_rope``: the keys added were taken before RoPE);
        raises ``ValueError`` if some layer saw no data."""
        layers = []
        for i in range(self.signature.num_layers):
            kinds = {}
            for kind in KINDS:
                acc = self.acc[(i, kind)]
                if acc.count == 0:
                    raise ValueError(f"layer {i} captured no {kind}s: was the calibration data empty?")
                kinds[kind] = KVStats.from_accumulator(acc, self.reservoirs[(i, kind)].items)
            moment = self.query_sums[i] / self.query_counts[i] if i in self.query_sums else None
            layers.append(LayerCalibration(kinds["key"], kinds["value"], moment, self.output_moments.get(i)))
        captured = KINDS + (("query",) if self.query_sums else ()) + (("output",) if self.output_moments else ())
        sig = ModelSignature(
            self.signature.num_layers, self.signature.kv_heads, self.signature.head_dims, captured,
            self.signature.model_type, self.signature.name,
        )
        return Calibration(sig, layers, dict(info or {}), keys_pre_rope=keys_pre_rope)
