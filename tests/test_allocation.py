import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectralquant.allocation import uniform_bits, waterfill

weights_st = st.lists(st.floats(0, 1e4, allow_nan=False, allow_subnormal=False), min_size=1, max_size=64)


@given(weights_st, st.sampled_from([0.5, 1, 1.5, 2, 2.5, 3, 4, 6, 8]), st.integers(0, 2), st.integers(3, 8))
def test_waterfill_meets_budget_exactly_within_bounds_and_is_monotone(ws, avg, lo, hi):
    w = torch.tensor(ws, dtype=torch.float64)
    d = len(ws)
    if not lo <= avg <= hi:
        with pytest.raises(ValueError):
            waterfill(w, avg, lo, hi)
        return
    bits = waterfill(w, avg, lo, hi)
    assert int(bits.sum()) == round(avg * d)
    assert bits.min() >= lo and bits.max() <= hi
    for i in range(d):
        for j in range(d):
            if w[i] > w[j]:
                assert bits[i] >= bits[j], (i, j)


@given(weights_st, st.sampled_from([1, 2.5, 4]))
def test_waterfill_sorted_weights_give_non_increasing_widths_and_is_deterministic(ws, avg):
    w = torch.tensor(sorted(ws, reverse=True), dtype=torch.float64)
    bits = waterfill(w, avg)
    assert (bits[1:] <= bits[:-1]).all()
    assert torch.equal(bits, waterfill(w.clone(), avg))


@given(st.lists(st.floats(0.01, 100), min_size=1, max_size=4), st.integers(0, 10))
def test_waterfill_minimises_the_high_rate_distortion_sum(ws, extra):
    """Greedy marginal allocation is optimal for sum(w * 4**-b): compare with exhaustive search."""
    d = len(ws)
    budget = min(extra, 6 * d)
    w = torch.tensor(ws, dtype=torch.float64)
    bits = waterfill(w, budget / d, 0, 6)
    cost = float((w * 4.0 ** (-bits.double())).sum())
    best = min(
        sum(wi * 4.0**-bi for wi, bi in zip(ws, combo))
        for combo in itertools.product(range(7), repeat=d)
        if sum(combo) == budget
    )
    assert cost <= best * (1 + 1e-9)


def test_waterfill_rows_are_independent_and_batched():
    w = torch.tensor([[8.0, 4.0, 2.0, 1.0], [1.0, 2.0, 4.0, 8.0]])
    bits = waterfill(w, 2)
    assert torch.equal(bits[0], waterfill(w[0], 2))
    assert torch.equal(bits[1], bits[0].flip(0))


def test_zero_weights_get_zero_bits_until_others_saturate():
    bits = waterfill(torch.tensor([1.0, 0.0, 0.0, 0.0]), 2.5, 0, 8)
    assert bits.tolist() == [8, 2, 0, 0]


def test_uniform_bits_spread_fractional_budgets():
    assert uniform_bits(4, 2.5).tolist() == [3, 3, 2, 2]
    assert int(uniform_bits(64, 2.25).sum()) == 144


def test_bad_budgets_raise():
    w = torch.ones(8)
    with pytest.raises(ValueError, match="outside"):
        waterfill(w, 9)
    with pytest.raises(ValueError, match="outside"):
        waterfill(w, 1, min_bits=2)
    with pytest.raises(ValueError):
        waterfill(w, 2, min_bits=5, max_bits=3)
    with pytest.raises(ValueError, match="NaN"):
        waterfill(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(TypeError):
        waterfill(torch.ones(4, dtype=torch.long), 2)
    with pytest.raises(TypeError):
        waterfill(w, "4")
