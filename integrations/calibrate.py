"""Calibration of a whole model: the adapter's statistics, plus (for causal LMs) the measured
per-layer sensitivity that spreads bits across layers."""

from __future__ import annotations

import warnings

import torch
from spectralquant.adapters import Adapter
from spectralquant.adapters.hf_causal_lm import HFCausalLMAdapter, tokenize_for_calibration

from spectralquant.calibration import Calibration
from spectralquant.config import resolve_config

from .sensitivity import measure_sensitivity

SENSITIVITY_PREFIX = 512
SENSITIVITY_SUFFIX = 128
SENSITIVITY_BITS = 2.0


def calibrate_model(
    adapter: Adapter,
    tokenizer=None,
    texts=None,
    token_ids=None,
    seq_len: int = 2048,
    max_tokens: int = 6144,
    sensitivity: bool = True,
    sensitivity_prefix: int = SENSITIVITY_PREFIX,
    sensitivity_recall: bool = False,
    progress: bool = True,
    **options,
) -> Calibration:
    """Calibrate ``adapter``'s model. For causal LMs, text is tokenized here (``token_ids`` wins
    over ``texts``; default: the bundled corpus), and unless ``sensitivity=False`` one row is also
    used to measure each layer's sensitivity (``2 * layers`` short forwards of
    ``SENSITIVITY_SUFFIX`` tokens after a prefix of ``sensitivity_prefix`` tokens, at most three
    quarters of a row). With ``sensitivity_recall`` a second row is measured and averaged in: the
    same prefix followed by a copy of its own opening tokens, so the measured tokens are predicted
    by recalling text ``sensitivity_prefix`` tokens back (the layers that long-range retrieval,
    such as passkey lookup, depends on)."""
    if not isinstance(adapter, HFCausalLMAdapter):
        return adapter.calibrate(tokenizer=tokenizer, texts=texts, progress=progress, **options)
    if token_ids is None:
        token_ids = tokenize_for_calibration(tokenizer, texts, seq_len, max_tokens)
    calibration = adapter.calibrate(token_ids=token_ids, progress=progress, **options)
    if sensitivity:
        length = token_ids.shape[1]
        if sensitivity_prefix < 1:
            raise ValueError(f"sensitivity_prefix must be positive, got {sensitivity_prefix}")
        prefix = min(sensitivity_prefix, (3 * length) // 4)
        probe = resolve_config("standard")
        if prefix <= probe.window + probe.sinks:
            # Every probe would keep the whole prefix exact and measure zero for every layer.
            warnings.warn(
                f"calibration rows of {length} tokens are too short to measure layer sensitivity (its "
                f"{prefix}-token prefix must exceed the fp16 window of {probe.window} plus {probe.sinks} sinks): "
                "layers get a uniform bit budget; calibrate on longer rows (seq_len) to spread bits by sensitivity",
                stacklevel=3,
            )
            return calibration
        row = token_ids[:1, : prefix + min(SENSITIVITY_SUFFIX, length - prefix)]
        if sensitivity_recall:
            suffix = row.shape[1] - prefix
            # Token 0 (often BOS) is not repeated: the copy starts at the first text token.
            recall = torch.cat([row[:, :prefix], row[:, 1 : 1 + suffix]], 1)
            row = torch.cat([row, recall])
        calibration.sensitivity = measure_sensitivity(
            adapter, calibration, row, prefix, probe_bits=SENSITIVITY_BITS, progress=progress
        )
        calibration.info["sensitivity_bits"] = SENSITIVITY_BITS
        calibration.info["sensitivity_tokens"] = [prefix, int(row.shape[1] - prefix)]
        calibration.info["sensitivity_recall"] = bool(sensitivity_recall)
    return calibration
