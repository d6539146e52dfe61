"""The output-format seam: a toy format (each shard a folder of .npy files and one JSON index) registered from this
test, touching no module of the package, goes through extract, resume, `open_features`, `FeatureDataset`,
`to_hf_dataset` and `s2 inspect`; the registry answers config, outdir and the readers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import s2cli
from s2cli import formats
from s2cli.dtypes import decode, encode
from s2cli.items import StoredItem, record
from s2cli.readers import Reader
from s2cli.writers import ThreadedSink

TINY = dict(model="timm:test_resnet", random_init=True, img_sizes=(64, 128), max_split_size=64, workers=0, pool="mean")


class NpyDirSink(ThreadedSink):
    """Each entry's arrays as `N.features.npy` / `N.pooled.npy` (N: its position), `index.json` last."""

    def _open(self) -> None:
        self.records: list[dict[str, Any]] = []

    def _append(self, items: list[StoredItem]) -> None:
        for it in items:
            n = len(self.records)
            for name in ("features", "pooled"):
                if getattr(it, name) is not None:
                    np.save(self.tmp / f"{n}.{name}.npy", encode(getattr(it, name), self.layout.dtype).codes)
            self.records.append({"key": it.key, **{a.name: a.stored(it) for a in self.layout.attrs()}})

    def _finish(self) -> None:
        (self.tmp / "index.json").write_text(json.dumps({"attrs": {k: v.item() if hasattr(v, "item") else v
                                                                   for k, v in self.attrs.items()},
                                                         "records": self.records, "failures": self.failures}))

    def _discard(self) -> None:
        self.records = []


class NpyDirReader(Reader):
    def __init__(self, path, raw: bool = False):
        self.path, self.raw = Path(path), raw
        index = json.loads((self.path / "index.json").read_text())
        self._attrs, self._failures = index["attrs"], index["failures"]
        self._records = {r["key"]: (i, r) for i, r in enumerate(index["records"])}

    def _array(self, key: str, name: str) -> np.ndarray:
        if key not in self._records:
            raise self._missing(key)
        x = np.load(self.path / f"{self._records[key][0]}.{name}.npy")
        return x if self.raw else decode(x, self.dtype)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._attrs)

    @property
    def failures(self) -> list[dict[str, str]]:
        return list(self._failures)

    @property
    def feature_shape(self):
        return list(self[next(iter(self))].shape) if len(self) else None

    @property
    def dtype(self) -> str:
        return self._attrs["dtype"]

    def __getitem__(self, key: str) -> np.ndarray:
        return self._array(key, "features")

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def pooled(self, key: str) -> np.ndarray:
        return self._array(key, "pooled")

    def meta(self, key: str) -> dict[str, Any]:
        if key not in self._records:
            raise self._missing(key)
        return record(key, self._records[key][1])

    def close(self) -> None:
        pass


@pytest.fixture
def npydir():
    fmt = formats.register(formats.Format("npydir", ".npyd", NpyDirSink, NpyDirReader, store=formats.DIR, remote=False))
    yield fmt
    formats.unregister("npydir")


def _same(a: Reader, b: Reader) -> None:
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a.pooled(k), b.pooled(k))
        assert {n: v for n, v in a.meta(k).items() if n != "shard"} == {n: v for n, v in b.meta(k).items() if n != "shard"}


def test_a_toy_folder_format_round_trips_through_extract_resume_and_every_reader(npydir, image_dir, tmp_path, cli):
    s2cli.extract(str(image_dir), str(tmp_path / "ref.h5"), **TINY)
    out = tmp_path / "feats"
    first = s2cli.extract(str(image_dir), str(out) + "/", format="npydir", shard_size=2, **TINY)
    assert first.num_images == 4
    shards = sorted(p.name for p in out.iterdir() if p.suffix == ".npyd")
    assert shards == ["part-00000-00000.npyd", "part-00000-00001.npyd"] and (out / shards[0]).is_dir()
    marker = json.loads((out / "part-00000-00000.json").read_text())
    assert marker["bytes"] == sum(p.stat().st_size for p in (out / shards[0]).iterdir())
    (out / "part-00000-00001.json").unlink()  # as if killed before its marker: the shard is a leftover, redone
    again = s2cli.extract(str(image_dir), str(out) + "/", format="npydir", shard_size=2, **TINY)  # resumes
    assert (again.resumed_images, again.num_images, again.complete) == (2, 2, True)
    with s2cli.open_features(out) as ff, s2cli.open_features(tmp_path / "ref.h5") as ref:
        assert len(ff.shards) == 2 and not ff.broken_shards
        _same(ff, ref)
    item = s2cli.FeatureDataset(out)[3]
    with s2cli.open_features(tmp_path / "ref.h5") as ref:
        np.testing.assert_array_equal(item["features"].numpy(), ref[item["key"]])
    shown = json.loads(cli("inspect", out, "--json").stdout)
    assert (shown["num_images"], shown["num_shards"], shown["complete"]) == (4, 2, True)
    verified = cli("inspect", out, "--verify", "--json")
    assert verified.exit_code == 0 and json.loads(verified.stdout)["broken_shards"] == []


