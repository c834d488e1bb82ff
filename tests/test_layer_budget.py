"""Bit budgets across layers (spectralquant.layer_budget) and how build_codecs applies them."""

import dataclasses
import warnings

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import spectralquant as sq
from spectralquant.codec import layer_bits
from spectralquant.config import resolve_config
from spectralquant.layer_budget import allocate_layer_bits


@settings(max_examples=40, deadline=None)
@given(
    layers=st.integers(1, 12),
    key_bits=st.sampled_from([1.5, 2.25, 3.0, 4.0]),
    value_bits=st.sampled_from([1.5, 2.25, 3.0]),
    seed=st.integers(0, 1000),
    pooled=st.booleans(),
)
def test_budget_is_spent_and_never_exceeded(layers, key_bits, value_bits, seed, pooled):
    g = torch.Generator().manual_seed(seed)
    sens = torch.rand(layers, 2, generator=g) * 10 ** torch.randint(-3, 2, (layers, 2), generator=g)
    sizes = torch.tensor([64, 128, 256])[torch.randint(0, 3, (layers,), generator=g)]
    step = 32 / 256
    bits = allocate_layer_bits(sens, sizes, key_bits, value_bits, 2.0, step=step, min_bits=1, max_bits=8, pooled=pooled)
    budgets = [float(sizes.sum() * (key_bits + value_bits))] if pooled else [float(sizes.sum() * key_bits),
                                                                             float(sizes.sum() * value_bits)]
    spents = [float((bits * sizes[:, None]).sum())] if pooled else (bits * sizes[:, None]).sum(0).tolist()
    for budget, spent in zip(budgets, spents):
        assert spent <= budget + 1e-6
        assert budget - spent < step * float(sizes.min()) + 1e-6
    assert bits.min() >= 1 and bits.max() <= 8


def test_more_sensitive_layers_and_kinds_get_more_bits():
    sens = torch.tensor([[1.0, 0.01], [10.0, 0.1], [0.1, 0.001]])
    bits = allocate_layer_bits(sens, torch.tensor([64, 64, 64]), 2.25, 2.25, 2.0, step=0.5)
    assert bits[1, 0] > bits[0, 0] > bits[2, 0]
    assert (bits[:, 0] > bits[:, 1]).all()  # the pooled budget moves bits from values to keys
    with pytest.raises(ValueError, match="sensitivity must be"):
        allocate_layer_bits(sens[:, :1], torch.tensor([64, 64, 64]), 2, 2, 2.0)
    with pytest.raises(ValueError, match="finite and non-negative"):
        allocate_layer_bits(-sens, torch.tensor([64, 64, 64]), 2, 2, 2.0)


def test_a_key_value_split_warns_under_the_pooled_budget_and_holds_under_a_uniform_one(tiny_calibrations):
    calib = dataclasses.replace(tiny_calibrations("llama"))
    calib.sensitivity = torch.rand(calib.signature.num_layers, 2, generator=torch.Generator().manual_seed(0))
    split = dict(key_bits=3.0, value_bits=2.0)
    with pytest.warns(UserWarning, match="pooled by the sensitivity layer budget"):
        pooled = layer_bits(calib, resolve_config("max", **split))
    assert pooled != layer_bits(calib, resolve_config("max", layer_budget="uniform", **split))
    assert layer_bits(calib, resolve_config("max", layer_budget="uniform", **split)) == [(3.0, 2.0)] * len(pooled)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        per_kind = layer_bits(calib, resolve_config("max", layer_budget="sensitivity_per_kind", **split))
    keys, values = zip(*per_kind)
    assert sum(keys) / len(keys) == 3.0 and sum(values) / len(values) == 2.0  # equal sizes, 2-bit steps fit
    assert per_kind != pooled


def test_a_uniform_width_that_leaves_records_part_empty_warns(tiny_calibrations):
    calib = tiny_calibrations("llama")
    d = calib.signature.head_dims[0]
    snug = 32 / d * 3  # three 32-bit words per record
    with pytest.warns(UserWarning, match=r"leaves at least \d+ bits of every record unused"):
        layer_bits(calib, resolve_config("max", layer_budget="uniform", bits=snug + 8 / d))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layer_bits(calib, resolve_config("max", layer_budget="uniform", bits=snug)) == [(snug, snug)] * len(
            calib.signature.head_dims
        )


def test_layer_floor_holds_and_the_budget_is_still_spent(tiny_calibrations):
    calib = dataclasses.replace(tiny_calibrations("llama"))
    # Two layers that look free to compress and two sensitive ones: without a floor the free ones get 1 bit.
    calib.sensitivity = torch.tensor([[0.0, 0.0], [5.0, 1.0], [0.0, 0.0], [5.0, 1.0]])
    assert min(min(kv) for kv in layer_bits(calib, resolve_config("max"))) == 1.0
    floored = layer_bits(calib, resolve_config("max", layer_min_bits=2.0))
    assert min(min(kv) for kv in floored) >= 2.0
    mean = sum(k + v for k, v in floored) / (2 * len(floored))
    assert 2.25 - 32 / 16 / 4 < mean <= 2.25  # spent to within one word step of the smallest layer
    for bad in (0.5, 3.0):
        with pytest.raises(ValueError, match="layer_min_bits"):
            resolve_config("max", layer_min_bits=bad)


