"""Orthonormal bases for the rotation step.

Every basis is a ``[D, D]`` matrix ``V`` whose columns are the new coordinate axes: a vector is
rotated as ``z = x @ V`` and restored as ``x = z @ V.T``. The spectral basis comes from the
calibration's eigenvectors; random orthogonal and randomized Hadamard bases are the data-blind
baselines.
"""

from __future__ import annotations

import math

import torch


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix ``[n, n]``; ``n`` must be a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def block_hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Block-diagonal orthonormal Hadamard ``[n, n]`` for any ``n``: one Sylvester block per set
    bit of ``n`` (e.g. 96 = 64 + 32), largest first."""
    if n < 1:
        raise ValueError(f"size must be positive, got {n}")
    blocks = [1 << k for k in reversed(range(n.bit_length())) if n >> k & 1]
    return torch.block_diag(*(hadamard_matrix(b, dtype) for b in blocks))


def random_orthogonal(d: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Haar-distributed random orthogonal matrix ``[d, d]`` (QR of a Gaussian, signs fixed)."""
    g = torch.randn(d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    return q.to(dtype)


def randomized_hadamard(d: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Random signs, a random permutation, then a (block) Hadamard transform: orthogonal ``[d, d]``.

    For power-of-two ``d`` this is the usual randomized Hadamard transform; otherwise the Hadamard
    part is block-diagonal and the permutation mixes coordinates across blocks.
    """
    signs = torch.randint(0, 2, (d,), generator=generator).to(dtype) * 2 - 1
    perm = torch.randperm(d, generator=generator)
    return (signs[:, None] * block_hadamard(d, dtype))[perm]


def is_orthonormal(basis: torch.Tensor, atol: float = 1e-4) -> bool:
    """True if the columns of ``basis [..., D, D]`` are orthonormal within ``atol``."""
    b = basis.to(torch.float64)
    eye = torch.eye(b.shape[-1], dtype=torch.float64)
    return bool(((b.transpose(-1, -2) @ b) - eye).abs().max() <= atol)
