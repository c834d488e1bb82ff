"""One layer's keys and values as attention reads them from a compressed cache: compressed history
(packed records), the fp16 window of recent tokens, and exact sink tokens.

Token order is ``[compressed history (Tc) | window (W)]``; sink ``j`` of row ``b`` sits at
history position ``sink_pos[b] + j`` and, where that position is compressed, its exact value
replaces the decoded record. Attention masks over this cache have ``Tc + W`` columns in that order.
Codecs that encode blocks of tokens may keep ``key_skip`` / ``value_skip`` leading records that
are no longer part of the cache (a sliding window dropped them mid-block).

With ``key_rope`` set, key records hold keys before RoPE: reading them applies the model's RoPE
at each record's position (``key_first`` is the cache slot of the first kept key record; rows'
positions start after their left padding, ``sink_pos``). Sinks and the window hold keys as the
model produced them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantizer import Encoded, Quantizer
from .rope import RopeTable, apply_rope, cache_positions


@dataclass
class CompressedKV:
    """Head-major views: ``key``/``value`` records ``[B, H, Tc, R]`` with scales ``[B, H, Tc]``;
    ``window_keys``/``window_values`` ``[B, H, W, D]``; ``sink_keys``/``sink_values``
    ``[B, H, S, D]`` or None; ``sink_pos [B]``."""

    key: Encoded
    value: Encoded
    key_quantizer: Quantizer
    value_quantizer: Quantizer
    window_keys: torch.Tensor
    window_values: torch.Tensor
    sink_keys: torch.Tensor | None
    sink_values: torch.Tensor | None
    sink_pos: torch.Tensor
    key_skip: int = 0
    value_skip: int = 0
    key_rope: RopeTable | None = None
    key_first: int = 0

    @property
    def compressed_length(self) -> int:
        return self.key.records.shape[2] - self.key_skip

    @property
    def length(self) -> int:
        return self.compressed_length + self.window_keys.shape[2]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape the materialized key tensor would have, ``(B, H, Tc + W, D)``."""
        b, h, _, d = self.window_keys.shape
        return (b, h, self.length, d)

    def _history(
        self, enc: Encoded, quantizer: Quantizer, sinks: torch.Tensor | None, skip: int, rope: RopeTable | None = None
    ) -> torch.Tensor:
        """Decoded compressed history ``[B, H, Tc, D]`` (float32), RoPE applied if ``rope``, with
        exact sinks restored."""
        if enc.records.shape[2] == 0:
            b, h, _, d = self.window_keys.shape
            return self.window_keys.new_zeros(b, h, 0, d, dtype=torch.float32)
        as_token_major = Encoded(
            *(None if t is None else t.transpose(1, 2) for t in (enc.records, enc.scales, enc.qjl_norms))
        )
        hist = quantizer.decode(as_token_major).transpose(1, 2)
        if rope is not None:
            cos, sin = rope(cache_positions(self.key_first, hist.shape[2], self.sink_pos))
            hist = apply_rope(hist, cos, sin)
        hist = hist[:, :, skip:]
        if sinks is not None and hist.shape[2]:
            pos = self.sink_pos[:, None] + torch.arange(sinks.shape[2], device=hist.device)
            rows, slots = (pos < hist.shape[2]).nonzero(as_tuple=True)
            hist[rows, :, pos[rows, slots]] = sinks[rows, :, slots].float()
        return hist

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Full keys and values ``[B, H, Tc + W, D]`` in ``dtype`` (a transient dequantized copy)."""
        k = self._history(self.key, self.key_quantizer, self.sink_keys, self.key_skip, self.key_rope)
        v = self._history(self.value, self.value_quantizer, self.sink_values, self.value_skip)
        return (
            torch.cat([k.to(dtype), self.window_keys.to(dtype)], dim=2),
            torch.cat([v.to(dtype), self.window_values.to(dtype)], dim=2),
        )
