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
from s2cli.errors import ConfigError

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


# ---- #23.6: a store that cannot be reached ----------------------------------------------------------------------
@pytest.mark.slow
def test_an_unreachable_endpoint_is_one_line_naming_url_and_endpoint_exit_2_before_weights_load(
        s3, image_dir, cli, monkeypatch):
    from conftest import free_port

    out = s3_url(s3, "run/")
    s2cli.extract(str(image_dir), out, **TINY)  # a real output folder, on moto
    s3.put(str(image_dir) + "/", s3_url(s3, "imgs/"), recursive=True)
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the store is down
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    model = ["-m", "clip-vit-l-336"]  # not in the (empty, offline) cache: loading its weights would fail otherwise
    for args, url in ((["extract", image_dir, *model, "-o", out], out),
                      (["extract", s3_url(s3, "imgs/"), *model, "-o", "x.h5"], s3_url(s3, "imgs/")),
                      (["extract", s3_url(s3, "sh/{000..001}.tar"), *model, "-o", "x.h5"], s3_url(s3, "sh/{000..001}.tar")),
                      (["inspect", out], out), (["status", out], out)):
        r = cli(*args)
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1, (args, r.output)
        assert "cannot reach" in lines[0] and url.rstrip("/") in lines[0] and closed in lines[0], lines[0]
        assert "no run.json" not in r.output and "Traceback" not in r.output
    with pytest.raises(ConfigError, match="cannot reach"):
        s2cli.open_features(out)


# ---- #23.10: local caches of remote shards -----------------------------------------------------------------------
def _caches(spool: Path) -> list[Path]:
    return sorted(spool.glob("s2cli-cache-*")) if spool.is_dir() else []


@pytest.fixture
def spool(monkeypatch):
    """S2CLI_SPOOL and the temporary folder both here: a cache left anywhere a run puts one is seen. A short path
    of its own, not under tmp_path (deeper under pytest-xdist): a DataLoader worker shares tensors through a unix
    socket in the temporary folder, whose path may not pass 107 bytes."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="s2spool-"))
    monkeypatch.setenv("S2CLI_SPOOL", str(d))
    monkeypatch.setenv("TMPDIR", str(d))
    monkeypatch.setattr(tempfile, "tempdir", None)  # asked again: TMPDIR
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_remote_readers_cache_is_bounded_shared_and_removed_on_close(s3, image_dir, spool, monkeypatch):
    out = s3_url(s3, "c/")
    s2cli.extract(str(image_dir), out, **TINY, shard_size=1)
    one = max(s3.size(p) for p in s3.glob(f"{s3.bucket}/c/part-*.h5"))
    monkeypatch.setenv("S2CLI_CACHE_BYTES", str(one + 1))  # room for one shard
    with s2cli.open_features(out) as a, s2cli.open_features(out) as b:
        assert [a[k].shape for k in a] == [b[k].shape for k in b]
        (cache,) = _caches(spool)  # one cache for the folder, shared by both readers
        held = [p for p in cache.iterdir() if p.name.startswith("part-")]
        assert len(held) == 1  # bounded: the least recently used shards went
    assert _caches(spool) == []


def test_a_cache_left_by_a_killed_process_is_removed_by_the_next(s3, image_dir, spool):
    import time

    from s2cli.fsutil import pid_alive

    out = s3_url(s3, "k/")
    s2cli.extract(str(image_dir), out, **TINY, shard_size=2)
    dead = next(p for p in range(4_000_000, 4_100_000) if not pid_alive(p))
    left = spool / "s2cli-cache-{}-0123456789abcdef".format(os.uname().nodename)
    (left / ".users").mkdir(parents=True)
    (left / ".users" / str(dead)).touch()
    (left / "part-00000-00000.h5").write_bytes(b"x" * 100)
    old = time.time() - 3600
    os.utime(left, (old, old))
    with s2cli.open_features(out) as r:
        assert len(r) == 4 and r[next(iter(r))] is not None  # a shard read: the cache is opened (not before)
        assert not left.exists()


@pytest.mark.slow
def test_dataloader_workers_over_epochs_leave_no_cache(s3, image_dir, spool):
    import torch

    out = s3_url(s3, "dl/")
    s2cli.extract(str(image_dir), out, **TINY, shard_size=1)
    ds = s2cli.FeatureDataset(out, meta=False)
    dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=s2cli.collate_features)
    for _ in range(3):
        assert sum(len(b["key"]) for b in dl) == 4
        assert len(_caches(spool)) <= 1  # one cache for every worker of every epoch (kept while the dataset is open)
    ds.close()
    assert _caches(spool) == []  # gone with its last user


@pytest.mark.slow
def test_inspect_stopped_by_sigterm_and_a_reader_left_open_at_exit_remove_their_cache(s3, image_dir, spool):
    import signal
    import subprocess
    import sys
    import time

    out = s3_url(s3, "t/")
    s2cli.extract(str(image_dir), out, **TINY, shard_size=1)
    slowed = ("import sys, time; import s2cli.store as st; get = st.ShardCache.get\n"
              "def slow(self, *a):\n    p = get(self, *a); time.sleep(30); return p\n"
              "st.ShardCache.get = slow; from s2cli.cli import main; sys.argv = ['s2', 'inspect', sys.argv[1]]; main()")
    p = subprocess.Popen([sys.executable, "-c", slowed, out], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(c.glob("part-*") for c in _caches(spool)):
        assert p.poll() is None, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and "Traceback" not in err, err
    assert _caches(spool) == []
    left_open = f"import s2cli; r = s2cli.open_features({out!r}); print(len(r))"  # never closed: removed at exit
    done = subprocess.run([sys.executable, "-c", left_open], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "4", done.stderr
    assert _caches(spool) == []


# ---- #23.11: the spool of a remote output -------------------------------------------------------------------------
def test_a_full_spool_is_named_with_the_size_a_shard_really_takes(s3, image_dir, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from s2cli.errors import S2Error
    from s2cli.fsutil import human_bytes

    spool = tmp_path / "spool"
    monkeypatch.setenv("S2CLI_SPOOL", str(spool))
    usage, real = namedtuple("usage", "total used free"), shutil.disk_usage
    asked: list[str] = []

    def disk_usage(path):  # the spool's disk is full once the first shard was written
        if str(path).startswith(str(spool)):
            asked.append(str(path))
            if len(asked) > 1:
                return usage(1 << 30, (1 << 30) - 4096, 4096)
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    out = s3_url(s3, "full/")
    with pytest.raises(S2Error) as e:
        s2cli.extract(str(image_dir), out, **TINY, shard_size=2, batch_size=2)
    line = e.value.one_line()
    assert "spool" in line and "S2CLI_SPOOL" in line and str(spool) in line and "-o elsewhere" not in line
    first = json.loads(s3.cat(f"{s3.bucket}/full/part-00000-00000.json"))
    assert f"a whole shard needs about {human_bytes(first['bytes'])}" in line  # as the first shard took
    assert not [p for p in spool.iterdir()] or not any(p.iterdir() for p in spool.iterdir())


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
