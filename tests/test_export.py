"""Retrieval export: L2-normalised float16 vectors by default, parquet metadata with image_path, bulk reads equal
to the per-key reads for every reader."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

import s2cli
from s2cli.export import export_embeddings
from s2cli.readers import Reader

TINY = dict(model="timm:test_vit", random_init=True, img_sizes=(160, 320), max_split_size=160, workers=0)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("exp")
    rng = np.random.default_rng(1)
    for i, hw in enumerate([(40, 60), (64, 48), (50, 50), (30, 70), (80, 40)]):
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    s2cli.extract(str(d), str(d / "fixed.h5"), keep_cls=True, **TINY)
    s2cli.extract(str(d), str(d / "ragged.h5"), fit="keep", keep_cls=True, **TINY)
    s2cli.extract(str(d), str(d / "pooled.safetensors"), pool="mean", **TINY)
    s2cli.extract(str(d), str(d / "folder/"), fit="keep", shard_size=2, pool="cls", keep_cls=True, dtype="bfloat16", **TINY)
    return d


@pytest.mark.parametrize("name,how", [("fixed.h5", "mean"), ("ragged.h5", "mean"), ("pooled.safetensors", "mean"),
                                      ("pooled.safetensors", "pooled"), ("folder", "mean"), ("folder", "pooled")])
def test_bulk_reads_equal_the_per_key_reads(stored, name, how):
    with s2cli.open_features(stored / name) as r:
        bulk = list(r.vector_blocks(how, block=2))
        ref = list(Reader.vector_blocks(r, how, block=100))
        keys = [k for b in bulk for k in b[0]]
        assert keys == list(r) == ref[0][0]
        np.testing.assert_allclose(np.concatenate([b[1] for b in bulk]), ref[0][1], rtol=1e-5, atol=1e-6)
        assert [x for b in bulk for x in b[2]] == ref[0][2]


def test_the_token_mean_leaves_the_prefix_token_out(stored):
    with s2cli.open_features(stored / "ragged.h5") as r:
        k = list(r)[2]
        assert r.meta(k)["num_prefix_tokens"] == 1
        keys, vecs, _ = next(r.vector_blocks("mean"))
        np.testing.assert_allclose(vecs[2], np.asarray(r[k], np.float64)[1:].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fixed.h5", "folder"])
def test_export_defaults_to_unit_norm_float16_with_image_path(stored, tmp_path, name):
    s = export_embeddings(s2cli.open_features(stored / name), tmp_path / "emb", chunk=3)
    assert s["normalized"] and s["dtype"] == "float16" and s["num_images"] == 5
    emb = np.concatenate([np.load(tmp_path / "emb" / f) for f in s["files"]])
    meta = [row for i in range(len(s["files"]))
            for row in pq.read_table(tmp_path / "emb" / "metadata" / f"metadata_{i}.parquet").to_pylist()]
    assert emb.dtype == np.float16 and len(s["files"]) == 2
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    with s2cli.open_features(stored / name) as r:
        assert [m["key"] for m in meta] == list(r)
        assert [m["image_path"] for m in meta] == [r.meta(k)["source"] for k in r]
        for i, k in enumerate(r):
            v = r.pooled(k) if s["pool"] == "stored" else np.asarray(r[k], np.float64)[r.meta(k)["num_prefix_tokens"]:].mean(0)
            np.testing.assert_allclose(emb[i], v / np.linalg.norm(v), atol=2e-3)


def test_no_normalize_and_float32(stored, tmp_path, cli):
    r = cli("export", stored / "pooled.safetensors", tmp_path / "emb", "--no-normalize", "--dtype", "float32", "--json")
    assert r.exit_code == 0, r.stdout
    emb = np.load(tmp_path / "emb" / "img_emb" / "img_emb_0.npy")
    with s2cli.open_features(stored / "pooled.safetensors") as ff:
        np.testing.assert_array_equal(emb, np.stack([ff.pooled(k) for k in ff]))
    r = cli("export", stored / "pooled.safetensors", tmp_path / "emb2", "--dtype", "int8")
    assert r.exit_code == 2 and "float16" in r.stderr
