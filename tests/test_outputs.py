"""Outputs that tell the truth (#23 items 1-4) and open without reading every shard (#25): a done shard replaced by
another file of the same size, a missing shard or marker, a reader opened during a run, a run of another rank
count on a live folder; markers that list their keys, one index per folder, a finished folder's rerun without the
model. Local folders and S3 (moto's server, the `s3` fixture)."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

import s2cli
from conftest import FAST, write_image
from s2cli import ConfigError, open_features
from s2cli.outdir import INDEX, OutputDir

SHARDS = [*FAST, "--shard-size", "2"]
TINY = dict(model="timm:test_resnet", random_init=True, img_sizes=(64, 128), max_split_size=64, workers=0)


def run_json(cli, *args) -> dict:
    r = cli(*args, "--json")
    assert r.exit_code == 0, r.stderr + r.stdout
    return json.loads(r.stdout.splitlines()[-1])


def same_size_images(d: Path, n: int = 4) -> Path:
    """`n` images of one size and names of one length: their shards of 2 are files of the same size."""
    for i in range(n):
        write_image(d / f"im{i}.png", (44, 52), i)
    return d


def where(store: str, tmp_path: Path, s3) -> str:
    return f"s3://{s3.bucket}/o" if store == "s3" else str(tmp_path / "o")


class Files:
    """The output folder's files by name, on either store."""

    def __init__(self, out: str, s3):
        self.out, self.s3 = out, s3

    def names(self) -> list[str]:
        if self.out.startswith("s3://"):
            self.s3.invalidate_cache()
            return sorted(p.rsplit("/", 1)[-1] for p in self.s3.ls(self.out[5:]))
        return sorted(p.name for p in Path(self.out).iterdir())

    def read(self, name: str) -> bytes:
        return self.s3.cat_file(f"{self.out[5:]}/{name}") if self.out.startswith("s3://") else (Path(self.out) / name).read_bytes()

    def replace(self, name: str, data: bytes) -> None:
        """Another file's bytes under `name`: an upload over it; locally `cp -p` (same inode, same mtime)."""
        if self.out.startswith("s3://"):
            self.s3.pipe_file(f"{self.out[5:]}/{name}", data)
            return
        p = Path(self.out) / name
        st = p.stat()
        with open(p, "r+b") as fh:  # cp writes into the file it replaces
            fh.write(data)
            fh.truncate()
        import os

        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # -p: the times kept

    def remove(self, name: str) -> None:
        if self.out.startswith("s3://"):
            self.s3.rm_file(f"{self.out[5:]}/{name}")
        else:
            (Path(self.out) / name).unlink()


def shard_names(files: Files, suffix: str = ".h5") -> list[str]:
    return [n for n in files.names() if n.startswith("part-") and n.endswith(suffix)]


def assert_read_as(out: str, keys: list[str], complete: bool, broken: list[str]) -> None:
    with open_features(out) as ff:
        assert (list(ff), ff.complete, [b["shard"] for b in ff.broken_shards]) == (keys, complete, broken)


# ---- #23.1: size is not identity --------------------------------------------------------------------------------
@pytest.mark.parametrize("store", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_a_done_shard_replaced_by_another_of_the_same_size_is_not_done(store, cli, tmp_path, request):
    s3 = request.getfixturevalue("s3") if store == "s3" else None
    d, out = same_size_images(tmp_path / "imgs"), where(store, tmp_path, s3)
    run_json(cli, "extract", d, *SHARDS, "-o", f"{out}/")
    run_json(cli, "extract", d, *SHARDS, "-o", f"{tmp_path / 'clean'}/")
    files = Files(out, s3)
    first, second = shard_names(files)
    assert len(files.read(first)) == len(files.read(second))  # what makes the case: the same size
    files.replace(second, files.read(first))
    assert_read_as(out, ["im0", "im1"], False, [second])  # never im0, im1 twice, never complete
    info = run_json(cli, "inspect", out)
    assert (info["num_images"], info["complete"], [b["shard"] for b in info["broken_shards"]]) == (2, False, [second])
    st = run_json(cli, "status", out)
    assert (st["images"], st["complete"], [b["shard"] for b in st["broken_shards"]]) == (2, False, [second])
    r = cli("extract", d, *SHARDS, "-o", f"{out}/")
    assert r.exit_code == 0 and f"{second} is broken" in r.stderr, r.stderr
    with open_features(out) as ff, open_features(tmp_path / "clean") as ref:
        assert list(ff) == list(ref) == [f"im{i}" for i in range(4)] and ff.complete and not ff.broken_shards
        for k in ref:
            np.testing.assert_array_equal(ff[k], ref[k])


def test_a_copied_folder_is_whole_and_its_rerun_records_where_its_shards_are_now(cli, tmp_path):
    """Copied elsewhere, every shard has a new identity with the same bytes: checked by digest and kept, and a
    rerun records the new identities (then opening is cheap again)."""
    d, out = same_size_images(tmp_path / "imgs"), tmp_path / "o"
    run_json(cli, "extract", d, *SHARDS, "-o", f"{out}/")
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)  # new inodes, new times
    snap = OutputDir(moved).snapshot()
    assert len(snap.good) == 2 and not snap.broken and len(snap.moved) == 2
    r = cli("extract", d, *SHARDS, "-o", f"{moved}/")
    assert r.exit_code == 0 and "done already" in r.stderr, r.stderr
    snap = OutputDir(moved).snapshot()
    assert len(snap.good) == 2 and not snap.moved and snap.complete