def test_sensitivity_context_is_a_calibration_option():
    model = tiny_model("llama")
    x = torch.randint(2, 96, (1, 160), generator=torch.Generator().manual_seed(5))
    calib = sq.calibrate(model, token_ids=x, progress=False, sensitivity_prefix=100, pre_rope_keys=True)
    assert calib.info["sensitivity_tokens"] == [100, 60] and calib.sensitivity.shape == (4, 2)
    assert sq.calibrate(model, token_ids=x, progress=False).info["sensitivity_tokens"] == [120, 40]
    with pytest.raises(ValueError, match="sensitivity_prefix must be positive"):
        sq.calibrate(model, token_ids=x, progress=False, sensitivity_prefix=0)


def test_rows_too_short_for_sensitivity_warn_and_fall_back_to_a_uniform_budget():
    # A prefix inside the fp16 window + sinks would measure zero for every layer, and an all-zero
    # sensitivity would hand the whole budget to layer 0.
    model = tiny_model("llama")
    x = torch.randint(2, 96, (1, 160), generator=torch.Generator().manual_seed(5))
    with pytest.warns(UserWarning, match="too short to measure layer sensitivity"):
        calib = sq.calibrate(model, token_ids=x, progress=False, sensitivity_prefix=60)
    assert calib.sensitivity is None and "sensitivity_tokens" not in calib.info
    bits = layer_bits(calib, resolve_config("max"))
    assert len(set(bits)) == 1


def test_sensitivity_recall_averages_in_a_row_that_copies_its_opening():
    from spectralquant.integrations.sensitivity import measure_sensitivity

    model = tiny_model("llama")
    x = torch.randint(2, 96, (1, 160), generator=torch.Generator().manual_seed(6))
    # A prefix longer than the default window (64) and sinks, so the probes compress something.
    calib = sq.calibrate(model, token_ids=x, progress=False, sensitivity_prefix=112, sensitivity_recall=True)
    assert calib.info["sensitivity_recall"] is True and calib.info["sensitivity_tokens"] == [112, 48]
    adapter = sq.api._adapter(model)
    text = measure_sensitivity(adapter, calib, x, 112, progress=False)
    recall = measure_sensitivity(adapter, calib, torch.cat([x[:, :112], x[:, 1:49]], 1), 112, progress=False)
    torch.testing.assert_close(calib.sensitivity, (text + recall) / 2, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(text, recall)


def test_budget_context_counts_sliding_layers_by_the_bytes_they_hold(tiny_calibrations):
    # Gemma 3's tiny model: layers 0-2 slide over 8 tokens, layer 3 attends to everything.
    calib = dataclasses.replace(tiny_calibrations("gemma3"))
    calib.sensitivity = torch.tensor([[1.0, 0.5], [1.0, 0.5], [1.0, 0.5], [1.0, 0.5]])
    windows = [8, 8, 8, None]
    plain = layer_bits(calib, resolve_config("max"), windows)
    assert plain == layer_bits(calib, resolve_config("max"))  # windows only count with budget_context
    held = layer_bits(calib, resolve_config("max", budget_context=64), windows)
    # A sliding layer holds 8 of 64 tokens: its bits cost an eighth, so it gets more of them, and
    # the bytes held at 64 tokens stay within the budget (one word step of the smallest layer).
    assert all(held[i][k] > held[3][k] for i in range(3) for k in range(2))
    assert all(held[i][k] > plain[i][k] for i in range(3) for k in range(2))
    d = calib.signature.head_dims[0] * calib.signature.kv_heads[0]
    tokens = torch.tensor([8.0, 8.0, 8.0, 64.0])
    spent = float((torch.tensor(held).sum(1) * tokens * d).sum())
    budget = 2 * 2.25 * d * float(tokens.sum())
    step = 32 / calib.signature.head_dims[0]  # one word per record
    assert budget - step * d * 8 <= spent <= budget + 1e-6  # within a step of the smallest (8-token) layer
    assert layer_bits(calib, resolve_config("max", budget_context=64), [None] * 4) == plain
    with pytest.raises(ValueError, match="windows lists 3 layers"):
        layer_bits(calib, resolve_config("max", budget_context=64), windows[:3])
    for bad in (0, -5, 1.5, True, "4k"):
        with pytest.raises(ValueError, match="budget_context must be a positive int"):
            resolve_config("max", budget_context=bad)


def test_wrap_passes_the_models_sliding_windows_to_the_budget(tiny_calibrations):
    model = tiny_model("gemma3")
    calib = dataclasses.replace(tiny_calibrations("gemma3"))
    calib.sensitivity = torch.tensor([[1.0, 0.5], [1.0, 0.5], [1.0, 0.5], [1.0, 0.5]])
    widths = {}
    for ctx in (None, 64):
        sq.wrap(model, calib, "max", budget_context=ctx)
        try:
            widths[ctx] = [codec.key.widths.float().mean().item() for codec in model._spectralquant.codecs]
        finally:
            sq.unwrap(model)
    assert widths[64][0] > widths[None][0] and widths[64][0] > widths[64][3]
