"""int8 and float8 (e4m3) storage: the codes equal torch's casts, the scaling keeps a model's small channels when a
few channels are huge, every reader (files, folders, FeatureDataset, to_hf_dataset, export) dequantizes within the
fidelity docs/features.md documents, raw codes on request, and the dry run counts the scales."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import s2cli
from s2cli import dtypes
from s2cli.dtypes import decode, quantize
from s2cli.export import export_embeddings

TINY = dict(model="timm:test_vit", random_init=True, img_sizes=(160, 320), max_split_size=160, workers=0, keep_cls=True)
# the fidelity docs/features.md documents (per token: the worst cosine and the relative L2 over an image)
FIDELITY = {"int8": dict(cosine=0.998, rel_l2=0.01), "float8": dict(cosine=0.995, rel_l2=0.04)}


def _fidelity(x: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    x, ref = x.reshape(-1, x.shape[-1]).astype(np.float64), ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    cos = (x * ref).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(ref, axis=1), 1e-30)
    return float(cos.min()), float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _channel_error(x: np.ndarray, ref: np.ndarray) -> float:
    """The worst channel's relative error: max over channels of |x_c - ref_c| / |ref_c| over the tokens."""
    return float((np.linalg.norm(x - ref, axis=0) / np.linalg.norm(ref, axis=0)).max())


def test_float8_codes_are_torchs_e4m3fn_cast():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(20000) * np.exp(rng.standard_normal(20000) * 3),
                        [0.0, -0.0, 448.0, -448.0, 2 ** -9, 2 ** -10, 3 * 2 ** -11, 1.0625, 1.1875]]).astype(np.float32)
    x = np.clip(x, -448, 448)
    want = torch.from_numpy(x).to(torch.float8_e4m3fn)
    np.testing.assert_array_equal(dtypes.to_float8_bits(x), want.view(torch.uint8).numpy())
    np.testing.assert_array_equal(dtypes.from_float8_bits(dtypes.to_float8_bits(x)), want.float().numpy())


def test_int8_codes_are_symmetric_and_rounded_to_nearest():
    x = np.array([[1.0, -0.5, 0.25], [-2.0, 0.0, 1.0]], np.float32)
    enc = quantize(x, "int8", scaling="token")
    assert np.abs(enc.codes).max(1).tolist() == [127, 127] and enc.codes.dtype == np.int8
    np.testing.assert_array_equal(enc.codes, np.rint(x / np.abs(x).max(1, keepdims=True) * 127))
    np.testing.assert_allclose(decode(enc.codes, "int8", enc.token_scales, enc.channel_scales), x, atol=2 / 127)


