"""Bit packing of mixed-width codes into fixed-length uint8 records, in a kernel-friendly order.

A record is a little-endian bit stream of the codes in a *stored order*: a permutation of the
coordinates chosen per row (per head) so that every group of ``slots`` consecutive stored codes
(a *unit*) spans at most 32 bits. A kernel then fetches one unit with a 32-bit word load and
extracts its codes with a shift and a mask each. Where it can, the layout puts every unit inside
one 32-bit word (whole units per word, the words filled in order; a word may end in unused bits
when the record has room to spare); otherwise units follow each other back to back and some
straddle two words (a second load and a 64-bit shift in the kernel). When ``sum(b) == 32 *
units`` every unit fills exactly one word. Coordinate ``i`` with width ``b_i`` occupies stream
bits ``[o_i, o_i + b_i)`` (``offsets``), least significant bit first; stream bit ``s`` is bit
``s % 8`` of byte ``s // 8``. Read as one little-endian integer, a record equals
``sum_i code_i << o_i``. The record length is ``ceil(sum(b) / 8)`` bytes, rounded up to whole
32-bit words when the row length ``D`` is a power of two >= 16 (the head dims the kernels take,
so records stay word aligned); unused bits are zero. Widths are 0-8; a 0-bit coordinate takes no space and unpacks
as 0. ``permute=False`` keeps the coordinate order (a plain bit stream; units of 4 codes), and
``word_units=False`` keeps permuted units back to back (for comparisons).

``fragments="keys"`` / ``"values"`` instead places the codes of a head whose coordinates all have
the same width (2 or 4 bits) in the order the tensor-core decode attention reads them
(:mod:`spectralquant.kernels.mma_attention`; :func:`fragment_offsets`): each thread of a warp
loads the words holding exactly the codes of its matrix fragments, and extracts four (keys, as
bytes) or two (values, as the halves of an fp16 pair) per shift and mask. Codes still lie back to
back inside 32-bit words, so every other reader of records works unchanged.
"""

from __future__ import annotations

import torch

from .codebook import MAX_BITS

UNIT_BITS = 32
SLOT_CHOICES = (32, 16, 8, 4)  # 4 codes of at most 8 bits always fit in 32 bits


FRAGMENTS = ("keys", "values")
FRAGMENT_BITS = (2, 4)


def fragment_unsupported_reason(kind: str, dim: int, bits: int) -> str | None:
    """Why records of ``dim`` coordinates at ``bits`` each cannot take the ``kind`` fragment order, or None."""
    if kind not in FRAGMENTS:
        return f"unknown fragment order {kind!r}; choose one of {FRAGMENTS}"
    if bits not in FRAGMENT_BITS:
        return f"the fragment order needs every coordinate at 2 or 4 bits, got {bits}"
    if dim not in (64, 128, 256):
        return f"the fragment order needs head_dim 64, 128 or 256, got {dim}"
    if kind == "values" and dim * bits < 256:
        return f"value fragments need at least 256 bits per record (head_dim {dim} at {bits} bits has {dim * bits})"
    return None