# ---- #23.2: missing work is never complete ----------------------------------------------------------------------
@pytest.mark.parametrize("gone", ["shard", "marker"])
@pytest.mark.parametrize("store", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_a_missing_shard_or_marker_is_not_complete_in_any_reader(store, gone, cli, tmp_path, request):
    s3 = request.getfixturevalue("s3") if store == "s3" else None
    d, out = same_size_images(tmp_path / "imgs"), where(store, tmp_path, s3)
    run_json(cli, "extract", d, *SHARDS, "-o", f"{out}/")
    files = Files(out, s3)
    second = shard_names(files)[1]
    files.remove(second if gone == "shard" else second.replace(".h5", ".json"))
    assert_read_as(out, ["im0", "im1"], False, [second])
    info = run_json(cli, "inspect", out)
    assert (info["num_images"], info["complete"], [b["shard"] for b in info["broken_shards"]]) == (2, False, [second])
    st = run_json(cli, "status", out)
    assert (st["images"], st["complete"], [b["shard"] for b in st["broken_shards"]]) == (2, False, [second])
    ex = run_json(cli, "export", out, tmp_path / "emb")
    assert (ex["num_images"], ex["complete"], [b["shard"] for b in ex["broken_shards"]]) == (2, False, [second])
    ds = s2cli.FeatureDataset(out)
    assert (len(ds), ds.complete, [b["shard"] for b in ds.broken_shards]) == (2, False, [second])
    ds.close()
    r = cli("extract", d, *SHARDS, "-o", f"{out}/")
    assert r.exit_code == 0 and f"{second} is broken" in r.stderr, r.stderr
    assert_read_as(out, [f"im{i}" for i in range(4)], True, [])
    assert run_json(cli, "status", out)["complete"]


# ---- #23.3: one look ---------------------------------------------------------------------------------------------
def test_a_reader_opened_during_a_run_says_complete_only_of_what_it_serves(cli, tmp_path):
    d, out, side = same_size_images(tmp_path / "imgs", 6), tmp_path / "o", tmp_path / "side"
    run_json(cli, "extract", d, *SHARDS, "-o", f"{out}/")
    side.mkdir()
    last = sorted(out.glob("part-*.h5"))[-1]
    late = [p for p in (last, last.with_suffix(".json"), out / "manifest.json", out / INDEX) if p.exists()]
    for p in late:  # the run as it was before its last shard: 4 images done, no manifest yet
        shutil.move(p, side / p.name)
    with open_features(out) as ff:
        for p in late:  # ... and the run ends while the reader is open
            shutil.move(side / p.name, p)
        assert (len(ff), ff.complete) == (4, False)
        assert list(ff) == [f"im{i}" for i in range(4)]
    # the other order: the manifest (complete) lists a shard the look did not see marked: not complete
    marker = last.with_suffix(".json")
    text = marker.read_text()
    marker.unlink()
    assert_read_as(out, [f"im{i}" for i in range(4)], False, [last.name])
    marker.write_text(text)
    assert_read_as(out, [f"im{i}" for i in range(6)], True, [])


# ---- #23.4: one rank count at a time -----------------------------------------------------------------------------
def test_a_run_of_another_rank_count_is_refused_for_every_rank_before_any_writes(cli, tmp_path, monkeypatch):
    from s2cli.fsutil import take_claim
    from s2cli.heartbeat import Heartbeat

    d, out = same_size_images(tmp_path / "imgs"), tmp_path / "o"
    run_json(cli, "extract", d, *SHARDS, "-o", f"{out}/")
    for p in out.iterdir():  # a 1-rank run that has just started: run.json only
        if p.name != "run.json":
            p.unlink()
    claim = take_claim(out / ".rank-00000.lock", "rank 0", fix="")
    beat = Heartbeat(out, 0, 1, "single")
    before = sorted(p.name for p in out.iterdir())
    try:
        r = cli("extract", d, *SHARDS, "-o", f"{out}/", "--devices", "cpu,cpu")
        assert r.exit_code == 2 and "being written by another run" in r.stderr, r.stderr
        monkeypatch.setenv("RANK", "1")  # rank 1 of a 2-rank launch: its own rank is free, the folder is not
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(ConfigError, match="a run of 1 ranks"):
            s2cli.extract(str(d), f"{out}/", shard_size=2, **TINY)
        assert sorted(p.name for p in out.iterdir()) == before  # nothing written by any rank
    finally:
        beat.close("done")
        claim.release()
    # a run still preparing (its claim taken, no heartbeat yet): its claim's record says its rank count
    claim = take_claim(out / ".rank-00000.lock", "rank 0", fix="", info={"rank": 0, "world": 1})
    try:
        with pytest.raises(ConfigError, match="a run of 1 ranks"):
            s2cli.extract(str(d), f"{out}/", shard_size=2, **TINY)
        assert not list(out.glob("part-*"))
    finally:
        claim.release()


# ---- #25: markers list their keys; one index; nothing opened that is not read ------------------------------------
def test_a_marker_lists_its_shards_keys_shape_and_dtype_and_the_index_lists_every_marker(cli, tmp_path):
    out = tmp_path / "o"
    run_json(cli, "extract", same_size_images(tmp_path / "imgs", 6), *SHARDS, "--format", "safetensors", "-o", f"{out}/")
    index = json.loads((out / INDEX).read_text())["markers"]
    assert sorted(index) == sorted(p.name for p in out.glob("part-*.json"))
    for p in sorted(out.glob("part-*.safetensors")):
        m = json.loads(p.with_suffix(".json").read_text())
        assert index[p.with_suffix(".json").name][1] == m
        with open_features(p) as r:
            assert (m["keys"], m["shape"], m["dtype"]) == (list(r), r.feature_shape, r.dtype)


def test_a_folder_opens_inspects_and_feeds_a_dataset_without_opening_every_shard(cli, tmp_path, monkeypatch):
    from s2cli import readers

    out = tmp_path / "o"
    run_json(cli, "extract", same_size_images(tmp_path / "imgs", 6), *SHARDS, "-o", f"{out}/")
    opened = []
    real = readers._open_file
    monkeypatch.setattr(readers, "_open_file", lambda p, **kw: opened.append(Path(p).name) or real(p, **kw))
    with open_features(out) as ff:
        assert len(ff) == 6 and ff.complete and len(opened) <= 1  # the attributes (what layers it holds): one shard
        opened.clear()
        assert ff["im5"].shape == tuple(ff.feature_shape) and opened == ["part-00000-00002.h5"]
    opened.clear()
    info = run_json(cli, "inspect", out)
    assert info["num_images"] == 6 and info["feature_shape"] and len(opened) <= 1  # attributes: from one shard
    ds = s2cli.FeatureDataset(out)
    opened.clear()
    worker = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker gets (spawn): the folder as looked at once
    assert worker[5]["key"] == "im5" and opened[-1] == "part-00000-00002.h5" and len(opened) <= 2  # + attributes
    ds.close()
    worker.close()


def test_the_index_is_a_cache_a_changed_marker_or_a_damaged_index_is_read_again(cli, tmp_path):
    out = tmp_path / "o"
    run_json(cli, "extract", same_size_images(tmp_path / "imgs"), *SHARDS, "-o", f"{out}/")
    marker = sorted(out.glob("part-*.json"))[0]
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "note": "rewritten"}))
    assert OutputDir(out).markers()[0]["note"] == "rewritten"
    (out / INDEX).write_text('{"version": 1, "mark')
    assert [m["shard"] for m in OutputDir(out).markers()] == ["part-00000-00000.h5", "part-00000-00001.h5"]
    run_json(cli, "extract", same_size_images(tmp_path / "imgs"), *SHARDS, "-o", f"{out}/")  # a rerun rewrites it
    assert json.loads((out / INDEX).read_text())["markers"][marker.name][1]["note"] == "rewritten"


def test_a_finished_folders_rerun_answers_without_loading_the_model(cli, tmp_path, monkeypatch):
    from s2cli import api

    d, out = same_size_images(tmp_path / "imgs"), tmp_path / "o"
    run_json(cli, "extract", d, *SHARDS, "-o", f"{out}/")

    def no_model(*a, **k):
        raise AssertionError("the model was loaded for a finished folder")

    monkeypatch.setattr(api, "load", no_model)
    s = run_json(cli, "extract", d, *SHARDS, "-o", f"{out}/")
    assert (s["num_images"], s["resumed_images"], s["total_images"], s["complete"]) == (0, 4, 4, True)
    (out / sorted(p.name for p in out.glob("part-*.json"))[-1]).unlink()  # work left: the model is needed
    r = cli("extract", d, *SHARDS, "-o", f"{out}/")
    assert r.exit_code == 1 and "the model was loaded" in str(r.exception)