@pytest.mark.parametrize("dtype", ["int8", "float8"])
def test_outlier_channels_do_not_wreck_small_ones_with_the_chosen_scaling(dtype):
    """A ViT-like entry: 577 tokens x 768 channels, four channels 300x the others (CLIP's massive activations).
    Per-token scaling alone loses the small channels (int8: most of their codes are 0); the chosen scaling keeps
    every channel's relative error near that of the format."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((577, 768)).astype(np.float32)
    x[:, [7, 100, 333, 600]] *= 300
    chosen = quantize(x, dtype)
    per_token = quantize(x, dtype, scaling="token")
    worst = _channel_error(decode(chosen.codes, dtype, chosen.token_scales, chosen.channel_scales), x)
    assert worst < (0.02 if dtype == "int8" else 0.06)
    if dtype == "int8":
        assert _channel_error(decode(per_token.codes, dtype, per_token.token_scales, per_token.channel_scales), x) > 0.3
    assert dtypes.SCALING == "both"


def _extract_pair(image_dir, tmp_path, dtype, name, **options):
    ref = tmp_path / ("ref" + (".h5" if not name.endswith("/") else "/"))
    s2cli.extract(str(image_dir), str(ref), pool="mean", **TINY, **options)
    out = tmp_path / name
    s2cli.extract(str(image_dir), str(out) + ("/" if name.endswith("/") else ""), dtype=dtype, pool="mean", **TINY,
                  **options)
    return ref, out


@pytest.mark.parametrize("dtype", ["int8", "float8"])
@pytest.mark.parametrize("name,options", [("q.h5", {}), ("q.safetensors", dict(fit="keep")),
                                          ("q/", dict(fit="keep", shard_size=3, format="safetensors")),
                                          ("h/", dict(shard_size=3))])
def test_quantized_round_trips_through_every_reader_within_the_documented_fidelity(image_dir, tmp_path, dtype, name,
                                                                                    options):
    ref_path, out = _extract_pair(image_dir, tmp_path, dtype, name, **options)
    bound = FIDELITY[dtype]
    with s2cli.open_features(out) as r, s2cli.open_features(ref_path) as ref, s2cli.open_features(out, raw=True) as raw:
        assert r.dtype == dtype and list(r) == list(ref)
        for k in r:
            x = r[k]
            assert x.dtype == np.float32 and x.shape == ref[k].shape
            cos, rel = _fidelity(x, ref[k])
            assert cos >= bound["cosine"] and rel <= bound["rel_l2"], (k, cos, rel)
            codes, (ts, cs) = raw[k], raw.scales(k)
            assert codes.dtype == (np.int8 if dtype == "int8" else np.uint8) and ts.shape == (x.shape[0],)
            np.testing.assert_array_equal(decode(codes, dtype, ts, cs), x)
            np.testing.assert_allclose(r.pooled(k), ref.pooled(k).astype(np.float16), rtol=0, atol=0)
        keys = list(r)
        item = s2cli.FeatureDataset(out)[1]
        np.testing.assert_array_equal(item["features"].numpy(), r[keys[1]])
        raw_item = s2cli.FeatureDataset(out, raw=True)[1]
        assert raw_item["features"].dtype == (torch.int8 if dtype == "int8" else torch.uint8)
        np.testing.assert_array_equal(raw_item["token_scales"].numpy(), raw.scales(keys[1])[0])
        from s2cli.hf import to_hf_dataset

        ds = to_hf_dataset(out, cache_dir=tmp_path / "cache").with_format("numpy")
        np.testing.assert_array_equal(ds[0]["features"], r[keys[0]])
        raw_ds = to_hf_dataset(out, raw=True, cache_dir=tmp_path / "cache").with_format("numpy")
        np.testing.assert_array_equal(raw_ds[0]["features"], raw[keys[0]])
        np.testing.assert_array_equal(raw_ds[0]["channel_scales"], raw.scales(keys[0])[1])
    with s2cli.open_features(out) as r, s2cli.open_features(ref_path) as ref:
        q = export_embeddings(r, tmp_path / "exq", pool="mean", dtype="float32")
        e = export_embeddings(ref, tmp_path / "exr", pool="mean", dtype="float32")
    a, b = np.load(tmp_path / "exq" / q["files"][0]), np.load(tmp_path / "exr" / e["files"][0])
    assert ((a * b).sum(1) >= bound["cosine"]).all()


@pytest.mark.parametrize("dtype", ["int8", "float8"])
def test_safetensors_stores_native_i8_and_f8_e4m3_that_torch_reads(image_dir, tmp_path, dtype):
    from safetensors.torch import load_file

    s2cli.extract(str(image_dir), str(tmp_path / "q.safetensors"), dtype=dtype, **TINY)
    tensors = load_file(str(tmp_path / "q.safetensors"))
    with s2cli.open_features(tmp_path / "q.safetensors") as r:
        k = next(iter(r))
        t = tensors[k]
        assert t.dtype == (torch.int8 if dtype == "int8" else torch.float8_e4m3fn)
        ts, cs = tensors[f"__s2cli_token_scales__/{k}"], tensors[f"__s2cli_channel_scales__/{k}"]
        np.testing.assert_array_equal((t.float() * ts[:, None] * cs[None, :]).numpy(), r[k])


def test_hdf5_float8_is_documented_bytes_with_its_encoding_attribute(image_dir, tmp_path):
    import h5py

    s2cli.extract(str(image_dir), str(tmp_path / "q.h5"), dtype="float8", **TINY)
    with h5py.File(tmp_path / "q.h5") as f, s2cli.open_features(tmp_path / "q.h5") as r:
        ds = f["features"]
        assert ds.dtype == np.uint8 and ds.attrs["encoding"] == "float8_e4m3fn"
        values = torch.from_numpy(ds[0]).view(torch.float8_e4m3fn).float().numpy()
        want = values * f["token_scales"][0][:, None] * f["channel_scales"][0][None, :]
        np.testing.assert_array_equal(want, r[next(iter(r))])


def test_pool_only_with_a_quantized_dtype_is_refused_before_anything_runs():
    with pytest.raises(s2cli.ConfigError, match="--pool-only"):
        s2cli.settings("x/", "o.h5", dtype="int8", pool="mean", pool_only=True, **TINY)


def test_inspect_shows_the_quantized_dtype(image_dir, tmp_path, cli):
    s2cli.extract(str(image_dir), str(tmp_path / "q.h5"), dtype="int8", **TINY)
    r = cli("inspect", tmp_path / "q.h5", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["dtype"] == "int8"
