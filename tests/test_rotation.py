import pytest
import torch

from spectralquant.rotation import (
    block_hadamard,
    hadamard_matrix,
    is_orthonormal,
    random_orthogonal,
    randomized_hadamard,
)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 128, 256])
def test_hadamard_is_orthonormal_with_equal_magnitudes(n):
    h = hadamard_matrix(n)
    assert is_orthonormal(h, atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))


@pytest.mark.parametrize("n", [3, 80, 96, 100, 112])
def test_non_power_of_two_sizes_use_block_hadamard(n):
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(n)
    assert is_orthonormal(block_hadamard(n), atol=1e-12)
    assert is_orthonormal(randomized_hadamard(n, torch.Generator().manual_seed(0)), atol=1e-12)


@pytest.mark.parametrize("n", [1, 7, 64, 96, 128])
def test_random_rotations_are_orthonormal_and_seeded(n):
    a = random_orthogonal(n, torch.Generator().manual_seed(3))
    b = random_orthogonal(n, torch.Generator().manual_seed(3))
    assert is_orthonormal(a, atol=1e-10)
    assert torch.equal(a, b)
    assert is_orthonormal(randomized_hadamard(n, torch.Generator().manual_seed(1)), atol=1e-10)


def test_randomized_hadamard_spreads_a_spike_evenly():
    r = randomized_hadamard(64, torch.Generator().manual_seed(0))
    spike = torch.zeros(64, dtype=torch.float64)
    spike[5] = 1.0
    assert torch.allclose((spike @ r).abs(), torch.full((64,), 0.125, dtype=torch.float64))


def test_is_orthonormal_rejects_a_non_orthonormal_matrix():
    assert not is_orthonormal(torch.eye(4) * 1.01)
