"""The Triton kernels on the GPU: large random inputs, poisoned outputs, several bit layouts,
head dims 64/128/256, ragged batches, and generation with fused kernels against the reference
path. Marked ``gpu`` (excluded by default; run with ``pytest -m gpu``)."""

import pytest
import torch
from spectralquant.adapters.hf_cache_argument import returned_cache, with_cache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

# (head dim, (key bits, value bits)): units filling whole words, units inside words (several per
# word), 16 codes per unit, keys in units of 4 that straddle words, both straddling.
LAYOUTS = [(64, (4, 4)), (128, (3, 3)), (256, (2.5, 2)), (128, (5, 8)), (256, (4, 3)), (64, (3, 2.5)),
           (64, (4.5, 5))]


def poison() -> None:
    """Fill the allocator's free blocks with NaN so an unwritten output element shows up."""
    block = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    block.fill_(0xFF)
    del block


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def test_paired_code_extraction_matches_shift_and_mask():
    """The decode attention's PTX extraction of two codes at a time, against the plain shift and
    mask, with every element at its own shift and width (so no pairing of elements is assumed)."""
    import triton
    import triton.language as tl

    from spectralquant.kernels.triton_codec import paired_codes

    @triton.jit
    def extract(W, SH, M, OUT, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(OUT + i, paired_codes(tl.load(W + i), tl.load(SH + i), tl.load(M + i).to(tl.int16)))

    n = 1 << 14
    g = torch.Generator().manual_seed(5)
    width = torch.randint(0, 9, (n,), generator=g)
    shift = (torch.rand(n, generator=g) * (33 - width)).long().clamp(max=32 - width) % 32
    words = torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64)
    mask = (1 << width) - 1
    want = (((words & 0xFFFFFFFF) >> shift) & mask) + 1024
    out = torch.empty(n, dtype=torch.float16, device="cuda")
    extract[(1,)](words.int().cuda(), shift.int().cuda(), mask.int().cuda(), out, N=n)
    assert torch.equal(out.cpu().double(), want.double())


@pytest.mark.parametrize("dim,bits", [(d, b[1]) for d, b in LAYOUTS], ids=str)
def test_codec_matches_the_quantizer_on_many_vectors(dim, bits):
    from spectralquant.kernels.random_cache import random_quantizer
    from spectralquant.kernels.triton_codec import decode, encode

    q = random_quantizer(8, dim, bits, seed=dim)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4096, 8, dim, generator=g) * q.sigma
    x = (torch.einsum("nhe,hde->nhd", z, q.basis) + q.mean).to("cuda", torch.bfloat16)
    qg = q.to("cuda")
    ref = qg.encode(x)
    poison()
    got = encode(qg, x)
    # A vector whose scale sits within rounding of a log-scale step may take the neighbouring step
    # (the kernel sums in another order); its codes then move with it. Elsewhere codes agree up to
    # boundary rounding, and either way the kernel's encoding is as accurate as the reference's.
    step = (got.scales.int() - ref.scales.int()).abs()
    assert int(step.max()) <= 1 and step.float().mean() < 1e-3
    same = (step == 0)[..., None]
    codes, ref_codes = qg.layout.unpack(got.records), qg.layout.unpack(ref.records)
    assert ((codes != ref_codes) & same).float().mean() < 1e-4
    assert int(((codes - ref_codes).abs() * same).max()) <= 1
    assert rel(qg.decode(got), x) < 1.001 * rel(qg.decode(ref), x)
    poison()
    decoded = decode(qg, ref)
    assert torch.isfinite(decoded).all()
    assert rel(decoded, qg.decode(ref)) < 1e-5


