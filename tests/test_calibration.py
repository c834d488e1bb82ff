import json

import pytest
import torch
from safetensors.torch import save_file

from spectralquant.calibration import Calibration, KVStats, LayerCalibration, ModelSignature
from spectralquant.calibration_builder import CalibrationBuilder, Reservoir
from spectralquant.quantizer import Quantizer, QuantizerConfig
from spectralquant.synthetic import anisotropic_gaussian as anisotropic


def make_calibration(layers=2, heads=2, dim=16, samples=False) -> Calibration:
    sig = ModelSignature(layers, [heads] * layers, [dim] * layers, model_type="toy", name="toy-model")
    builder = CalibrationBuilder(sig, samples_per_layer=64 if samples else 0)
    for i in range(layers):
        k, _ = anisotropic(500, heads, dim, seed=i)
        v, _ = anisotropic(500, heads, dim, seed=100 + i)
        builder.add(i, "key", k)
        builder.add(i, "value", v)
        builder.add_query(i, torch.randn(500, heads * 3, dim))
        builder.set_output_projection(i, torch.randn(24, heads * 3 * dim))
    return builder.build({"corpus": "synthetic"})


def test_save_load_round_trip_preserves_everything(tmp_path):
    calib = make_calibration(samples=True)
    path = tmp_path / "c.safetensors"
    calib.save(path)
    loaded = Calibration.load(path)
    assert loaded.signature == calib.signature
    assert loaded.info == {"corpus": "synthetic"}
    for a, b in zip(calib.layers, loaded.layers):
        for kind in ("key", "value"):
            sa, sb = getattr(a, kind), getattr(b, kind)
            assert sa.count == sb.count
            for name in ("mean", "eigenvalues", "eigenvectors", "samples"):
                assert torch.equal(getattr(sa, name), getattr(sb, name))
        assert torch.equal(a.query_moment, b.query_moment)
        assert torch.equal(a.output_moment, b.output_moment)


def test_save_load_encode_gives_identical_bytes(tmp_path):
    calib = make_calibration()
    calib.save(tmp_path / "c.safetensors")
    loaded = Calibration.load(tmp_path / "c.safetensors")
    x, _ = anisotropic(200, 2, 16, seed=9)
    cfg = QuantizerConfig(bits=2.5)
    for i in range(2):
        a = Quantizer.from_stats(calib.layers[i].key, cfg, seed_offset=i).encode(x)
        b = Quantizer.from_stats(loaded.layers[i].key, cfg, seed_offset=i).encode(x)
        assert torch.equal(a.records, b.records) and torch.equal(a.scales, b.scales)


