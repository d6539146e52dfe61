"""A resume over an input that changed since the folder was written extracts exactly what a clean run over the
input as it is now would: done shards whose part of the input changed are taken back and redone, never mapped onto
other images, and no image is skipped."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from conftest import write_image
from s2cli import open_features

MODEL = ["-m", "timm:test_resnet", "--random-init", "--img-sizes", "64,128", "--max-split-size", "64", "-j", "0",
         "--shard-size", "2"]


def killed_after(out: Path, units: int) -> None:
    """What a run killed after its first `units` units leaves: the later units' shards and markers never written."""
    for m in out.glob("part-*.json"):
        if json.loads(m.read_text())["unit_index"] >= units:
            m.unlink()
            m.with_suffix(".h5").unlink()
    (out / "manifest.json").unlink()


def extract(cli, d: Path, out: Path) -> dict:
    r = cli("extract", d, *MODEL, "-o", f"{out}/", "--json")
    assert r.exit_code == 0, r.stderr + r.stdout
    return json.loads(r.stdout.splitlines()[-1])


def assert_same(a: Path, b: Path) -> None:
    with open_features(a) as fa, open_features(b) as fb:
        assert list(fa) == list(fb)
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k])
        assert fa.complete and fb.complete


def test_resume_after_images_were_deleted_and_added_extracts_what_a_clean_run_would(cli, tmp_path):
    d = tmp_path / "in"
    for i in range(10):
        write_image(d / f"img{i:02d}.png", (40 + i, 36), i)
    out = tmp_path / "out"
    extract(cli, d, out)
    killed_after(out, 2)  # 2 of 5 units done: img00..img03
    (d / "img01.png").unlink()  # an image of a done unit deleted: every later slice shifts by one
    write_image(d / "img00b.png", (44, 40), 50)  # and one added
    r = cli("extract", d, *MODEL, "-o", f"{out}/", "--json")
    assert r.exit_code == 0, r.stderr
    assert "the input changed since" in r.stderr and "1 of its done shards no longer match it" in r.stderr  # unit 0
    s = json.loads(r.stdout.splitlines()[-1])
    clean = tmp_path / "clean"
    extract(cli, d, clean)
    assert_same(out, clean)  # nothing skipped (img02 moved into unit 0), nothing stale (img01 is gone)
    with open_features(out) as f:
        assert len(f) == 10 and "img01" not in list(f) and "img00b" in list(f)
    assert s["complete"] and s["total_images"] == 10
    markers = [json.loads(p.read_text()) for p in out.glob("part-*.json")]
    assert sorted(m["unit_index"] for m in markers) == list(range(5))  # each unit once


def test_resume_after_a_shrunk_input_drops_the_units_that_are_gone(cli, tmp_path):
    d = tmp_path / "in"
    for i in range(6):
        write_image(d / f"img{i:02d}.png", (40 + i, 36), i)
    out = tmp_path / "out"
    extract(cli, d, out)
    for i in (4, 5):
        (d / f"img{i:02d}.png").unlink()
    s = extract(cli, d, out)
    assert s["complete"] and s["num_images"] == 0 and s["total_images"] == 4  # the 2 done units still match
    with open_features(out) as f:
        assert list(f) == [f"img{i:02d}" for i in range(4)]


def test_an_unchanged_input_resumes_without_redoing_anything(cli, tmp_path):
    d = tmp_path / "in"
    for i in range(6):
        write_image(d / f"img{i:02d}.png", (40 + i, 36), i)
    out = tmp_path / "out"
    extract(cli, d, out)
    shutil.copy(out / "part-00000-00000.json", tmp_path / "m.json")
    killed_after(out, 1)
    r = cli("extract", d, *MODEL, "-o", f"{out}/", "--json")
    s = json.loads(r.stdout.splitlines()[-1])
    assert (s["resumed_images"], s["num_images"], s["complete"]) == (2, 4, True)
    assert "the input changed" not in r.stderr
    assert (out / "part-00000-00000.json").read_text() == (tmp_path / "m.json").read_text()
