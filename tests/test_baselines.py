"""Baseline codecs (TurboQuant, KIVI, INT, FP8): round-trip error bounds, record sizes, and the
same compressed cache running them (block codecs included)."""

import math

import pytest
import torch
from conftest import tiny_model
from hypothesis import given
from hypothesis import strategies as st
from spectralquant.adapters.hf_cache_argument import returned_cache, with_cache

import spectralquant as sq
from spectralquant.baselines import FP8Codec, IntCodec, KIVICodec, baseline_codec
from spectralquant.calibration import KVStats
from spectralquant.stats import CovarianceAccumulator

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def vectors(shape, seed=0, outliers=True) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    if outliers:
        x[..., 3] *= 20  # an outlier channel, as real keys have
    return x


@given(bits=st.sampled_from([2, 3, 4, 8]), dim=st.sampled_from([16, 64, 128]), seed=st.integers(0, 99))
def test_int_codec_error_is_within_half_a_step(bits, dim, seed):
    codec = IntCodec(2, dim, bits)
    x = vectors((5, 2, dim), seed)
    enc = codec.encode(x)
    assert enc.records.dtype == torch.uint8
    # Codes fill whole 32-bit words (the packing layout's rule), then the fp16 scale.
    assert enc.records.shape == (5, 2, 4 * math.ceil(dim * bits / 32) + 2) == (5, 2, codec.record_bytes)
    step = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    err = (codec.decode(enc) - x).abs()
    assert (err <= step * (0.5 + 2e-3) + 1e-6).all()


def test_fp8_codec_error_is_e4m3_rounding():
    codec = FP8Codec(2, 64)
    x = vectors((40, 2, 64))
    enc = codec.encode(x)
    assert enc.records.shape == (40, 2, 66)
    err = (codec.decode(enc) - x).abs()
    scale = x.abs().amax(-1, keepdim=True) / 448
    # 3 mantissa bits: relative rounding error <= 2^-4, subnormals spaced 2^-9 * scale apart.
    assert (err <= x.abs() * (2**-4 + 2e-3) + scale * 2**-9).all()
    assert float(err.max()) > 0


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_values_are_quantized_per_token_in_channel_groups(bits):
    codec = KIVICodec(2, 64, bits, per_channel=False)
    x = vectors((7, 2, 64))
    enc = codec.encode(x)
    assert enc.records.shape == (7, 2, 64 * bits // 8 + 4 * 2)  # fp16 min + step per 32 channels
    g = x.reshape(7, 2, 2, 32)
    step = ((g.amax(-1) - g.amin(-1)) / (2**bits - 1)).repeat_interleave(32, -1)
    err = (codec.decode(enc) - x).abs()
    assert (err <= step * (0.5 + 2e-3) + 1e-3 * x.abs() + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_keys_are_quantized_per_channel_over_token_blocks(bits):
    codec = KIVICodec(2, 64, bits, per_channel=True)
    assert codec.block == 32
    x = vectors((3, 64, 2, 64))  # [batch, tokens, heads, dim]
    enc = codec.encode(x)
    # 4 * D side bytes per block (fp16 min and step per channel), spread over its 32 tokens.
    assert enc.records.shape == (3, 64, 2, 64 * bits // 8 + 8)
    blocks = x.reshape(3, 2, 32, 2, 64)
    step = ((blocks.amax(2) - blocks.amin(2)) / (2**bits - 1))[:, :, None].expand_as(blocks).reshape_as(x)
    err = (codec.decode(enc) - x).abs()
    assert (err <= step * (0.5 + 2e-3) + 1e-3 * x.abs() + 1e-6).all()
    # Per-channel ranges keep the outlier channel from inflating the others' steps (KIVI's point).
    per_token = KIVICodec(2, 64, bits, per_channel=False)
    plain = (per_token.decode(per_token.encode(x)) - x)[..., 4:].pow(2).mean()
    assert float((codec.decode(enc) - x)[..., 4:].pow(2).mean()) < float(plain)


def test_block_codec_rejects_partial_blocks_and_bad_bits():
    with pytest.raises(ValueError, match="blocks of 32 tokens"):
        KIVICodec(2, 64, 2, per_channel=True).encode(vectors((1, 20, 2, 64)))
    with pytest.raises(ValueError, match="2, 3, 4 or 8"):
        IntCodec(2, 64, 5)
    stats = KVStats.from_accumulator(CovarianceAccumulator(2, 16).update(torch.randn(100, 2, 16)))
    with pytest.raises(ValueError, match="whole bits"):
        baseline_codec("kivi", "key", stats, 2.5)
    with pytest.raises(ValueError, match="bits=8"):
        baseline_codec("fp8", "key", stats, 4)
    with pytest.raises(ValueError, match="unknown method"):
        baseline_codec("gptq", "key", stats, 4)


def test_turboquant_is_data_oblivious_hadamard_at_uniform_bits():
    stats = KVStats.from_accumulator(CovarianceAccumulator(2, 64).update(vectors((500, 2, 64))))
    tq = baseline_codec("turboquant", "key", stats, 3)
    assert tq.config.rotation == "hadamard" and tq.config.allocation == "uniform"
    assert (tq.widths == 3).all()
    assert tq.record_bytes == 64 * 3 // 8 and tq.bytes_per_vector == 24 + 2  # codes + fp16 norm
    qjl = baseline_codec("turboquant_qjl", "key", stats, 3)
    assert (qjl.widths == 2).all() and qjl.has_qjl
    x = vectors((50, 2, 64), seed=3)
    rel = (tq.decode(tq.encode(x)) - x).pow(2).sum(-1) / x.pow(2).sum(-1)
    assert float(rel.mean()) < 0.05  # Lloyd-Max at 3 bits on Gaussianised coordinates: ~0.035


@pytest.mark.parametrize(
    "method,bits",
    [("kivi", 2), ("kivi", 4), ("int", 4), ("int", 8), ("fp8", 8), ("turboquant", 3), ("turboquant_qjl", 3)],
)
def test_baselines_run_in_the_same_cache_and_count_their_bytes(method, bits, tiny_calibrations):
    model = tiny_model("gemma3")  # sliding layers trim a block codec's history too
    x = torch.randint(2, 96, (2, 120), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(x).logits[:, -1]
    sq.wrap(model, tiny_calibrations("gemma3"), method=method, bits=bits, window=8, chunk=4, sinks=2)
    try:
        with torch.no_grad():
            out = model(x, use_cache=True)
            cache = returned_cache(out)
            step = model(x[:, -1:], **with_cache(model, cache)).logits
        stats = cache.compression_stats()
        assert stats.held_bytes == sum(t.numel() * t.element_size() for t in cache.tensors())
        assert stats.ratio > (1.25 if bits == 8 else 1.5)
        full = cache.layers[3]  # the global layer holds compressed history of the whole prompt
        assert full.compressed_length > 0 and full.compressed_length % (32 if method == "kivi" else 1) == 0
        assert full.held == 121
        p, q = torch.log_softmax(ref, -1), torch.log_softmax(out.logits[:, -1], -1)
        assert float((p.exp() * (p - q)).sum(-1).max()) < (0.05 if bits < 8 else 1e-3)
        assert torch.isfinite(step).all()
        out2 = model.generate(x[:, :50], max_new_tokens=12, do_sample=False)
        assert out2.shape == (2, 62)
    finally:
        sq.unwrap(model)
