"""Compact storage: bfloat16 round-trips (HDF5 encoding, safetensors BF16), dry-run bytes equal stored bytes,
chunks fit the data, safetensors shards respect the header limit and say so when they cannot."""
from __future__ import annotations

import json
import struct

import h5py
import numpy as np
import pytest
import torch

import s2cli
from s2cli import writers
from s2cli.writers import SafetensorsSink

TINY = dict(model="timm:test_resnet", random_init=True, img_sizes=(64, 128), max_split_size=64, workers=0)


@pytest.mark.parametrize("fmt", ["h5", "safetensors"])
def test_bfloat16_round_trips_as_torch_rounds_it(image_dir, tmp_path, fmt, cli):
    s2cli.extract(str(image_dir), str(tmp_path / f"bf.{fmt}"), dtype="bfloat16", pool="mean", **TINY)
    s2cli.extract(str(image_dir), str(tmp_path / f"f32.{fmt}"), pool="mean", **TINY)
    with s2cli.open_features(tmp_path / f"bf.{fmt}") as bf, s2cli.open_features(tmp_path / f"f32.{fmt}") as ref:
        assert bf.dtype == "bfloat16" and len(bf) == 4
        for k in ref:
            want = torch.from_numpy(ref[k]).to(torch.bfloat16)
            assert torch.equal(torch.from_numpy(bf[k]).to(torch.bfloat16), want)
            np.testing.assert_array_equal(bf[k], want.float().numpy())
            np.testing.assert_array_equal(bf.pooled(k), torch.from_numpy(ref.pooled(k)).to(torch.bfloat16).float().numpy())
        item = s2cli.FeatureDataset(tmp_path / f"bf.{fmt}", dtype=torch.bfloat16)[0]
        assert torch.equal(item["features"], torch.from_numpy(ref[item["key"]]).to(torch.bfloat16))
    r = cli("inspect", tmp_path / f"bf.{fmt}", "--json")
    assert r.exit_code == 0, r.stdout
    assert json.loads(r.stdout)["dtype"] == "bfloat16"


def test_hdf5_bfloat16_is_documented_uint16_bits():
    x = np.array([1.0, -2.5, 3.14159, 1e-3, 65504.0], np.float32)
    bits = writers.to_bf16_bits(x)
    assert bits.dtype == np.uint16
    assert bits.tolist() == torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).tolist()
    np.testing.assert_array_equal(writers.from_bf16_bits(bits), torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def _stored_bytes(path) -> int:
    with s2cli.open_features(path) as r:  # elements x the stored dtype's size (bfloat16 reads back as float32)
        total, item = 0, writers.itemsize(r.dtype)
        for k in r:
            total += r[k].size * item if r.feature_shape is not None else 0
            try:
                total += r.pooled(k).size * item
            except KeyError:
                pass
        return total


@pytest.mark.parametrize("options", [dict(pool="mean"), dict(pool="mean", pool_only=True), dict(dtype="float16"),
                                     dict(pool="mean", pool_only=True, dtype="bfloat16")])
def test_dry_run_bytes_are_the_stored_bytes(image_dir, tmp_path, options):
    plan = s2cli.plan(str(image_dir), str(tmp_path / "o.h5"), **TINY, **options)
    s2cli.extract(str(image_dir), str(tmp_path / "o.h5"), **TINY, **options)
    stored = _stored_bytes(tmp_path / "o.h5")
    assert abs(plan["total_bytes"] - stored) <= 0.01 * stored


def test_llava_s2_pool_only_dry_run_counts_one_vector(image_dir):
    plan = s2cli.plan(str(image_dir), "o.h5", recipe="llava-1.5-s2", random_init=True, pool="mean", pool_only=True)
    channels = plan["images"][0]["output_shape"][1]
    assert plan["bytes_per_image"] == channels * 4


def test_a_pool_only_file_of_a_few_vectors_has_no_megabyte_chunks(tmp_path):
    C, n = 2560, 8
    sink = writers.HDF5Sink(tmp_path / "p.h5", {}, channels=C, num_scales=1, tokens=None, dtype="float32",
                            store_features=False, pooled=True)
    rng = np.random.default_rng(0)
    sink.write([{"key": f"k{i}", "source": "s", "orig_hw": (4, 4), "grid_hw": (1, 1), "img_sizes": [(4, 4)],
                 "num_prefix_tokens": 0, "split_mode": "resize", "features": None,
                 "pooled": rng.standard_normal(C).astype(np.float32)} for i in range(n)])
    sink.close()
    size = (tmp_path / "p.h5").stat().st_size
    assert size < n * C * 4 + 256 * 1024, size
    with h5py.File(tmp_path / "p.h5") as f:
        for name, ds in f.items():
            if ds.chunks:
                row = int(np.prod(ds.chunks[1:], dtype=np.int64)) * ds.dtype.itemsize
                assert np.prod(ds.chunks) * ds.dtype.itemsize <= max(writers.HDF5_CHUNK_BYTES, row), name


def _items(n: int, meta_bytes: int, C: int = 4):
    return [{"key": f"img-{i:06d}", "source": f"/data/images/img-{i:06d}.jpg", "meta": json.dumps({"caption": "x" * meta_bytes}),
             "orig_hw": (480, 640), "grid_hw": (24, 24), "img_sizes": [(336, 336), (672, 672), (1008, 1008)],
             "num_prefix_tokens": 0, "split_mode": "resize", "features": None,
             "pooled": np.full(C, i, np.float32)} for i in range(n)]


def test_header_size_estimate_matches_the_written_header(tmp_path):
    sink = SafetensorsSink(tmp_path / "s.safetensors", {"model": "m"}, channels=4, num_scales=3, tokens=None,
                           dtype="float32", store_features=False, pooled=True)
    sink.write(_items(50, 100))
    sink.close()
    raw = (tmp_path / "s.safetensors").read_bytes()
    actual = struct.unpack("<Q", raw[:8])[0]
    meta = json.loads(raw[8:8 + actual])["__metadata__"]
    tensors = {writers.POOLED_TENSOR: np.zeros((50, 4), np.float32)}
    assert abs(writers.safetensors_header_bytes(tensors, meta) - actual) <= 0.02 * actual


def test_an_overfull_safetensors_header_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(writers, "SAFETENSORS_HEADER_LIMIT", 20_000)
    sink = SafetensorsSink(tmp_path / "s.safetensors", {}, channels=4, num_scales=3, tokens=None, dtype="float32",
                           pooled=True)
    sink.write(_items(100, 300))
    with pytest.raises(s2cli.S2Error) as e:
        sink.close()
    msg = str(e.value)
    assert "header" in msg and "--shard-size" in msg and "free space" not in msg
    assert not (tmp_path / "s.safetensors").exists()


def test_default_safetensors_shards_leave_room_for_a_kilobyte_of_metadata_per_image():
    res = s2cli.settings("x/", "out/", recipe="llava-1.5-s2", random_init=True, pool="mean", pool_only=True,
                         format="safetensors")
    one = _items(1, 1024)[0]
    record = {k: one[k] for k in ("source", "meta", "orig_hw", "grid_hw", "img_sizes", "num_prefix_tokens", "split_mode")}
    per_image = len(json.dumps({one["key"]: record})) + 2 * len(json.dumps(one["key"]))
    assert res.shard_size * per_image < writers.SAFETENSORS_HEADER_LIMIT
    assert res.shard_size < 87_381
