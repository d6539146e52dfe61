"""Input kinds: single files and globs, parquet/Arrow tables (img2dataset's layout, HF datasets on disk and on the
loopback hub), torch and `datasets` Datasets in Python, and a toy kind registered from here: each extracts the
features the same images give from a folder."""
from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from hubserver import closed_port
from PIL import Image

import s2cli
from conftest import FAST, rng_rgb, run_cli, slowed_s2, wait_until
from s2cli import open_features
from s2cli.errors import ConfigError
from s2cli.inputs.kind import InputKind
from s2cli.inputs.resolve import open_input, register, unregister
from s2cli.inputs.samples import Sample

LIB = dict(model="timm:test_resnet", random_init=True, img_sizes=(64, 128), max_split_size=64, workers=0)
SIZES = [(40, 52), (48, 36), (44, 44), (60, 30), (36, 50)]


def arrays() -> list[np.ndarray]:
    return [rng_rgb(i, hw) for i, hw in enumerate(SIZES)]


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def folder_of(d: Path, keys: list[str], ext: str = "png") -> Path:
    """The images of `arrays()` as PNG files named by `keys` (the reference every other kind is compared to)."""
    for k, a in zip(keys, arrays()):
        (d / f"{k}.{ext}").parent.mkdir(parents=True, exist_ok=True)
        (d / f"{k}.{ext}").write_bytes(png(a))
    return d


def features(path: Path | str) -> dict[str, np.ndarray]:
    with open_features(path) as ff:
        return {k: np.asarray(ff[k]) for k in ff}


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=0)


ROWS = [f"{i:08d}" for i in range(len(SIZES))]  # keys of a table or dataset without a key column: row numbers


@pytest.fixture
def reference(tmp_path) -> dict[str, np.ndarray]:
    """Features of the five images read from a folder, keyed by row number."""
    d = folder_of(tmp_path / "ref", ROWS)
    s2cli.extract(str(d), str(tmp_path / "ref.h5"), **LIB)
    return features(tmp_path / "ref.h5")


# ---- single files and globs ---------------------------------------------------------------------------------------
def test_a_single_image_and_a_glob_extract_as_from_their_folder(tmp_path):
    d = folder_of(tmp_path / "photos", ["a", "sub/b", "sub/c", "d", "e"])
    s2cli.extract(str(d), str(tmp_path / "ref.h5"), **LIB)
    ref = features(tmp_path / "ref.h5")
    s2cli.extract(str(d / "sub" / "b.png"), str(tmp_path / "one.h5"), **LIB)
    assert_same(features(tmp_path / "one.h5"), {"b": ref["sub/b"]})
    s2cli.extract(f"{d}/**/*.png", str(tmp_path / "glob.h5"), **LIB)
    assert_same(features(tmp_path / "glob.h5"), ref)
    s2cli.extract(f"{d}/sub/*.png", str(tmp_path / "sub.h5"), **LIB)
    assert_same(features(tmp_path / "sub.h5"), {"b": ref["sub/b"], "c": ref["sub/c"]})


def test_s2_extract_of_one_photo_names_its_output_after_it(cli, tmp_path, monkeypatch):
    d = folder_of(tmp_path / "p", ["photo", "x", "y", "z", "w"], ext="jpg")
    monkeypatch.chdir(tmp_path)
    r = cli("extract", d / "photo.jpg", *FAST, "-o", "photo.h5")
    assert r.exit_code == 0, r.stderr
    assert list(features(tmp_path / "photo.h5")) == ["photo"]


