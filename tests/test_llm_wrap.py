"""wrap / generate / unwrap on tiny random models of every supported family, and the cache's
contract (sliding windows, padding, beams, crop, memory figures)."""

import pytest
import torch
from conftest import FAMILIES, tiny_model
from spectralquant.adapters import find_adapter
from spectralquant.adapters.hf_cache_argument import cache_argument, returned_cache, with_cache
from spectralquant.integrations.hf_cache import SpectralQuantCache
from transformers import DynamicCache

import spectralquant as sq
from spectralquant.metrics import kl_divergence
from spectralquant.quantizer import Quantizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def ids(batch: int, length: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(2, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def history_logits(model, x: torch.Tensor, split: int) -> torch.Tensor:
    """Logits of ``x[:, split:]`` after ``x[:, :split]`` went into the cache first."""
    with torch.no_grad():
        out = model(x[:, :split], use_cache=True)
        return model(x[:, split:], **with_cache(model, returned_cache(out))).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_wrap_generate_unwrap_restores_the_model_bit_for_bit(family, tiny_calibrations):
    model = tiny_model(family)
    x = ids(2, 24)
    impl = model.config._attn_implementation
    with torch.no_grad():
        before = model(x).logits
    greedy_before = model.generate(x, max_new_tokens=6, do_sample=False)

    sq.wrap(model, tiny_calibrations(family), window=4, chunk=2)
    assert sq.is_wrapped(model)
    with torch.no_grad():
        assert isinstance(returned_cache(model(x)), SpectralQuantCache)
    out = model.generate(x, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 30) and torch.equal(out[:, :24], x)
    assert isinstance(sq.compression_stats(model).ratio, float)

    sq.unwrap(model)
    assert not sq.is_wrapped(model)
    assert model.config._attn_implementation == impl
    assert not model._forward_pre_hooks
    with torch.no_grad():
        after = model(x)
    assert torch.equal(after.logits, before)
    assert type(returned_cache(after)) is DynamicCache
    assert torch.equal(model.generate(x, max_new_tokens=6, do_sample=False), greedy_before)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_cache_passed_under_either_argument_name_is_extended_not_replaced(tiny_calibrations):
    """transformers >= 5.24 calls the argument ``cache`` and still accepts ``past_key_values``."""
    model = tiny_model("llama")
    sq.wrap(model, tiny_calibrations("llama"), window=4, chunk=2)
    x = ids(1, 30)
    with torch.no_grad():
        cache = returned_cache(model(x[:, :10]))
        for name, part in (("past_key_values", x[:, 10:20]), (cache_argument(model), x[:, 20:])):
            assert returned_cache(model(part, **{name: cache})) is cache
    assert cache.get_seq_length() == 30
    assert sq.compression_stats(model).tokens == 30
    sq.unwrap(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_compressed_history_error_is_small_and_shrinks_with_bits(family, tiny_calibrations):
    model = tiny_model(family)
    x = ids(2, 64)
    ref = history_logits(model, x, 48)
    errors = {}
    for bits in (2, 4, 8):
        sq.wrap(model, tiny_calibrations(family), bits=bits, window=4, chunk=2)
        out = history_logits(model, x, 48)
        sq.unwrap(model)
        errors[bits] = float((out - ref).abs().max())
        if bits == 4:
            assert float(kl_divergence(ref, out).mean()) < 2e-4
    # Compression really happened (the history went through records), and more bits help.
    assert errors[2] > 1e-3
    assert errors[8] < errors[4] < errors[2]
    assert errors[8] < 0.02


def test_memory_figures_are_the_bytes_of_the_tensors_held(tiny_calibrations):
    model = tiny_model("llama")
    sq.wrap(model, tiny_calibrations("llama"), bits=3, window=8, chunk=4, sinks=2)
    with torch.no_grad():
        cache = returned_cache(model(ids(3, 100)))
    stats = cache.compression_stats()
    assert stats.held_bytes == sum(t.numel() * t.element_size() for t in cache.tensors())
    # fp16 bytes of the same K/V: 4 layers x (K, V) x B=3 x H=2 x T=100 x D=16 x 2 bytes.
    assert stats.fp16_bytes == 4 * 2 * 3 * 2 * 100 * 16 * 2
    layer = cache.layers[0]
    assert layer.compressed_length + layer.keys.shape[-2] == 100
    assert layer.keys.shape[-2] <= 8 + 4
    # 3 bits x 16 dims = 6-byte records, one per token, head and kind, plus 2-byte scales.
    assert stats.records >= 4 * 2 * 3 * 2 * layer.compressed_length * 6
    assert stats.ratio > 1.0
    sq.unwrap(model)


def test_sliding_layers_keep_only_their_window_with_transformers_mask_sizes(tiny_calibrations):
    model = tiny_model("gemma3")
    x = ids(1, 40)

    def mask_sizes_per_step():
        sizes = []
        with torch.no_grad():
            cache = returned_cache(model(x[:, :20]))
            for t in range(20, 40):
                sizes.append([cache.get_mask_sizes(1, i) for i in range(4)])
                model(x[:, t : t + 1], **with_cache(model, cache))
        return sizes, cache

    reference, _ = mask_sizes_per_step()
    sq.wrap(model, tiny_calibrations("gemma3"), window=2, chunk=1)
    ours, cache = mask_sizes_per_step()
    assert ours == reference
    assert [layer.held for layer in cache.layers] == [7, 7, 7, 40]
    assert [layer.compressed_length > 0 for layer in cache.layers] == [True] * 4
    sq.unwrap(model)


def test_left_padded_batch_matches_each_row_alone(tiny_calibrations):
    model = tiny_model("llama")
    sq.wrap(model, tiny_calibrations("llama"), window=4, chunk=2, sinks=2)
    long, short = ids(1, 30, seed=1), ids(1, 18, seed=2)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 12, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 30), torch.cat([torch.zeros(1, 12), torch.ones(1, 18)], 1)]).long()
    together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert sq.compression_stats(model).tokens == 38 - 1
    cache = find_adapter(model).state().last_cache
    assert cache.layers[0].sink_pos.tolist() == [0, 12]
    alone_long = model.generate(long, max_new_tokens=8, do_sample=False)
    alone_short = model.generate(short, max_new_tokens=8, do_sample=False)
    assert torch.equal(together[0, 30:], alone_long[0, 30:])
    assert torch.equal(together[1, 30:], alone_short[0, 18:])
    sq.unwrap(model)


