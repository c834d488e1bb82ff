"""Keys stored before RoPE: the RoPE helpers, calibration before RoPE, and a cache that takes RoPE
off keys at their positions before encoding and puts it back when attention reads them."""

import pytest
import torch
from conftest import FAMILIES, tiny_model
from hypothesis import given
from hypothesis import strategies as st
from spectralquant.adapters import find_adapter
from spectralquant.adapters.hf_cache_argument import returned_cache
from spectralquant.integrations.hf_cache import CompressedLayer
from test_llm_wrap import history_logits, ids
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import spectralquant as sq
from spectralquant.calibration import Calibration
from spectralquant.codec import build_codecs
from spectralquant.config import CompressionConfig
from spectralquant.metrics import kl_divergence
from spectralquant.quantizer import Encoded
from spectralquant.rope import LinearRope, apply_rope, cache_positions

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def pre_rope_calibrations(tiny_calibrations):
    """Per family: the tiny calibration measured before RoPE."""
    return lambda family: tiny_calibrations(family, pre_rope_keys=True)


def rope_inputs(b: int, t: int, r: int, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(b, t, r // 2, generator=g) * 100
    cos, sin = (torch.cat([f(angles)] * 2, -1) * scale for f in (torch.cos, torch.sin))
    return cos, sin


@given(
    b=st.integers(1, 3), t=st.integers(1, 9), half=st.integers(1, 8), extra=st.integers(0, 6),
    scale=st.floats(0.5, 2.0), seed=st.integers(0, 10**6),
)
def test_apply_rope_is_inverted_exactly_and_leaves_the_unrotated_tail(b, t, half, extra, scale, seed):
    r = 2 * half
    cos, sin = rope_inputs(b, t, r, scale, seed)
    x = torch.randn(b, 3, t, r + extra, generator=torch.Generator().manual_seed(seed + 1))
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., r:], x[..., r:])
    assert torch.allclose(y[..., :r].norm(dim=-1), scale * x[..., :r].norm(dim=-1), rtol=1e-4, atol=1e-5)
    assert torch.allclose(apply_rope(y, cos, sin, inverse=True), x, atol=1e-5)


def test_apply_rope_matches_transformers():
    cos, sin = rope_inputs(2, 5, 16, 1.3, 0)
    x = torch.randn(2, 4, 5, 16)
    assert torch.allclose(apply_rope(x, cos, sin), apply_rotary_pos_emb(x, x, cos, sin)[1], atol=1e-6)
    with pytest.raises(ValueError, match="even R <= head_dim 16"):
        apply_rope(x, *rope_inputs(2, 5, 18, 1.0, 0))


def test_cache_positions_start_after_each_rows_padding():
    pos = cache_positions(3, 4, torch.tensor([0, 5]))
    assert pos.tolist() == [[3, 4, 5, 6], [0, 0, 0, 1]]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_compresses_keys_before_rope(family, pre_rope_calibrations):
    calib = pre_rope_calibrations(family)
    assert calib.keys_pre_rope
    model = tiny_model(family)
    x = ids(2, 64)
    ref = history_logits(model, x, 48)
    errors = {}
    for bits in (2, 4, 8):
        sq.wrap(model, calib, bits=bits, window=4, chunk=2)
        assert all(layer.rope is not None for layer in find_adapter(model).state().make_cache().layers)
        out = history_logits(model, x, 48)
        sq.unwrap(model)
        errors[bits] = float((out - ref).abs().max())
        if bits == 4:
            assert float(kl_divergence(ref, out).mean()) < 2e-4
    assert errors[8] < errors[4] < errors[2]
    assert errors[8] < 0.02


def test_records_hold_the_keys_before_rope_of_their_positions(pre_rope_calibrations):
    """Decoded records match ``k_proj``'s output (RoPE not yet applied) in a left-padded batch: a
    record taken off at the wrong position would be rotated away from it."""
    model = tiny_model("llama")
    captured = []
    hook = model.model.layers[1].self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.append(o))
    x = ids(2, 40)
    mask = torch.ones_like(x)
    mask[1, :9] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    sq.wrap(model, pre_rope_calibrations("llama"), bits=8, window=4, chunk=2)
    with torch.no_grad():
        cache = returned_cache(model(x, attention_mask=mask, position_ids=position_ids))
    hook.remove()
    sq.unwrap(model)
    layer = cache.layers[1]
    view = layer.snapshot()
    k = view.key
    records = Encoded(k.records.transpose(1, 2), k.scales.transpose(1, 2), None)
    decoded = layer.codec.key.decode(records)  # [B, Tc, H, D], before RoPE
    pre = captured[0].reshape(2, 40, 2, 16)[:, : decoded.shape[1]]
    real = mask[:, : decoded.shape[1]].bool()
    err = (decoded - pre).norm(dim=-1) / pre.norm(dim=-1)
    assert decoded.shape[1] >= 32 and float(err[real].max()) < 0.05
    # The same keys after RoPE are far from the records: the test can tell the two apart.
    post = view.materialize(torch.float32)[0].transpose(1, 2)[:, : decoded.shape[1]]
    assert float(((post - pre).norm(dim=-1) / pre.norm(dim=-1))[real].median()) > 0.3


