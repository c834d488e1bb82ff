import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectralquant.packing import RecordLayout, pack, record_bytes, unpack

widths_st = st.one_of(
    st.lists(st.integers(0, 8), min_size=1, max_size=70), st.lists(st.integers(0, 8), min_size=16, max_size=16)
)


def random_codes(widths: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    high = (1 << widths).expand(n, *widths.shape)
    return (torch.rand(high.shape, generator=g) * high).long()


def expected_bytes(ws: list[int]) -> int:
    """ceil(bits / 8), rounded up to whole 32-bit words when D is a power of two >= 16."""
    d, bits = len(ws), sum(ws)
    return 4 * -(-bits // 32) if d >= 16 and d & (d - 1) == 0 else -(-bits // 8)


@given(widths_st, st.integers(0, 20), st.integers(0, 2**31))
def test_round_trip_is_bit_exact_and_record_length_follows_the_rule(ws, n, seed):
    widths = torch.tensor(ws)
    codes = random_codes(widths, n, seed)
    records = pack(codes, widths)
    assert records.dtype == torch.uint8
    assert records.shape == (n, expected_bytes(ws))
    assert record_bytes(widths) == expected_bytes(ws)
    assert torch.equal(unpack(records, widths), codes)


@given(widths_st, st.integers(0, 2**31), st.booleans())
def test_record_is_the_little_endian_integer_sum_of_shifted_codes(ws, seed, permute):
    widths = torch.tensor(ws)
    layout = RecordLayout(widths, permute=permute)
    codes = random_codes(widths, 1, seed)
    as_int = int.from_bytes(bytes(layout.pack(codes)[0].tolist()), "little")
    assert as_int == sum(int(c) << o for c, o in zip(codes[0].tolist(), layout.offsets.tolist()))
    assert torch.equal(layout.unpack(layout.pack(codes)), codes)


NO_CODES = 1 << 30  # unit_spans' first bit of a unit whose codes are all 0-bit


def unit_spans(layout: RecordLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last stream bit of each unit (a row layout), over its used codes."""
    w, o = layout.widths[layout.order], layout.offsets[layout.order]
    first = torch.where(w > 0, o, NO_CODES).reshape(-1, layout.slots).min(1).values
    end = (o + w).reshape(-1, layout.slots).max(1).values
    return first, end


@given(widths_st, st.booleans(), st.booleans())
def test_units_hold_at_most_32_bits_and_codes_never_overlap(ws, permute, word_units):
    widths = torch.tensor(ws)
    layout = RecordLayout(widths, permute=permute, word_units=word_units)
    assert sorted(layout.order.tolist()) == list(range(len(ws)))
    if not permute:
        assert layout.order.tolist() == list(range(len(ws)))
    assert layout.slots in (4, 8, 16, 32) and layout.units == -(-len(ws) // layout.slots)
    stored, offsets = widths[layout.order], layout.offsets[layout.order]
    padded = torch.nn.functional.pad(stored, (0, layout.units * layout.slots - len(ws)))
    assert int(padded.reshape(layout.units, layout.slots).sum(1).max()) <= 32
    if not (permute and word_units):  # units back to back: the whole record is one running sum
        assert torch.equal(offsets, torch.cumsum(stored, 0) - stored)
    # Within a unit, each used code starts where the one before it ends.
    same_unit = torch.arange(1, len(ws)) // layout.slots == torch.arange(len(ws) - 1) // layout.slots
    follows = same_unit & (stored[1:] > 0)
    assert torch.equal(offsets[1:][follows], (offsets[:-1] + stored[:-1])[follows])


@given(st.sampled_from([16, 32, 64, 128, 256]), st.floats(1.0, 4.0), st.integers(0, 2**31))
def test_spectrum_like_widths_put_every_unit_inside_one_word(dim, bits, seed):
    # Widths as a water-filling gives them: every value between a narrowest and a widest present,
    # falling along the spectrum, a multiple of 32 bits in all (the budgets the presets use).
    g = torch.Generator().manual_seed(seed)
    total = max(32, round(bits * dim / 32) * 32)
    widths = torch.zeros(dim, dtype=torch.long)
    for _ in range(total):  # one bit at a time to the coordinate with the best gain
        gain = torch.exp2(-torch.arange(dim) * 6.0 / dim - 2.0 * widths) * (widths < 8)
        widths[int(torch.argmax(gain + 1e-9 * torch.rand(dim, generator=g)))] += 1
    layout = RecordLayout(widths)
    first, end = unit_spans(layout)
    inside = (first == NO_CODES) | (first // 32 == (end - 1) // 32)
    assert bool(inside.all()), f"a unit straddles a word at {bits:.2f} bits, head_dim {dim}"
    assert layout.nbytes == total // 8
    assert int(layout.offsets.max()) < 8 * layout.nbytes


def test_waterfill_like_widths_fill_whole_words_with_eight_codes_each():
    # 4 bits on average over 128 coordinates, widths falling from 6 to 2 as a spectrum gives them.
    widths = torch.tensor([6] * 26 + [5] * 25 + [4] * 26 + [3] * 25 + [2] * 26)
    layout = RecordLayout(widths)
    assert (layout.slots, layout.units, layout.nbytes) == (8, 16, 64)
    starts = layout.offsets[layout.order][:: layout.slots]
    assert starts.tolist() == [32 * j for j in range(16)]
    # In coordinate order the first 8 codes would need 48 bits: only units of 4 fit.
    assert RecordLayout(widths, permute=False).slots == 4


def test_near_uniform_widths_fall_back_to_units_back_to_back():
    # 52 of 64 codes at 3 bits in 6 words: a word takes at most 10 such codes, whole units give 8 or
    # 12, so no order keeps units inside words; the layout is then the back-to-back one.
    widths = torch.tensor([2] * 6 + [3] * 52 + [4] * 6)
    layout, back = RecordLayout(widths), RecordLayout(widths, word_units=False)
    assert layout.nbytes == back.nbytes == 24
    assert layout.slots == back.slots
    assert torch.equal(layout.order, back.order) and torch.equal(layout.offsets, back.offsets)
    first, end = unit_spans(layout)
    assert bool((first // 32 != (end - 1) // 32).any())


@given(st.integers(1, 4), st.integers(1, 40), st.integers(0, 2**31))
def test_per_head_widths_with_equal_totals_round_trip(heads, dim, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 9, (dim,), generator=g)
    # Each head gets a permutation of the same widths, so totals agree but layouts differ.
    widths = torch.stack([base[torch.randperm(dim, generator=g)] for _ in range(heads)])
    codes = random_codes(widths, 5, seed)
    layout = RecordLayout(widths)
    records = layout.pack(codes)
    assert records.shape == (5, heads, layout.nbytes)
    assert torch.equal(layout.unpack(records), codes)
    for h in range(heads):  # each head's row is laid out as it would be alone
        assert torch.equal(records[:, h], RecordLayout(widths[h]).pack(codes[:, h]))


def test_unused_high_bits_of_last_byte_are_zero():
    widths = torch.tensor([3, 2])  # 5 bits in one byte
    records = pack(torch.tensor([[7, 3]]), widths)
    assert records.tolist() == [[0b11111]]


def test_zero_width_coordinates_unpack_as_zero_and_take_no_space():
    widths = torch.tensor([0, 8, 0, 0])
    records = pack(torch.tensor([[0, 200, 0, 0]]), widths)
    assert records.shape == (1, 1)
    assert unpack(records, widths).tolist() == [[0, 200, 0, 0]]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="does not fit"):
        pack(torch.tensor([[4]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="does not fit"):
        pack(torch.tensor([[-1]]), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"\[0, 8\]"):
        RecordLayout(torch.tensor([9]))
    with pytest.raises(TypeError, match="integer"):
        RecordLayout(torch.tensor([2.0]))
    with pytest.raises(TypeError, match="integer"):
        pack(torch.tensor([[1.0]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="same total"):
        RecordLayout(torch.tensor([[1, 2], [2, 2]]))
    with pytest.raises(ValueError, match="bytes"):
        unpack(torch.zeros(1, 3, dtype=torch.uint8), torch.tensor([8, 8]))
    with pytest.raises(TypeError, match="uint8"):
        unpack(torch.zeros(1, 2, dtype=torch.int32), torch.tensor([8, 8]))
    with pytest.raises(ValueError, match="does not end with"):
        RecordLayout(torch.tensor([2, 2])).pack(torch.zeros(3, 5, dtype=torch.long))