def test_beam_search_and_sampling_run_on_the_compressed_cache(tiny_calibrations):
    model = tiny_model("qwen2")
    sq.wrap(model, tiny_calibrations("qwen2"), window=4, chunk=2)
    x = ids(2, 12)
    beams = model.generate(x, max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, 18) and torch.equal(beams[::2, :12], x)
    torch.manual_seed(0)
    sampled = model.generate(x, max_new_tokens=6, do_sample=True, top_k=5)
    assert sampled.shape == (2, 18)
    sq.unwrap(model)


def test_reorder_and_batch_ops_move_whole_rows(tiny_calibrations):
    model = tiny_model("llama")
    sq.wrap(model, tiny_calibrations("llama"), window=4, chunk=2)
    with torch.no_grad():
        cache = returned_cache(model(ids(3, 30)))
    def state(layer):
        view = layer.snapshot()
        return [view.key.records, view.key.scales, view.value.records, view.window_keys, view.sink_keys, view.sink_pos]

    before = [t.clone() for t in state(cache.layers[1])]
    decoded = cache.layers[1].snapshot().materialize(torch.float32)
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    for a, b in zip(before, state(cache.layers[1])):
        assert torch.equal(a[[2, 0, 1]], b)
    for a, b in zip(decoded, cache.layers[1].snapshot().materialize(torch.float32)):
        assert torch.allclose(a[[2, 0, 1]], b, atol=1e-6)
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.layers[1].snapshot().materialize(torch.float32)[0].shape[0] == 1
    cache.batch_repeat_interleave(2)
    k = cache.layers[1].snapshot().materialize(torch.float32)[0]
    assert k.shape[0] == 2 and torch.equal(k[0], k[1])
    sq.unwrap(model)


def test_crop_removes_exactly_the_last_tokens(tiny_calibrations):
    model = tiny_model("gemma3")
    sq.wrap(model, tiny_calibrations("gemma3"), window=4, chunk=2)
    with torch.no_grad():
        cache = returned_cache(model(ids(1, 40)))
    full = cache.layers[3].snapshot().materialize(torch.float32)
    cache.layers[3].crop(-10)
    cropped = cache.layers[3].snapshot().materialize(torch.float32)
    assert cache.layers[3].get_seq_length() == 30
    assert torch.allclose(cropped[0], full[0][:, :, :30], atol=1e-6)
    assert torch.allclose(cropped[1], full[1][:, :, :30], atol=1e-6)
    cache.layers[3].crop(25)  # transformers' older convention: the length to keep
    assert cache.layers[3].get_seq_length() == 25
    with pytest.raises(ValueError, match="holds only the last 7"):
        cache.layers[0].crop(-20)  # a sliding layer no longer has them
    sq.unwrap(model)


def test_assisted_generation_crops_the_compressed_cache(tiny_calibrations):
    model = tiny_model("llama")
    assistant = tiny_model("llama")
    sq.wrap(model, tiny_calibrations("llama"), window=4, chunk=2)
    out = model.generate(ids(1, 16), assistant_model=assistant, max_new_tokens=10, do_sample=False)
    assert out.shape == (1, 26)
    sq.unwrap(model)