def test_left_padded_batch_matches_each_row_alone(pre_rope_calibrations):
    model = tiny_model("llama")
    sq.wrap(model, pre_rope_calibrations("llama"), bits=4, window=4, chunk=2, sinks=2)
    long, short = ids(1, 30, seed=1), ids(1, 18, seed=2)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 12, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 30), torch.cat([torch.zeros(1, 12), torch.ones(1, 18)], 1)]).long()
    together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    alone_long = model.generate(long, max_new_tokens=8, do_sample=False)
    alone_short = model.generate(short, max_new_tokens=8, do_sample=False)
    sq.unwrap(model)
    assert torch.equal(together[0, 30:], alone_long[0, 30:])
    assert torch.equal(together[1, 30:], alone_short[0, 18:])


def test_sliding_layers_and_crop_keep_record_positions(pre_rope_calibrations):
    """Gemma 3's sliding layers drop old records; reads must still rotate each kept record by its
    own position, before and after a crop."""
    model = tiny_model("gemma3")
    x = ids(1, 60)
    ref = history_logits(model, x, 44)
    sq.wrap(model, pre_rope_calibrations("gemma3"), bits=8, window=2, chunk=1)
    assert float((history_logits(model, x, 44) - ref).abs().max()) < 0.02
    with torch.no_grad():
        cache = returned_cache(model(x[:, :40]))
    sq.unwrap(model)
    assert all(layer.compressed_length > 0 for layer in cache.layers)
    assert cache.layers[0].held < 40 and cache.layers[0].history_first > 0
    full = cache.layers[3].snapshot().materialize(torch.float32)
    cache.layers[3].crop(-10)
    cropped = cache.layers[3].snapshot().materialize(torch.float32)
    assert torch.allclose(cropped[0], full[0][:, :, :30], atol=1e-5)


def test_calibration_file_keeps_the_key_domain(tmp_path, pre_rope_calibrations, tiny_calibrations):
    for calib, expected in ((pre_rope_calibrations("qwen2"), True), (tiny_calibrations("qwen2"), False)):
        calib.save(tmp_path / "c.safetensors")
        assert Calibration.load(tmp_path / "c.safetensors").keys_pre_rope is expected


def test_clear_errors(pre_rope_calibrations):
    model = tiny_model("llama")
    model.model.rotary_emb = None
    with pytest.raises(ValueError, match="pre_rope_keys=True needs a rotary embedding"):
        sq.calibrate(model, token_ids=ids(1, 16), sensitivity=False, progress=False, pre_rope_keys=True)
    codec = build_codecs(pre_rope_calibrations("llama"), CompressionConfig())[0]
    assert codec.keys_pre_rope
    with pytest.raises(ValueError, match="no rotary table"):
        CompressedLayer(codec, CompressionConfig())


def test_fused_kernel_takes_linear_rope_at_head_dim_32_and_up(pre_rope_calibrations):
    from spectralquant.kernels.triton_attention import attention_unsupported_reason

    model = tiny_model("llama")
    sq.wrap(model, pre_rope_calibrations("llama"), window=4, chunk=2)
    with torch.no_grad():
        view = returned_cache(model(ids(1, 30))).layers[0].snapshot()
    sq.unwrap(model)
    assert isinstance(view.key_rope, LinearRope) and view.key_first == 0
    assert "head_dim below 32" in attention_unsupported_reason(torch.zeros(1, 4, 1, 16), view)


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_tables_are_the_models_own(family):
    model = tiny_model(family)
    adapter = find_adapter(model)
    rotary = model.get_decoder().rotary_emb
    positions = torch.tensor([[0, 1, 7, 500, 1023]])
    for layer in range(4):
        table = adapter.rope_table(layer)
        assert isinstance(table, LinearRope)
        args = {"layer_type": model.config.layer_types[layer]} if family == "gemma3" else {}
        want = rotary(torch.empty(0), positions, **args)
        for got, ref in zip(table(positions), want):
            assert torch.equal(got, ref)



