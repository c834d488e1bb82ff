"""Streaming second-order statistics per head and the spectrum derived from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class CovarianceAccumulator:
    """Streaming (optionally weighted) count, mean and centred scatter of vectors ``x [..., H, D]``,
    per head, in float64.

    Batches are combined with Chan's parallel update, the numerically stable equivalent of
    keeping count, sum and sum of outer products; accumulators over disjoint data can be merged.
    With weights, every statistic is the weighted one (weights per vector and head); ``count``
    still counts vectors. Nothing but these sums is stored.
    """

    def __init__(self, heads: int, dim: int):
        if heads < 1 or dim < 1:
            raise ValueError(f"heads and dim must be positive, got heads={heads}, dim={dim}")
        self.heads, self.dim = heads, dim
        self.count = 0
        self.weight = torch.zeros(heads, dtype=torch.float64)
        self.mean_ = torch.zeros(heads, dim, dtype=torch.float64)
        self.scatter = torch.zeros(heads, dim, dim, dtype=torch.float64)

    def update(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> CovarianceAccumulator:
        """Add vectors ``x [..., H, D]`` (any leading shape; float), optionally with non-negative
        ``weights [..., H]``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"expected a floating tensor, got {x.dtype}")
        if x.dim() < 2 or x.shape[-1] != self.dim or x.shape[-2] != self.heads:
            raise ValueError(
                f"expected vectors of shape [..., {self.heads}, {self.dim}] (heads, head_dim), got {tuple(x.shape)}"
            )
        x = x.detach().reshape(-1, self.heads, self.dim).to(torch.float64)
        n = x.shape[0]
        if n == 0:
            return self
        if not torch.isfinite(x).all():
            raise ValueError("calibration data contains NaN or Inf")
        if weights is None:
            w = torch.ones(n, self.heads, dtype=torch.float64, device=x.device)
        else:
            if weights.shape != x.shape[:-1] and weights.reshape(-1, self.heads).shape[0] != n:
                raise ValueError(f"weights of shape {tuple(weights.shape)} do not match vectors {tuple(x.shape)}")
            w = weights.detach().reshape(n, self.heads).to(x.device, torch.float64)
            if not torch.isfinite(w).all() or (w < 0).any():
                raise ValueError("calibration weights must be finite and non-negative")
        total = w.sum(0)  # [H]
        if (total <= 0).any():
            return self
        mean = (w[..., None] * x).sum(0) / total[:, None]
        centred = x - mean
        scatter = torch.einsum("nh,nhi,nhj->hij", w, centred, centred)
        return self._combine(n, total.cpu(), mean.cpu(), scatter.cpu())

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Fold another accumulator (same heads and dim) into this one."""
        if (other.heads, other.dim) != (self.heads, self.dim):
            raise ValueError(
                f"cannot merge accumulators of shape ({other.heads}, {other.dim}) into ({self.heads}, {self.dim})"
            )
        if other.count == 0:
            return self
        return self._combine(other.count, other.weight, other.mean_, other.scatter)

    def _combine(
        self, n: int, weight: torch.Tensor, mean: torch.Tensor, scatter: torch.Tensor
    ) -> CovarianceAccumulator:
        total = self.weight + weight  # [H]
        delta = mean - self.mean_
        cross = (self.weight * weight / total)[:, None, None]
        self.scatter = self.scatter + scatter + torch.einsum("hi,hj->hij", delta, delta) * cross
        self.mean_ = self.mean_ + delta * (weight / total)[:, None]
        self.weight = total
        self.count += n
        return self

    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError("no samples were accumulated: run calibration data through first")

    @property
    def mean(self) -> torch.Tensor:
        """``[H, D]`` float64."""
        self._require_data()
        return self.mean_.clone()

    @property
    def covariance(self) -> torch.Tensor:
        """Population (weighted) covariance ``[H, D, D]`` float64."""
        self._require_data()
        return self.scatter / self.weight[:, None, None]

    @property
    def second_moment(self) -> torch.Tensor:
        """Uncentred second moment ``E[x x^T]``, ``[H, D, D]`` float64."""
        return self.covariance + torch.einsum("hi,hj->hij", self.mean, self.mean)

    def spectrum(self) -> Spectrum:
        return Spectrum.from_covariance(self.covariance)


@dataclass
class Spectrum:
    """Eigen-decomposition of per-head covariances: ``eigenvalues [H, D]`` descending and
    ``eigenvectors [H, D, D]`` whose columns are the matching unit eigenvectors."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor

    @classmethod
    def from_covariance(cls, cov: torch.Tensor) -> Spectrum:
        cov = cov.to(torch.float64)
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        vals, vecs = torch.linalg.eigh(cov)
        vals, vecs = vals.flip(-1).clamp_min(0), vecs.flip(-1)
        # Fix each eigenvector's sign (largest-magnitude entry positive) so bases are reproducible.
        idx = vecs.abs().argmax(-2, keepdim=True)
        sign = torch.sign(torch.gather(vecs, -2, idx))
        return cls(vals, vecs * torch.where(sign == 0, 1.0, sign))

    def participation_ratio(self) -> torch.Tensor:
        """Effective dimension ``(sum l)^2 / sum l^2`` per head, ``[H]``."""
        return participation_ratio(self.eigenvalues)

    def threshold_dim(self, fraction: float = 0.9) -> torch.Tensor:
        """Smallest number of leading coordinates holding ``fraction`` of the variance, ``[H]``."""
        return threshold_dim(self.eigenvalues, fraction)


def participation_ratio(eigenvalues: torch.Tensor) -> torch.Tensor:
    """``(sum l)^2 / sum l^2`` over the last dimension (0 for an all-zero spectrum)."""
    lam = eigenvalues.to(torch.float64)
    sq = (lam**2).sum(-1)
    return torch.where(sq > 0, lam.sum(-1) ** 2 / sq.clamp_min(1e-300), torch.zeros_like(sq))


def threshold_dim(eigenvalues: torch.Tensor, fraction: float = 0.9) -> torch.Tensor:
    """Smallest ``k`` with ``sum(l[:k]) >= fraction * sum(l)`` for descending eigenvalues ``[..., D]``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    lam = eigenvalues.to(torch.float64)
    cum = torch.cumsum(lam, -1)
    # Relative slack so float32 rounding of the input does not push the boundary by one.
    target = fraction * cum[..., -1:] * (1 - 1e-6)
    return (cum < target).sum(-1) + 1
