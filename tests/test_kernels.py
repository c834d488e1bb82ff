"""The Triton kernels against their PyTorch references on small shapes.

Without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set in
``conftest.py`` before Triton is imported); with one, these run on it. Large-shape GPU checks are in
``test_kernels_gpu.py``.
"""

from dataclasses import replace

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from spectralquant.codebook import MAX_BITS, gaussian_poly_coeffs, poly_basis  # noqa: E402
from spectralquant.kernels import compressed_attention, compressed_attention_reference  # noqa: E402
from spectralquant.kernels.random_cache import random_compressed_kv, random_quantizer  # noqa: E402
from spectralquant.kernels.tables import layout_tables, poly_tables, tables_of, unsupported_reason  # noqa: E402
from spectralquant.kernels.triton_attention import (  # noqa: E402
    _splits,
    attention_unsupported_reason,
    compressed_attention_triton,
)
from spectralquant.kernels.triton_codec import decode, encode, pack_words, poly_codes  # noqa: E402
from spectralquant.packing import RecordLayout  # noqa: E402
from spectralquant.quantizer import Encoded  # noqa: E402
from spectralquant.rope import LinearRope  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def on_device(enc: Encoded) -> Encoded:
    return Encoded(*(t.to(DEVICE) if t is not None else None for t in (enc.records, enc.scales)))


def vectors(q, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, q.heads, q.dim, generator=g) * q.sigma
    return torch.einsum("nhe,hde->nhd", z, q.basis) + q.mean


CODEC_CASES = [
    dict(dim=16, bits=4),  # units fill whole words
    dict(dim=32, bits=3),  # two units share a word
    dict(dim=64, bits=5, allocation="uniform"),  # 8 codes would need 40 bits: units of 4 that straddle words
    dict(dim=32, bits=2, codebook="fitted"),
    dict(dim=32, bits=3, codebook="linear"),  # the kernels skip the cubic and quintic terms
    dict(dim=16, bits=2.5, scale=False, center=False),
    dict(dim=256, bits=3),  # the encode reads the basis in two chunks, 16 vectors per program
    dict(dim=32, bits=2, unbiased=True),  # decode levels scaled apart from the encode's sigma
]


