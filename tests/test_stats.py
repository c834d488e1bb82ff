import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectralquant.stats import CovarianceAccumulator, Spectrum, participation_ratio, threshold_dim


@given(st.lists(st.integers(0, 30), min_size=1, max_size=6), st.integers(1, 3), st.integers(1, 9), st.integers(0, 999))
def test_streaming_mean_and_covariance_match_one_pass(sizes, heads, dim, seed):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(n, heads, dim, generator=g, dtype=torch.float64) * 3 + 10 for n in sizes]
    data = torch.cat(batches)
    acc = CovarianceAccumulator(heads, dim)
    for b in batches:
        acc.update(b)
    if data.shape[0] == 0:
        with pytest.raises(ValueError, match="no samples"):
            _ = acc.mean
        return
    assert acc.count == data.shape[0]
    assert torch.allclose(acc.mean, data.mean(0), atol=1e-10)
    centred = data - data.mean(0)
    cov = torch.einsum("nhi,nhj->hij", centred, centred) / data.shape[0]
    assert torch.allclose(acc.covariance, cov, atol=1e-9)


def test_merge_equals_single_accumulator_and_is_stable_with_large_means():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 2, 4, generator=g, dtype=torch.float64) * 1e-3 + 1e4
    whole = CovarianceAccumulator(2, 4).update(x)
    a = CovarianceAccumulator(2, 4).update(x[:300])
    b = CovarianceAccumulator(2, 4).update(x[300:])
    merged = a.merge(b)
    assert merged.count == 1000
    assert torch.allclose(merged.covariance, whole.covariance, rtol=1e-6, atol=1e-15)
    centred = x - x.mean(0)
    ref = torch.einsum("nhi,nhj->hij", centred, centred) / 1000
    assert torch.allclose(merged.covariance, ref, rtol=1e-6, atol=1e-15)


def test_spectrum_reconstructs_covariance_descending_with_fixed_signs():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 8, 8, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(-1, -2)
    spec = Spectrum.from_covariance(cov)
    assert (spec.eigenvalues[:, 1:] <= spec.eigenvalues[:, :-1]).all()
    rebuilt = spec.eigenvectors @ torch.diag_embed(spec.eigenvalues) @ spec.eigenvectors.transpose(-1, -2)
    assert torch.allclose(rebuilt, cov, atol=1e-9)
    big = torch.gather(spec.eigenvectors, -2, spec.eigenvectors.abs().argmax(-2, keepdim=True))
    assert (big > 0).all()


def test_effective_dimensions():
    assert participation_ratio(torch.ones(16)) == pytest.approx(16)
    assert participation_ratio(torch.tensor([5.0, 0, 0, 0])) == pytest.approx(1)
    assert participation_ratio(torch.zeros(4)) == 0
    lam = torch.tensor([0.5, 0.3, 0.1, 0.1])
    assert threshold_dim(lam, 0.5).item() == 1
    assert threshold_dim(lam, 0.8).item() == 2
    assert threshold_dim(lam, 0.9).item() == 3
    assert threshold_dim(lam, 1.0).item() == 4
    with pytest.raises(ValueError):
        threshold_dim(lam, 0.0)


def test_bad_inputs_raise():
    acc = CovarianceAccumulator(2, 4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.update(torch.tensor([[[1.0, 2, 3, float("nan")]] * 2]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.update(torch.full((1, 2, 4), float("inf")))
    with pytest.raises(ValueError, match=r"\[\.\.\., 2, 4\]"):
        acc.update(torch.zeros(3, 2, 5))
    with pytest.raises(TypeError, match="floating"):
        acc.update(torch.zeros(3, 2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="no samples"):
        _ = acc.covariance
    with pytest.raises(ValueError):
        acc.merge(CovarianceAccumulator(3, 4))
    with pytest.raises(ValueError):
        CovarianceAccumulator(0, 4)


@given(st.lists(st.integers(0, 4), min_size=2, max_size=12), st.integers(0, 999))
def test_integer_weights_equal_repeating_vectors(weights, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(weights), 2, 3, generator=g, dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)[:, None].expand(-1, 2)
    if w.sum() == 0:
        return
    weighted = CovarianceAccumulator(2, 3).update(x, w)
    repeated = CovarianceAccumulator(2, 3).update(x.repeat_interleave(torch.tensor(weights), 0))
    assert torch.allclose(weighted.mean, repeated.mean, atol=1e-10)
    assert torch.allclose(weighted.covariance, repeated.covariance, atol=1e-10)


def test_bad_weights_raise():
    acc = CovarianceAccumulator(1, 2)
    with pytest.raises(ValueError, match="non-negative"):
        acc.update(torch.ones(3, 1, 2), torch.tensor([[1.0], [-1.0], [1.0]]))
    with pytest.raises(ValueError, match="do not match"):
        acc.update(torch.ones(3, 1, 2), torch.ones(4, 1))
