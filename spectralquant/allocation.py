"""Integer bit allocation over coordinates.

Water-filling: start every coordinate at ``min_bits`` and hand out the remaining budget one bit
at a time to the coordinate with the largest ``weight * 4**(-bits)`` (the distortion it would
remove), never above ``max_bits``. Ties go to the lower index, so with weights sorted in
descending order the widths come out non-increasing.
"""

from __future__ import annotations

import torch

from .codebook import MAX_BITS


def total_bits(avg_bits: float, dim: int, min_bits: int = 0, max_bits: int = MAX_BITS) -> int:
    """The integer budget ``round(avg_bits * dim)`` for ``dim`` coordinates, checked against the bounds."""
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float)):
        raise TypeError(f"bits must be a number, got {avg_bits!r}")
    if not (isinstance(min_bits, int) and isinstance(max_bits, int)):
        raise TypeError("min_bits and max_bits must be ints")
    if not 0 <= min_bits <= max_bits <= MAX_BITS:
        raise ValueError(f"need 0 <= min_bits <= max_bits <= {MAX_BITS}, got min_bits={min_bits}, max_bits={max_bits}")
    if not min_bits <= avg_bits <= max_bits:
        raise ValueError(
            f"average bits {avg_bits} is outside [min_bits, max_bits] = [{min_bits}, {max_bits}]"
        )
    return int(round(avg_bits * dim))


def waterfill(
    weights: torch.Tensor, avg_bits: float, min_bits: int = 0, max_bits: int = MAX_BITS
) -> torch.Tensor:
    """Bit widths ``[..., D]`` (int64) for importance ``weights [..., D]`` (e.g. eigenvalues).

    Each row's widths lie in ``[min_bits, max_bits]`` and sum to exactly
    ``round(avg_bits * D)``; a larger weight never gets fewer bits than a smaller one.
    """
    if not torch.is_floating_point(weights):
        raise TypeError(f"weights must be a floating tensor, got {weights.dtype}")
    if not torch.isfinite(weights).all():
        raise ValueError("weights contain NaN or Inf")
    d = weights.shape[-1]
    budget = total_bits(avg_bits, d, min_bits, max_bits)
    w = weights.to(torch.float64).clamp_min(0).reshape(-1, d)
    if budget == max_bits * d:
        return torch.full(weights.shape, max_bits, dtype=torch.int64)
    bits = torch.full_like(w, min_bits, dtype=torch.int64)
    priority = w * 4.0 ** (-min_bits)
    rows = torch.arange(w.shape[0])
    for _ in range(budget - min_bits * d):
        # argmax returns the first maximal index, which is the tie-break we want; saturated
        # coordinates get priority -1 so any open coordinate (priority >= 0) wins over them.
        i = torch.argmax(priority, dim=-1)
        bits[rows, i] += 1
        priority[rows, i] = torch.where(bits[rows, i] >= max_bits, -1.0, priority[rows, i] / 4.0)
    return bits.reshape(weights.shape)


def uniform_bits(dim: int, avg_bits: float, min_bits: int = 0, max_bits: int = MAX_BITS) -> torch.Tensor:
    """Widths ``[D]`` as equal as possible summing to ``round(avg_bits * D)``; the extra bits of a
    fractional average go to the leading coordinates."""
    budget = total_bits(avg_bits, dim, min_bits, max_bits)
    base, extra = divmod(budget, dim)
    bits = torch.full((dim,), base, dtype=torch.int64)
    bits[:extra] += 1
    return bits