def test_a_toy_format_changed_after_its_marker_is_a_broken_shard(npydir, image_dir, tmp_path):
    out = tmp_path / "feats"
    s2cli.extract(str(image_dir), str(out) + "/", format="npydir", shard_size=2, **TINY)
    victim = out / "part-00000-00001.npyd" / "0.features.npy"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only the folder's digest tells
    victim.write_bytes(bytes(data))
    with s2cli.open_features(out, verify=True) as ff:
        assert [b["shard"] for b in ff.broken_shards] == ["part-00000-00001.npyd"] and len(ff) == 2


def contents_identity(path: Path, digest: str) -> dict[str, Any]:
    """A folder format's own identity: its files' bytes in name order, their names left out of the digest."""
    h = formats.DIGESTS[digest]()
    files = formats.store_files(path)
    for p in files:
        h.update(p.read_bytes())
    return {"bytes": sum(p.stat().st_size for p in files), digest: h.hexdigest()}


def test_a_format_with_its_own_identity_is_marked_and_checked_by_it(image_dir, tmp_path):
    """The identity a format registers is what its done markers record and what a shard is checked against
    (`--verify`, or a shard whose file identity changed): whole shards pass, a changed byte is a broken shard."""
    formats.register(formats.Format("npyown", ".npyo", NpyDirSink, NpyDirReader, store=formats.DIR, remote=False,
                                    identity=contents_identity))
    try:
        out = tmp_path / "feats"
        s2cli.extract(str(image_dir), str(out) + "/", format="npyown", shard_size=2, **TINY)
        marker = json.loads((out / "part-00000-00001.json").read_text())
        assert marker[formats.DIGEST] == contents_identity(out / "part-00000-00001.npyo", formats.DIGEST)[formats.DIGEST]
        with s2cli.open_features(out, verify=True) as ff:
            assert ff.broken_shards == [] and len(ff) == 4
        victim = out / "part-00000-00001.npyo" / "0.features.npy"
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
        with s2cli.open_features(out, verify=True) as ff:
            assert [b["shard"] for b in ff.broken_shards] == ["part-00000-00001.npyo"] and len(ff) == 2
    finally:
        formats.unregister("npyown")


def test_a_toy_format_as_one_output_named_by_its_suffix(npydir, image_dir, tmp_path, cli):
    s2cli.extract(str(image_dir), str(tmp_path / "ref.h5"), **TINY)
    res = s2cli.settings(str(image_dir), str(tmp_path / "one.npyd"), **TINY)
    assert (res.format, res.output_is_dir) == ("npydir", False)
    s2cli.extract(str(image_dir), str(tmp_path / "one.npyd"), **TINY)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".one.npyd.tmp")]
    with s2cli.open_features(tmp_path / "one.npyd") as ff, s2cli.open_features(tmp_path / "ref.h5") as ref:
        _same(ff, ref)
    shown = json.loads(cli("inspect", tmp_path / "one.npyd", "--key", "a", "--json").stdout)
    assert shown["orig_hw"] == [40, 60]
    s2cli.extract(str(image_dir), str(tmp_path / "one.npyd"), overwrite=True, **TINY)  # a folder replaces a folder
    assert sorted(p.name for p in (tmp_path / "one.npyd").iterdir())[-1] == "index.json"


def test_the_registry_answers_names_suffixes_and_refuses_a_taken_suffix(npydir):
    assert formats.names()[:2] == ("h5", "safetensors") and "npydir" in formats.names()
    assert formats.of_path("x/part-00000-00000.NPYD") is npydir and formats.of_path("a.txt") is None
    with pytest.raises(ValueError, match="registered already"):
        formats.register(formats.Format("other", ".npyd", NpyDirSink, NpyDirReader))
    with pytest.raises(s2cli.ConfigError, match="--format"):
        s2cli.settings("x/", "out/", format="zarr", random_init=True)
    with pytest.raises(s2cli.ConfigError, match="local folders only"):
        s2cli.settings("x/", "s3://bucket/feats/", format="npydir", random_init=True)
