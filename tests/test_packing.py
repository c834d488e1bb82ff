import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectralquant.packing import RecordLayout, bit_offsets, pack, record_bytes, unpack

widths_st = st.lists(st.integers(0, 8), min_size=1, max_size=70)


def random_codes(widths: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    high = (1 << widths).expand(n, *widths.shape)
    return (torch.rand(high.shape, generator=g) * high).long()


@given(widths_st, st.integers(0, 20), st.integers(0, 2**31))
def test_round_trip_is_bit_exact_and_record_length_is_ceil_bits_over_8(ws, n, seed):
    widths = torch.tensor(ws)
    codes = random_codes(widths, n, seed)
    records = pack(codes, widths)
    assert records.dtype == torch.uint8
    assert records.shape == (n, (sum(ws) + 7) // 8)
    assert record_bytes(widths) == (sum(ws) + 7) // 8
    assert torch.equal(unpack(records, widths), codes)


@given(widths_st, st.integers(0, 2**31))
def test_record_is_the_little_endian_integer_sum_of_shifted_codes(ws, seed):
    widths = torch.tensor(ws)
    codes = random_codes(widths, 1, seed)[0]
    record = pack(codes, widths)
    as_int = int.from_bytes(bytes(record.tolist()), "little")
    offsets = bit_offsets(widths).tolist()
    assert as_int == sum(int(c) << o for c, o in zip(codes.tolist(), offsets))


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
