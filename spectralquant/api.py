"""The public calibrate-then-wrap API. The one core module that reaches into adapters and
integrations: everything here is thin orchestration."""

from __future__ import annotations

import warnings
from typing import Any

from .calibration import Calibration
from .codec import build_codecs
from .config import CompressionConfig, resolve_config


def _adapter(model: Any):
    from .adapters import find_adapter

    return find_adapter(model)


def calibrate(model: Any, tokenizer: Any = None, texts=None, **options) -> Calibration:
    """Measure per-layer, per-KV-head key/value statistics of ``model``.

    For language models: ``tokenizer`` and optional ``texts`` (default: the bundled English
    corpus); ``options``: ``seq_len`` (2048), ``max_tokens`` (6144), ``sensitivity`` (True:
    also measure per-layer sensitivity), ``sensitivity_prefix`` (512: context before the measured
    tokens; at most three quarters of a row), ``sensitivity_recall`` (False: also measure on a row
    that recalls its own opening),
    ``samples_per_layer``, ``attention_weighted``, ``position_copies``,
    ``pre_rope_keys`` (False: measure and store keys after RoPE; True: before; a list of layers:
    before RoPE in those; ``"auto"``: per layer, whichever domain measures less sensitive),
    ``progress``, ``token_ids``.
    """
    from .integrations.calibrate import calibrate_model

    return calibrate_model(_adapter(model), tokenizer=tokenizer, texts=texts, **options)


def wrap(
    model: Any,
    calibration: Calibration | None = None,
    preset: str | CompressionConfig = "standard",
    tokenizer: Any = None,
    fused: bool | None = None,
    **overrides,
) -> Any:
    """Make ``model`` keep its K/V compressed; returns the same model object.

    ``calibration`` from :func:`calibrate` (or ``None`` to calibrate now on the default corpus,
    which needs ``tokenizer``); ``preset`` is ``"standard"``, ``"high"``, ``"max"`` or a
    :class:`CompressionConfig`; ``overrides`` are dials such as ``bits=3``, ``key_bits=4``,
    ``window=128``. Afterwards ``model(...)`` and ``model.generate(...)`` use a compressed cache.
    ``fused`` makes attention read the packed records directly (default: on CUDA with Triton);
    otherwise attention sees a transient dequantized copy through the model's own attention.
    """
    adapter = _adapter(model)
    if adapter.is_installed():
        raise ValueError("this model is already wrapped by SpectralQuant: call sq.unwrap(model) first")
    config = resolve_config(preset, **overrides)
    if calibration is None:
        if tokenizer is None:
            raise ValueError(
                "sq.wrap needs a calibration: run calib = sq.calibrate(model, tokenizer) first, "
                "or pass tokenizer= to calibrate on the bundled corpus now"
            )
        calibration = adapter.calibrate(tokenizer=tokenizer)
    if not isinstance(calibration, Calibration):
        raise TypeError(f"calibration must be a Calibration, got {type(calibration).__name__}")
    ours = adapter.signature()
    problem = calibration.signature.mismatch(ours)
    if problem:
        raise ValueError(f"{problem}: calibrate this model first (sq.calibrate(model, ...))")
    if calibration.signature.name and ours.name and calibration.signature.name != ours.name:
        warnings.warn(
            f"calibration was measured on {calibration.signature.name!r}, this model is {ours.name!r}",
            stacklevel=2,
        )
    from .adapters import WrapState
    from .integrations import fused_available, make_cache_factory

    if fused is None:
        fused = fused_available(next(model.parameters()).device)
    codecs = build_codecs(calibration, config, adapter.sliding_windows())
    make_cache, attention = make_cache_factory(adapter, codecs, config, fused)
    adapter.install(WrapState(calibration, config, codecs, make_cache, attention))
    return model


def unwrap(model: Any) -> Any:
    """Remove compression: the model behaves bit-for-bit as before :func:`wrap`."""
    _adapter(model).remove()
    return model


def is_wrapped(model: Any) -> bool:
    return _adapter(model).is_installed()


def compression_stats(model: Any):
    """Memory figures of the compressed cache ``model`` used last (see ``CompressionStats``)."""
    state = _adapter(model).state()
    if state is None:
        raise ValueError("this model is not wrapped by SpectralQuant")
    if state.last_cache is None:
        raise ValueError("the wrapped model has not run yet: no cache to measure")
    return state.last_cache.compression_stats()
