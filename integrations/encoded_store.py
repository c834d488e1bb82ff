"""A growable, per (batch row, head) store of encoded vectors: what a compressed cache layer holds.

Tensors are laid out ``[B, H, capacity, ...]`` (records ``[B, H, T, R]`` uint8, side values
``[B, H, T]`` fp16) so each head's tokens are contiguous, as attention kernels read them. The
valid tokens are ``[start, start + length)``. Capacity is what is held, so it stays tight: a
large append (a prefill) reserves exactly what it needs, rounded up to ``GRANULE`` tokens; small
appends (decoding) grow it by a sixteenth, so copies stay rare and over-allocation stays under
about 6%. Dropping tokens from the front (sliding windows) moves ``start``; compaction happens on
the next growth.
"""

from __future__ import annotations

import torch

from spectralquant.quantizer import Encoded

GRANULE = 64


class EncodedStore:
    """Records ``[B, H, cap, R]`` uint8, optional scales (uint8 or fp16) and fp16 QJL norms ``[B, H, cap]``."""

    def __init__(
        self, batch: int, heads: int, record_bytes: int, scale_dtype: torch.dtype | None, qjl: bool, device
    ):
        records = torch.empty(batch, heads, 0, record_bytes, dtype=torch.uint8, device=device)
        scales = None if scale_dtype is None else torch.empty(batch, heads, 0, dtype=scale_dtype, device=device)
        qjl_norms = torch.empty(batch, heads, 0, dtype=torch.float16, device=device) if qjl else None
        self.buffers: list[torch.Tensor | None] = [records, scales, qjl_norms]
        self.start = 0
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    def append(self, enc: Encoded) -> None:
        """Append ``enc`` whose tensors are ``[B, n, H, ...]`` (as a quantizer returns them)."""
        parts = [enc.records, enc.scales, enc.qjl_norms]
        n = enc.records.shape[1]
        if n == 0:
            return
        end = self.start + self.length
        if end + n > self.capacity:
            self._reserve(self.length + n)
        end = self.start + self.length
        for buf, p in zip(self.buffers, parts):
            if buf is not None:
                buf[:, :, end : end + n] = p.transpose(1, 2)
        self.length += n

    def _reserve(self, needed: int) -> None:
        """Make room for ``needed`` valid tokens starting at index 0 (compacting, growing if needed)."""
        if needed > self.capacity:
            needed = max(needed, self.capacity + self.capacity // 16)
        cap = max(self.capacity, -(-needed // GRANULE) * GRANULE)
        new = []
        for buf in self.buffers:
            if buf is None:
                new.append(None)
                continue
            fresh = buf.new_empty(buf.shape[0], buf.shape[1], cap, *buf.shape[3:])
            fresh[:, :, : self.length] = buf[:, :, self.start : self.start + self.length]
            new.append(fresh)
        self.buffers, self.start = new, 0

    def view(self) -> Encoded:
        """The valid tokens as an :class:`Encoded` of head-major ``[B, H, T, ...]`` views."""
        return Encoded(*(None if b is None else b[:, :, self.start : self.start + self.length] for b in self.buffers))

    def drop_front(self, n: int) -> None:
        n = min(n, self.length)
        self.start += n
        self.length -= n
        if self.length == 0:
            self.start = 0

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` valid tokens."""
        self.length = max(0, min(length, self.length))

    def map_batch(self, fn) -> None:
        """Apply ``fn`` (a batch-dimension operation such as ``index_select``) to every buffer,
        keeping only the valid tokens."""
        self.buffers = [
            None if b is None else fn(b[:, :, self.start : self.start + self.length]).contiguous() for b in self.buffers
        ]
        self.start = 0

    def nbytes(self) -> list[int]:
        """Bytes allocated per buffer (records, scales, qjl_norms)."""
        return [0 if b is None else b.numel() * b.element_size() for b in self.buffers]
