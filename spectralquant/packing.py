"""Bit packing of mixed-width codes into fixed-length uint8 records, in a kernel-friendly order.

A record is a little-endian bit stream of the codes in a *stored order*: a permutation of the
coordinates chosen per row (per head) so that every group of ``slots`` consecutive stored codes
(a *unit*) spans at most 32 bits. A kernel then fetches one unit with one or two 32-bit word
loads and extracts its codes with a shift and a mask each, and when ``sum(b) == 32 * units``
every unit fills exactly one 32-bit word. Coordinate ``i`` with width ``b_i`` occupies stream bits
``[o_i, o_i + b_i)`` (``offsets``), least significant bit first; stream bit ``s`` is bit
``s % 8`` of byte ``s // 8``. Read as one little-endian integer, a record equals
``sum_i code_i << o_i``. The record length is ``ceil(sum(b) / 8)`` bytes, rounded up to whole
32-bit words when the row length ``D`` is a power of two >= 16 (the head dims the kernels take,
so records stay word aligned); unused bits are zero. Widths are 0-8; a 0-bit coordinate takes no space and unpacks
as 0. ``permute=False`` keeps the coordinate order (a plain bit stream; units of 4 codes).
"""

from __future__ import annotations

import torch

from .codebook import MAX_BITS

UNIT_BITS = 32
SLOT_CHOICES = (32, 16, 8, 4)  # 4 codes of at most 8 bits always fit in 32 bits


def word_aligned(dim: int) -> bool:
    """Whether records of ``dim`` coordinates are padded to whole 32-bit words (power of two >= 16)."""
    return dim >= 16 and dim & (dim - 1) == 0