# ---- tables ------------------------------------------------------------------------------------------------------
def img2dataset_parquet(path: Path, row_group_size: int = 2) -> Path:
    """img2dataset's parquet output: key, jpg (the bytes; PNG here, lossless), caption, url, width, height."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"key": ROWS, "jpg": [png(a) for a in arrays()], "caption": [f"caption {i}" for i in range(len(ROWS))],
            "url": [f"https://example.com/{i}.jpg" for i in range(len(ROWS))],
            "width": [a.shape[1] for a in arrays()], "height": [a.shape[0] for a in arrays()]}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path, row_group_size=row_group_size)
    return path


def test_img2dataset_parquet_extracts_as_the_folder_and_keeps_caption_and_url(tmp_path, reference):
    p = img2dataset_parquet(tmp_path / "data" / "00000.parquet")
    s = s2cli.extract(str(p), str(tmp_path / "t.h5"), **LIB)
    assert s.num_images == 5 and s.num_failed == 0
    assert_same(features(tmp_path / "t.h5"), reference)
    with open_features(tmp_path / "t.h5") as ff:
        meta = ff.meta("00000003")["meta"]
        meta = json.loads(meta) if isinstance(meta, str) else meta
    assert meta["caption"] == "caption 3" and meta["url"] == "https://example.com/3.jpg" and meta["width"] == 30
    s2cli.extract(str(tmp_path / "data"), str(tmp_path / "f.h5"), **LIB)  # a folder of parquet files
    assert_same(features(tmp_path / "f.h5"), reference)


def test_a_table_names_its_columns_and_refuses_a_missing_one(tmp_path, reference):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [f"x{i}" for i in range(5)], "picture": [png(a) for a in arrays()]}), p)
    with pytest.raises(ConfigError, match="no image column") as e:
        s2cli.plan(str(p))
    assert "--image-column" in str(e.value) and "picture" in str(e.value)
    s2cli.extract(str(p), str(tmp_path / "t.h5"), image_column="picture", key_column="id", **LIB)
    assert_same(features(tmp_path / "t.h5"), {f"x{i}": reference[k] for i, k in enumerate(ROWS)})
    with pytest.raises(ConfigError, match="--image-column names a table's image column"):
        s2cli.plan(str(tmp_path / "ref"), image_column="jpg")  # a folder of images takes no --image-column


def hf_dataset():
    import datasets

    return datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in arrays()], "label": list(range(5))},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "label": datasets.Value("int64")}))


def test_an_hf_dataset_saved_with_save_to_disk_extracts_as_the_folder(tmp_path, reference):
    ds = hf_dataset()
    ds.save_to_disk(str(tmp_path / "saved"))
    s2cli.extract(str(tmp_path / "saved"), str(tmp_path / "s.h5"), **LIB)
    assert_same(features(tmp_path / "s.h5"), reference)
    s2cli.extract(ds, str(tmp_path / "mem.h5"), **LIB)  # and the same dataset in memory
    assert_same(features(tmp_path / "mem.h5"), reference)


# ---- Python datasets -----------------------------------------------------------------------------------------------
class PilImages:
    """A torch map-style Dataset of PIL images."""

    def __len__(self):
        return len(SIZES)

    def __getitem__(self, i):
        return Image.fromarray(arrays()[i])


def test_a_torch_map_style_dataset_of_pil_images_extracts_as_the_folder(tmp_path, reference):
    from torch.utils.data import Dataset

    class Ds(PilImages, Dataset):
        pass

    s2cli.extract(Ds(), str(tmp_path / "m.h5"), **LIB)
    assert_same(features(tmp_path / "m.h5"), reference)


def test_an_iterable_dataset_of_tensors_with_keys_extracts_as_the_folder(tmp_path, reference):
    import torch
    from torch.utils.data import IterableDataset

    class Tensors(IterableDataset):
        def __iter__(self):
            for i, a in enumerate(arrays()):
                yield {"key": ROWS[i], "image": torch.from_numpy(a).permute(2, 0, 1).contiguous(), "label": i}

    s = s2cli.extract(Tensors(), str(tmp_path / "i.h5"), **LIB)
    assert s.num_images == 5
    assert_same(features(tmp_path / "i.h5"), reference)
    with open_features(tmp_path / "i.h5") as ff:
        meta = ff.meta(ROWS[2])["meta"]
    assert (json.loads(meta) if isinstance(meta, str) else meta) == {"label": 2}


def test_a_dataset_of_unusable_items_is_refused_in_one_line(tmp_path):
    import torch
    from torch.utils.data import Dataset

    class Floats(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.rand(3, 8, 8)  # normalized float pixels: not an image s2cli can fit

    with pytest.raises(ConfigError, match="holds no image") as e:
        s2cli.extract(Floats(), str(tmp_path / "x.h5"), **LIB)
    assert "\n" not in str(e.value) and "uint8" in str(e.value)
    assert not (tmp_path / "x.h5").exists()


def test_a_map_style_dataset_resumes_by_its_done_units(tmp_path, reference):
    calls: list[int] = []

    class Counted(PilImages):
        def __getitem__(self, i):
            calls.append(i)
            return super().__getitem__(i)

    out = f"{tmp_path / 'o'}/"
    s2cli.extract(Counted(), out, shard_size=2, **LIB)
    calls.clear()
    s = s2cli.extract(Counted(), out, shard_size=2, **LIB)
    assert s.resumed_images == 5 and calls == [0]  # only the first item, read to check the dataset's items
    assert_same(features(tmp_path / "o"), reference)


# ---- a toy kind, registered from here ------------------------------------------------------------------------------
class ToyKind(InputKind):
    """`toy:N`: the first N images of `arrays()`, keyed `t0`, `t1`, ..., read as a stream."""

    name = "toy"
    streamed = True

    def detect(self, spec, opts):
        return isinstance(spec, str) and spec.startswith("toy:")

    def open(self, spec, opts):
        from s2cli.inputs.units import Unit

        n = int(spec[4:])
        return self.input(spec, [Unit(0, spec, kind=self, ref=n, rows=n)], n)

    def read(self, unit):
        for i in range(unit.ref):
            yield Sample(f"t{i}", f"toy#{i}", data=png(arrays()[i]))


def test_a_toy_input_kind_registered_from_a_test_runs_end_to_end(tmp_path, reference):
    register(ToyKind(), first=True)
    try:
        s = s2cli.extract("toy:3", f"{tmp_path / 'o'}/", **LIB)
        assert s.num_images == 3
        assert_same(features(tmp_path / "o"), {f"t{i}": reference[ROWS[i]] for i in range(3)})
        assert s2cli.plan("toy:2", input_format="toy")["num_images"] == 2
    finally:
        unregister("toy")


# ---- a killed run over a table resumes -----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_killed_run_over_parquet_resumes_to_the_clean_result(tmp_path):
    p = img2dataset_parquet(tmp_path / "t.parquet", row_group_size=2)
    opts = [*FAST[:-2], "-j", "0", "-b", "1", "--shard-size", "2", "-q"]
    clean = tmp_path / "clean"
    r = run_cli("extract", p, "-o", f"{clean}/", *opts)  # the reference: in this process
    assert r.exit_code == 0, r.stderr
    out = tmp_path / "out"
    proc = slowed_s2(0.5, "extract", p, "-o", f"{out}/", *opts)
    try:
        wait_until(lambda: (out / "part-00000-00000.json").exists(), "the first shard's marker")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (out / "manifest.json").exists() or not json.loads((out / "manifest.json").read_text())["complete"]
    r = run_cli("extract", p, "-o", f"{out}/", *opts, "--json")  # the resume: in this process
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["resumed_images"] >= 2
    assert_same(features(out), features(clean))
    marker = json.loads((out / "part-00000-00000.json").read_text())
    assert marker["row_group"] == 0 and marker["table_bytes"] == p.stat().st_size  # content-identified like a tar


# ---- #23 items 14-16: odd file names, keys that clash once printed, files that are no files ----------------------
def test_a_list_naming_a_file_whose_name_is_not_utf8_reads_it_as_a_folder_does(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    raw = os.fsencode(str(d)) + b"/caf\xe9.png"
    with open(raw, "wb") as fh:
        fh.write(png(arrays()[0]))
    (d / "list.txt").write_bytes(b"caf\xe9.png\n")
    (d / "list.csv").write_bytes(b"path,caption\ncaf\xe9.png,caf\xe9 au lait\n")
    s2cli.extract(str(d / "list.txt"), str(tmp_path / "t.h5"), **LIB)
    s2cli.extract(str(d / "list.csv"), str(tmp_path / "c.h5"), **LIB)
    (d / "list.txt").unlink()
    (d / "list.csv").unlink()
    s2cli.extract(str(d), str(tmp_path / "f.h5"), **LIB)
    want = features(tmp_path / "f.h5")
    assert list(want) == ["caf\\xe9"]
    assert_same(features(tmp_path / "t.h5"), want)
    assert_same(features(tmp_path / "c.h5"), want)


def test_two_names_that_print_as_one_key_are_refused_naming_both(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    with open(os.fsencode(str(d)) + b"/caf\xe9.png", "wb") as fh:
        fh.write(png(arrays()[0]))
    (d / "caf\\xe9.jpg").write_bytes(png(arrays()[1]))  # a name holding a backslash, x, e, 9
    with pytest.raises(ConfigError, match="keys are shared") as e:
        s2cli.plan(str(d))
    assert "caf\\xe9.png" in str(e.value) and "caf\\xe9.jpg" in str(e.value)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_fifo_named_like_an_image_is_a_failure_record_whatever_the_workers(cli, tmp_path, workers):
    d = folder_of(tmp_path / "in", ["a", "b", "c", "d", "e"])
    os.mkfifo(d / "pipe.jpg")  # opening it would block until a writer comes: never
    r = cli("extract", d, *FAST[:-2], "-j", workers, "--decode-timeout", 20, "-o", tmp_path / "o.h5")
    assert r.exit_code == 0, r.stderr
    with open_features(tmp_path / "o.h5") as ff:
        assert sorted(ff) == ["a", "b", "c", "d", "e"]
        [f] = ff.failures
    assert (f["key"], f["stage"], f["error_class"]) == ("pipe", "read", "NotAFileError") and "FIFO" in f["error"]
    r = cli("extract", d, *FAST, "--dry-run", "--json")  # the dry run reads headers: it must not block either
    assert r.exit_code == 0, r.stderr


def hub_parquet(folder: Path, rows: slice = slice(None), name: str = "train-00000-of-00001.parquet") -> Path:
    """The rows of `hf_dataset()` as parquet (row groups of 2) in `folder/data/`, as a hub dataset repo holds them."""
    import pyarrow.parquet as pq

    table = hf_dataset().data.table.slice(rows.start or 0, (rows.stop or 5) - (rows.start or 0))
    (folder / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "data" / name, row_group_size=2)
    return folder


def test_the_same_dataset_on_the_loopback_hub_as_parquet_extracts_as_the_folder(tmp_path, reference, hub,
                                                                                 monkeypatch):
    hub_parquet(tmp_path / "repo")
    hub.add("org/tiny", tmp_path / "repo", repo_type="dataset")
    s2cli.extract("hf://datasets/org/tiny", str(tmp_path / "h.h5"), **LIB)
    assert_same(features(tmp_path / "h.h5"), reference)
    with pytest.raises(ConfigError, match="no such dataset on the hub"):
        s2cli.plan("hf://datasets/org/missing")
    with pytest.raises(ConfigError, match="no such revision"):
        s2cli.plan("hf://datasets/org/tiny@nope")
    down = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", down)
    with pytest.raises(ConfigError, match="cannot be reached") as e:  # the hub down: one line, naming it
        s2cli.plan("hf://datasets/org/tiny")
    assert "\n" not in str(e.value) and down in str(e.value)


def test_a_hub_dataset_is_listed_through_hffilesystem_and_each_file_downloaded_once_into_the_hf_cache(
        tmp_path, reference, hub):
    repo = hub_parquet(tmp_path / "repo", slice(0, 3), "train-00000-of-00002.parquet")
    hub_parquet(repo, slice(3, 5), "train-00001-of-00002.parquet")
    (repo / "README.md").write_text("a dataset card")
    hub.add("org/two", repo, repo_type="dataset")
    inp = open_input("hf://datasets/org/two")  # its row groups from the footers, by range requests: no download
    assert (inp.total, [u.id for u in inp.units]) == (5, ["data/train-00000-of-00002.parquet#rg0",
                                                          "data/train-00000-of-00002.parquet#rg1",
                                                          "data/train-00001-of-00002.parquet#rg0"])
    assert not hub.downloads and hub.ranges
    assert any(p.startswith("/api/datasets/org/two/tree/") for _, p in hub.requests)  # HfFileSystem's listing
    s = s2cli.extract("hf://datasets/org/two", f"{tmp_path / 'o'}/", shard_size=2, **LIB)
    assert s.num_images == 5
    assert_same(features(tmp_path / "o"), reference)
    files = {("datasets/org/two", f"data/train-0000{i}-of-00002.parquet") for i in (0, 1)}
    assert dict(hub.downloads) == dict.fromkeys(files, 1)  # each .parquet file once, never the card
    blobs = Path(os.environ["HF_HOME"]) / "hub" / "datasets--org--two" / "blobs"
    assert len(list(blobs.iterdir())) == 2  # in the HF cache, as model weights are
    s2cli.extract("hf://datasets/org/two", str(tmp_path / "again.h5"), **LIB)
    assert dict(hub.downloads) == dict.fromkeys(files, 1)  # another run reads the cache
    assert_same(features(tmp_path / "again.h5"), reference)
    marker = json.loads((tmp_path / "o" / "part-00000-00000.json").read_text())
    assert marker["unit"] == "data/train-00000-of-00002.parquet#rg0" and len(marker["table_etag"]) == 64


def test_a_hub_dataset_read_once_resumes_and_extracts_offline_from_the_cache(tmp_path, reference, hub, monkeypatch):
    hub_parquet(tmp_path / "repo")
    hub.add("org/tiny", tmp_path / "repo", repo_type="dataset")
    out = f"{tmp_path / 'o'}/"
    s2cli.extract("hf://datasets/org/tiny", out, shard_size=2, **LIB)
    asked = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = s2cli.extract("hf://datasets/org/tiny", out, shard_size=2, **LIB)  # the same files, the same identities
    assert s.resumed_images == 5 and s.num_images == 0
    s2cli.extract("hf://datasets/org/tiny@main", str(tmp_path / "off.h5"), **LIB)
    assert_same(features(tmp_path / "off.h5"), reference)
    assert len(hub.requests) == asked  # nothing asked of the hub
    with pytest.raises(ConfigError, match="not in the HF cache and HF_HUB_OFFLINE=1") as e:
        s2cli.plan("hf://datasets/org/other")
    assert "hf download org/other --repo-type dataset" in str(e.value)


def test_an_offline_run_names_the_hub_files_missing_from_the_cache(tmp_path, hub, monkeypatch):
    repo = hub_parquet(tmp_path / "repo", slice(0, 3), "a.parquet")
    hub_parquet(repo, slice(3, 5), "b.parquet")
    hub.add("org/two", repo, repo_type="dataset")
    s2cli.extract("hf://datasets/org/two", str(tmp_path / "one.h5"), limit=2, **LIB)  # reads a.parquet only
    assert [f for _, f in hub.downloads] == ["data/a.parquet"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="1 of the 2 .parquet files of the hub dataset are not in the HF cache"):
        s2cli.plan("hf://datasets/org/two")  # never a run over half the dataset


def test_a_path_inside_a_hub_dataset_picks_a_file_a_folder_or_a_glob_of_its_parquet_files(tmp_path, hub):
    from s2cli.inputs.hubdata import parse

    repo = hub_parquet(tmp_path / "repo", slice(0, 3), "a.parquet")
    hub_parquet(repo, slice(3, 5), "b.parquet")
    hub.add("org/two", repo, repo_type="dataset")
    rows = {spec: open_input(spec).total for spec in (
        "hf://datasets/org/two", "hf://datasets/org/two/data/b.parquet", "hf://datasets/org/two@main/data",
        "hf://datasets/org/two@main/data/[ab].parquet", "hf://datasets/org/two/data/a*")}
    assert list(rows.values()) == [5, 2, 5, 5, 3]
    with pytest.raises(ConfigError, match="no .parquet files at data/c.parquet"):
        open_input("hf://datasets/org/two/data/c.parquet")
    assert parse("hf://datasets/org/two@refs/convert/parquet/default/train") == (
        "org/two", "refs/convert/parquet", "default/train")
    assert parse("hf://datasets/org/two@refs%2Fpr%2F1") == ("org/two", "refs/pr/1", "")
    with pytest.raises(ConfigError, match="not a hub dataset URL"):
        parse("hf://datasets/org")


def test_a_new_commit_of_a_hub_dataset_redoes_only_the_files_it_changed(tmp_path, hub):
    repo = hub_parquet(tmp_path / "repo", slice(0, 3), "a.parquet")
    hub_parquet(repo, slice(3, 5), "b.parquet")
    hub.add("org/two", repo, repo_type="dataset")
    out = f"{tmp_path / 'o'}/"
    first = s2cli.extract("hf://datasets/org/two", out, shard_size=2, **LIB)
    hub_parquet(repo, slice(0, 2), "b.parquet")  # b.parquet rewritten: other rows
    hub.add("org/two", repo, repo_type="dataset")  # main moves to the new commit
    again = s2cli.extract("hf://datasets/org/two", out, shard_size=2, **LIB)
    assert (first.num_images, again.resumed_images, again.num_images) == (5, 3, 2)
    with open_features(tmp_path / "o") as ff:
        assert ff.complete and len(ff) == 5


def test_a_single_video_file_extracts_as_from_its_folder(cli, tmp_path):
    pytest.importorskip("av")
    from test_video import make_video

    d = tmp_path / "clips"
    make_video(d / "clip.mp4", n=12)
    make_video(d / "other.mp4", n=8)
    for src, out in ((d, "f.h5"), (d / "clip.mp4", "one.h5")):
        r = cli("extract", src, *FAST, "--num-frames", "3", "-o", tmp_path / out)
        assert r.exit_code == 0, r.stderr
    with open_features(tmp_path / "f.h5") as ff, open_features(tmp_path / "one.h5") as fo:
        assert list(fo) == ["clip"] and fo["clip"].shape[0] == 3
        np.testing.assert_allclose(fo["clip"], ff["clip"], atol=1e-5, rtol=0)
        assert fo.meta("clip")["frame_indices"] == ff.meta("clip")["frame_indices"]


# ---- a decode worker killed mid-run ---------------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


@pytest.mark.slow
def test_a_decode_worker_killed_mid_run_loses_no_image_and_the_run_ends_0(tmp_path):
    keys = [f"im{i:02d}" for i in range(10)]
    d = tmp_path / "in"
    for i, k in enumerate(keys):
        (d / f"{k}.png").parent.mkdir(parents=True, exist_ok=True)
        (d / f"{k}.png").write_bytes(png(rng_rgb(i, (40 + i, 52))))
    opts = [*FAST[:-2], "-j", "2", "-b", "1", "--shard-size", "2", "-q", "--decode-timeout", "600"]
    clean = tmp_path / "clean"
    r = run_cli("extract", d, "-o", f"{clean}/", *opts)  # the reference: in this process
    assert r.exit_code == 0, r.stderr
    out = tmp_path / "out"
    proc = slowed_s2(0.5, "extract", d, "-o", f"{out}/", *opts, "--json")
    try:
        wait_until(lambda: (out / "part-00000-00000.json").exists(), "the first shard's marker")
        workers = children(proc.pid)
        assert workers, "no decode worker found"
        os.kill(workers[0], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr
    s = json.loads(stdout)
    assert s["num_images"] == 10 and s["num_failed"] == 0  # its samples were decoded again by a new pool
    assert_same(features(out), features(clean))


def test_input_format_dataset_refuses_a_path(tmp_path):
    with pytest.raises(ConfigError, match="Python dataset"):
        s2cli.plan(str(tmp_path), input_format="dataset")
