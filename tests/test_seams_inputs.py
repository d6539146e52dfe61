"""Where the new input kinds meet the rest (#24): map-style datasets resumed by their keys (a dataset that changed
redoes the units whose keys moved, never leaving features under a key the dataset no longer holds there); tables,
HF datasets, torch Datasets and single files/globs with --devices, s3:// outputs, --retry-failed, export and the
readers; Path inputs and outputs."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_inputs import LIB, arrays, assert_same, features, folder_of, png

import s2cli
from s2cli import open_features

NAMES = ["ant", "bee", "cat", "dog", "elk"]


class Keyed:
    """A map-style dataset of dict items {key, image, label} in the given order of `arrays()`; `reads` counts
    __getitem__ calls; `stop_at`: the index whose read is interrupted (Ctrl-C), once."""

    def __init__(self, order=(0, 1, 2, 3, 4), stop_at: int | None = None):
        self.order, self.stop_at, self.reads = list(order), stop_at, 0

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        if i == self.stop_at:
            self.stop_at = None
            raise KeyboardInterrupt
        self.reads += 1
        j = self.order[i]
        return {"key": NAMES[j], "image": Image.fromarray(arrays()[j]), "label": j}


class Slowed(Keyed):
    """Keyed, each item read `seconds` late (a run slow enough to be killed mid-way)."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def __getitem__(self, i):
        time.sleep(self.seconds)
        return super().__getitem__(i)


@pytest.fixture(scope="module")
def by_name(tmp_path_factory) -> dict[str, np.ndarray]:
    """Features of the five images read from a folder, keyed by NAMES (made once for the module)."""
    d = tmp_path_factory.mktemp("by-name")
    s2cli.extract(str(folder_of(d / "ref", NAMES)), str(d / "ref.h5"), **LIB)
    return features(d / "ref.h5")


def test_a_map_style_dataset_interrupted_resumes_to_the_same_result(tmp_path, by_name):
    out = f"{tmp_path / 'o'}/"
    with pytest.raises(KeyboardInterrupt):
        s2cli.extract(Keyed(stop_at=3), out, shard_size=2, **LIB)
    s = s2cli.extract(Keyed(), out, shard_size=2, **LIB)
    assert (s.resumed_images, s.num_images) == (2, 3)
    assert_same(features(tmp_path / "o"), by_name)


@pytest.mark.slow
def test_a_map_style_dataset_run_killed_with_sigkill_resumes_to_the_same_result(tmp_path, by_name):
    import os
    import signal
    import subprocess
    import sys

    from conftest import wait_until

    out = tmp_path / "o"
    script = tmp_path / "run.py"  # the dataset in a process of its own, each item slowed so the kill lands mid-run
    script.write_text(f"""
import s2cli
from test_seams_inputs import LIB, Slowed

s2cli.extract(Slowed(0.4), {str(out) + "/"!r}, shard_size=1, batch_size=1, **LIB)
""")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(script)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: len(list(out.glob("part-*.json"))) >= 2 or proc.poll() is not None, "two done shards")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    s = s2cli.extract(Slowed(0), f"{out}/", shard_size=1, batch_size=1, **LIB)
    assert 2 <= s.resumed_images < 5 and s.resumed_images + s.num_images == 5
    assert_same(features(out), by_name)


def test_a_map_style_dataset_whose_keys_moved_redoes_those_units_and_no_feature_stays_under_a_wrong_key(
        tmp_path, by_name):
    out = f"{tmp_path / 'o'}/"
    s2cli.extract(Keyed(), out, shard_size=2, **LIB)
    again = Keyed(order=(0, 1, 2, 4, 3))  # the last two items swapped: units [2:4] and [4:5] hold other keys now
    s = s2cli.extract(again, out, shard_size=2, **LIB)
    assert (s.resumed_images, s.num_images) == (2, 3)
    got = features(tmp_path / "o")
    assert_same(got, by_name)  # every key has its own image's features
    with open_features(tmp_path / "o") as ff:
        assert ff.complete and len(ff) == 5 and ff.meta("dog")["meta"]
    grown = Keyed(order=(0, 1, 2, 4, 3, 0))  # an item added to the last unit (its key met before: a failure record)
    s = s2cli.extract(grown, out, shard_size=2, **LIB)
    assert (s.resumed_images, s.num_images, s.num_failed) == (4, 1, 1)
    assert_same(features(tmp_path / "o"), by_name)


