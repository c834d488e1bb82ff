"""Bit budgets across layers: spend more bits where compressing a layer's keys or values costs the
model more, measured as a per-(layer, kind) sensitivity.

Model: compressing kind ``k`` of layer ``l`` alone at ``b`` bits costs ``s[l, k] * 4**(p - b)``
nats of KL divergence, where ``s`` was measured at probe width ``p`` (distortion falls about 4x
per bit, and KL adds up across layers). The greedy allocation below minimizes the modelled total
for a fixed number of bits, in steps of ``step`` bits per coordinate.
"""

from __future__ import annotations

import torch


def allocate_layer_bits(
    sensitivity: torch.Tensor,
    sizes: torch.Tensor,
    key_bits: float,
    value_bits: float,
    probe_bits: float,
    step: float = 0.25,
    min_bits: float = 1.0,
    max_bits: float = 8.0,
    pooled: bool = True,
) -> torch.Tensor:
    """Per-layer ``[L, 2]`` (key, value) bit widths spending the bits of ``key_bits`` on every key
    plus ``value_bits`` on every value. ``pooled``: one budget, and the greedy moves bits between
    keys and values too (keys usually get more), so only ``key_bits + value_bits`` matters, not
    the split; else keys and values each spread their own budget across layers.

    ``sensitivity [L, 2]`` (non-negative), ``sizes [L]`` coordinates per token in each layer
    (KV heads x head_dim). The result never spends more than the budget and differs from it by
    less than one step of the smallest layer (per kind, unless pooled).
    """
    if sensitivity.dim() != 2 or sensitivity.shape[1] != 2 or sizes.shape != sensitivity.shape[:1]:
        raise ValueError(
            f"sensitivity must be [L, 2] and sizes [L], got {tuple(sensitivity.shape)}, {tuple(sizes.shape)}"
        )
    if not torch.isfinite(sensitivity).all() or (sensitivity < 0).any():
        raise ValueError("sensitivities must be finite and non-negative")
    if not min_bits <= min(key_bits, value_bits) <= max(key_bits, value_bits) <= max_bits:
        raise ValueError(f"budget ({key_bits}, {value_bits}) bits is outside [{min_bits}, {max_bits}]")
    s = sensitivity.double()
    size = sizes.double()[:, None].expand_as(s)
    limits = (probe_bits, step, min_bits, max_bits)
    if pooled:
        return _greedy(s, size, float((size[:, 0] * (key_bits + value_bits)).sum()), *limits)
    kinds = [_greedy(s[:, k : k + 1], size[:, k : k + 1], float(size[:, k].sum() * b), *limits)
             for k, b in enumerate((key_bits, value_bits))]
    return torch.cat(kinds, 1)


def _greedy(
    s: torch.Tensor, size: torch.Tensor, budget: float, probe_bits: float, step: float, min_bits: float, max_bits: float
) -> torch.Tensor:
    """Widths (the shape of ``s``) from ``min_bits`` up, a step at a time where the modelled KL
    falls most per bit spent, until no step fits in ``budget`` bits per token."""
    bits = torch.full_like(s, min_bits)
    spent = float((size * bits).sum())
    gain_per_step = 1 - 4.0 ** (-step)
    while True:
        gain = s * 4.0 ** (probe_bits - bits) * gain_per_step / (step * size)
        affordable = (bits + step <= max_bits + 1e-9) & (spent + step * size <= budget + 1e-6)
        if not affordable.any():
            return bits
        gain = torch.where(affordable, gain, torch.full_like(gain, -1.0))
        flat = int(torch.argmax(gain))
        l, k = divmod(flat, s.shape[1])
        bits[l, k] += step
        spent += step * float(size[l, k])
