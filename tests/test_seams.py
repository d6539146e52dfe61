"""Where two features meet (#23): object stores with --retry-failed, --devices, to_hf_dataset and unreachable
endpoints; local caches of remote shards; the spool's messages; export and to_hf_dataset with every image's
metadata, mixed types, and an export that is atomic. S3 through moto's server on loopback (conftest's `s3`)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import s2cli
from conftest import FAST, write_image

TINY = dict(model="timm:test_resnet", random_init=True, img_sizes=(64, 128), max_split_size=64, workers=0)


def s3_url(s3, rel: str) -> str:
    return f"s3://{s3.bucket}/{rel}"


# ---- #23.7-9: --retry-failed, --devices and to_hf_dataset on an S3 output folder ---------------------------------
def test_retry_failed_on_an_s3_output_folder_retries_the_failures(s3, image_dir):
    bad = image_dir / "e.png"
    bad.write_bytes(b"not an image")
    out = s3_url(s3, "run/")
    first = s2cli.extract(str(image_dir), out, **TINY)
    assert first.num_failed == 1
    write_image(bad, (40, 40), 9)  # fixed since
    again = s2cli.extract(str(image_dir), out, **TINY, retry_failed=True)
    assert again.num_images == 1 and again.num_failed == 0
    with s2cli.open_features(out) as r:
        assert sorted(r) == ["a", "b", "d", "e", "sub/c"]


@pytest.mark.slow
def test_devices_into_an_s3_output_folder_extract_every_image(s3, image_dir, cli, tmp_path):
    out = s3_url(s3, "dev/")
    r = cli("extract", image_dir, *FAST, "--devices", "cpu,cpu", "-o", out, "--shard-size", 1)
    assert r.exit_code == 0, r.output
    s3.invalidate_cache()
    with s2cli.open_features(out) as ff:
        assert sorted(ff) == ["a", "b", "d", "sub/c"] and ff.complete
    s2cli.extract(str(image_dir), str(tmp_path / "ref.h5"), **TINY)
    with s2cli.open_features(out) as got, s2cli.open_features(tmp_path / "ref.h5") as want:
        for k in want:
            np.testing.assert_allclose(got[k], want[k], atol=1e-5)


def test_to_hf_dataset_reads_an_s3_url_as_open_features_does(s3, image_dir, tmp_path):
    pytest.importorskip("datasets", reason="the hf extra")
    out = s3_url(s3, "hf/")
    s2cli.extract(str(image_dir), out, **TINY, shard_size=2)
    ds = s2cli.to_hf_dataset(out, cache_dir=tmp_path / "cache")
    with s2cli.open_features(out) as r:
        assert ds["key"] == list(r)
        np.testing.assert_array_equal(np.asarray(ds.with_format("numpy")[0]["features"]), r[ds["key"][0]])


# ---- #23.12-13: every image's metadata, mixed types, atomic export ----------------------------------------------
def _with_sidecars(image_dir: Path) -> None:
    """Metadata only on later images (a caption in d's key.txt), nested JSON, and a field of mixed types."""
    (image_dir / "a.json").write_text(json.dumps({"caption": "a cat", "exif": {"iso": 100, "lens": {"mm": 35}}}))
    (image_dir / "b.json").write_text(json.dumps({"caption": 5, "key": "clash"}))
    (image_dir / "d.txt").write_text("a late caption")


EXPECTED = {  # column -> value per key (a, b, d, sub/c): json.* from key.json, txt from key.txt
    "json.caption": ["a cat", "5", None, None],  # a string and a number: strings (JSON text)
    "json.exif.iso": [100, None, None, None],
    "json.exif.lens.mm": [35, None, None, None],
    "json.key": [None, "clash", None, None],  # nested, so not the table's own `key`: kept as its path
    "txt": [None, None, "a late caption", None],
}


def test_export_takes_every_images_metadata_with_one_type_per_column(image_dir, tmp_path, cli):
    import pyarrow.parquet as pq

    _with_sidecars(image_dir)
    s2cli.extract(str(image_dir), str(tmp_path / "f.h5"), **TINY, pool="mean")
    r = cli("export", tmp_path / "f.h5", tmp_path / "emb")
    assert r.exit_code == 0, r.output
    table = pq.read_table(tmp_path / "emb" / "metadata" / "metadata_0.parquet")
    rows = table.to_pydict()
    assert rows["key"] == ["a", "b", "d", "sub/c"]
    for col, want in EXPECTED.items():
        assert rows[col] == want, col
    assert str(table.schema.field("json.caption").type) == "string"
    assert str(table.schema.field("json.exif.iso").type) == "int64"


def test_export_across_chunks_gives_every_file_the_same_columns(image_dir, tmp_path):
    import pyarrow.parquet as pq

    from s2cli.export import export_embeddings

    _with_sidecars(image_dir)
    s2cli.extract(str(image_dir), str(tmp_path / "f.h5"), **TINY, pool="mean")
    with s2cli.open_features(tmp_path / "f.h5") as ff:
        export_embeddings(ff, tmp_path / "emb", chunk=1)
    tables = [pq.read_table(tmp_path / "emb" / "metadata" / f"metadata_{i}.parquet") for i in range(4)]
    assert all(t.schema == tables[0].schema for t in tables)
    for col, want in EXPECTED.items():
        assert [t.to_pydict()[col][0] for t in tables] == want, col


def test_a_field_named_like_an_own_column_is_kept_apart_and_non_object_metadata_is_one_column():
    from s2cli.columns import Columns, flatten

    assert flatten({"key": "k", "a": {"b": 1}, "a.b": 2}, ("key",)) == {"meta.key": "k", "a.b": 1, "a.b#2": 2}
    assert flatten([1, 2]) == {"meta": [1, 2]} and flatten(None) == {} and flatten({"e": {}}) == {"e": {}}
    cols = Columns().add([{"x": 1, "y": True, "z": [1]}, {"x": 2.5, "y": "no"}])
    assert cols.types() == {"x": "float", "y": "string", "z": "string"}
    assert cols.cast([{"y": True, "z": [1]}]) == [{"x": None, "y": "true", "z": "[1]"}]


def test_a_failed_export_leaves_nothing_and_a_rerun_works(image_dir, tmp_path, cli, monkeypatch):
    import pyarrow.parquet as pq

    from s2cli.fsutil import pid_alive

    s2cli.extract(str(image_dir), str(tmp_path / "f.h5"), **TINY, pool="mean")
    real = pq.write_table

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    r = cli("export", tmp_path / "f.h5", tmp_path / "emb")
    assert r.exit_code == 1 and "no space left on device" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "emb").exists() and not list(tmp_path.glob(".s2cli-export-*"))
    monkeypatch.setattr(pq, "write_table", real)
    dead = next(p for p in range(4_000_000, 4_100_000) if not pid_alive(p))
    left = tmp_path / f".s2cli-export-emb-{dead}"  # what an export killed with kill -9 left
    (left / "img_emb").mkdir(parents=True)
    r = cli("export", tmp_path / "f.h5", tmp_path / "emb")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(tmp_path / "emb")) == ["img_emb", "metadata"] and not left.exists()


def test_to_hf_dataset_takes_every_images_metadata(image_dir, tmp_path):
    pytest.importorskip("datasets", reason="the hf extra")
    _with_sidecars(image_dir)
    s2cli.extract(str(image_dir), str(tmp_path / "f.h5"), **TINY)
    ds = s2cli.to_hf_dataset(tmp_path / "f.h5", cache_dir=tmp_path / "cache")
    assert ds["key"] == ["a", "b", "d", "sub/c"]
    for col, want in EXPECTED.items():
        assert ds[col] == want, col