def test_merged_key_domains_take_each_layer_from_its_calibration(tmp_path, pre_rope_calibrations, tiny_calibrations):
    after, before = tiny_calibrations("llama"), pre_rope_calibrations("llama")
    merged = sq.merge_key_domains(after, before, [1, 3])
    assert merged.keys_pre_rope == (False, True, False, True)
    assert merged.key_domain() == "before RoPE in layers [1, 3]"
    merged.save(tmp_path / "m.safetensors")
    loaded = Calibration.load(tmp_path / "m.safetensors")
    assert loaded.keys_pre_rope == merged.keys_pre_rope
    # Merging every layer (or none) is a plain calibration of one domain.
    assert sq.merge_key_domains(after, before, range(4)).keys_pre_rope is True
    assert sq.merge_key_domains(after, before, []).keys_pre_rope is False
    config = CompressionConfig()
    codecs = build_codecs(loaded, config)
    pure = {False: build_codecs(after, config), True: build_codecs(before, config)}
    for i, codec in enumerate(codecs):
        source = pure[i in (1, 3)][i]
        assert codec.keys_pre_rope == (i in (1, 3))
        assert torch.equal(codec.key.basis, source.key.basis) and torch.equal(codec.value.basis, source.value.basis)
    # The same key/value states through the three caches: each merged layer stores and reads keys
    # exactly as the calibration it came from.
    model = tiny_model("llama")
    windows, ropes = find_adapter(model).sliding_windows(), find_adapter(model).rope_tables()
    cfg = CompressionConfig(window=4, chunk=2)
    from spectralquant.integrations.hf_cache import SpectralQuantCache

    caches = {name: SpectralQuantCache(c, cfg, windows, ropes=ropes) for name, c in
              (("merged", codecs), (False, pure[False]), (True, pure[True]))}
    g = torch.Generator().manual_seed(3)
    for i in range(4):
        k, v = torch.randn(1, 2, 25, 16, generator=g), torch.randn(1, 2, 25, 16, generator=g)
        for cache in caches.values():
            cache.update(k[:, :, :24], v[:, :, :24], i)  # the prefill attends to itself exactly
        outs = {name: cache.update(k[:, :, 24:], v[:, :, 24:], i) for name, cache in caches.items()}
        for part in range(2):
            assert torch.equal(outs["merged"][part], outs[i in (1, 3)][part])
        assert not torch.allclose(outs[False][0], outs[True][0], atol=1e-3)


def test_merging_key_domains_rejects_bad_inputs(tmp_path, pre_rope_calibrations, tiny_calibrations):
    after, before = tiny_calibrations("llama"), pre_rope_calibrations("llama")
    with pytest.raises(ValueError, match="one calibration with keys after RoPE and one before"):
        sq.merge_key_domains(after, after, [1])
    with pytest.raises(ValueError, match="out of range"):
        sq.merge_key_domains(after, before, [4])
    with pytest.raises(ValueError, match="different models"):
        sq.merge_key_domains(after, pre_rope_calibrations("qwen2"), [1])
    with pytest.raises(ValueError, match="lists 3 layers"):
        Calibration(after.signature, after.layers, keys_pre_rope=(True, False, True))
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="pre_rope_keys must be"):
        sq.calibrate(model, token_ids=ids(1, 16), sensitivity=False, progress=False, pre_rope_keys="some")
    with pytest.raises(ValueError, match="chooses each layer's key domain by measured sensitivity"):
        sq.calibrate(model, token_ids=ids(1, 16), sensitivity=False, progress=False, pre_rope_keys="auto")


def test_auto_key_domains_pick_the_less_sensitive_domain_per_layer():
    model = tiny_model("llama")
    with torch.no_grad():  # at its initial scale the tiny model's logits barely depend on attention
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(20)
    x = ids(1, 160)
    options = dict(token_ids=x, progress=False, sensitivity_prefix=112)
    after = sq.calibrate(model, pre_rope_keys=False, **options)
    before = sq.calibrate(model, pre_rope_keys=True, **options)
    auto = sq.calibrate(model, pre_rope_keys="auto", **options)
    expected = tuple(bool(b < a) for a, b in zip(after.sensitivity[:, 0], before.sensitivity[:, 0]))
    assert auto.keys_pre_rope == (expected[0] if len(set(expected)) == 1 else expected)
    assert torch.equal(auto.sensitivity[:, 0], torch.minimum(after.sensitivity[:, 0], before.sensitivity[:, 0]))
    assert torch.equal(auto.sensitivity[:, 1], after.sensitivity[:, 1])
    listed = sq.calibrate(model, pre_rope_keys=[0, 2], **options)
    assert listed.keys_pre_rope == (True, False, True, False) and listed.sensitivity.shape == (4, 2)
    assert torch.equal(listed.layers[0].key.eigenvectors, before.layers[0].key.eigenvectors)
    assert torch.equal(listed.layers[1].key.eigenvectors, after.layers[1].key.eigenvectors)
