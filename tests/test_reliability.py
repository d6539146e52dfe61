"""Nothing ignored, nothing lost (#13, items 10-17): an option the strategy cannot honour and a number out of range
are refused before anything runs; --limit holds for shards; a key in two tars is kept once; a done shard that is no
longer whole is skipped by readers and redone on resume, and damaged metadata is one line; an unwritable output is
one line before the model loads; messages say why; readers show the done part of an unfinished folder; a tar that
changed between runs is redone."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import xxhash

import s2cli
from conftest import FAST, cannot_run, jpeg_bytes, make_shards, plain_tar, unless_possible, write_image
from s2cli import ConfigError, open_features
from s2cli.config import list_recipes

RESNET = ["-m", "timm:test_resnet", "--random-init", "-j", "0"]
VIT = ["-m", "timm:test_vit", "--random-init", "-j", "0"]


def run_json(cli, *args) -> dict:
    r = cli(*args, "--json")
    assert r.exit_code == 0, r.stderr + r.stdout
    return json.loads(r.stdout.splitlines()[-1])


def one_line_error(r, code: int = 2) -> str:
    assert r.exit_code == code, r.stderr + r.stdout
    text = r.stderr.strip()
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    return text


def assert_same_features(a: Path, b: Path) -> None:
    with open_features(a) as fa, open_features(b) as fb:
        assert list(fa) == list(fb)
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k])


def six_images(d: Path) -> Path:
    for i in range(6):
        write_image(d / f"im{i}.png", (40 + 4 * i, 52), i)
    return d


# ---- 10: options the strategy cannot honour ----------------------------------------------------------------------
@pytest.mark.parametrize("extra, named", [(["--scales", "1,2,3"], "--scales"), (["--scales", "5"], "--scales"),
                                          (["--split-mode", "pad", "--resize-output-to-idx", "1"], "--split-mode"),
                                          (["--fit", "crop"], "--fit"), (["--antialias"], "--antialias")])
def test_an_option_the_strategy_does_not_use_is_refused(cli, image_dir, tmp_path, extra, named):
    r = cli("extract", image_dir, *VIT, "--strategy", "internvl", *extra, "-o", tmp_path / "o.h5")
    line = one_line_error(r)
    assert named in line and "--strategy internvl" in line
    assert not (tmp_path / "o.h5").exists()


def test_recipes_resolve_and_a_recipe_value_for_another_strategy_is_named():
    for name in list_recipes():
        s2cli.settings("x/", recipe=name)
    with pytest.raises(ConfigError, match="--img-sizes does not apply to --strategy internvl .set by the recipe llava-1.5-s2"):
        s2cli.settings("x/", recipe="llava-1.5-s2", strategy="internvl")
    # what a strategy does use still goes through
    assert s2cli.settings("x/", model="timm:test_vit", strategy="dual", img_sizes=(320,), fit="crop").strategy_cfg.fit == "crop"
    assert s2cli.settings("x/", model="timm:test_vit", strategy="dynamic-s2", img_sizes=(160, 320)).strategy_cfg.img_sizes == (160, 320)


# ---- 11: numbers in range ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [["--shard-size", "-2"], ["--shard-size", "0"], ["--decode-timeout", "0"],
                                   ["--decode-timeout", "-1"], ["--scales", "0.001"], ["--batch-size", "0"],
                                   ["--workers", "-1"], ["--limit", "0"], ["--max-failures", "-1"],
                                   ["--prefetch-factor", "0"], ["--prefetch-factor", "2", "-j", "0"]])
def test_a_number_out_of_range_is_refused_before_anything_runs(cli, image_dir, tmp_path, extra):
    out = tmp_path / "o"
    line = one_line_error(cli("extract", image_dir, *RESNET, *extra, "-o", f"{out}/"))
    assert extra[0] in line
    assert not out.exists()


# ---- 12: a key in two tars ---------------------------------------------------------------------------------------
def test_a_key_in_two_tars_is_kept_once_and_recorded_in_a_folder_as_in_a_file(cli, tmp_path):
    d = tmp_path / "tars"
    plain_tar(d / "a.tar", [("x.jpg", jpeg_bytes(1)), ("y.jpg", jpeg_bytes(2))])
    plain_tar(d / "b.tar", [("x.jpg", jpeg_bytes(3)), ("z.jpg", jpeg_bytes(4))])
    out, one = tmp_path / "o", tmp_path / "one.h5"
    run_json(cli, "extract", d, *FAST, "-o", f"{out}/")
    run_json(cli, "extract", d, *FAST, "-o", one)
    for path in (out, one):
        with open_features(path) as ff:
            assert list(ff) == ["x", "y", "z"]
            assert [(f["key"], f["source"], f["error_class"]) for f in ff.failures] == [("x", f"{d / 'b.tar'}#x", "DuplicateKey")]
    assert_same_features(out, one)  # the first x (a.tar's) in both
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["num_images"], manifest["num_failed"]) == (3, 1)
    # a resume after b.tar's shard was lost still knows a.tar's keys
    for m in out.glob("part-*.json"):
        if json.loads(m.read_text())["unit_index"] == 1:
            m.unlink()
    run_json(cli, "extract", d, *FAST, "-o", f"{out}/")
    assert_same_features(out, one)
    with open_features(out) as ff:
        assert [f["key"] for f in ff.failures] == ["x"]


# ---- 13: --limit for shards --------------------------------------------------------------------------------------
def test_limit_takes_the_first_samples_of_the_shards(cli, tmp_path):
    d = make_shards(tmp_path / "s", 3, 3)
    plan = run_json(cli, "extract", d, *FAST, "--limit", "4", "--dry-run")
    assert [i["key"] for i in plan["images"]] == ["k000", "k001", "k002", "k003"]
    out = tmp_path / "o"
    s = run_json(cli, "extract", d, *FAST, "--limit", "4", "-o", f"{out}/")
    assert s["num_images"] == 4 and s["complete"]
    with open_features(out) as ff:
        assert list(ff) == ["k000", "k001", "k002", "k003"]
    again = run_json(cli, "extract", d, *FAST, "--limit", "4", "-o", f"{out}/")
    assert again["num_images"] == 0 and again["total_images"] == 4 and again["complete"]
    st = run_json(cli, "status", out)
    assert (st["images"], st["units_done"], st["units_total"], st["complete"]) == (4, 2, 2, True)
    run_json(cli, "extract", d, *FAST, "--limit", "4", "-o", tmp_path / "one.h5")
    assert_same_features(out, tmp_path / "one.h5")


# ---- 14: done means whole ----------------------------------------------------------------------------------------
def test_a_marker_records_its_shard_size_and_digest(cli, tmp_path):
    out = tmp_path / "o"
    run_json(cli, "extract", six_images(tmp_path / "imgs"), *FAST, "--shard-size", "2", "-o", f"{out}/")
    markers = [json.loads(p.read_text()) for p in sorted(out.glob("part-*.json"))]
    assert len(markers) == 3
    for m in markers:
        data = (out / m["shard"]).read_bytes()
        assert (m["bytes"], m["xxh3_128"]) == (len(data), xxhash.xxh3_128(data).hexdigest())
        assert "sha256" not in m


def test_a_marker_written_with_sha256_is_still_checked_by_it(cli, tmp_path):
    """Markers written before xxh3-128 record sha256: a folder of them reads whole, and a shard whose bytes then
    change (same size) is found by sha256 (verify, and a changed identity)."""
    out = tmp_path / "o"
    run_json(cli, "extract", six_images(tmp_path / "imgs"), *FAST, "--shard-size", "2", "-o", f"{out}/")
    for p in sorted(out.glob("part-*.json")):
        m = json.loads(p.read_text())
        del m["xxh3_128"]
        m["sha256"] = hashlib.sha256((out / m["shard"]).read_bytes()).hexdigest()
        p.write_text(json.dumps(m))
    with s2cli.open_features(out, verify=True) as ff:
        assert ff.complete and not ff.broken_shards and len(ff.keys()) == 6
    shard = sorted(out.glob("part-*.h5"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only the digest tells
    shard.write_bytes(bytes(data))
    with s2cli.open_features(out) as ff:
        assert [b["shard"] for b in ff.broken_shards] == [shard.name]
        assert "sha256 digest differs" in ff.broken_shards[0]["why"]


def test_a_truncated_shard_is_skipped_by_readers_and_redone_on_resume(cli, tmp_path):
    d, out, clean = six_images(tmp_path / "imgs"), tmp_path / "o", tmp_path / "clean"
    run_json(cli, "extract", d, *FAST, "--shard-size", "2", "-o", f"{out}/")
    shutil.copytree(out, clean)
    shard = sorted(out.glob("part-*.h5"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with open_features(out) as ff:
        assert list(ff) == ["im0", "im1", "im4", "im5"] and not ff.complete
        assert [b["shard"] for b in ff.broken_shards] == [shard.name]
    info = run_json(cli, "inspect", out)
    assert info["num_images"] == 4 and info["complete"] is False and info["broken_shards"][0]["shard"] == shard.name
    st = run_json(cli, "status", out)
    assert st["images"] == 4 and not st["complete"] and st["broken_shards"][0]["shard"] == shard.name
    r = cli("extract", d, *FAST, "--shard-size", "2", "-o", f"{out}/")
    assert r.exit_code == 0 and f"{shard.name} is broken" in r.stderr
    assert_same_features(out, clean)
    with open_features(out) as ff:
        assert ff.complete and not ff.broken_shards


def test_a_shard_with_other_keys_than_its_old_marker_counted_is_skipped(cli, tmp_path):
    """Markers written before they recorded sizes (and keys, and the shard's identity): the key count still tells
    a shard replaced by another."""
    out = tmp_path / "o"
    run_json(cli, "extract", six_images(tmp_path / "imgs"), *FAST, "--shard-size", "4", "-o", f"{out}/")
    first, second = sorted(out.glob("part-*.h5"))
    marker = second.with_suffix(".json")
    m = json.loads(marker.read_text())
    del m["bytes"], m["xxh3_128"], m["keys"], m["stat"]
    marker.write_text(json.dumps(m))
    shutil.copy(first, second)  # 4 keys where the marker counted 2
    with open_features(out) as ff:
        assert list(ff) == ["im0", "im1", "im2", "im3"]
        assert [b["shard"] for b in ff.broken_shards] == [second.name] and "4 keys" in ff.broken_shards[0]["why"]


def _flip_last_byte(path: Path, keep_mtime: bool) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))
    if keep_mtime:  # bit rot: nothing says the file was written
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_shard_rewritten_after_its_marker_is_checked_and_redone(cli, tmp_path):
    d, out, clean = six_images(tmp_path / "imgs"), tmp_path / "o", tmp_path / "clean"
    run_json(cli, "extract", d, *FAST, "--shard-size", "2", "-o", f"{out}/")
    shutil.copytree(out, clean)
    shard = sorted(out.glob("part-*.h5"))[0]
    os.utime(shard.with_suffix(".json"), ns=(0, shard.stat().st_mtime_ns - 10**9))  # marked a second before
    _flip_last_byte(shard, keep_mtime=False)
    with open_features(out) as ff:
        assert [b["shard"] for b in ff.broken_shards] == [shard.name] and "digest differs" in ff.broken_shards[0]["why"]
    r = cli("extract", d, *FAST, "--shard-size", "2", "-o", f"{out}/")
    assert r.exit_code == 0 and f"{shard.name} is broken" in r.stderr
    assert_same_features(out, clean)


def test_a_shard_whose_bytes_rotted_is_found_by_verify(cli, tmp_path):
    """Bit rot changes nothing the file system keeps of a file (here the marker records other bytes instead): the
    cheap check passes it, --verify reads the bytes."""
    out = tmp_path / "o"
    run_json(cli, "extract", six_images(tmp_path / "imgs"), *FAST, "--shard-size", "2", "-o", f"{out}/")
    shard = sorted(out.glob("part-*.h5"))[0]
    marker = shard.with_suffix(".json")
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "xxh3_128": "0" * 32}))
    with open_features(out) as ff:
        assert not ff.broken_shards  # sizes and identities only: cheap
    info = run_json(cli, "inspect", out, "--verify")
    assert [b["shard"] for b in info["broken_shards"]] == [shard.name] and "digest differs" in info["broken_shards"][0]["why"]


def test_damaged_run_json_manifest_and_metadata_are_one_line(cli, tmp_path):
    d, out = six_images(tmp_path / "imgs"), tmp_path / "o"
    run_json(cli, "extract", d, *FAST, "--shard-size", "2", "-o", f"{out}/")
    (out / "manifest.json").write_text('{"complete": tr')
    info = run_json(cli, "inspect", out)  # the manifest is only a summary: the markers say what is done
    assert info["num_images"] == 6 and info["complete"] is False
    run_json(cli, "extract", d, *FAST, "--shard-size", "2", "-o", f"{out}/")  # rebuilds it
    assert json.loads((out / "manifest.json").read_text())["complete"]
    (out / "run.json").write_text((out / "run.json").read_text()[:40])
    for args in (("extract", d, *FAST, "--shard-size", "2", "-o", f"{out}/"), ("inspect", out), ("status", out)):
        assert "run.json is damaged" in one_line_error(cli(*args))
    one = tmp_path / "one.safetensors"
    run_json(cli, "extract", d, *FAST, "-o", one)
    _set_metadata(one, "s2cli", "{not json")
    assert "s2cli metadata" in one_line_error(cli("inspect", one))


def test_a_done_shard_of_a_tar_run_that_cannot_be_read_is_redone(cli, tmp_path):
    """An old marker (no size recorded) over a shard whose metadata broke: readers skip it, resume redoes it."""
    d, out, clean = make_shards(tmp_path / "s", 2, 3), tmp_path / "o", tmp_path / "clean"
    args = (d, *FAST, "--format", "safetensors", "-o")
    run_json(cli, "extract", *args, f"{out}/")
    shutil.copytree(out, clean)
    shard = sorted(out.glob("part-*.safetensors"))[1]
    marker = shard.with_suffix(".json")
    m = json.loads(marker.read_text())
    del m["bytes"], m["xxh3_128"], m["keys"], m["stat"]
    marker.write_text(json.dumps(m))
    _set_metadata(shard, "keys", "[not json")
    with open_features(out) as ff:
        assert list(ff) == ["k000", "k001", "k002"] and "s2cli metadata" in ff.broken_shards[0]["why"]
    r = cli("extract", *args, f"{out}/")
    assert r.exit_code == 0 and f"{shard.name} is broken" in r.stderr
    assert_same_features(out, clean)


def _set_metadata(path: Path, name: str, value: str) -> None:
    """Rewrite one entry of a safetensors file's metadata (the tensors' offsets are relative to the data)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["__metadata__"][name] = value
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