def test_prompts_longer_than_calibration_work(tiny_calibrations):
    model = tiny_model("mistral")
    sq.wrap(model, tiny_calibrations("mistral"), window=8, chunk=4)  # calibrated on 64-token rows
    out = model.generate(ids(1, 300), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 305)
    sq.unwrap(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_model_dtypes(dtype, tiny_calibrations):
    model = tiny_model("llama", dtype)
    sq.wrap(model, tiny_calibrations("llama"), window=4, chunk=2)
    x = ids(1, 30)
    with torch.no_grad():
        out = model(x[:, :20])
        logits = model(x[:, 20:], **with_cache(model, returned_cache(out))).logits
    layer = returned_cache(out).layers[0]
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert layer.keys.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    assert layer.compressed_length > 0
    sq.unwrap(model)


def test_clear_errors(tiny_calibrations):
    model = tiny_model("llama")
    calib = tiny_calibrations("llama")
    with pytest.raises(ValueError, match="needs a calibration"):
        sq.wrap(model)
    sq.wrap(model, calib)
    with pytest.raises(ValueError, match="already wrapped"):
        sq.wrap(model, calib)
    sq.unwrap(model)
    with pytest.raises(ValueError, match="not wrapped"):
        sq.unwrap(model)
    with pytest.raises(ValueError, match="calibrate this model first"):
        sq.wrap(model, tiny_calibrations("gemma3"))
    with pytest.raises(ValueError, match="unknown preset"):
        sq.wrap(model, calib, preset="extreme")
    with pytest.raises(ValueError, match="unknown option 'bitz'"):
        sq.wrap(model, calib, bitz=3)
    with pytest.raises(TypeError, match="no SpectralQuant adapter fits Linear.*supported families"):
        sq.wrap(torch.nn.Linear(2, 2), calib)
    with pytest.raises(ValueError, match="has not run yet"):
        sq.wrap(model, calib)
        try:
            sq.compression_stats(model)
        finally:
            sq.unwrap(model)
    assert not sq.is_wrapped(model)


def test_fp16_layers_and_fused_reference_path_agree(tiny_calibrations):
    model = tiny_model("gemma2")  # eager attention with soft-capping
    x = ids(2, 40)
    outs = []
    for fused in (False, True):
        sq.wrap(model, tiny_calibrations("gemma2"), window=4, chunk=2, fp16_layers=(1,), fused=fused)
        outs.append(history_logits(model, x, 30))
        cache = find_adapter(model).state().last_cache
        assert cache.layers[1].codec is None and cache.layers[1].compressed_length == 0
        sq.unwrap(model)
    assert torch.allclose(outs[0], outs[1], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_aware_allocation_uses_measured_queries_and_output_projections(family, tiny_calibrations):
    calib = tiny_calibrations(family)
    assert set(calib.signature.captured) == {"key", "value", "query", "output"}
    model = tiny_model(family)
    hidden = model.config.hidden_size
    for layer in calib.layers:
        h, d = layer.value.heads, layer.value.dim
        assert layer.output_moment.shape == (h, d, d)
        # W_o^T W_o is positive semi-definite with trace = |W_o|^2 / (query heads per KV head).
        assert float(torch.linalg.eigvalsh(layer.output_moment).min()) > -1e-4
        assert 0 < float(layer.output_moment.diagonal(dim1=-2, dim2=-1).sum()) < 10 * hidden * d
    x = ids(2, 48)
    ref = history_logits(model, x, 40)
    sq.wrap(model, calib, bits=3, attention_aware=True, window=4, chunk=2)
    codecs = find_adapter(model).state().codecs
    assert all(c.key.config.attention_aware and c.value.config.attention_aware for c in codecs if c is not None)
    out = history_logits(model, x, 40)
    sq.unwrap(model)
    assert float(kl_divergence(ref, out).mean()) < 5e-3


def test_attention_aware_needs_a_calibration_that_measured_it(tiny_calibrations):
    calib = tiny_calibrations("llama")
    stripped = type(calib)(calib.signature, [type(layer)(layer.key, layer.value) for layer in calib.layers], calib.info)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="attention_aware keys need the calibration's query second moments"):
        sq.wrap(model, stripped, attention_aware=True)
    assert not sq.is_wrapped(model)
    sq.wrap(model, stripped, key_attention_aware=False, value_attention_aware=False)
    sq.unwrap(model)
    # The presets weight key bits by the queries only where they were measured: both work.
    for calibration in (calib, stripped):
        sq.wrap(model, calibration, "max")
        codecs = find_adapter(model).state().codecs
        aware = Quantizer.from_stats(calib.layers[0].key, codecs[0].key.config.with_(attention_aware=True), 0,
                                     calib.layers[0].query_moment)
        assert torch.equal(codecs[0].key.widths, aware.widths) == (calibration is calib)
        sq.unwrap(model)
