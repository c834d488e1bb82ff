"""The CUDA speed probe (``benchmarks/cuda_probe.py``): its record orders and packing on the CPU, and
the kernel against its float64 reference on a GPU (marked ``gpu``)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.cuda_probe import BITS, Probe, check, codebook, key_order, pack, value_order


def test_record_orders_are_permutations_of_the_coordinates():
    for order in (key_order(), value_order()):
        assert sorted(order.tolist()) == list(range(128))


def test_key_order_matches_the_mma_b_fragments():
    """Thread ``tq``'s word ``i`` holds coordinates ``32 i + 2 tq + {0, 8, 16, 24}`` (+1 in the high nibbles)."""
    order = key_order().reshape(4, 4, 8)  # [tq, i, nibble]
    for tq in range(4):
        for i in range(4):
            lo = [32 * i + 2 * tq + o for o in (0, 8, 16, 24)]
            assert order[tq, i].tolist() == lo + [c + 1 for c in lo]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_packing_is_lossless(seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**BITS, (3, 5, 128), generator=g, dtype=torch.uint8)
    for order in (key_order(), value_order()):
        words = pack(codes, order).to(torch.int64) & 0xFFFFFFFF
        nibbles = (words[..., None] >> (4 * torch.arange(8))) & 0xF
        back = torch.empty_like(codes)
        back[..., order] = nibbles.reshape(3, 5, 128).to(torch.uint8)
        assert torch.equal(back, codes)


def test_the_kernels_affine_step_is_exact_in_fp16():
    """``y = x s/2 - (512 s + 1)`` on ``x = 1024 + 2c + 1`` in fp16 equals the reference ``c s - h``."""
    (half_s, k, *_), (s, h, *_) = codebook(BITS)
    c = torch.arange(2**BITS)
    x = (1024 + 2 * c + 1).to(torch.float16)
    y = (x * torch.tensor(half_s, dtype=torch.float16)) + torch.tensor(k, dtype=torch.float16)
    assert torch.equal(y.double(), c.double() * s - h)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("warps", [1, 4])
def test_probe_kernel_matches_its_reference(warps):
    for row in check(Probe(warps)):
        assert row["rel_err"] < 3e-3, row
