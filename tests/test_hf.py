"""HF datasets: a fixed, a ragged and a sharded output each load as one datasets.Dataset (s2cli.to_hf_dataset)
with the features open_features reads and the per-image metadata as columns."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

import s2cli
from s2cli.hf import to_hf_dataset

# without the hf extra these tests are skipped (datasets is looked up here, imported only by the tests that run)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="the hf extra")
TINY = dict(model="timm:test_vit", random_init=True, img_sizes=(160, 320), max_split_size=160, workers=0, keep_cls=True)


@pytest.mark.parametrize("name,options", [("fixed.h5", {}), ("ragged.safetensors", dict(fit="keep")),
                                          ("sharded/", dict(fit="keep", shard_size=2, pool="cls", dtype="bfloat16",
                                                            reduce="avg:2"))])
def test_every_output_loads_as_one_dataset_with_metadata_columns(image_dir, tmp_path, name, options):
    import datasets  # seconds to import: not at collection, which every xdist worker does for every module

    out = tmp_path / name
    s2cli.extract(str(image_dir), str(out) + ("/" if name.endswith("/") else ""), **TINY, **options)
    ds = to_hf_dataset(out, cache_dir=tmp_path / "cache")
    assert isinstance(ds, datasets.Dataset)
    with s2cli.open_features(out) as r:
        assert ds["key"] == list(r) and len(ds) == 4
        for row in ds.with_format("numpy"):
            k, m = row["key"], r.meta(row["key"])
            np.testing.assert_array_equal(row["features"], r[k])
            assert row["source"] == m["source"] and list(row["grid_hw"]) == m["grid_hw"]
            assert list(row["orig_hw"]) == m["orig_hw"] and row["num_prefix_tokens"] == m["num_prefix_tokens"]
            if "pool" in options:
                np.testing.assert_array_equal(row["pooled"], r.pooled(k))
            if "reduce" in options:
                assert json.loads(row["reduce"]) == m["reduce"]


def test_pooled_only_without_features(image_dir, tmp_path):
    s2cli.extract(str(image_dir), str(tmp_path / "p.h5"), pool="mean", pool_only=True, **TINY)
    ds = to_hf_dataset(tmp_path / "p.h5", cache_dir=tmp_path / "cache")
    assert "features" not in ds.column_names and len(ds[0]["pooled"]) == 128
