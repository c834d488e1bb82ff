"""Synthetic K/V-like data with a known covariance, for tests, benchmarks and sanity checks."""

from __future__ import annotations

import torch

from .calibration import KVStats


def anisotropic_gaussian(
    n: int, heads: int, dim: int, decades: float = 3.0, seed: int = 0, mean: float = 2.0
) -> tuple[torch.Tensor, KVStats]:
    """Gaussian vectors ``[n, heads, dim]`` (float32) whose per-head covariance has eigenvalues
    log-spaced over ``decades`` orders of magnitude in a random basis, and the exact
    :class:`KVStats` (mean, eigenvalues, eigenvectors) they were drawn from."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.logspace(0, -decades, dim, dtype=torch.float64).expand(heads, dim)
    basis = torch.linalg.qr(torch.randn(heads, dim, dim, generator=g, dtype=torch.float64))[0]
    mu = mean * torch.randn(heads, dim, generator=g, dtype=torch.float64)
    z = torch.randn(n, heads, dim, generator=g, dtype=torch.float64) * lam.sqrt()
    x = torch.einsum("nhe,hde->nhd", z, basis) + mu
    return x.float(), KVStats(mu, lam, basis, n)
