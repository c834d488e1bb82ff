import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectralquant.codebook import (
    boundaries_of,
    fit_lloyd,
    gaussian_correlation,
    gaussian_distortion,
    gaussian_levels,
    quantize,
)

# Max (1960), Table I: mean squared error of the optimum quantizer for a unit normal.
PUBLISHED_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gaussian_lloyd_max_matches_published_distortion(bits):
    assert gaussian_distortion(bits) == pytest.approx(PUBLISHED_MSE[bits], rel=1e-3)


@pytest.mark.parametrize("bits", range(0, 9))
def test_gaussian_levels_are_symmetric_ascending_centroids(bits):
    y = gaussian_levels(bits)
    assert y.numel() == 2**bits
    assert torch.allclose(y, -y.flip(0), atol=1e-9)
    assert (y[1:] > y[:-1]).all()
    if bits:
        # Lloyd-Max fixed point: each level is the conditional mean of its cell.
        inf = torch.tensor([float("inf")], dtype=torch.float64)
        t = torch.cat([-inf, boundaries_of(y), inf])
        pdf = torch.exp(-0.5 * t.clamp(-40, 40) ** 2) / (2 * torch.pi) ** 0.5
        cdf = torch.special.ndtr(t)
        centroid = (pdf[:-1] - pdf[1:]) / (cdf[1:] - cdf[:-1])
        assert torch.allclose(centroid, y, atol=1e-6)


@pytest.mark.parametrize("bits", range(1, 7))
def test_monte_carlo_mse_matches_distortion(bits):
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    y = gaussian_levels(bits)
    codes = quantize(x, boundaries_of(y))
    mse = float(((y[codes] - x) ** 2).mean())
    assert mse == pytest.approx(gaussian_distortion(bits), rel=0.03)


def test_distortion_halves_in_db_per_bit():
    d = [gaussian_distortion(b) for b in range(1, 9)]
    assert all(b < a / 3 for a, b in zip(d, d[1:]))


@given(st.integers(1, 3), st.integers(0, 2**31))
def test_fit_lloyd_on_gaussian_samples_approaches_lloyd_max(bits, seed):
    x = torch.randn(2, 40_000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[1] *= 5.0
    levels = fit_lloyd(x, bits)
    assert levels.shape == (2, 2**bits)
    assert (levels[:, 1:] >= levels[:, :-1]).all()
    for row, sigma in ((0, 1.0), (1, 5.0)):
        codes = quantize(x[row], boundaries_of(levels[row]))
        mse = float(((levels[row][codes] - x[row]) ** 2).mean()) / sigma**2
        assert mse <= gaussian_distortion(bits) * 1.03


def test_fit_lloyd_beats_gaussian_codebook_on_heavy_tails():
    g = torch.Generator().manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((50_000,)).double()
    x = x / x.std()
    fitted = fit_lloyd(x, 3)
    gauss = gaussian_levels(3)
    mse = lambda lv: float(((lv[quantize(x, boundaries_of(lv))] - x) ** 2).mean())  # noqa: E731
    assert mse(fitted) < 0.8 * mse(gauss)
    del g


def test_fit_lloyd_errors():
    with pytest.raises(ValueError):
        fit_lloyd(torch.empty(0), 2)
    with pytest.raises(ValueError, match="NaN"):
        fit_lloyd(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError):
        gaussian_levels(9)
    with pytest.raises(TypeError):
        gaussian_levels(2.0)


@pytest.mark.parametrize("bits", range(1, 9))
def test_polynomial_codebooks_are_ascending_and_close_to_lloyd_max(bits):
    from spectralquant.codebook import gaussian_poly_coeffs, poly_basis

    levels = poly_basis(bits) @ gaussian_poly_coeffs(bits)
    assert (levels[1:] > levels[:-1]).all() and torch.allclose(levels, -levels.flip(0), atol=1e-9)
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    mse = float(((levels[quantize(x, boundaries_of(levels))] - x) ** 2).mean())
    # Measured: +0.1% (2 bits), +0.3% (3), +0.4% (4), +1.2% (5), +3.6% (6), +7.4% (7), +13% (8).
    allowed = {1: 0.02, 2: 0.02, 3: 0.02, 4: 0.025, 5: 0.04, 6: 0.07, 7: 0.11, 8: 0.17}[bits]
    assert mse <= gaussian_distortion(bits) * (1 + allowed)


def test_linear_codebooks_are_the_optimal_uniform_quantizers():
    from spectralquant.codebook import gaussian_poly_coeffs, poly_basis

    # Max (1960), optimum uniform quantizer steps for a unit normal with 2 (2 sqrt(2/pi)), 4, 8 and 16 levels.
    for bits, step in ((1, 1.5958), (2, 0.9957), (3, 0.5860), (4, 0.3352)):
        coeffs = gaussian_poly_coeffs(bits, terms=1)
        assert coeffs[1:].eq(0).all() and coeffs[0] == pytest.approx(step, abs=2e-4)
        levels = poly_basis(bits) @ coeffs
        assert torch.allclose(levels.diff(), torch.full((2**bits - 1,), float(coeffs[0]), dtype=torch.float64))
    with pytest.raises(ValueError, match="terms"):
        gaussian_poly_coeffs(3, terms=2)


@pytest.mark.parametrize("bits", range(1, 7))
def test_lloyd_max_levels_shrink_by_their_distortion(bits):
    # Centroid condition: E[q(X) X] = E[q(X)^2] = 1 - distortion.
    assert float(gaussian_correlation(gaussian_levels(bits))) == pytest.approx(1 - gaussian_distortion(bits), abs=1e-9)


@given(st.lists(st.floats(-4, 4), min_size=2, max_size=8, unique=True), st.integers(0, 10_000))
def test_gaussian_correlation_matches_monte_carlo_for_any_levels(levels, seed):
    y = torch.tensor(sorted(levels), dtype=torch.float64)
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q = y[quantize(x, boundaries_of(y))]
    sample = q * x
    # Within 5 standard errors of the sample mean.
    tol = 5 * float(sample.std()) / len(x) ** 0.5
    assert float(gaussian_correlation(y)) == pytest.approx(float(sample.mean()), abs=tol)
