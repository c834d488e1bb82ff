"""The adapter contract and registry.

An adapter knows one model family: how to read its signature (layers, KV heads, head_dim), how to
run calibration data through it while capturing K/V as its cache stores them, and how to install
and remove compression. ``find_adapter(model)`` picks the first registered adapter that matches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from spectralquant.calibration import Calibration, ModelSignature
from spectralquant.codec import LayerCodec
from spectralquant.config import CompressionConfig

STATE_ATTR = "_spectralquant"


@dataclass
class WrapState:
    """What a wrapped model carries (as ``model._spectralquant``) until it is unwrapped."""

    calibration: Calibration
    config: CompressionConfig
    codecs: list[LayerCodec | None]
    make_cache: Callable[[], Any]
    attention: str | None = None  # attention implementation to switch to while wrapped
    undo: list[Callable[[], None]] = field(default_factory=list)
    last_cache: Any = None


class Adapter(ABC):
    """How SpectralQuant reaches the attention K/V of one model family."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: Any):
        self.model = model

    @classmethod
    @abstractmethod
    def matches(cls, model: Any) -> bool:
        """True if this adapter can handle ``model``."""

    @abstractmethod
    def signature(self) -> ModelSignature:
        """Layers, KV heads and head dims of the model's attention."""

    def sliding_windows(self) -> list[int | None] | None:
        """Per layer, the attention window (``None`` for full attention); ``None`` if the family
        has no sliding windows."""
        return None

    @abstractmethod
    def calibrate(self, **options) -> Calibration:
        """Run calibration data through the model and return the statistics."""

    @abstractmethod
    def install(self, state: WrapState) -> None:
        """Make the model store its K/V compressed (caches from ``state.make_cache``); record how to
        undo it in ``state.undo`` and attach ``state`` to the model."""

    def remove(self) -> None:
        """Undo :meth:`install` completely (in reverse order)."""
        state = self.state()
        if state is None:
            raise ValueError(f"{type(self.model).__name__} is not wrapped by SpectralQuant: nothing to unwrap")
        for undo in reversed(state.undo):
            undo()
        delattr(self.model, STATE_ATTR)

    def state(self) -> WrapState | None:
        return getattr(self.model, STATE_ATTR, None)

    def is_installed(self) -> bool:
        return self.state() is not None


_REGISTRY: list[type[Adapter]] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` available to :func:`find_adapter` (later registrations win)."""
    if cls not in _REGISTRY:
        _REGISTRY.insert(0, cls)
    return cls


def supported_families() -> list[str]:
    return [f"{cls.family} ({', '.join(cls.model_types)})" for cls in _REGISTRY]


def find_adapter(model: Any) -> Adapter:
    """The adapter for ``model``; ``TypeError`` naming the model and the supported families if none fits."""
    for cls in _REGISTRY:
        if cls.matches(model):
            return cls(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    kind = type(model).__name__ + (f" (model_type {model_type!r})" if model_type else "")
    raise TypeError(
        f"no SpectralQuant adapter fits {kind}; supported families: {'; '.join(supported_families()) or 'none'}"
    )