def fragment_offsets(kind: str, dim: int, bits: int) -> torch.Tensor:
    """First record bit ``[dim]`` of each coordinate in the tensor-core fragment order (int64).

    Keys (tokens are the rows of ``mma.m16n8k32`` with u8 codes, coordinates its k): lane ``tq``
    (= lane % 4) reads words ``[tq * W, (tq + 1) * W)`` of a record, ``W = dim * bits / 128``; its
    register ``j`` takes byte ``e`` from bits ``bits * (j % (8 / bits)) + 8 e`` of word
    ``j // (8 / bits)``: the code of coordinate ``32 (j // 2) + 16 (j % 2) + 4 tq + e``.
    Values (output coordinates are the rows of ``mma.m16n8k16``, tokens its k): lane group ``g``
    (= lane // 4) reads words ``[g * W, (g + 1) * W)``, ``W = dim * bits / 256``; slot ``n`` sits in
    half ``(n // (16 / bits)) % 2`` of word ``n // (32 / bits)`` at bit ``bits * (n % (16 / bits))``
    of the half, and holds coordinate ``16 (n // 2) + 8 (n % 2) + g``.
    """
    reason = fragment_unsupported_reason(kind, dim, bits)
    if reason:
        raise ValueError(reason)
    offsets = torch.empty(dim, dtype=torch.int64)
    if kind == "keys":
        words, per_word = dim * bits // 128, 8 // bits
        for tq in range(4):
            for j in range(dim // 16):
                for e in range(4):
                    c = 32 * (j // 2) + 16 * (j % 2) + 4 * tq + e
                    offsets[c] = UNIT_BITS * (tq * words + j // per_word) + bits * (j % per_word) + 8 * e
    else:
        words, per_half = dim * bits // 256, 16 // bits
        for g in range(8):
            for n in range(dim // 8):
                c = 16 * (n // 2) + 8 * (n % 2) + g
                half = n // per_half
                offsets[c] = UNIT_BITS * (g * words + half // 2) + 16 * (half % 2) + bits * (n % per_half)
    return offsets


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


def _fill_words(widths: list[int], slots: int, words: int) -> tuple[list[int], list[int]] | None:
    """Codes in units of ``slots`` that each lie inside one of ``words`` 32-bit words (each word
    holding whole units, ``units // words`` or one more): ``(stored order, offsets)``, or None if a
    short search finds none. Codes go, widest first, to the word with the most bits left per free
    slot, so words meant for many narrow codes keep room for them; a branch is abandoned as soon as
    the bits its words must leave unused exceed the record's spare bits. Words are stored in order,
    each widest code first, codes back to back from the word's first bit; a 0-bit code's offset is
    its word's first bit (so a unit of 0-bit codes never points past the record)."""
    d = len(widths)
    units = d // slots
    if units * slots != d or not 0 < words <= units:
        return None
    per, extra = divmod(units, words)
    narrow = sorted(widths)
    if sum(narrow[: extra * (per + 1) * slots]) > UNIT_BITS * extra:
        return None  # the words with the most slots cannot hold even the narrowest codes
    bits = [UNIT_BITS] * words
    free = [(per + (w < extra)) * slots for w in range(words)]
    spare = UNIT_BITS * words - sum(widths)
    items = sorted(range(d), key=lambda i: (-widths[i], i))
    home = [0] * d
    budget = 8 * d  # search steps: success takes d; a miss should cost little

    def unavoidable_waste(next_width: int) -> int:
        return sum(b if f == 0 else max(0, b - f * next_width) for b, f in zip(bits, free))

    def place(k: int) -> bool:
        nonlocal budget
        if k == d:
            return True
        budget -= 1
        if budget < 0:
            return False
        x = widths[items[k]]
        nxt = widths[items[k + 1]] if k + 1 < d else 0
        tried = set()
        for w in sorted(range(words), key=lambda w: -bits[w] / free[w] if free[w] else 0.0):
            if free[w] == 0 or bits[w] < x or (bits[w], free[w]) in tried:
                continue
            tried.add((bits[w], free[w]))  # words in the same state are interchangeable
            bits[w] -= x
            free[w] -= 1
            if unavoidable_waste(nxt) <= spare and place(k + 1):
                home[items[k]] = w
                return True
            bits[w] += x
            free[w] += 1
        return False

    if not place(0):
        return None
    order = sorted(range(d), key=lambda i: (home[i], -widths[i], i))
    offsets = [0] * d
    used = [0] * words
    for i in order:
        offsets[i] = UNIT_BITS * home[i] + (used[home[i]] if widths[i] else 0)
        used[home[i]] += widths[i]
    return order, offsets


def _plan(w: torch.Tensor, permute: bool, word_units: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Slots per unit, the stored order ``[rows, D]`` and the offsets ``[rows, D]`` for widths
    ``[rows, D]``."""
    rows, d = w.shape
    if d == 0:
        return SLOT_CHOICES[-1], w.clone(), w.clone()
    if permute and word_units and word_aligned(d):
        words = -(-int(w[0].sum()) // UNIT_BITS)
        for slots in SLOT_CHOICES:
            if slots > d:
                continue
            plans = []
            for row in w.tolist():
                plans.append(_fill_words(row, slots, words))
                if plans[-1] is None:
                    break
            else:
                order, offsets = (torch.tensor([p[k] for p in plans], dtype=torch.int64) for k in (0, 1))
                return slots, order, offsets
    for slots in SLOT_CHOICES:
        if slots > d and slots != SLOT_CHOICES[-1]:
            continue
        if not permute:
            pos = torch.arange(d)
            units = torch.zeros(rows, -(-d // slots) if d else 0, dtype=torch.int64).index_add_(1, pos // slots, w)
            if (units <= UNIT_BITS).all():
                order = pos.expand(rows, d).clone()
                break
            continue
        orders = [_group(row, slots) for row in w.tolist()]
        if all(o is not None for o in orders):
            order = torch.tensor(orders, dtype=torch.int64).reshape(rows, d)
            break
    else:
        raise AssertionError("unreachable: 4 codes of at most 8 bits always fit in 32 bits")
    stored = torch.gather(w, 1, order)
    return slots, order, torch.empty_like(w).scatter_(1, order, torch.cumsum(stored, 1) - stored)


class RecordLayout:
    """The packed layout for widths ``[..., D]`` (e.g. ``[D]`` or one row per head ``[H, D]``).

    Every row must have the same total bits, so all records share one length. Attributes:
    ``order [..., D]`` (coordinate stored at each position), ``offsets [..., D]`` (first stream
    bit of each coordinate), ``slots`` (codes per unit), ``units`` (``ceil(D / slots)``),
    ``total_bits`` and ``nbytes``. ``permute`` and ``word_units`` choose the stored order, or
    ``fragments`` (``"keys"`` / ``"values"``) the tensor-core fragment order (module doc). Build it
    once and reuse it: packing and unpacking then do no validation or host work.
    """

    def __init__(
        self, widths: torch.Tensor, permute: bool = True, word_units: bool = True, fragments: str | None = None
    ):
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
        self.fragments = fragments
        if fragments is None:
            self.slots, order, offsets = _plan(flat, permute, word_units)
        else:
            bits = int(flat[0, 0]) if flat.numel() else 0
            if flat.numel() and (flat != bits).any():
                raise ValueError(f"the {fragments} fragment order needs every coordinate at the same width")
            offsets = fragment_offsets(fragments, d, bits).expand_as(flat).contiguous()
            order = torch.argsort(offsets, -1)
            self.slots = UNIT_BITS // bits  # the codes of one word
        self.units = -(-d // self.slots) if d else 0
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
