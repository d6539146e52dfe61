"""Retries: `--retry-failed` extracts again exactly the images an output folder records as failed, adds those that
now succeed as shards of their own and keeps the history in errors.jsonl, leaving everything else as it was;
`--retries N` tries a read that fails with an OSError again within a run (a decode error is not retried)."""
from __future__ import annotations

import errno
import hashlib
import json

import numpy as np

import s2cli
import s2cli.inputs.reading as reading
from conftest import FAST, invoke_json, jpeg_bytes, plain_tar, write_image
from s2cli import open_features

LIB = dict(model="timm:test_resnet", random_init=True, img_sizes=(64, 128), max_split_size=64, workers=0)


def folder(d):
    for i, name in enumerate(["a", "b", "c", "d", "e"]):
        write_image(d / f"{name}.png", (40 + 3 * i, 52), i)
    (d / "broken.png").write_text("not a PNG yet\n")  # sorted: a, b, broken | c, d | e (shard size 2: units of 2)
    return d


def snapshot(out):
    """Every done shard's bytes (sha256) and marker, and every feature."""
    shards = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("part-*.h5")}
    markers = {p.name: json.loads(p.read_text()) for p in out.glob("part-*.json")}
    with open_features(out) as f:
        feats = {k: np.array(f[k]) for k in f}
    return shards, markers, feats


def errors(out):
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]


