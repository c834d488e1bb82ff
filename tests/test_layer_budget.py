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
)
def test_budget_is_spent_and_never_exceeded(layers, key_bits, value_bits, seed):
    g = torch.Generator().manual_seed(seed)
    sens = torch.rand(layers, 2, generator=g) * 10 ** torch.randint(-3, 2, (layers, 2), generator=g)
    sizes = torch.tensor([64, 128, 256])[torch.randint(0, 3, (layers,), generator=g)]
    step = 32 / 256
    bits = allocate_layer_bits(sens, sizes, key_bits, value_bits, 2.0, step=step, min_bits=1, max_bits=8)
    budget = float(sizes.sum() * (key_bits + value_bits))
    spent = float((bits * sizes[:, None]).sum())
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
    x = torch.randint(2, 96, (1, 64), generator=torch.Generator().manual_seed(5))
    calib = sq.calibrate(model, token_ids=x, progress=False, sensitivity_prefix=40, pre_rope_keys=True)
    assert calib.info["sensitivity_tokens"] == [40, 24] and calib.sensitivity.shape == (4, 2)
    assert sq.calibrate(model, token_ids=x, progress=False).info["sensitivity_tokens"] == [48, 16]
    with pytest.raises(ValueError, match="sensitivity_prefix must be positive"):
        sq.calibrate(model, token_ids=x, progress=False, sensitivity_prefix=0)