@pytest.mark.parametrize("case", CODEC_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_encode_and_decode_match_the_quantizer(case):
    case = dict(case)
    q = random_quantizer(3, case.pop("dim"), case.pop("bits"), seed=1, **case)
    x = vectors(q, 70, seed=2)
    ref = q.encode(x)
    got = encode(q.to(DEVICE), x.to(DEVICE))
    codes, ref_codes = q.layout.unpack(got.records.cpu()), q.layout.unpack(ref.records)
    assert got.records.shape == ref.records.shape
    assert (codes != ref_codes).float().mean() < 2e-3 and (codes - ref_codes).abs().max() <= 1
    if q.config.scale:
        assert torch.equal(got.scales.cpu(), ref.scales)
    else:
        assert got.scales is None
    decoded = decode(q.to(DEVICE), on_device(ref)).cpu()
    assert torch.allclose(decoded, q.decode(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("magnitude", [1e-5, 1e5])
def test_encode_matches_the_quantizer_at_extreme_magnitudes(magnitude):
    q = random_quantizer(2, 32, 3, seed=4)
    x = vectors(q, 40, seed=5) * magnitude
    ref = q.encode(x)
    got = encode(q.to(DEVICE), x.to(DEVICE))
    codes, ref_codes = q.layout.unpack(got.records.cpu()), q.layout.unpack(ref.records)
    assert (codes != ref_codes).float().mean() < 2e-3 and (codes - ref_codes).abs().max() <= 1
    assert torch.equal(got.scales.cpu(), ref.scales)


@pytest.mark.parametrize("bits", [1, 2.5, 4, 6])
def test_poly_tables_reproduce_the_unit_levels(bits):
    q = random_quantizer(3, 32, bits, seed=4)
    s, h, a1, a3, a5 = poly_tables(q).unbind(1)  # [H, D] each, stored order
    widths = q.widths.gather(1, q.layout.order)
    for code in range(2 ** int(widths.max())):
        ok = code < 2**widths
        want = q.unit_levels[torch.arange(3)[:, None], widths, code]
        y = code * s - h  # exact: m * s
        m = (y / s).double()
        coeffs = torch.stack([a1 * s, a3 * s**3, a5 * s**5], -1)  # c1, c3, c5 (power-of-two rescaling is exact)
        exact = (torch.stack([m, m**3, m**5], -1).float()[..., None, :] @ coeffs[..., None])[..., 0, 0]
        assert torch.allclose(torch.where(ok, exact, 0), torch.where(ok, want, 0), rtol=1e-6, atol=0)  # to an ulp
        horner = y * (a1 + y * y * (a3 + y * y * a5))  # the kernels' form
        assert torch.allclose(torch.where(ok, horner, 0), torch.where(ok, want, 0), rtol=0, atol=1e-6)
    assert poly_tables(random_quantizer(1, 16, 2, codebook="gaussian")) is None


@triton.jit
def _poly_codes_kernel(U, OUT, n, top, s, h, a1, a3, a5, TERMS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    u = tl.load(U + i, mask=i < n, other=0.0)
    tl.store(OUT + i, poly_codes(u, top, s, h, a1, a3, a5, TERMS), mask=i < n)


@pytest.mark.parametrize("terms", [1, 3])
def test_computed_polynomial_codes_match_the_boundary_search(terms):
    # The encode kernel inverts the level polynomial instead of searching the boundary table; for
    # every width, codes must equal the search's except within rounding of a boundary.
    u = torch.cat([torch.linspace(-14, 14, 40001), torch.tensor([0.0, -0.0, 1e4, -1e4, 1e30, -1e30])])
    for b in range(1, MAX_BITS + 1):
        c = gaussian_poly_coeffs(b, terms).float()
        levels = poly_basis(b).float() @ c  # as Quantizer.from_stats builds poly levels
        bounds = 0.5 * (levels[1:] + levels[:-1])
        want = torch.searchsorted(bounds, u)
        s = 2.0 ** -(b - 1)
        coeffs = (c[0] / s, c[1] / s**3, c[2] / s**5) if terms == 3 else (c[0] / s, 0.0, 0.0)
        got = torch.empty(u.numel(), dtype=torch.int32, device=DEVICE)
        _poly_codes_kernel[(triton.cdiv(u.numel(), 1024),)](
            u.to(DEVICE), got, u.numel(), float(2**b - 1), s, s * (2**b - 1) / 2, *map(float, coeffs),
            TERMS=terms, BLOCK=1024,
        )
        got = got.cpu().long()
        near = (u[:, None] - bounds[None, :]).abs().min(1).values <= 1e-5 * u.abs().clamp_min(1)
        assert ((got != want) & ~near).sum() == 0, f"{b} bits: codes differ away from a boundary"
        assert (got - want).abs().max() <= 1


@triton.jit
def _pack_words_kernel(CODES, OFFSETS, OUT, D: tl.constexpr, BN: tl.constexpr, NWP: tl.constexpr):
    p = tl.arange(0, D)
    n = tl.arange(0, BN)
    words = pack_words(tl.load(CODES + n[None, :] * D + p[:, None]), tl.load(OFFSETS + p), NWP)
    tl.store(OUT + n[None, :] * NWP + tl.arange(0, NWP)[:, None], words)


@settings(max_examples=20, deadline=None)
@given(widths=st.lists(st.integers(0, 8), min_size=32, max_size=32), seed=st.integers(0, 2**16))
def test_tensor_core_packing_equals_the_record_layout(widths, seed):
    # The encode kernel packs layouts whose units straddle words with 0/1 tensor-core products;
    # they must give the layout's records bit for bit (any widths, all-ones codes included).
    assume(sum(widths) > 0)
    layout = RecordLayout(torch.tensor(widths))
    top = (1 << layout.widths) - 1
    codes = (torch.rand(16, 32, generator=torch.Generator().manual_seed(seed)) * (top + 1)).long().minimum(top)
    codes[0] = top
    want = layout.pack(codes).view(torch.int32)
    got = torch.zeros(16, 16, dtype=torch.int32, device=DEVICE)
    _pack_words_kernel[(1,)](codes.to(DEVICE, torch.int32), layout.offsets.to(DEVICE, torch.int32), got,
                             D=32, BN=16, NWP=16)
    assert torch.equal(got.cpu()[:, : want.shape[1]], want)
    assert not got.cpu()[:, want.shape[1]:].any()


@settings(max_examples=60, deadline=None)
@given(
    widths=st.lists(st.sampled_from([0, 0, 0, 1, 2, 3, 4, 5, 8]), min_size=32, max_size=32),
    option=st.sampled_from([dict(), dict(word_units=False), dict(permute=False)]),
    seed=st.integers(0, 2**16),
)
@example(widths=[4] * 24 + [0] * 8, option=dict(permute=False), seed=0)  # a last unit of 0-bit codes at the end
def test_kernel_tables_read_every_code_from_inside_the_record(widths, option, seed):
    # The kernels' reading of a record, in PyTorch: unit j's word(s) from unit_word, shifted by
    # unit_shift, then each slot by slot_shift and slot_mask. Every word read must be in the record
    # (units of only 0-bit codes included), and the codes must come out in stored order.
    w = torch.tensor([widths])
    assume(int(w.sum()) > 0)
    layout = RecordLayout(w, **option)
    t = layout_tables(layout)
    n = t["words"]
    bits = w.gather(1, layout.order).reshape(layout.units, -1).sum(-1)
    end = 32 * t["unit_word"][0] + t["unit_shift"][0] + bits
    assert int(t["unit_word"].max()) < n and int(end.max()) <= 32 * n
    assert t["crosses"] == bool((t["unit_shift"][0] + bits > 32).any())
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**16, (1, 32), generator=gen) & ((1 << w) - 1)
    rec = torch.nn.functional.pad(layout.pack(codes).long(), (0, 4 * n - layout.nbytes))
    words = (rec.reshape(n, 4) << torch.tensor([0, 8, 16, 24])).sum(-1)
    uw = t["unit_word"][0].long()
    both = words[uw] | (words[(uw + 1).clamp_max(n - 1)] << 32)
    unit = (both >> t["unit_shift"][0].long()) & 0xFFFFFFFF
    got = (unit[:, None] >> t["slot_shift"][0].reshape(layout.units, -1)) & t["slot_mask"][0].reshape(layout.units, -1)
    assert torch.equal(got.flatten(), codes[0, layout.order[0]])


def test_poly_terms_tell_linear_from_quintic_codebooks():
    assert tables_of(random_quantizer(2, 16, 3, codebook="linear")).poly_terms == 1
    assert tables_of(random_quantizer(2, 16, 3, codebook="poly")).poly_terms == 3
    assert tables_of(random_quantizer(2, 16, 3, codebook="gaussian")).poly_terms == 0


def test_decode_reads_the_plain_coordinate_order_layout_too():
    q = random_quantizer(2, 32, 4, seed=3)
    q.layout = RecordLayout(q.widths, permute=False)
    enc = q.encode(vectors(q, 40, seed=4))
    assert torch.allclose(decode(q.to(DEVICE), on_device(enc)).cpu(), q.decode(enc), rtol=1e-5, atol=1e-5)


ATTENTION_CASES = [
    dict(batch=2, heads=2, groups=2, queries=1, dim=32, compressed=170, window=5, sinks=2),
    dict(batch=1, heads=1, groups=4, queries=3, dim=64, compressed=40, window=0, sinks=0, key_bits=3, value_bits=2),
    dict(batch=3, heads=2, groups=1, queries=2, dim=16, compressed=0, window=7, sinks=3),
    dict(batch=2, heads=1, groups=2, queries=1, dim=32, compressed=33, window=3, sinks=4, key_bits=5, value_bits=2.5),
    dict(batch=1, heads=2, groups=2, queries=1, dim=32, compressed=50, window=2, sinks=1, key_bits=3,
         codebook="linear"),
    dict(batch=1, heads=1, groups=3, queries=1, dim=64, compressed=90, window=4, sinks=2, key_bits=2, value_bits=2,
         unbiased=True),
    # near-uniform widths (2 and 3 bits) whose units straddle words
    dict(batch=1, heads=1, groups=2, queries=1, dim=64, compressed=70, window=3, sinks=1, key_bits=2.25,
         value_bits=2.25, allocation="uniform", unbiased=True),
]


def attention_inputs(case: dict, dtype: torch.dtype, seed: int = 0):
    c = dict(case)
    b, h, g, lq = c.pop("batch"), c.pop("heads"), c.pop("groups"), c.pop("queries")
    kv = random_compressed_kv(b, h, c.pop("dim"), dtype=dtype, device=DEVICE, seed=seed, **c)
    gen = torch.Generator().manual_seed(seed + 7)
    q = (1.5 * torch.randn(b, h * g, lq, kv.shape[-1], generator=gen)).to(DEVICE, dtype)
    mask = torch.rand(b, lq, kv.length, generator=gen) > 0.25
    mask[0, :, : kv.length // 2] = False  # a left-padded (shorter) row
    return q, kv, mask.to(DEVICE)


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=range(len(ATTENTION_CASES)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fused_attention_matches_the_reference(case, dtype):
    q, kv, mask = attention_inputs(case, dtype)
    for m, softcap, scaling in ((mask, None, None), (None, 20.0, 0.3)):
        ref = compressed_attention_reference(q, kv, m, scaling=scaling, softcap=softcap)
        got = compressed_attention_triton(q, kv, m, scaling=scaling, softcap=softcap, block_t=16)
        assert got.dtype == q.dtype and got.shape == q.shape
        assert rel(got, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


def without_poly(q):
    """The same quantizer read through its level table instead of the polynomial."""
    q = q.to(DEVICE)
    q.poly_coeffs = None
    assert tables_of(q).poly is None
    return q


def test_polynomial_and_table_levels_give_the_same_attention():
    q, kv, mask = attention_inputs(ATTENTION_CASES[3], torch.float32, seed=3)
    assert kv.key_quantizer.poly_coeffs is not None and tables_of(kv.key_quantizer).poly is not None
    poly = {f16: compressed_attention_triton(q, kv, mask, block_t=16, fp16_levels=f16) for f16 in (True, False)}
    kv.key_quantizer, kv.value_quantizer = without_poly(kv.key_quantizer), without_poly(kv.value_quantizer)
    table = compressed_attention_triton(q, kv, mask, block_t=16)
    assert rel(poly[False], table) < 1e-5
    assert rel(poly[True], table) < 1e-3


def test_splits_and_blocks_do_not_change_the_result():
    q, kv, mask = attention_inputs(ATTENTION_CASES[0], torch.float32, seed=5)
    ref = compressed_attention_reference(q, kv, mask)
    rows = kv.shape[0] * kv.key_quantizer.heads
    # fill=0: the split count follows min_blocks alone, whatever the device's multiprocessor count.
    for block_t, min_blocks, splits in ((16, 1, 11), (32, 3, 2), (64, 4, 1)):
        opts = dict(block_t=block_t, min_blocks=min_blocks, per_sm=64, fill=0)
        assert _splits(kv.compressed_length, rows, block_t, q.device, min_blocks, 64, 0)[0] == splits
        got = compressed_attention_triton(q, kv, mask, num_warps=4, **opts)
        assert rel(got, ref) < 2e-3


def test_split_rule_amortizes_programs_fills_the_gpu_and_caps_waves():
    cpu = torch.device("cpu")  # counts as 4 multiprocessors
    # (tokens, rows, block, min_blocks, per_sm, fill) -> (splits, tokens per split)
    assert _splits(256 * 64, 1, 64, cpu, 16, 8, 2) == (16, 1024)  # splits of min_blocks blocks
    assert _splits(64 * 64, 1, 64, cpu, 16, 8, 2) == (8, 512)  # at least fill programs per multiprocessor
    assert _splits(1024 * 64, 1, 64, cpu, 16, 8, 2) == (32, 2048)  # at most per_sm programs per multiprocessor
    assert _splits(100, 1, 64, cpu, 16, 8, 2) == (2, 64)  # never more splits than blocks
    assert _splits(0, 1, 64, cpu, 16, 8, 2) == (0, 64)


def test_a_row_with_nothing_to_attend_gives_zeros_and_sink_slots_use_exact_values():
    q, kv, mask = attention_inputs(ATTENTION_CASES[0], torch.float32, seed=9)
    mask[1] = False
    got = compressed_attention_triton(q, kv, mask, block_t=16)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    # Only sink columns open: the result must come from the exact sink values alone.
    only = torch.zeros_like(mask)
    pos = kv.sink_pos.cpu()
    for row in range(mask.shape[0]):
        only[row, :, pos[row] : pos[row] + 2] = True
    ref = compressed_attention_reference(q, kv, only)
    assert rel(compressed_attention_triton(q, kv, only, block_t=16), ref) < 2e-3


def test_unknown_tuning_options_are_rejected():
    q, kv, mask = attention_inputs(ATTENTION_CASES[2], torch.float32)
    with pytest.raises(ValueError, match="unknown tuning option"):
        compressed_attention_triton(q, kv, mask, blocks=3)


def test_dispatcher_falls_back_to_the_reference_where_the_kernel_does_not_apply():
    q, kv, mask = attention_inputs(ATTENTION_CASES[0], torch.float32)
    if DEVICE == "cpu":  # CPU tensors always take the reference
        assert torch.equal(compressed_attention(q, kv, mask), compressed_attention_reference(q, kv, mask))
    qjl = random_quantizer(1, 32, 2, qjl_dims=8)
    assert "QJL" in unsupported_reason(qjl)
    assert "power of two" in unsupported_reason(random_quantizer(1, 48, 2))
    assert unsupported_reason(random_quantizer(1, 32, 2)) is None
    huge = random_quantizer(1, 32, 2)
    huge.sigma = huge.sigma * (1e5 / float(huge.sigma.max()))
    assert "fp16 range" in unsupported_reason(huge)
    kv.key_quantizer = qjl.to(DEVICE)
    with pytest.raises(ValueError, match="use compressed_attention"):
        compressed_attention_triton(q, kv, mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_keys_before_rope_match_the_reference(dtype):
    """History keys stored before RoPE, rotated in the kernel at their positions (left padding and a
    history that starts past slot 0 included), as the reference rotates them."""
    case = dict(ATTENTION_CASES[0], dim=64)
    q, kv, mask = attention_inputs(case, dtype, seed=4)
    kv.key_rope = LinearRope(1.0 / 500.0 ** (torch.arange(0, 64, 2) / 64), scaling=1.1)
    kv.key_first = 300
    assert attention_unsupported_reason(q, kv) is None
    plain = compressed_attention_reference(q, replace(kv, key_rope=None), mask)
    for m, softcap in ((mask, None), (None, 20.0)):
        ref = compressed_attention_reference(q, kv, m, softcap=softcap)
        got = compressed_attention_triton(q, kv, m, softcap=softcap, block_t=16)
        assert rel(got, ref) < 2e-3
    assert rel(plain, ref) > 0.05  # RoPE changed the result: the test can tell
    kv.key_rope = lambda positions: LinearRope(torch.ones(32))(positions)
    assert "frequencies change" in attention_unsupported_reason(q, kv)
    kv.key_rope = LinearRope(torch.ones(16))
    assert "partial rotary" in attention_unsupported_reason(q, kv)