def test_retry_failed_adds_the_fixed_image_and_nothing_else_changes(cli, tmp_path):
    d = folder(tmp_path / "in")
    out = tmp_path / "out"
    s = invoke_json(cli, "extract", d, *FAST, "-o", f"{out}/", "--shard-size", 2, "--json")
    assert (s["num_images"], s["num_failed"]) == (5, 1)
    shards, markers, feats = snapshot(out)
    [broken_marker] = [n for n, m in markers.items() if m["failures"]]
    write_image(d / "broken.png", (44, 50), 99)  # fixed since
    clean = invoke_json(cli, "extract", d, *FAST, "-o", f"{tmp_path / 'clean'}/", "--shard-size", 2, "--json")
    assert clean["num_failed"] == 0

    s = invoke_json(cli, "extract", d, *FAST, "-o", f"{out}/", "--shard-size", 2, "--retry-failed", "--json")
    assert (s["num_images"], s["num_failed"], s["shards_written"]) == (1, 0, 1)
    assert (s["total_images"], s["total_failed"], s["complete"]) == (6, 0, True)
    shards2, markers2, feats2 = snapshot(out)
    assert {k: v for k, v in shards2.items() if k in shards} == shards  # every shard there before: bit-identical
    new = set(shards2) - set(shards)
    assert len(new) == 1
    assert sorted(feats2) == sorted([*feats, "broken"])
    for k in feats:
        assert np.array_equal(feats2[k], feats[k])
    with open_features(tmp_path / "clean") as fc:
        np.testing.assert_allclose(feats2["broken"], fc["broken"], atol=1e-5, rtol=0)
    # the markers: untouched but for the failure, which moved to the history with its outcome
    for name, m in markers.items():
        if name != broken_marker:
            assert markers2[name] == m
    old = markers2[broken_marker]
    assert old["failures"] == [] and old["num_failed"] == 0
    assert [(r["key"], r["outcome"], r["retried_in"]) for r in old["retried"]] == [("broken", "ok", new.pop())]
    retry = next(m for m in markers2.values() if "retry_of" in m)
    assert retry["retry_of"] == [broken_marker.replace(".json", ".h5")] and retry["retried_keys"] == ["broken"]
    [rec] = errors(out)  # the original record kept, marked with the retry's outcome
    assert (rec["key"], rec["stage"], rec["outcome"]) == ("broken", "decode", "ok")
    st = invoke_json(cli, "status", out, "--json")
    assert (st["images"], st["failed"], st["complete"], st["shards_done"], st["retry_shards"]) == (6, 0, True, 3, 1)
    with open_features(out) as f:
        assert f.failures == []

    again = cli("extract", d, *FAST, "-o", f"{out}/", "--shard-size", 2, "--retry-failed", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["num_images"] == 0
    assert "nothing to retry" in again.stderr
    assert snapshot(out)[0] == shards2


def test_a_retry_that_fails_again_is_recorded_once_more_and_a_later_one_can_still_succeed(cli, tmp_path):
    d = folder(tmp_path / "in")
    out = tmp_path / "out"
    invoke_json(cli, "extract", d, *FAST, "-o", f"{out}/", "--shard-size", 2, "--json")
    s = invoke_json(cli, "extract", d, *FAST, "-o", f"{out}/", "--shard-size", 2, "--retry-failed", "--json")
    assert (s["num_images"], s["num_failed"], s["total_failed"], s["total_images"]) == (0, 1, 1, 5)
    recs = errors(out)
    assert [(r["key"], r.get("outcome"), r.get("retry", False)) for r in recs] == [("broken", "failed", False),
                                                                                   ("broken", None, True)]
    assert invoke_json(cli, "status", out, "--json")["failed"] == 1
    write_image(d / "broken.png", (44, 50), 99)
    s = invoke_json(cli, "extract", d, *FAST, "-o", f"{out}/", "--shard-size", 2, "--retry-failed", "--json")
    assert (s["num_images"], s["total_failed"], s["total_images"]) == (1, 0, 6)
    assert [(r.get("outcome"), r.get("retry", False)) for r in errors(out)] == [("failed", False), ("ok", True)]
    with open_features(out) as f:
        assert "broken" in f and len(f) == 6


def test_retry_failed_is_refused_where_it_cannot_apply(cli, tmp_path):
    d = folder(tmp_path / "in")
    r = cli("extract", d, *FAST, "-o", tmp_path / "x.h5", "--retry-failed")
    assert r.exit_code == 2 and "--retry-failed" in r.stderr and "-o OUTDIR/" in r.stderr
    assert not (tmp_path / "x.h5").exists()
    r = cli("extract", d, *FAST, "-o", f"{tmp_path / 'none'}/", "--retry-failed")
    assert r.exit_code == 2 and "holds no run" in r.stderr and not (tmp_path / "none" / "run.json").exists()
    invoke_json(cli, "extract", d, *FAST, "-o", f"{tmp_path / 'o'}/", "--json")
    r = cli("extract", d, *FAST, "-o", f"{tmp_path / 'o'}/", "--retry-failed", "--overwrite")
    assert r.exit_code == 2 and "contradict" in r.stderr


def flaky_reads(monkeypatch, key: str, failures: int) -> list[str]:
    """`key`'s first `failures` reads fail with EIO, as a network file system's hiccup does; returns the reads."""
    calls: list[str] = []
    read = reading._read

    def flaky(sample):
        calls.append(sample.key)
        if sample.key == key and calls.count(key) <= failures:
            raise OSError(errno.EIO, "Input/output error")
        return read(sample)

    monkeypatch.setattr(reading, "_read", flaky)
    return calls


def test_retries_get_past_a_transient_read_error(tmp_path, monkeypatch):
    d = folder(tmp_path / "in")
    (d / "broken.png").unlink()
    clean = s2cli.extract(str(d), str(tmp_path / "clean.h5"), **LIB)
    calls = flaky_reads(monkeypatch, "c", 2)
    s = s2cli.extract(str(d), str(tmp_path / "r.h5"), retries=2, **LIB)
    assert (s.num_images, s.num_failed, calls.count("c")) == (5, 0, 3)
    with open_features(tmp_path / "clean.h5") as fc, open_features(tmp_path / "r.h5") as fr:
        assert sorted(fr) == sorted(fc)
        for k in fc:
            np.testing.assert_array_equal(fr[k], fc[k])
    assert clean.num_failed == 0

    calls = flaky_reads(monkeypatch, "c", 5)  # more failures than retries: recorded, saying how often it was tried
    s = s2cli.extract(str(d), str(tmp_path / "r2.h5"), retries=1, **LIB)
    assert (s.num_images, s.num_failed, calls.count("c")) == (4, 1, 2)
    with open_features(tmp_path / "r2.h5") as f:
        [rec] = f.failures
    assert (rec["key"], rec["stage"], rec["error_class"]) == ("c", "read", "OSError") and "tried 2 times" in rec["error"]


def test_a_decode_error_is_not_retried(tmp_path, monkeypatch):
    d = folder(tmp_path / "in")
    calls = flaky_reads(monkeypatch, "none", 0)
    s = s2cli.extract(str(d), str(tmp_path / "r.h5"), retries=3, **LIB)
    assert (s.num_images, s.num_failed, calls.count("broken")) == (5, 1, 1)


def test_retry_failed_finds_a_failed_sample_again_in_its_tar(cli, tmp_path):
    def tars(d, k001: bytes):
        plain_tar(d / "000000.tar", [("k000.jpg", jpeg_bytes(0)), ("k001.jpg", k001), ("k002.jpg", jpeg_bytes(2)),
                                     ("k003.jpg", jpeg_bytes(3))])
        plain_tar(d / "000001.tar", [("k004.jpg", jpeg_bytes(4)), ("k005.jpg", jpeg_bytes(5))])
        return f"{d}/{{000000..000001}}.tar"

    spec = tars(tmp_path / "bad", b"garbage, not a JPEG")
    out = tmp_path / "out"
    s = invoke_json(cli, "extract", spec, *FAST, "-o", f"{out}/", "--shard-size", 2, "--json")
    assert (s["num_images"], s["num_failed"]) == (5, 1)
    shards, _, feats = snapshot(out)
    tars(tmp_path / "bad", jpeg_bytes(1))  # the tar rewritten with the sample fixed
    invoke_json(cli, "extract", spec, *FAST, "-o", f"{tmp_path / 'clean'}/", "--shard-size", 2, "--json")
    s = invoke_json(cli, "extract", spec, *FAST, "-o", f"{out}/", "--shard-size", 2, "--retry-failed", "--json")
    assert (s["num_images"], s["total_images"], s["total_failed"], s["complete"]) == (1, 6, 0, True)
    shards2, markers2, feats2 = snapshot(out)
    assert {k: v for k, v in shards2.items() if k in shards} == shards
    assert sorted(feats2) == sorted([*feats, "k001"]) and all(np.array_equal(feats2[k], feats[k]) for k in feats)
    with open_features(tmp_path / "clean") as fc:
        np.testing.assert_allclose(feats2["k001"], fc["k001"], atol=1e-5, rtol=0)
    retry = next(m for m in markers2.values() if "retry_of" in m)
    assert (retry["unit_index"], retry["part"], retry["last_part"]) == (0, 0, False)


def test_retry_failed_over_added_images_is_refused_and_takes_nothing_back(cli, tmp_path):
    d = folder(tmp_path / "in")
    out = tmp_path / "out"
    invoke_json(cli, "extract", d, *FAST, "-o", f"{out}/", "--shard-size", 2, "--json")
    shards, markers, _ = snapshot(out)
    write_image(d / "aa.png", (40, 40), 7)  # a new image: the first unit's keys are no longer the marked ones
    r = cli("extract", d, *FAST, "-o", f"{out}/", "--shard-size", 2, "--retry-failed")
    assert r.exit_code == 2 and "the input changed since" in r.output and "rerun without --retry-failed" in r.output
    assert snapshot(out)[:2] == (shards, markers)  # nothing taken back, nothing written


def test_retry_failed_keeps_a_rewritten_tar_and_a_later_rerun_keeps_it_too(cli, tmp_path):
    def tar(k1: bytes):
        plain_tar(tmp_path / "000000.tar", [("k0.jpg", jpeg_bytes(0)), ("k1.jpg", k1), ("k2.jpg", jpeg_bytes(2))])
        return str(tmp_path / "000000.tar")

    spec, out = tar(b"not a JPEG"), tmp_path / "out"
    invoke_json(cli, "extract", spec, *FAST, "-o", f"{out}/", "--shard-size", 2, "--json")
    shards, _, _ = snapshot(out)
    tar(jpeg_bytes(1))
    s = invoke_json(cli, "extract", spec, *FAST, "-o", f"{out}/", "--shard-size", 2, "--retry-failed", "--json")
    assert (s["num_images"], s["total_images"], s["total_failed"]) == (1, 3, 0)
    again = invoke_json(cli, "extract", spec, *FAST, "-o", f"{out}/", "--shard-size", 2, "--json")
    assert again["num_images"] == 0 and again["total_images"] == 3  # the tar as it is now is the one marked
    shards2, _, _ = snapshot(out)
    assert {k: v for k, v in shards2.items() if k in shards} == shards
