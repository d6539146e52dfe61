"""Metadata kept: a list's extra columns (--meta-columns), a folder's key.json/key.txt sidecars, keys with their
file extension (--keep-ext), and refusals where an option cannot be honoured."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import s2cli
from conftest import MODEL

RUN = [*MODEL, "-j", "0", "-q"]


def _images(d, names):
    d.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(d / n)


def _metas(path) -> dict:
    """Each image's metadata, less the decoder's own note (`decode`, e.g. a PNG under --decode torch)."""
    with s2cli.open_features(path) as ff:
        metas = {k: dict(ff.meta(k).get("meta") or {}) for k in ff}
    return {k: ({f: v for f, v in m.items() if f != "decode"} or None) for k, m in metas.items()}


def test_a_csv_lists_extra_columns_are_kept(cli, tmp_path):
    _images(tmp_path / "im", ["a.png", "b.png"])
    (tmp_path / "l.csv").write_text("path,caption,url,license\nim/a.png,a cat,http://x/a,cc-by\nim/b.png,,http://x/b,\n")
    assert cli("extract", tmp_path / "l.csv", *RUN, "-o", tmp_path / "all.h5").exit_code == 0
    assert _metas(tmp_path / "all.h5") == {"im/a": {"caption": "a cat", "url": "http://x/a", "license": "cc-by"},
                                          "im/b": {"caption": "", "url": "http://x/b", "license": ""}}
    assert cli("extract", tmp_path / "l.csv", *RUN, "--meta-columns", "caption", "-o", tmp_path / "c.h5").exit_code == 0
    assert _metas(tmp_path / "c.h5") == {"im/a": {"caption": "a cat"}, "im/b": {"caption": ""}}
    assert cli("extract", tmp_path / "l.csv", *RUN, "--meta-columns", "none", "-o", tmp_path / "n.h5").exit_code == 0
    assert _metas(tmp_path / "n.h5") == {"im/a": None, "im/b": None}
    r = cli("extract", tmp_path / "l.csv", *RUN, "--meta-columns", "caption,width", "-o", tmp_path / "x.h5")
    assert r.exit_code == 2 and "width" in r.stderr and "Fix:" in r.stderr


def test_a_parquet_lists_columns_keep_their_types(cli, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    _images(tmp_path / "im", ["a.png"])
    pq.write_table(pa.table({"path": ["im/a.png"], "width": [56], "score": [0.5], "nsfw": [False]}), tmp_path / "l.parquet")
    assert cli("extract", tmp_path / "l.parquet", *RUN, "-o", tmp_path / "o.h5").exit_code == 0
    assert _metas(tmp_path / "o.h5") == {"im/a": {"width": 56, "score": 0.5, "nsfw": False}}


def test_a_folders_sidecars_are_read_like_webdataset_members(cli, tmp_path):
    d = tmp_path / "im"
    _images(d, ["a.png", "b.png", "c.png"])
    (d / "a.json").write_text(json.dumps({"caption": "a cat", "url": "http://x/a"}))
    (d / "a.txt").write_text("a cat on a mat")
    (d / "b.txt").write_text("only text")
    for extra in ([], ["--decode", "torch"]):
        out = tmp_path / f"o{len(extra)}.h5"
        assert cli("extract", d, *RUN, *extra, "-o", out).exit_code == 0
        assert _metas(out) == {"a": {"json": {"caption": "a cat", "url": "http://x/a"}, "txt": "a cat on a mat"},
                               "b": {"txt": "only text"}, "c": None}


def test_keep_ext_keeps_the_extension_in_keys(cli, tmp_path):
    d = tmp_path / "im"
    _images(d, ["a.png"])
    _images(d / "sub", ["b.jpg"])
    assert cli("extract", d, *RUN, "--keep-ext", "-o", tmp_path / "o.h5").exit_code == 0
    with s2cli.open_features(tmp_path / "o.h5") as ff:
        assert list(ff) == ["a.png", "sub/b.jpg"]
    (tmp_path / "l.txt").write_text("im/a.png\nim/sub/b.jpg\n")
    assert cli("extract", tmp_path / "l.txt", *RUN, "--keep-ext", "-o", tmp_path / "l.h5").exit_code == 0
    with s2cli.open_features(tmp_path / "l.h5") as ff:
        assert list(ff) == ["im/a.png", "im/sub/b.jpg"]
    # a.png and a.jpg clash without the extension, not with it
    _images(d, ["a.jpg"])
    assert cli("extract", d, *RUN, "-o", tmp_path / "clash.h5").exit_code == 2
    assert cli("extract", d, *RUN, "--keep-ext", "-o", tmp_path / "ok.h5").exit_code == 0


def test_options_that_cannot_apply_are_refused(cli, tmp_path, shards):
    d = tmp_path / "im"
    _images(d, ["a.png"])
    r = cli("extract", d, *RUN, "--meta-columns", "caption", "-o", tmp_path / "o.h5")
    assert r.exit_code == 2 and "--meta-columns" in r.stderr
    r = cli("extract", shards, *RUN, "--keep-ext", "-o", tmp_path / "w.h5")
    assert r.exit_code == 2 and "--keep-ext" in r.stderr


def test_the_new_options_leave_older_outputs_resumable():
    """At their defaults the options are not in the saved config (outputs written before them resume)."""
    res = s2cli.settings("x/", model="timm:test_resnet")
    assert not {"meta_columns", "keep_ext"} & set(res.to_dict())
    assert s2cli.settings("x/", model="timm:test_resnet", keep_ext=True).to_dict()["keep_ext"] is True
