"""Per-layer key/value quantizer pairs built from a calibration and a compression config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .calibration import Calibration
from .config import CompressionConfig
from .quantizer import Quantizer


@dataclass
class LayerCodec:
    """The key and value quantizers of one layer."""

    key: Quantizer
    value: Quantizer

    def to(self, device: torch.device | str) -> LayerCodec:
        return LayerCodec(self.key.to(device), self.value.to(device))

    def nbytes(self) -> int:
        return self.key.nbytes() + self.value.nbytes()

    def __deepcopy__(self, memo) -> LayerCodec:
        # Codecs are read-only tables: a copied cache shares them.
        return self


def build_codecs(calibration: Calibration, config: CompressionConfig) -> list[LayerCodec | None]:
    """One codec per layer (``None`` for layers listed in ``config.fp16_layers``)."""
    n = calibration.signature.num_layers
    bad = [i for i in config.fp16_layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"fp16_layers {bad} are out of range for a {n}-layer model")
    codecs: list[LayerCodec | None] = []
    for i, layer in enumerate(calibration.layers):
        if i in config.fp16_layers:
            codecs.append(None)
            continue
        codecs.append(
            LayerCodec(
                Quantizer.from_stats(layer.key, config.key, seed_offset=2 * i),
                Quantizer.from_stats(layer.value, config.value, seed_offset=2 * i + 1),
            )
        )
    return codecs