def test_truncated_or_corrupt_files_raise(tmp_path):
    path = tmp_path / "c.safetensors"
    make_calibration().save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Calibration.load(tmp_path / "trunc.safetensors")
    flipped = bytearray(data)
    flipped[-5] ^= 0x40  # a bit inside the tensor data, header intact
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum"):
        Calibration.load(tmp_path / "flip.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Calibration.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        Calibration.load(tmp_path / "missing.safetensors")


def test_foreign_format_newer_version_and_inconsistent_content_raise(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a SpectralQuant calibration"):
        Calibration.load(tmp_path / "other.safetensors")

    calib = make_calibration()
    tensors = calib._tensors()
    from spectralquant.calibration import _digest

    def write(name, tensors, **meta):
        base = {
            "format": "spectralquant.calibration", "format_version": "1",
            "signature": calib.signature.to_json(), "counts": json.dumps([[500, 500]] * 2), "info": "{}",
            "sha256": _digest(tensors),
        }
        base.update(meta)
        save_file(tensors, tmp_path / name, metadata=base)
        return tmp_path / name

    with pytest.raises(ValueError, match="version '99'"):
        Calibration.load(write("v99.safetensors", tensors, format_version="99"))
    bad = dict(tensors)
    bad["layers.1.value.eigenvectors"] = bad["layers.1.value.eigenvectors"] * 2
    with pytest.raises(ValueError, match="layer 1 value: eigenvectors are not orthonormal"):
        Calibration.load(write("ortho.safetensors", bad))
    bad = dict(tensors)
    bad["layers.0.key.eigenvalues"] = bad["layers.0.key.eigenvalues"].flip(-1)
    with pytest.raises(ValueError, match="descending"):
        Calibration.load(write("order.safetensors", bad))
    bad = dict(tensors)
    bad["layers.0.key.mean"] = bad["layers.0.key.mean"].clone()
    bad["layers.0.key.mean"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Calibration.load(write("nan.safetensors", bad))
    bad = dict(tensors)
    del bad["layers.1.key.mean"]
    with pytest.raises(ValueError, match="missing or has malformed"):
        Calibration.load(write("missing.safetensors", bad))
    bad = dict(tensors)
    bad["layers.0.key.mean"] = torch.zeros(2, 8)
    with pytest.raises(ValueError):
        Calibration.load(write("shape.safetensors", bad))


def test_signature_mismatch_names_the_layer_and_fix():
    a = ModelSignature(3, [2, 2, 2], [64, 64, 64])
    b = ModelSignature(3, [2, 2, 2], [64, 64, 128])
    assert a.mismatch(a) is None
    assert a.mismatch(b) == "calibration has head_dim 64 but the model's layer 2 has 128"
    assert "layers" in a.mismatch(ModelSignature(2, [2, 2], [64, 64]))
    with pytest.raises(ValueError):
        ModelSignature(2, [2], [64, 64])
    with pytest.raises(ValueError):
        ModelSignature(1, [2], [64], captured=("key",))


def test_builder_statistics_match_direct_computation():
    sig = ModelSignature(1, [2], [8])
    b = CalibrationBuilder(sig)
    x = torch.randn(300, 2, 8) * 2 + 1
    b.add(0, "key", x[:100])
    b.add(0, "key", x[100:])
    b.add(0, "value", x)
    q = torch.randn(300, 6, 8)
    b.add_query(0, q)
    calib = b.build()
    st = calib.layers[0].key
    assert torch.allclose(st.mean, x.mean(0), atol=1e-5)
    cov = torch.einsum("nhi,nhj->hij", x - x.mean(0), x - x.mean(0)) / 300
    rebuilt = st.eigenvectors @ torch.diag_embed(st.eigenvalues) @ st.eigenvectors.transpose(-1, -2)
    assert torch.allclose(rebuilt, cov, atol=1e-4)
    grouped = q.reshape(300, 2, 3, 8)
    moment = torch.einsum("nhgi,nhgj->hij", grouped, grouped) / 900
    assert torch.allclose(calib.layers[0].query_moment, moment, atol=1e-5)
    assert calib.signature.captured == ("key", "value", "query")
    assert calib.layers[0].output_moment is None and calib.layers[0].importance("value") is None
    eff = calib.effective_dims()
    assert eff[0]["key_participation"].shape == (2,)


def test_output_moment_is_wo_transpose_wo_per_kv_head():
    sig = ModelSignature(1, [2], [8])
    b = CalibrationBuilder(sig)
    b.add(0, "key", torch.randn(50, 2, 8))
    b.add(0, "value", torch.randn(50, 2, 8))
    w = torch.randn(20, 6 * 8)  # 6 query heads (3 per KV head), hidden 20
    b.set_output_projection(0, w)
    layer = b.build().layers[0]
    for h in range(2):
        blocks = [w[:, (3 * h + g) * 8 : (3 * h + g + 1) * 8] for g in range(3)]
        expected = sum(blk.T @ blk for blk in blocks) / 3
        assert torch.allclose(layer.output_moment[h], expected, rtol=1e-5, atol=1e-4)
    assert layer.importance("value") is layer.output_moment and layer.importance("key") is None
    with pytest.raises(ValueError, match="does not fit 2 KV heads of dim 8"):
        b.set_output_projection(0, torch.randn(20, 20))


def test_builder_errors():
    b = CalibrationBuilder(ModelSignature(2, [1, 1], [4, 4]))
    b.add(0, "key", torch.randn(3, 1, 4))
    b.add(0, "value", torch.randn(3, 1, 4))
    with pytest.raises(ValueError, match="layer 1 captured no keys"):
        b.build()
    with pytest.raises(ValueError, match="kind"):
        b.add(0, "query", torch.randn(3, 1, 4))
    with pytest.raises(ValueError, match="out of range"):
        b.add(5, "key", torch.randn(3, 1, 4))
    with pytest.raises(ValueError, match="NaN"):
        b.add(1, "key", torch.full((3, 1, 4), float("nan")))


def test_reservoir_is_bounded_and_uniform():
    r = Reservoir(100, seed=0)
    for start in range(0, 10_000, 500):
        r.add(torch.arange(start, start + 500).float().reshape(-1, 1, 1))
    assert r.items.shape == (100, 1, 1)
    # A uniform sample of 0..9999 has mean ~5000 (std of the mean ~290).
    assert abs(float(r.items.mean()) - 5000) < 1200
    assert len(set(r.items.flatten().tolist())) == 100


def test_kvstats_and_layers_are_validated():
    x, st = anisotropic(10, 2, 8)
    with pytest.raises(ValueError, match="signature says"):
        Calibration(ModelSignature(1, [3], [8]), [LayerCalibration(st, st)])
    assert isinstance(st, KVStats) and st.mean.dtype == torch.float32