def test_a_datasets_dataset_resumes_by_its_key_column_and_redoes_what_moved(tmp_path, by_name):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"key": NAMES, "image": [Image.fromarray(a) for a in arrays()]},
                                    features=datasets.Features({"key": datasets.Value("string"),
                                                                "image": datasets.Image()}))
    out = f"{tmp_path / 'o'}/"
    s2cli.extract(ds, out, shard_size=2, **LIB)
    s = s2cli.extract(ds.select([1, 0, 2, 3, 4]), out, shard_size=2, **LIB)  # the first unit's keys swapped
    assert (s.resumed_images, s.num_images) == (3, 2)
    assert_same(features(tmp_path / "o"), by_name)


# ---- the input kinds x outputs, stores, --retry-failed, readers ----------------------------------------------------
class Items:
    """A torch map-style Dataset of dict items {key, image, label} (the images of `arrays()`, keys NAMES);
    `bad`: indices whose read raises (a dataset's own failure), `broken`: indices holding bytes that are no image."""

    def __init__(self, bad=(), broken=()):
        self.bad, self.broken = set(bad), set(broken)

    def __len__(self):
        return 5

    def __getitem__(self, i):
        if i in self.bad:
            raise OSError(f"item {i} is on a disk that is down")
        image = b"not an image" if i in self.broken else Image.fromarray(arrays()[i])
        return {"key": NAMES[i], "image": image, "label": i}


def iterable(items: Items):
    """The same items as a torch IterableDataset (one unit: read to learn its keys)."""
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            return (items[i] for i in range(len(items)))

    return Stream()