def _group(widths: list[int], slots: int) -> list[int] | None:
    """A stored order (coordinate per position) whose consecutive groups of ``slots`` codes each
    span at most 32 bits, or None if the greedy assignment finds none. Codes go, widest first, to
    the unit with the fewest bits that has a free slot and room (longest-processing-time rule),
    which fills every unit to exactly 32 bits whenever the total allows and the greedy succeeds;
    within a unit, codes are ordered widest first so a slot holds similar widths across units."""
    d = len(widths)
    units = -(-d // slots)
    sizes = [slots] * (units - 1) + [d - slots * (units - 1)]
    members: list[list[int]] = [[] for _ in range(units)]
    sums = [0] * units
    for i in sorted(range(d), key=lambda i: (-widths[i], i)):
        best = -1
        for u in range(units):
            if len(members[u]) < sizes[u] and sums[u] + widths[i] <= UNIT_BITS and (best < 0 or sums[u] < sums[best]):
                best = u
        if best < 0:
            return None
        members[best].append(i)
        sums[best] += widths[i]
    return [i for m in members for i in sorted(m, key=lambda i: (-widths[i], i))]


def _plan(w: torch.Tensor, permute: bool) -> tuple[int, torch.Tensor]:
    """Slots per unit and the stored order ``[rows, D]`` for widths ``[rows, D]``."""
    rows, d = w.shape
    if d == 0:
        return SLOT_CHOICES[-1], w.clone()
    for slots in SLOT_CHOICES:
        if slots > d and slots != SLOT_CHOICES[-1]:
            continue
        if not permute:
            pos = torch.arange(d)
            units = torch.zeros(rows, -(-d // slots) if d else 0, dtype=torch.int64).index_add_(1, pos // slots, w)
            if (units <= UNIT_BITS).all():
                return slots, pos.expand(rows, d).clone()
            continue
        orders = [_group(row, slots) for row in w.tolist()]
        if all(o is not None for o in orders):
            return slots, torch.tensor(orders, dtype=torch.int64).reshape(rows, d)
    raise AssertionError("unreachable: 4 codes of at most 8 bits always fit in 32 bits")


class RecordLayout:
    """The packed layout for widths ``[..., D]`` (e.g. ``[D]`` or one row per head ``[H, D]``).

    Every row must have the same total bits, so all records share one length. Attributes:
    ``order [..., D]`` (coordinate stored at each position), ``offsets [..., D]`` (first stream
    bit of each coordinate), ``slots`` (codes per unit), ``units`` (``ceil(D / slots)``),
    ``total_bits`` and ``nbytes``. Build it once and reuse it: packing and unpacking then do no
    validation or host work.
    """

    def __init__(self, widths: torch.Tensor, permute: bool = True):
        if widths.dtype.is_floating_point or widths.dtype == torch.bool:
            raise TypeError(f"widths must be an integer tensor, got {widths.dtype}")
        if widths.dim() == 0:
            raise ValueError("widths must have at least one dimension [..., D]")
        w = widths.detach().to("cpu", torch.int64)
        if (w < 0).any() or (w > MAX_BITS).any():
            raise ValueError(f"widths must lie in [0, {MAX_BITS}]")
        d = w.shape[-1]
        flat = w.reshape(-1, d)
        totals = flat.sum(-1)
        if flat.shape[0] and (totals != totals[0]).any():
            raise ValueError(f"every row of widths must have the same total bits, got {totals.unique().tolist()}")
        self.widths = w
        self.total_bits = int(totals[0]) if flat.shape[0] else 0
        words = -(-self.total_bits // UNIT_BITS)
        self.nbytes = 4 * words if word_aligned(d) else (self.total_bits + 7) // 8
        self.slots, order = _plan(flat, permute)
        self.units = -(-d // self.slots) if d else 0
        stored = torch.gather(flat, 1, order)
        offsets = torch.empty_like(flat).scatter_(1, order, torch.cumsum(stored, 1) - stored)
        self.order = order.reshape(w.shape)
        self.offsets = offsets.reshape(w.shape)
        self._device_cache: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per coordinate: 32-bit word index, shift within it, and code mask, on ``device``."""
        if device not in self._device_cache:
            used = self.widths > 0  # a 0-bit code may sit at the very end: keep its index in range
            word = torch.where(used, self.offsets // UNIT_BITS, 0)
            shift = torch.where(used, self.offsets % UNIT_BITS, 0)
            self._device_cache[device] = tuple(t.to(device) for t in (word, shift, (1 << self.widths) - 1))
        return self._device_cache[device]

    @property
    def words(self) -> int:
        """32-bit words the packing works in (the record is their first ``nbytes`` bytes)."""
        return -(-self.nbytes // 4)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., *widths.shape]`` (integers in range) to uint8 records ``[..., *lead, R]``."""
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
        if tuple(codes.shape[codes.dim() - self.widths.dim():]) != tuple(self.widths.shape):
            raise ValueError(
                f"codes shape {tuple(codes.shape)} does not end with widths shape {tuple(self.widths.shape)}"
            )
        word, shift, mask = self._on(codes.device)
        shifted = (codes.to(torch.int64) & mask) << shift  # at most 39 bits: spills into the next word
        index = word.expand_as(shifted)
        words = torch.zeros(*shifted.shape[:-1], self.words + 2, dtype=torch.int64, device=codes.device)
        words.scatter_add_(-1, index, shifted & 0xFFFFFFFF).scatter_add_(-1, index + 1, shifted >> UNIT_BITS)
        parts = (words[..., : self.words, None] >> torch.arange(0, 32, 8, device=codes.device)) & 0xFF
        return parts.flatten(-2)[..., : self.nbytes].to(torch.uint8)

    def unpack(self, records: torch.Tensor) -> torch.Tensor:
        """uint8 records ``[..., R]`` to int64 codes ``[..., D]``."""
        if records.dtype != torch.uint8:
            raise TypeError(f"records must be uint8, got {records.dtype}")
        if records.shape[-1] != self.nbytes:
            raise ValueError(f"records have {records.shape[-1]} bytes but this layout needs {self.nbytes}")
        word, shift, mask = self._on(records.device)
        padded = torch.nn.functional.pad(records.to(torch.int64), (0, 4 * (self.words + 2) - self.nbytes))
        parts = padded.reshape(*records.shape[:-1], self.words + 2, 4)
        words = (parts << torch.arange(0, 32, 8, device=records.device)).sum(-1)
        index = word.expand(*records.shape[: records.dim() - self.widths.dim()], *word.shape)
        value = torch.gather(words, -1, index) | (torch.gather(words, -1, index + 1) << UNIT_BITS)
        return (value >> shift) & mask


def record_bytes(widths: torch.Tensor) -> int:
    """Bytes per record (see the module docstring for the rule)."""
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
