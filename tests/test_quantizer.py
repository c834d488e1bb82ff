import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectralquant.codebook import gaussian_distortion
from spectralquant.quantizer import Quantizer, QuantizerConfig, decode_scale, encode_scale
from spectralquant.synthetic import anisotropic_gaussian as anisotropic


def mse(q: Quantizer, x: torch.Tensor) -> float:
    return float(((q.decode(q.encode(x)) - x) ** 2).sum(-1).mean())


@pytest.mark.parametrize("mix_bands", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_per_coordinate_error_is_lloyd_max_distortion_times_variance(bits, mix_bands):
    x, stats = anisotropic(40_000, 2, 32, decades=2)
    q = Quantizer.from_stats(stats, QuantizerConfig(bits=bits, scale=False, mix_bands=mix_bands, codebook="gaussian"))
    if not mix_bands:  # the plain eigenbasis: coordinate variances are the eigenvalues
        assert torch.allclose(q.sigma**2, stats.eigenvalues, rtol=1e-4)
    z = q.rotate(x)
    err = ((q.decode_rotated(q.encode(x)) - z) ** 2).mean(0)  # [H, D]
    expected = torch.tensor([[gaussian_distortion(int(b)) for b in row] for row in q.widths]) * q.sigma**2
    # 40k samples: per-coordinate MSE estimates are within a few percent; float32 adds a floor.
    assert (err <= expected * 1.08 + 1e-6).all(), (err / expected).max()
    assert (err >= expected * 0.92 - 1e-6).all(), (err / expected).min()


def test_total_error_falls_as_budget_rises():
    x, stats = anisotropic(5_000, 1, 64)
    errors = [mse(Quantizer.from_stats(stats, QuantizerConfig(bits=b)), x) for b in range(1, 9)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_spectral_rotation_beats_random_rotation_on_anisotropic_data(bits):
    x, stats = anisotropic(5_000, 2, 64, decades=3)
    spectral = mse(Quantizer.from_stats(stats, QuantizerConfig(bits=bits)), x)
    random = mse(Quantizer.from_stats(stats, QuantizerConfig(bits=bits, rotation="random", allocation="uniform")), x)
    assert spectral < 0.5 * random, (spectral, random)


def test_waterfilling_beats_uniform_bits_in_the_eigenbasis():
    x, stats = anisotropic(5_000, 1, 64, decades=3)
    wf = mse(Quantizer.from_stats(stats, QuantizerConfig(bits=3)), x)
    uni = mse(Quantizer.from_stats(stats, QuantizerConfig(bits=3, allocation="uniform")), x)
    assert wf < 0.5 * uni


@pytest.mark.parametrize("rotation", ["spectral", "random", "hadamard", "identity"])
@pytest.mark.parametrize("codebook", ["gaussian", "poly", "linear", "fitted"])
def test_every_configuration_round_trips_with_bounded_error(rotation, codebook):
    x, stats = anisotropic(3_000, 2, 48, decades=1)
    stats.samples = x[:1000]
    q = Quantizer.from_stats(stats, QuantizerConfig(bits=4, rotation=rotation, codebook=codebook))
    enc = q.encode(x)
    assert enc.records.shape == (3_000, 2, q.record_bytes) and q.record_bytes == 4 * 48 // 8
    assert enc.scales.dtype == torch.uint8
    rel = mse(q, x) / float(((x - stats.mean) ** 2).sum(-1).mean())
    assert rel < 0.03


@given(st.floats(1.0, 6.0), st.integers(0, 1000))
def test_encoding_is_deterministic_and_quantizers_rebuild_identically(bits, seed):
    bits = round(bits * 2) / 2
    x, stats = anisotropic(64, 2, 16, seed=seed)
    cfg = QuantizerConfig(bits=bits, rotation="random", seed=seed)
    a, b = Quantizer.from_stats(stats, cfg), Quantizer.from_stats(stats, cfg)
    ea, eb = a.encode(x), b.encode(x)
    assert torch.equal(ea.records, eb.records) and torch.equal(ea.scales, eb.scales)
    assert torch.equal(a.encode(x).records, ea.records)


def test_per_vector_scale_makes_codes_scale_invariant():
    x, stats = anisotropic(500, 1, 32)
    q = Quantizer.from_stats(stats, QuantizerConfig(bits=3, center=False))
    e1, e2 = q.encode(x), q.encode(4 * x)
    assert torch.equal(e1.records, e2.records)
    assert torch.equal(e2.scales.long(), e1.scales.long() + 32)  # x4 = two octaves of 16 log steps
    assert torch.allclose(q.decode(e2), 4 * q.decode(e1), rtol=1e-5, atol=1e-5)


def test_zero_bits_decode_to_the_mean():
    x, stats = anisotropic(100, 1, 8)
    q = Quantizer.from_stats(stats, QuantizerConfig(bits=0, scale=False))
    assert q.record_bytes == 0
    assert torch.allclose(q.decode(q.encode(x)), stats.mean.expand_as(x), atol=1e-6)


def test_qjl_sketch_adds_its_bits_and_is_unbiased_for_inner_products():
    x, stats = anisotropic(1, 1, 32, decades=1)
    base = QuantizerConfig(bits=2, scale=False, qjl_dims=16, mix_bands=False)  # the seed moves only the sketch
    q0 = Quantizer.from_stats(stats, base.with_(qjl_dims=0))
    assert Quantizer.from_stats(stats, base).record_bytes == q0.record_bytes + 2
    probe = torch.randn(32, generator=torch.Generator().manual_seed(0))
    z = q0.rotate(x)[0, 0]
    z0 = q0.decode_rotated(q0.encode(x))[0, 0]
    true_resid = float(probe[:16] @ (z - z0)[:16])
    # Averaged over sketch matrices (seeds), the QJL estimate of <probe, residual> is unbiased.
    estimates = []
    for seed in range(300):
        q = Quantizer.from_stats(stats, base.with_(seed=seed))
        zq = q.decode_rotated(q.encode(x))[0, 0]
        estimates.append(float(probe[:16] @ (zq - z0)[:16]))
    est = torch.tensor(estimates)
    assert abs(float(est.mean()) - true_resid) < 3 * float(est.std()) / math.sqrt(len(est)) + 1e-4


def test_single_head_view_matches_the_stacked_quantizer():
    x, stats = anisotropic(50, 3, 16)
    q = Quantizer.from_stats(stats, QuantizerConfig(bits=3, rotation="random"))
    full = q.encode(x)
    one = q.head(1).encode(x[:, 1:2])
    assert torch.equal(full.records[:, 1:2], one.records)


def test_bad_inputs_raise_clear_errors():
    x, stats = anisotropic(10, 2, 16)
    q = Quantizer.from_stats(stats, QuantizerConfig())
    with pytest.raises(ValueError, match=r"\[\.\.\., 2, 16\]"):
        q.encode(torch.zeros(4, 2, 15))
    with pytest.raises(ValueError, match=r"\[\.\.\., 2, 16\]"):
        q.encode(torch.zeros(4, 3, 16))
    with pytest.raises(TypeError, match="floating"):
        q.encode(torch.zeros(4, 2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown quantizer option"):
        QuantizerConfig.from_dict({"bitz": 3})
    with pytest.raises(ValueError, match="unknown rotation"):
        QuantizerConfig(rotation="fourier")
    with pytest.raises(ValueError, match="outside"):
        QuantizerConfig(bits=9)
    with pytest.raises(ValueError, match="outside"):
        QuantizerConfig(bits=-1)
    with pytest.raises(TypeError):
        QuantizerConfig(bits=float("nan"))
    with pytest.raises(ValueError, match="qjl_dims"):
        Quantizer.from_stats(stats, QuantizerConfig(qjl_dims=17))
    with pytest.raises(ValueError, match="samples"):
        Quantizer.from_stats(stats, QuantizerConfig(codebook="fitted"))
    with pytest.raises(ValueError, match="do not match"):
        q.decode(q.head(0).encode(x[:, :1]))


@given(st.floats(0.005, 200.0), st.sampled_from([8, 16]))  # 8-bit codes span 2**-7.9 .. 2**7.9
def test_stored_scales_round_trip_within_their_precision(value, bits):
    s = torch.tensor([value, 0.0])
    back = decode_scale(encode_scale(s, bits))
    assert back[1] == 0
    # 8 bits: log steps of 1/16 octave, so at most half a step (2**(1/32) - 1 = 2.2%) off.
    assert abs(float(back[0]) / value - 1) <= (2 ** (1 / 32) - 1 if bits == 8 else 1e-3)


def test_fp16_scales_are_still_available():
    x, stats = anisotropic(100, 1, 16)
    q = Quantizer.from_stats(stats, QuantizerConfig(bits=3, scale_bits=16))
    assert q.encode(x).scales.dtype == torch.float16 and q.bytes_per_vector == q.record_bytes + 2
    assert Quantizer.from_stats(stats, QuantizerConfig(bits=3)).bytes_per_vector == q.record_bytes + 1
    with pytest.raises(ValueError, match="scale_bits"):
        QuantizerConfig(scale_bits=12)


def test_poly_codebook_tables_are_the_polynomials_kernels_evaluate():
    from spectralquant.codebook import poly_basis

    x, stats = anisotropic(100, 2, 32)
    q = Quantizer.from_stats(stats, QuantizerConfig(bits=3, codebook="poly"))
    assert q.poly_coeffs.shape == (2, 9, 3)
    for b in q.widths.unique().tolist():
        assert torch.equal(q.unit_levels[0, b, : 2**b], (poly_basis(b).float() @ q.poly_coeffs[0, b]).float())
    assert Quantizer.from_stats(stats, QuantizerConfig(bits=3, codebook="gaussian")).poly_coeffs is None


def test_attention_aware_allocation_minimizes_the_weighted_error():
    x, stats = anisotropic(20_000, 2, 32, decades=2)
    # Errors seen through a query moment that weights the low-variance half of the eigenbasis 100x:
    # the weighted error q^T e e^T q is what attention scores feel.
    vecs = stats.eigenvectors
    weight = torch.ones(2, 32)
    weight[:, 16:] = 100.0
    moment = vecs @ torch.diag_embed(weight) @ vecs.transpose(-1, -2)
    plain = Quantizer.from_stats(stats, QuantizerConfig(bits=3, mix_bands=False))
    aware_config = QuantizerConfig(bits=3, mix_bands=False, attention_aware=True)
    aware = Quantizer.from_stats(stats, aware_config, importance=moment)
    assert aware.widths.sum() == plain.widths.sum()
    assert aware.widths[:, 16:].sum() > plain.widths[:, 16:].sum()

    def weighted(q: Quantizer) -> float:
        e = q.decode(q.encode(x)) - x
        return float(torch.einsum("nhi,hij,nhj->", e, moment, e)) / len(x)

    assert weighted(aware) < 0.7 * weighted(plain)
    # An isotropic importance changes nothing: the allocation is still by variance alone.
    iso = Quantizer.from_stats(
        stats, QuantizerConfig(bits=3, attention_aware=True), importance=torch.eye(32).expand(2, 32, 32) * 5
    )
    assert torch.equal(iso.widths, Quantizer.from_stats(stats, QuantizerConfig(bits=3)).widths)
    with pytest.raises(ValueError, match="importance matrix"):
        Quantizer.from_stats(stats, QuantizerConfig(bits=3, attention_aware=True))
    with pytest.raises(ValueError, match="importance matrix"):
        Quantizer.from_stats(stats, QuantizerConfig(bits=3, attention_aware=True), importance=torch.eye(32))
    # None (the presets' keys): the importance when the calibration measured it, else variances.
    maybe = QuantizerConfig(bits=3, mix_bands=False, attention_aware=None)
    assert torch.equal(Quantizer.from_stats(stats, maybe, importance=moment).widths, aware.widths)
    assert torch.equal(Quantizer.from_stats(stats, maybe).widths, plain.widths)
    with pytest.raises(ValueError, match="importance matrix"):
        Quantizer.from_stats(stats, maybe, importance=torch.eye(32))
    with pytest.raises(ValueError, match="attention_aware must be True, False or None"):
        QuantizerConfig(attention_aware="auto")


@pytest.mark.parametrize("codebook", ["poly", "gaussian", "fitted"])
def test_unbiased_levels_keep_the_codes_and_undo_the_shrinkage(codebook):
    x, stats = anisotropic(20_000, 2, 32, decades=2)
    stats.samples = x[:4096]
    base = QuantizerConfig(bits=2, scale=False, codebook=codebook)
    plain = Quantizer.from_stats(stats, base)
    fair = Quantizer.from_stats(stats, base.with_(unbiased=True))
    enc = plain.encode(x)
    assert torch.equal(fair.encode(x).records, enc.records) and plain.gain is None
    z = plain.rotate(x)
    # Per coordinate with at least one bit: the slope of the decoded coordinate on the input,
    # E[z_hat z] / E[z^2], is 1 - distortion (shrunk) without gains and 1 with them.
    used = plain.widths > 0
    for q, lo, hi in ((plain, 0.55, 0.995), (fair, 0.97, 1.03)):
        slope = (q.decode_rotated(enc) * z).mean(0) / (z * z).mean(0)
        assert lo < float(slope[used].min()) and float(slope[used].max()) < hi, (q.gain is None, slope[used])
    assert torch.equal(fair.level_scale, fair.sigma * fair.gain) and torch.equal(plain.level_scale, plain.sigma)
    assert torch.equal(fair.head(1).gain, fair.gain[1:2])
    # More squared error than the MSE-optimal decode, as the price of the slope.
    assert mse(fair, x) > mse(plain, x)


def test_presets_keep_every_value_coordinate_at_one_bit_at_the_same_bytes(tiny_calibrations):
    """The presets' value floor: no value coordinate is dropped, each layer's record length and
    its keys are unchanged; ``value_min_bits=0`` restores plain water-filling."""
    from spectralquant.codec import build_codecs
    from spectralquant.config import resolve_config

    calib = tiny_calibrations("llama")  # near-isotropic: water-filling drops value coordinates at 1.5 bits
    floor = build_codecs(calib, resolve_config("max", bits=1.5))
    plain = build_codecs(calib, resolve_config("max", bits=1.5, value_min_bits=0))
    assert min(int(c.value.widths.min()) for c in floor) == 1
    assert min(int(c.value.widths.min()) for c in plain) == 0
    for a, b in zip(floor, plain):
        assert a.value.record_bytes == b.value.record_bytes
        assert torch.equal(a.value.widths.sum(-1), b.value.widths.sum(-1))
        assert torch.equal(a.key.widths, b.key.widths)
