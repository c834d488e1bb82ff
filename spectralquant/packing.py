"""Bit packing of mixed-width codes into fixed-length uint8 records.

A record is a little-endian bit stream: coordinate ``i`` with width ``b_i`` occupies stream bits
``[o_i, o_i + b_i)`` where ``o_i = b_0 + ... + b_{i-1}``, least significant bit first; stream bit
``s`` is bit ``s % 8`` of byte ``s // 8``. Read as one little-endian integer, a record equals
``sum_i code_i << o_i``. The record length is ``ceil(sum(b) / 8)`` bytes; unused high bits of the
last byte are zero. Widths are 0-8; a 0-bit coordinate takes no space and unpacks as 0.
"""

from __future__ import annotations

import torch

from .codebook import MAX_BITS


def bit_offsets(widths: torch.Tensor) -> torch.Tensor:
    """Stream offset of each coordinate's first bit, ``[..., D]`` (exclusive cumulative sum)."""
    w = widths.to(torch.int64)
    return torch.cumsum(w, -1) - w


class RecordLayout:
    """The packed layout for widths ``[..., D]`` (e.g. ``[D]`` or one row per head ``[H, D]``).

    Every row must have the same total bits, so all records share one length. Build it once and
    reuse it: packing and unpacking then do no validation or host work.
    """

    def __init__(self, widths: torch.Tensor):
        if widths.dtype.is_floating_point or widths.dtype == torch.bool:
            raise TypeError(f"widths must be an integer tensor, got {widths.dtype}")
        if widths.dim() == 0:
            raise ValueError("widths must have at least one dimension [..., D]")
        w = widths.detach().to("cpu", torch.int64)
        if (w < 0).any() or (w > MAX_BITS).any():
            raise ValueError(f"widths must lie in [0, {MAX_BITS}]")
        flat = w.reshape(-1, w.shape[-1])
        totals = flat.sum(-1)
        if (totals != totals[0]).any():
            raise ValueError(f"every row of widths must have the same total bits, got {totals.unique().tolist()}")
        self.widths = w
        self.total_bits = int(totals[0])
        self.nbytes = (self.total_bits + 7) // 8
        # For each stream bit: the coordinate that owns it and which bit of its code it is.
        coord = torch.stack([torch.repeat_interleave(torch.arange(w.shape[-1]), row) for row in flat])
        coord = coord.reshape(*w.shape[:-1], self.total_bits)
        self.coord = coord
        self.bit = torch.arange(self.total_bits).expand_as(coord) - torch.gather(bit_offsets(w), -1, coord)
        self._device_cache: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self._device_cache:
            self._device_cache[device] = (self.widths.to(device), self.coord.to(device), self.bit.to(device))
        return self._device_cache[device]

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., *widths.shape]`` (integers in range) to uint8 records ``[..., *lead, R]``."""
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
        if tuple(codes.shape[codes.dim() - self.widths.dim():]) != tuple(self.widths.shape):
            raise ValueError(
                f"codes shape {tuple(codes.shape)} does not end with widths shape {tuple(self.widths.shape)}"
            )
        _, coord, bit = self._on(codes.device)
        c = codes.to(torch.int64)
        lead = c.shape[: c.dim() - self.widths.dim()]
        stream = (torch.gather(c, -1, coord.expand(*lead, *coord.shape)) >> bit) & 1
        stream = torch.nn.functional.pad(stream, (0, self.nbytes * 8 - self.total_bits))
        stream = stream.reshape(*stream.shape[:-1], self.nbytes, 8)
        return (stream << torch.arange(8, device=c.device)).sum(-1).to(torch.uint8)

    def unpack(self, records: torch.Tensor) -> torch.Tensor:
        """uint8 records ``[..., R]`` to int64 codes ``[..., D]``."""
        if records.dtype != torch.uint8:
            raise TypeError(f"records must be uint8, got {records.dtype}")
        if records.shape[-1] != self.nbytes:
            raise ValueError(f"records have {records.shape[-1]} bytes but this layout needs {self.nbytes}")
        _, coord, bit = self._on(records.device)
        shifts = torch.arange(8, device=records.device)
        stream = ((records.to(torch.int64)[..., None] >> shifts) & 1).flatten(-2)[..., : self.total_bits]
        lead = records.shape[: records.dim() - self.widths.dim()]
        out = torch.zeros(*lead, *self.widths.shape, dtype=torch.int64, device=records.device)
        return out.scatter_add_(-1, coord.expand(*lead, *coord.shape), stream << bit)


def record_bytes(widths: torch.Tensor) -> int:
    """Bytes per record: ``ceil(sum(widths) / 8)``."""
    return RecordLayout(widths).nbytes


def pack(codes: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Pack codes ``[..., D]`` into uint8 records ``[..., R]``; raises ``ValueError`` if a code does
    not fit its width. ``widths`` is ``[D]`` or ``[H, D]``, aligned with the trailing dims of codes."""
    layout = RecordLayout(widths)
    w = layout.widths.to(codes.device)
    if not codes.dtype.is_floating_point and codes.dtype != torch.bool:
        c = codes.to(torch.int64)
        if codes.shape[codes.dim() - w.dim():] == w.shape and ((c < 0) | (c >> w != 0)).any():
            raise ValueError("a code does not fit in its bit width")
    return layout.pack(codes)


def unpack(records: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 records ``[..., R]`` to int64 codes ``[..., D]``."""
    return RecordLayout(widths).unpack(records)
