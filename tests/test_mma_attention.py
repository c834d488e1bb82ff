"""The tensor-core decode attention for records in fragment order (``spectralquant/kernels/mma_attention.py``):
its Triton steps under the interpreter against their references, the whole call with the history
reference against the attention reference, and where it applies. The CUDA history kernel itself is
compared with its reference in ``test_kernels_gpu.py``."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectralquant.kernels import compressed_attention_reference
from spectralquant.kernels.mma_attention import (
    QMAX,
    compressed_attention_mma,
    inputs_unsupported_reason,
    mma_unsupported_reason,
    query_fragments,
    query_fragments_reference,
    tables_of,
)
from spectralquant.kernels.random_cache import random_compressed_kv, random_quantizer
from spectralquant.kernels.tables import layout_tables
from spectralquant.packing import RecordLayout, fragment_offsets
from spectralquant.quantizer import QuantizerConfig

FAST = dict(allocation="uniform", codebook="linear")


def fragment_pair(heads: int, dim: int, kbits: int, vbits: int, seed: int = 0, **config):
    return (random_quantizer(heads, dim, kbits, seed=seed, fragments="keys", **FAST, **config),
            random_quantizer(heads, dim, vbits, seed=seed + 1, fragments="values", **FAST, **config))


def fragment_kv(batch, heads, dim, compressed, kbits=4, vbits=4, window=8, sinks=4, seed=0, **config):
    return random_compressed_kv(batch, heads, dim, compressed, window, sinks, dtype=torch.float32, seed=seed,
                                quantizers=fragment_pair(heads, dim, kbits, vbits, seed, **config))


@pytest.mark.parametrize("kind", ["keys", "values"])
@pytest.mark.parametrize("dim,bits", [(64, 2), (64, 4), (128, 2), (128, 4), (256, 2), (256, 4)])
def test_fragment_offsets_give_each_code_its_own_bits_back_to_back_inside_words(kind, dim, bits):
    if kind == "values" and dim * bits < 256:
        with pytest.raises(ValueError, match="256 bits"):
            fragment_offsets(kind, dim, bits)
        return
    offsets = fragment_offsets(kind, dim, bits)
    starts = torch.sort(offsets).values
    assert torch.equal(starts, bits * torch.arange(dim))  # a permutation of back-to-back slots
    layout = RecordLayout(torch.full((2, dim), bits), fragments=kind)
    tables = layout_tables(layout)
    assert layout.nbytes == dim * bits // 8 and tables["aligned"] and not tables["crosses"]


def test_fragment_offsets_follow_the_mma_fragments():
    """Keys: lane tq's register j, byte e holds coordinate 32 (j // 2) + 16 (j % 2) + 4 tq + e; values: lane group
    g's slot n holds coordinate 16 (n // 2) + 8 (n % 2) + g (spot checks of the documented rule, head_dim 128)."""
    keys = fragment_offsets("keys", 128, 4)
    assert keys[0] == 0 and keys[16] == 4 and keys[1] == 8 and keys[32] == 32  # lane 0: word 0 then word 1
    assert keys[4] == 4 * 32  # lane tq = 1 starts at word 4
    values = fragment_offsets("values", 128, 4)
    assert values[0] == 0 and values[8] == 4 and values[16] == 8 and values[1] == 2 * 32  # lane g = 1: word 2
    assert values[32] == 16 and values[64] == 32  # slot 4: the high half of word 0; slot 8: word 1


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["keys", "values"]), st.sampled_from([2, 4]))
def test_fragment_packing_is_lossless(seed, kind, bits):
    g = torch.Generator().manual_seed(seed)
    layout = RecordLayout(torch.full((3, 128), bits), fragments=kind)
    codes = torch.randint(0, 2**bits, (5, 3, 128), generator=g)
    assert torch.equal(layout.unpack(layout.pack(codes)), codes)


def test_fragment_order_needs_equal_widths_of_2_or_4_bits():
    with pytest.raises(ValueError, match="allocation='uniform'"):
        QuantizerConfig(bits=4, fragments="keys")
    with pytest.raises(ValueError, match="bits 2 or 4"):
        QuantizerConfig(bits=3, allocation="uniform", fragments="values")
    with pytest.raises(ValueError, match="unknown fragments"):
        QuantizerConfig(bits=4, allocation="uniform", fragments="rows")
    with pytest.raises(ValueError, match="same width"):
        RecordLayout(torch.tensor([[4] * 63 + [0]]), fragments="keys")


