"""A growable, per (batch row, head) store of encoded vectors: what a compressed cache layer holds.

Tensors are laid out ``[B, H, capacity, ...]`` (records ``[B, H, T, R]`` uint8, side values
``[B, H, T]``) so each head's tokens are contiguous, as attention kernels read them. Capacity is
what is held, so it stays tight: a large append (a prefill) reserves exactly what it needs,
rounded up to ``GRANULE`` tokens; small appends (decoding) grow it by a sixteenth, so copies stay
rare and over-allocation stays under about 6%.

Codecs that encode tokens in blocks (``block > 1``, e.g. KIVI's per-channel key groups) need
whole blocks to decode: the store keeps ``[start, start + skip + length)`` physically, where the
first ``skip`` tokens were dropped from the front (sliding windows) but still share a block with
live ones. Without blocks ``skip`` is always 0.

Within a buffer, tokens are only ever written past the kept ones, never over a dropped region, so
views taken before an append or a drop (a layer's snapshot for the running forward) stay valid.
"""

from __future__ import annotations

import torch

from spectralquant.quantizer import Encoded

GRANULE = 64


class EncodedStore:
    """Records ``[B, H, cap, R]`` uint8, optional scales (uint8 or fp16) and fp16 QJL norms ``[B, H, cap]``."""

    def __init__(
        self,
        batch: int,
        heads: int,
        record_bytes: int,
        scale_dtype: torch.dtype | None,
        qjl: bool,
        device,
        block: int = 1,
    ):
        records = torch.empty(batch, heads, 0, record_bytes, dtype=torch.uint8, device=device)
        scales = None if scale_dtype is None else torch.empty(batch, heads, 0, dtype=scale_dtype, device=device)
        qjl_norms = torch.empty(batch, heads, 0, dtype=torch.float16, device=device) if qjl else None
        self.buffers: list[torch.Tensor | None] = [records, scales, qjl_norms]
        self.block = block
        self.start = 0
        self.skip = 0
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    @property
    def physical(self) -> int:
        """Tokens physically kept (dropped-but-blocked ones included)."""
        return self.skip + self.length

    def append(self, enc: Encoded) -> None:
        """Append ``enc`` whose tensors are ``[B, n, H, ...]`` (as a quantizer returns them)."""
        parts = [enc.records, enc.scales, enc.qjl_norms]
        n = enc.records.shape[1]
        if n == 0:
            return
        if n % self.block:
            raise ValueError(f"this codec encodes blocks of {self.block} tokens; got {n}")
        if self.start + self.physical + n > self.capacity:
            self._reserve(self.physical + n)
        end = self.start + self.physical
        for buf, p in zip(self.buffers, parts):
            if buf is not None:
                buf[:, :, end : end + n] = p.transpose(1, 2)
        self.length += n

    def _reserve(self, needed: int) -> None:
        """Make room for ``needed`` tokens starting at index 0 (compacting, growing if needed)."""
        if needed > self.capacity:
            needed = max(needed, self.capacity + self.capacity // 16)
        self._reallocate(max(self.capacity, -(-needed // GRANULE) * GRANULE))

    def _reallocate(self, cap: int) -> None:
        """Copy the kept tokens to the front of fresh buffers of ``cap`` tokens."""
        new = []
        for buf in self.buffers:
            if buf is None:
                new.append(None)
                continue
            fresh = buf.new_empty(buf.shape[0], buf.shape[1], cap, *buf.shape[3:])
            fresh[:, :, : self.physical] = buf[:, :, self.start : self.start + self.physical]
            new.append(fresh)
        self.buffers, self.start = new, 0

    def view(self) -> Encoded:
        """The kept tokens (``skip`` leading dropped ones included) as head-major ``[B, H, T, ...]`` views."""
        end = self.start + self.physical
        return Encoded(*(None if b is None else b[:, :, self.start : end] for b in self.buffers))

    def drop_front(self, n: int) -> None:
        """Forget the oldest ``n`` tokens (whole blocks are released, a partial one is skipped)."""
        n = min(n, self.length)
        self.length -= n
        self.skip += n
        whole = (self.skip // self.block) * self.block
        self.start += whole
        self.skip -= whole
        if self.length == 0:
            self.start, self.skip = self.start + self.skip, 0
        if self.start > self.capacity // 2:  # release the dropped front (a sliding window's past)
            self._reallocate(-(-(self.physical + self.physical // 16) // GRANULE) * GRANULE)

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` live tokens (at a block boundary for block codecs)."""
        length = max(0, min(length, self.length))
        if (self.skip + length) % self.block:
            raise ValueError(f"cannot cut inside a block of {self.block} tokens; crop to a block boundary")
        self.length = length

    def map_batch(self, fn) -> None:
        """Apply ``fn`` (a batch-dimension operation such as ``index_select``) to every buffer,
        keeping only the kept tokens."""
        end = self.start + self.physical
        self.buffers = [None if b is None else fn(b[:, :, self.start : end]).contiguous() for b in self.buffers]
        self.start = 0

    def nbytes(self) -> list[int]:
        """Bytes allocated per buffer (records, scales, qjl_norms)."""
        return [0 if b is None else b.numel() * b.element_size() for b in self.buffers]
