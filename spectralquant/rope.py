"""Rotary position embedding (RoPE) put onto and taken off keys, for caches that quantize keys
before RoPE (their distribution does not depend on position, and their spectrum is more
concentrated) and apply it again when attention reads them.

A model's rotary embedding is given as a :data:`RopeTable`: positions ``[B, T]`` to ``cos, sin``
``[B, T, R]`` in the ``rotate_half`` convention of Hugging Face models (coordinate ``j < R/2``
pairs with ``j + R/2``; ``R <= D``, a partial rotary dimension leaves the trailing ``D - R``
coordinates alone). ``cos`` and ``sin`` may carry an attention scaling (``cos^2 + sin^2 != 1``);
removing RoPE divides it out, so the two are exact inverses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

RopeTable = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LinearRope:
    """A :data:`RopeTable` whose angles are linear in position, ``p * inv_freq [R/2]``, with cos and
    sin multiplied by ``scaling`` (default, linear, Llama 3 and YaRN RoPE: computed as transformers
    computes them). The fused attention kernel evaluates this form itself."""

    inv_freq: torch.Tensor
    scaling: float = 1.0
    _offsets: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.inv_freq = self.inv_freq.detach().float()
        if self.inv_freq.dim() != 1:
            raise ValueError(f"inv_freq must be [R/2], got {tuple(self.inv_freq.shape)}")

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.scaling, emb.sin() * self.scaling

    def offset_table(self, n: int, device: torch.device | str) -> torch.Tensor:
        """Unscaled cos and sin of the angles of position offsets ``0 .. n-1``, ``[2, n, R/2]``
        float32 on ``device`` (cached): the fused kernel gets each key's angle from its block's
        first one by angle addition."""
        key = (n, str(device))
        if key not in self._offsets:
            angles = torch.arange(n, dtype=torch.float32)[:, None] * self.inv_freq.cpu()[None, :]
            self._offsets[key] = torch.stack([angles.cos(), angles.sin()]).to(device)
        return self._offsets[key]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """RoPE of ``x [B, H, T, D]`` at the positions ``cos, sin [B, T, R]`` stand for (``inverse``:
    take it off). Computed in float32; returns float32."""
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[-1] > x.shape[-1] or cos.shape[-1] % 2:
        raise ValueError(
            f"cos/sin must both be [B, T, R] with an even R <= head_dim {x.shape[-1]}, "
            f"got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    x = x.float()
    r = cos.shape[-1]
    cos, sin = cos[:, None].float(), sin[:, None].float()
    if inverse:
        norm = cos**2 + sin**2
        cos, sin = cos / norm, -sin / norm
    rot = x[..., :r]
    half = torch.cat([-rot[..., r // 2 :], rot[..., : r // 2]], dim=-1)
    return torch.cat([rot * cos + half * sin, x[..., r:]], dim=-1)


def cache_positions(first: int, length: int, pad: torch.Tensor) -> torch.Tensor:
    """Positions ``[B, length]`` of cache slots ``first .. first + length - 1`` in rows whose real
    tokens start after ``pad [B]`` left-padding slots (as ``generate`` numbers them; padding slots,
    which attention masks out, get position 0)."""
    slots = torch.arange(first, first + length, device=pad.device)
    return (slots[None] - pad[:, None]).clamp_min(0)
