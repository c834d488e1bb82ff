"""Calibration of a whole model: the adapter's statistics, plus (for causal LMs) the measured
per-layer sensitivity that spreads bits across layers."""

from __future__ import annotations

import warnings

import torch
from spectralquant.adapters import Adapter
from spectralquant.adapters.hf_causal_lm import HFCausalLMAdapter, tokenize_for_calibration

from spectralquant.calibration import Calibration, merge_key_domains
from spectralquant.config import resolve_config

from .sensitivity import PROBE_BASE, measure_sensitivity

# 1536 helps SmolLM2 (KL 0.0075 against 0.0083 at 2.25 bits, query-aware keys) but hurts Gemma 3
# (0.0232 against 0.0161): README, 'What limits passkey retrieval'.
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
    pre_rope_keys: bool | str | list[int] = False,
    progress: bool = True,
    **options,
) -> Calibration:
    """Calibrate ``adapter``'s model. For causal LMs, text is tokenized here (``token_ids`` wins
    over ``texts``; default: the bundled corpus), and unless ``sensitivity=False`` one row is also
    used to measure each layer's sensitivity (``2 * layers`` short forwards of
    ``SENSITIVITY_SUFFIX`` tokens after a prefix of ``sensitivity_prefix`` tokens, at most three
    quarters of a row). With ``sensitivity_recall`` a second row is measured and averaged in: the
    same prefix followed by a copy of its own opening tokens, so the measured tokens are predicted
    by recalling text ``sensitivity_prefix`` tokens back.

    ``pre_rope_keys``: ``False`` (keys after RoPE), ``True`` (before RoPE), a list of layers whose
    keys are taken before RoPE, or ``"auto"``: calibrate both ways, measure both sensitivities, and
    take keys before RoPE in the layers where that measures less sensitive (twice the work)."""
    if not isinstance(adapter, HFCausalLMAdapter):
        if pre_rope_keys is not False:
            options["pre_rope_keys"] = pre_rope_keys
        return adapter.calibrate(tokenizer=tokenizer, texts=texts, progress=progress, **options)
    if token_ids is None:
        token_ids = tokenize_for_calibration(tokenizer, texts, seq_len, max_tokens)
    if sensitivity_prefix < 1:
        raise ValueError(f"sensitivity_prefix must be positive, got {sensitivity_prefix}")
    rows = _sensitivity_rows(token_ids, sensitivity_prefix, sensitivity_recall) if sensitivity else None

    def calibrated(pre: bool) -> Calibration:
        return adapter.calibrate(token_ids=token_ids, progress=progress, pre_rope_keys=pre, **options)

    def with_sensitivity(calibration: Calibration) -> Calibration:
        if rows is not None:
            row, prefix = rows
            calibration.sensitivity = measure_sensitivity(
                adapter, calibration, row, prefix, probe_bits=SENSITIVITY_BITS, progress=progress
            )
            calibration.info.update(
                sensitivity_bits=SENSITIVITY_BITS,
                sensitivity_tokens=[prefix, int(row.shape[1] - prefix)],
                sensitivity_recall=bool(sensitivity_recall),
            )
        return calibration

    if isinstance(pre_rope_keys, bool):
        return with_sensitivity(calibrated(pre_rope_keys))
    if pre_rope_keys == "auto":
        if rows is None:
            raise ValueError(
                "pre_rope_keys='auto' chooses each layer's key domain by measured sensitivity: calibrate with "
                "sensitivity=True on rows long enough to measure it, or give the layers as a list"
            )
        after, before = with_sensitivity(calibrated(False)), with_sensitivity(calibrated(True))
        layers = [i for i in range(after.signature.num_layers) if before.sensitivity[i, 0] < after.sensitivity[i, 0]]
        return merge_key_domains(after, before, layers)
    if not isinstance(pre_rope_keys, (list, tuple)) or not all(isinstance(i, int) for i in pre_rope_keys):
        raise ValueError(f"pre_rope_keys must be True, False, 'auto' or a list of layer indices, got {pre_rope_keys!r}")
    return with_sensitivity(merge_key_domains(calibrated(False), calibrated(True), list(pre_rope_keys)))


def _sensitivity_rows(token_ids: torch.Tensor, prefix: int, recall: bool) -> tuple[torch.Tensor, int] | None:
    """The rows ``[N, T]`` that measure layer sensitivity and their prefix length, or None (with a
    warning) when the rows are too short for that."""
    length = token_ids.shape[1]
    prefix = min(prefix, (3 * length) // 4)
    probe = resolve_config(PROBE_BASE)
    if prefix <= probe.window + probe.sinks:
        # Every probe would keep the whole prefix exact and measure zero for every layer.
        warnings.warn(
            f"calibration rows of {length} tokens are too short to measure layer sensitivity (its "
            f"{prefix}-token prefix must exceed the fp16 window of {probe.window} plus {probe.sinks} sinks): "
            "layers get a uniform bit budget; calibrate on longer rows (seq_len) to spread bits by sensitivity",
            stacklevel=4,
        )
        return None
    row = token_ids[:1, : prefix + min(SENSITIVITY_SUFFIX, length - prefix)]
    if recall:
        suffix = row.shape[1] - prefix
        # Token 0 (often BOS) is not repeated: the copy starts at the first text token.
        row = torch.cat([row, torch.cat([row[:, :prefix], row[:, 1 : 1 + suffix]], 1)])
    return row, prefix