def ragged_case(dim, bits, batch=4, heads=8, groups=4, queries=1, compressed=3000, window=70, seed=0, **config):
    from spectralquant.kernels.random_cache import random_compressed_kv

    kv = random_compressed_kv(
        batch, heads, dim, compressed, window, sinks=4, key_bits=bits[0], value_bits=bits[1],
        dtype=torch.bfloat16, device="cuda", seed=seed, **config,
    )
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(batch, heads * groups, queries, dim, generator=g)).to("cuda", torch.bfloat16)
    lengths = torch.randint(kv.length // 3, kv.length + 1, (batch,), generator=g)
    lengths[0] = kv.length
    cols = torch.arange(kv.length)
    mask = cols[None, None, :] >= (kv.length - lengths)[:, None, None]  # left padding
    causal = cols[None, :] <= kv.length - queries + torch.arange(queries)[:, None]  # causal among queries
    return q, kv, (mask & causal[None]).cuda()


@pytest.mark.parametrize("dim,bits", LAYOUTS, ids=str)
@pytest.mark.parametrize("queries", [1, 4])
def test_fused_attention_matches_the_reference_on_ragged_batches(dim, bits, queries):
    from spectralquant.kernels import compressed_attention, compressed_attention_reference

    q, kv, mask = ragged_case(dim, bits, queries=queries, seed=dim + queries)
    ref = compressed_attention_reference(q, kv, mask)
    poison()
    got = compressed_attention(q, kv, mask)
    assert torch.isfinite(got).all()
    assert rel(got, ref) < 1e-2


@pytest.mark.parametrize("dim", [64, 128])
def test_unbiased_levels_match_the_reference(dim):
    """Decode and attention read the decoded levels' scales (sigma times the gains), not the
    encode's sigma."""
    from spectralquant.kernels import compressed_attention, compressed_attention_reference
    from spectralquant.kernels.triton_codec import decode
    from spectralquant.quantizer import Encoded

    q, kv, mask = ragged_case(dim, (2.25, 2.25), queries=1, seed=dim, unbiased=True)
    assert kv.key_quantizer.gain is not None and float(kv.key_quantizer.gain.max()) > 1.5  # 1-bit coordinates
    ref = compressed_attention_reference(q, kv, mask)
    poison()
    got = compressed_attention(q, kv, mask)
    assert rel(got, ref) < 1e-2
    token_major = Encoded(*(t.transpose(1, 2).contiguous() for t in (kv.value.records, kv.value.scales)))
    poison()
    assert rel(decode(kv.value_quantizer, token_major), kv.value_quantizer.decode(token_major)) < 1e-5


@pytest.mark.parametrize("dim,bits", [(64, 2.25), (128, 2.25), (128, 2.75), (256, 3.5)], ids=str)
@pytest.mark.parametrize("values", [dict(allocation="uniform"), dict(min_bits=1)], ids=["uniform", "min1"])
def test_water_filled_keys_with_other_value_widths_match_the_reference(dim, bits, values):
    """Keys water-filled, values at (near-)uniform widths or water-filled with at least 1 bit per
    coordinate, both with unbiased levels: two different record layouts read by one kernel."""
    from spectralquant.kernels import compressed_attention, compressed_attention_reference
    from spectralquant.kernels.random_cache import random_quantizer

    pair = (
        random_quantizer(8, dim, bits, seed=dim, unbiased=True),
        random_quantizer(8, dim, bits, seed=dim + 1, unbiased=True, **values),
    )
    assert int(pair[1].widths.min()) >= 1  # no value coordinate dropped
    if values.get("allocation") == "uniform":
        assert int(pair[1].widths.max() - pair[1].widths.min()) <= 1 < int(pair[0].widths.max() - pair[0].widths.min())
    q, kv, mask = ragged_case(dim, (bits, bits), queries=1, seed=dim, quantizers=pair)
    ref = compressed_attention_reference(q, kv, mask)
    poison()
    got = compressed_attention(q, kv, mask)
    assert torch.isfinite(got).all()
    assert rel(got, ref) < 1e-2


@pytest.mark.parametrize("dim,bits", LAYOUTS, ids=str)
def test_keys_before_rope_match_the_reference_on_ragged_batches(dim, bits):
    """The kernel rotates each history key at its own position (history starting at slot 5000,
    left-padded rows), as the reference does."""
    from spectralquant.kernels import compressed_attention_reference
    from spectralquant.kernels.triton_attention import attention_unsupported_reason, compressed_attention_triton
    from spectralquant.rope import LinearRope

    q, kv, mask = ragged_case(dim, bits, queries=2, seed=dim)
    kv.key_rope = LinearRope(1.0 / 500000.0 ** (torch.arange(0, dim, 2) / dim), scaling=1.2)
    kv.key_first = 5000
    assert attention_unsupported_reason(q, kv) is None
    ref = compressed_attention_reference(q, kv, mask)
    poison()
    got = compressed_attention_triton(q, kv, mask)
    assert torch.isfinite(got).all()
    assert rel(got, ref) < 1e-2


@pytest.mark.parametrize("dim,bits", [(128, (4, 4)), (128, (5, 8)), (64, (3, 2.5))], ids=str)
def test_polynomial_levels_match_the_lookup_table(dim, bits):
    from spectralquant.kernels.triton_attention import compressed_attention_triton

    q, kv, mask = ragged_case(dim, bits, seed=dim + 11)
    assert kv.key_quantizer.poly_coeffs is not None
    poly = {f16: compressed_attention_triton(q, kv, mask, fp16_levels=f16) for f16 in (True, False)}
    for quantizer in (kv.key_quantizer, kv.value_quantizer):
        quantizer.poly_coeffs = None  # fresh tables: lookup-table levels
    kv.key_quantizer, kv.value_quantizer = kv.key_quantizer.to("cuda"), kv.value_quantizer.to("cuda")
    table = compressed_attention_triton(q, kv, mask)
    assert rel(poly[False], table) < 1e-4
    assert rel(poly[True], table) < 2e-3


@pytest.mark.parametrize("dim,bits", [(128, (4, 4)), (64, (3, 2.5))], ids=str)
def test_linear_codebook_levels_match_the_reference(dim, bits):
    from spectralquant.kernels import compressed_attention_reference
    from spectralquant.kernels.tables import tables_of
    from spectralquant.kernels.triton_attention import compressed_attention_triton

    q, kv, mask = ragged_case(dim, bits, seed=dim + 12, codebook="linear")
    assert tables_of(kv.key_quantizer).poly_terms == 1 and tables_of(kv.value_quantizer).poly_terms == 1
    ref = compressed_attention_reference(q, kv, mask)
    poison()
    got = compressed_attention_triton(q, kv, mask)
    assert torch.isfinite(got).all()
    assert rel(got, ref) < 1e-2


@pytest.mark.parametrize("groups,queries", [(1, 1), (8, 16), (4, 16)])
def test_fused_attention_handles_group_and_query_counts_softcap_and_scaling(groups, queries):
    from spectralquant.kernels import compressed_attention_reference
    from spectralquant.kernels.triton_attention import compressed_attention_triton

    q, kv, mask = ragged_case(128, (4, 4), batch=2, groups=groups, queries=queries, compressed=1500)
    ref = compressed_attention_reference(q, kv, mask, scaling=0.07, softcap=30.0)
    poison()
    got = compressed_attention_triton(q, kv, mask, scaling=0.07, softcap=30.0)
    assert rel(got, ref) < 1e-2


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "qwen3", "mixtral", "granite", "starcoder2"])
def test_generation_with_fused_kernels_matches_the_reference_path(family, tiny_calibrations, monkeypatch):
    from conftest import tiny_model
    from spectralquant.integrations import fused_attention

    import spectralquant as sq
    from spectralquant.kernels import compressed_attention_reference

    model = tiny_model(family).cuda()
    ids = torch.randint(2, 96, (3, 40), generator=torch.Generator().manual_seed(3)).cuda()
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # a left-padded row
    sq.wrap(model, tiny_calibrations(family), window=8, chunk=4, sinks=2, fused=True)
    calls = []
    kernel = fused_attention.compressed_attention
    monkeypatch.setattr(fused_attention, "compressed_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    assert calls, "the fused attention path was not used"
    monkeypatch.setattr(fused_attention, "compressed_attention", compressed_attention_reference)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    sq.unwrap(model)
    # Greedy paths agree up to the first step whose reference top-2 margin is within the logit
    # difference the kernel's fp16 operands can cause (tiny random models have near-ties).
    steps = torch.stack(out.logits), torch.stack(ref.logits)  # [steps, B, vocab]
    prompt = ids.shape[1]
    for row in range(ids.shape[0]):
        differ = (out.sequences[row, prompt:] != ref.sequences[row, prompt:]).nonzero()
        until = int(differ[0]) if len(differ) else steps[0].shape[0]
        got, want = steps[0][: until + 1, row], steps[1][: until + 1, row]
        scale = float(want.abs().max())
        if until:
            assert float((got[:until] - want[:until]).abs().max()) < 1e-2 * scale
        if until < steps[0].shape[0]:
            top2 = want[until].topk(2).values
            assert float(top2[0] - top2[1]) < 2e-2 * scale, f"row {row} diverged at step {until} without a near-tie"


@pytest.mark.parametrize("domain", [True, [1, 3]])
def test_decoding_with_keys_before_rope_through_the_kernel_matches_the_reference_path(domain):
    """A model with head_dim 32 and a calibration before RoPE (in every layer, or in layers 1 and 3
    only): fused decoding (the kernel's RoPE path where keys are before RoPE) gives the logits of
    the unfused path (transient dequantize, RoPE applied in PyTorch)."""
    import transformers as tf
    from conftest import TINY_COMMON
    from spectralquant.adapters import find_adapter

    import spectralquant as sq
    from spectralquant.kernels.triton_attention import attention_unsupported_reason

    torch.manual_seed(0)
    config = tf.LlamaConfig(**{**TINY_COMMON, "head_dim": 32, "num_attention_heads": 4})
    model = tf.LlamaForCausalLM(config).eval().cuda()
    x = torch.randint(2, 96, (2, 60), generator=torch.Generator().manual_seed(3)).cuda()
    calib = sq.calibrate(model, token_ids=x.cpu(), sensitivity=False, progress=False, pre_rope_keys=domain)
    logits = []
    for fused in (True, False):
        sq.wrap(model, calib, bits=4, window=8, chunk=4, sinks=2, fused=fused)
        with torch.no_grad():
            out = model(x[:, :48], use_cache=True)
            steps = [model(x[:, t : t + 1], **with_cache(model, returned_cache(out))).logits for t in range(48, 60)]
        views = [layer.snapshot() for layer in find_adapter(model).state().last_cache.layers]
        sq.unwrap(model)
        logits.append(torch.cat(steps, 1))
    q = torch.zeros(2, 4, 1, 32, device="cuda")
    assert [v.key_rope is not None for v in views] == [domain is True or i in domain for i in range(4)]
    view = views[1]
    assert view.compressed_length > 0
    assert attention_unsupported_reason(q, view) is None
    assert rel(logits[0], logits[1]) < 1e-2


# Records in fragment order read by the tensor-core kernel (spectralquant/kernels/mma_attention.py):
# (head dim, (key bits, value bits)).
FRAGMENT_CASES = [(64, (4, 4)), (64, (2, 4)), (128, (4, 4)), (128, (4, 2)), (128, (2, 2)), (128, (2, 4))]


def fragment_case(dim, bits, groups=4, seed=0, **kwargs):
    from spectralquant.kernels.random_cache import random_quantizer

    fast = dict(allocation="uniform", codebook="linear")
    pair = (random_quantizer(8, dim, bits[0], seed=seed, fragments="keys", **fast),
            random_quantizer(8, dim, bits[1], seed=seed + 1, fragments="values", **fast))
    return ragged_case(dim, bits, groups=groups, seed=seed, quantizers=pair, **kwargs)


@pytest.mark.parametrize("dim,bits", FRAGMENT_CASES, ids=str)
@pytest.mark.parametrize("groups", [4, 8])
def test_tensor_core_history_kernel_matches_its_reference(dim, bits, groups):
    from spectralquant.kernels.mma_attention import (
        history_partials,
        history_partials_reference,
        query_fragments,
        query_fragments_reference,
        splits_of,
        tables_of,
    )

    q, kv, mask = fragment_case(dim, bits, groups=groups, seed=dim + bits[0], compressed=2999)
    tables = tables_of(kv.key_quantizer, kv.value_quantizer)
    qf, qp = query_fragments(q, tables, dim**-0.5 * 1.4426950408889634)
    _, _, qi = query_fragments_reference(q, tables, dim**-0.5 * 1.4426950408889634)
    poison()
    po, pm, pl, n = history_partials(kv, mask, qf, qp, tables)
    assert n == splits_of(kv.compressed_length, q.shape[0] * 8, q.device)[0] > 1
    # The kernel read qf; the reference reads qi (equal up to rare rounding ties between the Triton and
    # PyTorch roundings) with the kernel's own qp.
    length = splits_of(kv.compressed_length, 32, q.device)[1]
    rpo, rpm, rpl = history_partials_reference(kv, mask, qi, qp, tables, n, length)
    live = rpl > 0
    assert torch.equal(live, pl > 0) and torch.isfinite(po).all()
    torch.testing.assert_close(pm[live], rpm[live], rtol=1e-4, atol=2e-3)
    assert rel(pl[live], rpl[live]) < 2e-3
    assert rel(po[live], rpo[live]) < 3e-3


@pytest.mark.parametrize("dim,bits", FRAGMENT_CASES, ids=str)
@pytest.mark.parametrize("groups", [1, 3, 4, 6, 8])
def test_tensor_core_attention_matches_the_reference_on_ragged_batches(dim, bits, groups):
    from spectralquant.kernels import compressed_attention, compressed_attention_reference
    from spectralquant.kernels.mma_attention import mma_unsupported_reason

    q, kv, mask = fragment_case(dim, bits, groups=groups, seed=groups)
    assert mma_unsupported_reason(q, kv, mask) is None
    for m in (mask, None):
        ref = compressed_attention_reference(q, kv, m)
        poison()
        got = compressed_attention(q, kv, m)
        assert torch.isfinite(got).all()
        assert rel(got, ref) < 1e-2


def test_generation_with_the_fast_preset_uses_the_tensor_core_kernel_and_matches_the_reference_path(monkeypatch):
    import transformers as tf
    from conftest import TINY_COMMON
    from spectralquant.integrations import fused_attention

    import spectralquant as sq
    from spectralquant.kernels import compressed_attention_reference, mma_attention

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**TINY_COMMON, "head_dim": 64})).eval().cuda()
    ids = torch.randint(2, 96, (3, 40), generator=torch.Generator().manual_seed(3)).cuda()
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # a left-padded row
    calib = sq.calibrate(model, token_ids=ids.cpu(), sensitivity=False, progress=False)
    sq.wrap(model, calib, preset="fast", window=8, chunk=4, sinks=2, fused=True)
    calls = []
    kernel = mma_attention.compressed_attention_mma
    monkeypatch.setattr(mma_attention, "compressed_attention_mma", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    assert calls, "the tensor-core kernel was not used"
    monkeypatch.setattr(fused_attention, "compressed_attention", compressed_attention_reference)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    sq.unwrap(model)
    got, want = torch.stack(out.logits), torch.stack(ref.logits)
    same = (out.sequences == ref.sequences).all(1)
    assert same.any(), "every row's greedy path diverged"
    assert rel(got[:, same], want[:, same]) < 1e-2
