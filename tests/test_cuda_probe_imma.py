"""The integer-key CUDA speed probe (``benchmarks/cuda_probe_imma.py``): record layouts, packing and
query fragments on the CPU, including an emulation of what each lane extracts against the PTX
fragment layouts; the kernel against its float64 reference on a GPU (marked ``gpu``)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.cuda_probe_imma import (
    QMAX,
    ImmaProbe,
    check,
    fixed_point_query,
    key_layout,
    pack,
    query_fragments,
    unpack,
    value_layout,
)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("layout", [key_layout, value_layout])
def test_layouts_give_every_coordinate_its_own_bits_inside_the_record(layout, bits):
    word, bit = layout(bits)
    assert int(word.max()) < 4 * bits and int(bit.max()) <= 32 - bits
    # no two codes overlap: each occupies bits [bit, bit + width) of its word
    used = torch.zeros(4 * bits, 32, dtype=torch.int64)
    for w, b in zip(word.tolist(), bit.tolist()):
        used[w, b : b + bits] += 1
    assert int(used.max()) == 1 and int(used.sum()) == 128 * bits


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 4]))
def test_packing_is_lossless(seed, bits):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (3, 5, 128), generator=g, dtype=torch.uint8)
    for layout in (key_layout(bits), value_layout(bits)):
        assert torch.equal(unpack(pack(codes, layout, bits), layout, bits), codes)


def _words(record: torch.Tensor) -> list[int]:
    return [int(w) & 0xFFFFFFFF for w in record]


@pytest.mark.parametrize("bits", [2, 4])
def test_each_lane_extracts_the_key_codes_of_its_a_fragments(bits):
    """The kernel's ``key_reg(j)`` on lane ``(g, tq)``: byte ``e`` of register ``j`` of token row ``r`` must be
    A[r][k] of k-group ``j // 2`` (PTX m16n8k32 .u8: ``a0, a2`` row ``g``, ``a1, a3`` row ``g + 8``; columns
    ``4 tq + e``, + 16 for ``a2, a3``), i.e. the code of coordinate ``32 (j // 2) + k``, which the query
    fragments put at the same ``k``."""
    codes = torch.randint(0, 2**bits, (16, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    records = pack(codes, key_layout(bits), bits)
    per_word = 8 // bits
    for token in range(16):
        words = _words(records[token])
        for tq in range(4):
            mine = words[tq * bits : (tq + 1) * bits]  # the KVec the lane loads
            for j in range(8):
                reg = (mine[j // per_word] >> (bits * (j % per_word))) & (0x01010101 * (2**bits - 1))
                for e in range(4):
                    k = 4 * tq + e + 16 * (j % 2)
                    assert (reg >> (8 * e)) & 0xFF == codes[token, 32 * (j // 2) + k]


@pytest.mark.parametrize("bits", [2, 4])
def test_each_lane_extracts_the_value_codes_of_its_a_fragments(bits):
    """The kernel's ``value_reg`` for tile ``c`` on lane ``(g, tq)``: the half2 built from tokens ``2 tq``, ``2 tq + 1``
    must hold rows ``g`` (slot ``2 c``) and ``g + 8`` (slot ``2 c + 1``) of ``V^T`` in tile ``c``, i.e. the codes of
    coordinates ``16 c + g`` and ``16 c + 8 + g`` (the output rows the kernel writes)."""
    codes = torch.randint(0, 2**bits, (2, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    records = pack(codes, value_layout(bits), bits)
    per_half = 16 // bits
    for g in range(8):
        mine = [_words(records[t])[g * (bits // 2) : (g + 1) * (bits // 2)] for t in range(2)]  # the VVecs
        for c in range(8):
            zi, k = (2 * c) // per_half, (2 * c) % per_half
            sel = 16 * (zi & 1)  # prmt 0x5410 / 0x7632: the low / high halves of both tokens
            z = [(mine[t][zi >> 1] >> sel) & 0xFFFF for t in range(2)]  # half 0: token 0, half 1: token 1
            for row, kk in ((g, k), (g + 8, k + 1)):
                for t in range(2):
                    code = (z[t] >> (bits * kk)) & (2**bits - 1)
                    assert code == codes[t, 16 * c + row]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_query_fragments_hold_the_fixed_point_query_in_two_bytes(seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 128, generator=g) * torch.rand(2, 4, 1, generator=g)
    qint, step = fixed_point_query(q)
    assert int(qint.abs().max()) <= QMAX
    assert torch.allclose(qint * step[..., None], q, rtol=0, atol=float(step.max()) / 2 * (1 + 1e-6))
    frag = query_fragments(qint).view(torch.int8).reshape(2, 4, 32, 2, 4).to(torch.int32)  # [BH, i, lane, b, e]
    for lane in range(32):
        g_, tq = lane // 4, lane % 4
        for i in range(4):
            for half in range(2):
                for e in range(4):
                    coord = 32 * i + 16 * half + 4 * tq + e
                    piece = frag[:, i, lane, half, e]
                    if g_ < 4:
                        hi, lo = piece, frag[:, i, lane + 16, half, e]  # column g + 4 is two groups later
                        assert torch.equal(256 * hi + lo, qint[:, g_, coord])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kbits,vbits,warps", [(4, 4, 1), (2, 2, 4), (4, 2, 2)])
def test_imma_probe_matches_its_reference(kbits, vbits, warps):
    for row in check(ImmaProbe(kbits, vbits, warps)):
        assert row["rel_err"] < 2e-3, row
        assert row["rel_err_float_query"] < 5e-3, row