# ---- 15: an unwritable output ------------------------------------------------------------------------------------
def _mount_ro(d: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(d)], capture_output=True, text=True)


def _no_read_only_folder() -> str | None:
    """Why this machine cannot make a folder a run cannot write (None: it can). Not root: a chmod does it; root: a
    read-only tmpfs mounted on it, tried once here (and unmounted)."""
    import tempfile

    if os.geteuid() != 0:
        return None
    with tempfile.TemporaryDirectory() as d:
        r = _mount_ro(Path(d))
        if r.returncode != 0:
            return f"as root a chmod does not stop writes, and a read-only tmpfs cannot be mounted here: {r.stderr.strip()}"
        subprocess.run(["umount", "-l", d], check=False)
    return None


@pytest.fixture
def read_only_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    r = _mount_ro(d)
    if r.returncode != 0:
        cannot_run(f"as root a chmod does not stop writes, and a read-only tmpfs cannot be mounted here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@unless_possible(_no_read_only_folder())
@pytest.mark.parametrize("name", ["x.h5", "x.safetensors", "feats/", "./"])
def test_an_unwritable_output_is_one_line_before_the_model_loads(cli, image_dir, read_only_dir, monkeypatch, name):
    def must_not_load(*a, **k):
        raise AssertionError("the model loaded before the output was known to be unwritable")

    monkeypatch.setattr(s2cli.api, "load", must_not_load)
    line = one_line_error(cli("extract", image_dir, *FAST, "-o", f"{read_only_dir}/{name}"))
    assert str(read_only_dir) in line and "Fix:" in line


# ---- 16: messages that say why -----------------------------------------------------------------------------------
def test_a_folder_of_compressed_shards_says_to_pass_a_glob(cli, tmp_path):
    d = tmp_path / "gz"
    d.mkdir()
    with tarfile.open(d / "000000.tar.gz", "w:gz") as tf:
        for i in range(2):
            data = jpeg_bytes(i)
            info = tarfile.TarInfo(f"s{i}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    line = one_line_error(cli("extract", d, *FAST, "-o", tmp_path / "o.h5"))
    assert f"'{d}/*.tar.gz'" in line
    assert run_json(cli, "extract", f"{d}/*.tar.gz", *FAST, "-o", tmp_path / "o.h5")["num_images"] == 2


def test_webdataset_names_with_extra_dots_say_why_there_is_no_image(cli, tmp_path):
    d = tmp_path / "t"
    plain_tar(d / "a.tar", [("img.001.jpg", jpeg_bytes(1)), ("img.002.jpg", jpeg_bytes(2)), ("ok.jpg", jpeg_bytes(3))])
    run_json(cli, "extract", d, *FAST, "-o", tmp_path / "o.h5")
    with open_features(tmp_path / "o.h5") as ff:
        assert list(ff) == ["ok"]
        (f,) = ff.failures
    assert f["error_class"] == "MissingImage" and "first dot" in f["error"] and "img_001.jpg" in f["error"]


def _jpeg_header(sof: int, bits: int) -> bytes:
    seg = struct.pack(">BHHB", bits, 8, 8, 1) + bytes([1, 0x11, 0])
    return b"\xff\xd8" + bytes([0xFF, sof]) + struct.pack(">H", len(seg) + 2) + seg + b"\xff\xd9"


def test_a_12_or_16_bit_jpeg_failure_says_what_it_is(cli, tmp_path):
    d = tmp_path / "imgs"
    write_image(d / "good.png", (40, 40), 1)
    (d / "twelve.jpg").write_bytes(_jpeg_header(0xC1, 12))
    (d / "lossless.jpg").write_bytes(_jpeg_header(0xC3, 16))
    run_json(cli, "extract", d, *FAST, "-o", tmp_path / "o.h5")
    with open_features(tmp_path / "o.h5") as ff:
        errors = {f["key"]: f["error"] for f in ff.failures}
    assert "a 12-bit JPEG, which Pillow cannot decode" in errors["twelve"]
    assert "a 16-bit lossless JPEG" in errors["lossless"]
    assert not any("BufferedReader" in e for e in errors.values())


def test_every_sample_failed_in_shards_points_at_image_key_not_at_lists(cli, tmp_path):
    d = tmp_path / "t"
    plain_tar(d / "a.tar", [("a.bin", b"x"), ("b.bin", b"y")])
    r = cli("extract", d, *FAST, "-o", tmp_path / "o.h5", "-q")
    assert r.exit_code == 1
    line = r.stderr.strip().splitlines()[-1]
    assert "every sample failed" in line and "--image-key" in line and ".txt" not in line


def test_an_output_with_a_file_suffix_and_a_slash_is_refused(cli, image_dir, tmp_path):
    line = one_line_error(cli("extract", image_dir, *FAST, "-o", f"{tmp_path}/feats.h5/"))
    assert f"-o {tmp_path}/feats.h5 for one file" in line and f"-o {tmp_path}/feats/ for a folder" in line


def test_the_same_input_written_another_way_resumes(cli, image_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(image_dir.parent)
    out = tmp_path / "o"
    run_json(cli, "extract", "imgs", *FAST, "--shard-size", "2", "-o", f"{out}/")
    for spec in ("imgs/", "./imgs", str(image_dir)):
        s = run_json(cli, "extract", spec, *FAST, "--shard-size", "2", "-o", f"{out}/")
        assert s["num_images"] == 0 and s["resumed_images"] == 4 and s["complete"]
    line = one_line_error(cli("extract", str(tmp_path), *FAST, "--shard-size", "2", "-o", f"{out}/"))
    assert "different config" in line


def test_inspect_of_a_folder_holding_only_run_json_shows_its_settings(cli, image_dir, tmp_path):
    out = tmp_path / "o"
    run_json(cli, "extract", image_dir, *FAST, "-o", f"{out}/")
    for p in out.iterdir():
        if p.name != "run.json":
            p.unlink()
    info = run_json(cli, "inspect", out)
    assert (info["model"], info["img_sizes"], info["max_split_size"], info["strategy"]) == ("timm:test_resnet", [64, 128], 64, "s2")
    assert info["num_images"] == 0 and info["complete"] is False


# ---- 17: reading while writing, and after a kill -----------------------------------------------------------------
def test_readers_show_the_done_part_of_a_killed_or_live_run(cli, tmp_path):
    from s2cli.heartbeat import Heartbeat

    out = tmp_path / "o"
    run_json(cli, "extract", six_images(tmp_path / "imgs"), *FAST, "--shard-size", "2", "-o", f"{out}/")
    last = sorted(out.glob("part-*.json"))[-1]  # a killed run: its last shard never marked, a temporary left
    last.unlink()
    (out / "manifest.json").unlink()
    (out / ".part-00000-00009.h5.tmp-999999").write_bytes(b"half a shard")
    (out / "part-00000-00009.h5").write_bytes(b"\x89HDF\r\n")
    for hb in out.glob("rank-*.json"):
        hb.unlink()
    with open_features(out) as ff:
        assert list(ff) == ["im0", "im1", "im2", "im3"] and not ff.complete and ff.writing == []
    info = run_json(cli, "inspect", out)
    assert (info["num_images"], info["num_shards"], info["complete"], info["writing"]) == (4, 2, False, [])
    assert not run_json(cli, "status", out)["complete"]
    beat = Heartbeat(out, 0, 1, "single")  # a run writing it now
    try:
        info = run_json(cli, "inspect", out)
        assert info["num_images"] == 4 and info["writing"] == [f"rank 0: host {os.uname().nodename} pid {os.getpid()}"]
        r = cli("inspect", out)
        assert r.exit_code == 0 and "a run is writing this folder now" in r.stdout
    finally:
        beat.close("done")


@pytest.mark.slow
def test_readers_during_a_live_run_show_its_done_part_in_order(tmp_path):
    d, out = tmp_path / "imgs", tmp_path / "o"
    for i in range(60):
        write_image(d / f"im{i:02d}.png", (36 + i % 7, 44), i)
    cmd = [sys.executable, "-m", "s2cli", "extract", str(d), *FAST, "--shard-size", "2", "-o", f"{out}/", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("part-*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = []
    while proc.poll() is None and time.monotonic() < deadline:
        with open_features(out) as ff:
            keys, live, complete = list(ff), ff.writing, ff.complete
        assert keys == [f"im{i:02d}" for i in range(len(keys))]  # the done part, in order, never a temporary
        if live:
            assert not complete and live == [f"rank 0: host {os.uname().nodename} pid {proc.pid}"]
            seen.append(len(keys))
        time.sleep(0.1)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert seen, "the run ended before a reader saw it writing"
    with open_features(out) as ff:
        assert len(ff) == 60 and ff.complete and ff.writing == []


def test_a_single_file_being_written_says_so(cli, tmp_path):
    from s2cli.fsutil import take_claim

    out = tmp_path / "feats.h5"
    claim = take_claim(tmp_path / ".feats.h5.lock", str(out), fix="")  # what a live run of -o feats.h5 holds
    try:
        line = one_line_error(cli("inspect", out))
        assert f"is being written by a run (host {os.uname().nodename} pid {os.getpid()}" in line
    finally:
        claim.release()
    assert "no such feature file" in one_line_error(cli("inspect", out))


# ---- a tar that changed between runs ------------------------------------------------------------------------------
def test_a_tar_that_changed_between_runs_is_redone(cli, tmp_path):
    d, out, clean = make_shards(tmp_path / "s", 2, 3), tmp_path / "o", tmp_path / "clean"
    run_json(cli, "extract", d, *FAST, "-o", f"{out}/")
    tar = d / "000001.tar"
    before = tar.stat()
    plain_tar(tar, [("n0.jpg", jpeg_bytes(50)), ("n1.jpg", jpeg_bytes(51))])  # same name, other samples
    os.utime(tar, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    r = cli("extract", d, *FAST, "-o", f"{out}/", "--json")
    assert r.exit_code == 0 and "the input changed" in r.stderr
    run_json(cli, "extract", d, *FAST, "-o", f"{clean}/")
    assert_same_features(out, clean)
    with open_features(out) as ff:
        assert list(ff) == ["k000", "k001", "k002", "n0", "n1"] and ff.complete