def _table(path: Path, broken=()) -> Path:
    """img2dataset's parquet layout keyed by NAMES (row groups of 2); rows in `broken` hold bytes that are no image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"key": NAMES, "jpg": [b"not an image" if i in broken else png(a) for i, a in enumerate(arrays())],
            "caption": [f"caption {i}" for i in range(5)], "label": list(range(5))}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path, row_group_size=2)
    return path


def _hf(broken=()):
    import datasets

    return datasets.Dataset.from_dict(
        {"key": NAMES, "image": [{"bytes": b"not an image" if i in broken else png(a), "path": None}
                                 for i, a in enumerate(arrays())], "label": list(range(5))},
        features=datasets.Features({"key": datasets.Value("string"), "image": datasets.Image(decode=False),
                                    "label": datasets.Value("int64")}))


def make_input(kind: str, tmp_path: Path, request, broken=()):
    """An input of `kind` holding the five images keyed by NAMES (`broken`: those indices unreadable), with a
    metadata field `label` where the kind carries metadata; -> (input, its metadata field or None)."""
    if kind == "parquet":
        return str(_table(tmp_path / "t" / "t.parquet", broken)), "caption"
    if kind == "save_to_disk":
        pytest.importorskip("datasets")
        _hf(broken).save_to_disk(str(tmp_path / "saved"))
        return str(tmp_path / "saved"), "label"
    if kind == "hub":
        hub = request.getfixturevalue("hub")
        _table(tmp_path / "repo" / "data" / "train.parquet", broken)
        hub.add("org/seams", tmp_path / "repo", repo_type="dataset")
        return "hf://datasets/org/seams", "caption"
    if kind == "torch":
        return Items(broken=broken), "label"
    if kind == "iterable":
        return iterable(Items(broken=broken)), "label"
    if kind == "datasets":
        pytest.importorskip("datasets")
        return _hf(broken), "label"
    d = folder_of(tmp_path / "imgs", NAMES)
    for i in broken:
        (d / f"{NAMES[i]}.png").write_bytes(b"not an image")
    if kind == "file":
        return str(d / "cat.png"), None
    return f"{d}/*.png", None  # glob


KINDS = ["parquet", "save_to_disk", "hub", "torch", "iterable", "datasets", "file", "glob"]
INNER = ("parquet", "torch")  # the inner loop runs these; the others are marked slow (seconds each)


def kinds(*names: str) -> list:
    return [k if k in INNER else pytest.param(k, marks=pytest.mark.slow) for k in names]


def _want(kind: str, by_name: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"cat": by_name["cat"]} if kind == "file" else by_name


@pytest.mark.parametrize("kind", kinds(*KINDS))
def test_each_input_kind_into_an_s3_folder_reads_back_with_its_metadata_everywhere(kind, s3, tmp_path, request,
                                                                                    by_name, cli):
    from s2cli.dataset import FeatureDataset

    inp, field = make_input(kind, tmp_path, request)
    out = f"s3://{s3.bucket}/{kind}/"
    s = s2cli.extract(inp, out, shard_size=2, **LIB)
    want = _want(kind, by_name)
    assert s.num_images == len(want) and s.num_failed == 0
    with open_features(out) as ff:
        assert ff.complete
        assert_same({k: np.asarray(ff[k]) for k in ff}, want)
        metas = {k: ff.meta(k).get("meta") for k in ff}
    if field is None:
        return
    assert all(field in (m or {}) for m in metas.values())
    ds = FeatureDataset(out)
    assert field in ds[0]["meta"]["meta"]
    r = cli("export", out, "-o", tmp_path / "exp")
    assert r.exit_code == 0, r.stderr
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "exp" / "metadata" / "metadata_0.parquet")
    assert field in table.column_names and table.num_rows == 5
    r = cli("inspect", out, "--key", "dog", "--json")
    assert r.exit_code == 0 and field in r.stdout, r.stderr


@pytest.mark.parametrize("kind", kinds("parquet", "hub", "torch", "iterable", "datasets", "glob"))
def test_retry_failed_over_each_input_kind_retries_the_fixed_images_only(kind, tmp_path, request, by_name):
    out = f"{tmp_path / 'o'}/"
    inp, _ = make_input(kind, tmp_path, request, broken=(3,))
    first = s2cli.extract(inp, out, shard_size=2, **LIB)
    assert (first.num_images, first.num_failed) == (4, 1)
    fixed, _ = make_input(kind, tmp_path, request)  # the same input with the image fixed (a new commit on the hub)
    again = s2cli.extract(fixed, out, shard_size=2, retry_failed=True, **LIB)
    assert (again.num_images, again.num_failed) == (1, 0)
    assert_same(features(tmp_path / "o"), by_name)


# ---- several ranks ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", kinds("torch", "datasets"))
def test_a_python_dataset_split_over_two_ranks_equals_one_rank(kind, tmp_path, request, by_name, monkeypatch):
    """A Python object cannot be sent to --devices workers: each rank's process calls s2cli.extract on its own copy
    (torchrun's RANK/WORLD_SIZE, here one process after the other)."""
    inp, _ = make_input(kind, tmp_path, request)
    out = f"{tmp_path / 'o'}/"
    done = 0
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        done += s2cli.extract(inp, out, shard_size=2, **LIB).num_images
    assert done == 5
    with open_features(tmp_path / "o") as ff:
        assert ff.complete
    assert_same(features(tmp_path / "o"), by_name)


def test_devices_from_python_is_refused_in_one_line_with_the_way_to_run_ranks(tmp_path):
    with pytest.raises(s2cli.errors.ConfigError, match="cannot be sent to its workers") as e:
        s2cli.extract(Items(), f"{tmp_path / 'o'}/", devices="cpu,cpu", **LIB)
    assert "\n" not in str(e.value) and "torchrun" in str(e.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["parquet", "save_to_disk", "hub", "file", "glob"])
def test_devices_cpu_cpu_over_each_path_input_kind_equals_one_rank(kind, tmp_path, request, by_name, cli):
    from conftest import FAST

    inp, _ = make_input(kind, tmp_path, request)
    r = cli("extract", inp, *FAST, "--devices", "cpu,cpu", "--shard-size", 2, "-o", f"{tmp_path / 'o'}/", "--json")
    assert r.exit_code == 0, r.stderr + r.stdout
    with open_features(tmp_path / "o") as ff:
        assert ff.complete
    assert_same(features(tmp_path / "o"), _want(kind, by_name))


@pytest.mark.slow
def test_devices_cpu_cpu_from_a_hub_dataset_into_an_s3_folder(tmp_path, request, by_name, cli, s3):
    from conftest import FAST

    inp, _ = make_input("hub", tmp_path, request)
    out = f"s3://{s3.bucket}/dev/"
    r = cli("extract", inp, *FAST, "--devices", "cpu,cpu", "--shard-size", 2, "-o", out, "--json")
    assert r.exit_code == 0, r.stderr + r.stdout
    assert [w["summary"]["num_images"] for w in json.loads(r.stdout)["workers"]] == [3, 2]  # units 0, 2 and 1
    s3.invalidate_cache()
    with open_features(out) as ff:
        assert ff.complete
        assert_same({k: np.asarray(ff[k]) for k in ff}, by_name)


# ---- paths (os.PathLike) in, and probe over an S3 output ----------------------------------------------------------
def test_paths_given_as_pathlib_work_wherever_a_string_path_does(tmp_path, by_name):
    src = folder_of(tmp_path / "imgs", NAMES)
    table = _table(tmp_path / "t" / "t.parquet")
    assert s2cli.plan(src, **LIB)["num_images"] == 5
    assert s2cli.plan(table, tmp_path / "p.h5", **LIB)["num_images"] == 5
    assert s2cli.extract(table, tmp_path / "t.safetensors", **LIB).num_images == 5
    assert s2cli.extract(src / "cat.png", tmp_path / "c.h5", **LIB).num_images == 1
    s = s2cli.extract(src, tmp_path / "o", shard_size=2, **LIB)  # a Path without a suffix: an output folder
    assert s.shards_written == 3
    for out in ("t.safetensors", "o"):
        assert_same(features(tmp_path / out), by_name)
    assert s2cli.settings(src, tmp_path / "x.h5", **LIB).input == str(src)


@pytest.mark.slow  # extracts with a random-init model (seconds)
def test_probe_scores_outputs_on_s3_as_it_scores_them_locally(s3, tmp_path):
    pytest.importorskip("sklearn")
    from test_probe import TINY, labelled_folder

    data = labelled_folder(tmp_path / "data")
    local = [tmp_path / "a.h5", tmp_path / "b.h5"]
    remote = [f"s3://{s3.bucket}/a/", f"s3://{s3.bucket}/b/"]
    for sizes, here, there in zip(((64,), (64, 128)), local, remote):
        s2cli.extract(data, here, img_sizes=sizes, seed=1, **TINY)
        s2cli.extract(data, there, img_sizes=sizes, seed=1, shard_size=3, **TINY)
    want = s2cli.probe(local, folds=2, k=3, seed=1)
    got = s2cli.probe(remote, folds=2, k=3, seed=1)
    assert [v.source for v in got.variants] == [r.rstrip("/") for r in remote]
    assert [(v.probe_accuracy, v.knn_accuracy) for v in got.variants] == [
        (v.probe_accuracy, v.knn_accuracy) for v in want.variants]
    s3.put(str(local[0]), f"{s3.bucket}/up/a.h5")  # one file copied up (`aws s3 cp`): refused in one line, not extracted
    with pytest.raises(s2cli.errors.ConfigError, match="not read in place") as e:
        s2cli.probe([f"s3://{s3.bucket}/up/a.h5", remote[1]], folds=2, k=3, seed=1)
    assert "copy it to a local file first" in str(e.value)


def test_s2_slurm_over_a_hub_dataset_fetches_its_files_for_the_offline_tasks(cli, tmp_path, request, monkeypatch):
    from conftest import FAST

    inp, _ = make_input("hub", tmp_path, request)
    r = cli("slurm", inp, *FAST, "-o", f"{tmp_path / 'o'}/", "--ntasks", 2)  # the script only: nothing submitted
    assert r.exit_code == 0, r.stderr
    assert "HF_HUB_OFFLINE=1" in (tmp_path / "o" / "s2-slurm.sbatch").read_text()
    request.getfixturevalue("hub").stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as a task: offline, it reads the files from the cache
    assert s2cli.plan(inp, **LIB)["num_images"] == 5