@pytest.mark.parametrize("dim,g", [(64, 3), (128, 4), (128, 1), (64, 6), (128, 8)])
def test_query_kernel_matches_its_reference(dim, g):
    kv = fragment_kv(2, 2, dim, 16)
    tables = tables_of(kv.key_quantizer, kv.value_quantizer)
    query = torch.randn(2, 2 * g, 1, dim, generator=torch.Generator().manual_seed(3))
    qf, qp = query_fragments(query, tables, 0.125 * 1.4427)
    rf, rp, qi = query_fragments_reference(query, tables, 0.125 * 1.4427)
    torch.testing.assert_close(qp, rp, rtol=1e-4, atol=1e-6)
    got = qf.view(torch.int8).reshape(-1, dim // 32, qf.shape[2], 32, 2, 4).to(torch.int32)
    want = rf.view(torch.int8).reshape(-1, dim // 32, rf.shape[2], 32, 2, 4).to(torch.int32)
    def fixed_point(frag):  # [BH, groups, operands, lanes, b0/b1, bytes]: 256 * high byte + low byte, in place
        hi, lo = (frag[:, :, 0, :16], frag[:, :, 0, 16:]) if g <= 4 else (frag[:, :, 0], frag[:, :, 1])
        return 256 * hi + lo

    assert (fixed_point(got) - fixed_point(want)).abs().max() <= 1  # the same query, up to a rounding tie
    assert qi.shape[1] == (4 if g <= 4 else 8)
    assert int(qi.abs().max()) == QMAX and (qi[:, g:] == 0).all()  # each row uses the full range; padding is 0


@pytest.mark.parametrize(
    "dim,kbits,vbits,g,compressed",
    [(64, 4, 4, 3, 200), (128, 4, 2, 4, 150), (128, 2, 2, 1, 97), (128, 4, 4, 2, 0), (64, 4, 4, 6, 120),
     (128, 2, 4, 8, 90)],
)
def test_whole_call_with_the_history_reference_matches_the_attention_reference(dim, kbits, vbits, g, compressed):
    kv = fragment_kv(2, 2, dim, compressed, kbits, vbits, seed=dim + kbits)
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(2, 2 * g, 1, dim, generator=gen)
    mask = torch.rand(2, 1, kv.length, generator=gen) > 0.2
    for m in (None, mask):
        want = compressed_attention_reference(query, kv, m)
        got = compressed_attention_mma(query, kv, m, history="reference")
        assert float((got - want).norm() / want.norm()) < 3e-3


def test_a_row_with_nothing_to_attend_gives_zeros():
    kv = fragment_kv(1, 1, 64, 40)
    query = torch.randn(1, 2, 1, 64)
    mask = torch.zeros(1, 1, kv.length, dtype=torch.bool)
    assert torch.equal(compressed_attention_mma(query, kv, mask, history="reference"), torch.zeros_like(query))


def test_where_the_tensor_core_kernel_applies():
    kv = fragment_kv(1, 2, 128, 32)
    q = torch.randn(1, 8, 1, 128)
    assert inputs_unsupported_reason(q, kv) is None
    assert "CUDA" in mma_unsupported_reason(q, kv)
    assert "query tokens" in inputs_unsupported_reason(torch.randn(1, 8, 2, 128), kv)
    assert inputs_unsupported_reason(torch.randn(1, 16, 1, 128), kv) is None  # 8 per KV head: two products
    assert "at most 8" in inputs_unsupported_reason(torch.randn(1, 18, 1, 128), kv)
    assert "soft-capped" in inputs_unsupported_reason(q, kv, softcap=30.0)
    quintic = random_compressed_kv(1, 2, 128, 32, 8, quantizers=(
        random_quantizer(2, 128, 4, allocation="uniform", fragments="keys"),
        random_quantizer(2, 128, 4, seed=1, allocation="uniform", fragments="values", codebook="linear")))
    assert "evenly spaced" in inputs_unsupported_reason(q, quintic)
    plain = random_compressed_kv(1, 2, 128, 32, 8, allocation="uniform", codebook="linear")
    assert "fragment order" in inputs_unsupported_reason(q, plain)


def _llama(head_dim: int):
    import transformers as tf
    from conftest import TINY_COMMON

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**{**TINY_COMMON, "head_dim": head_dim})).eval()


def test_fast_preset_stores_records_in_fragment_order_and_generates():
    from spectralquant.adapters import find_adapter

    import spectralquant as sq

    model = _llama(64)
    ids = torch.randint(2, 96, (2, 40), generator=torch.Generator().manual_seed(3))
    calib = sq.calibrate(model, token_ids=ids, sensitivity=False, progress=False)
    before = model.generate(ids, max_new_tokens=4, do_sample=False)
    sq.wrap(model, calib, preset="fast", window=8, chunk=4, sinks=2)
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    layers = find_adapter(model).state().last_cache.layers
    assert out.shape == before.shape
    assert [(layer.codec.key.layout.fragments, layer.codec.value.layout.fragments) for layer in layers] == [
        ("keys", "values")
    ] * len(layers)
    sq.unwrap(model)
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), before)


def test_fast_preset_warns_and_keeps_the_default_order_where_fragments_do_not_fit():
    import spectralquant as sq

    model = _llama(16)
    calib = sq.calibrate(model, token_ids=torch.randint(2, 96, (2, 40)), sensitivity=False, progress=False)
    with pytest.warns(UserWarning, match="tensor-core kernel"):
        sq.wrap(model, calib, preset="fast")
    sq.unwrap(model)


def test_fast_preset_rejects_budgets_that_change_widths_per_layer():
    from spectralquant.config import resolve_config

    with pytest.raises(ValueError, match="layer_budget='uniform'"):
        resolve_config("fast", layer_budget="sensitivity")
    with pytest.raises(ValueError, match="bits 2 or 4"):
        resolve_config("fast", bits=3)
    assert resolve_config("fast", value_bits=2).value.bits == 2
