"""The reliability battery: hostile images, killed runs, full disks, bad flags. Each fault is recorded with its
stage and reason, the run goes on, and every good image's features equal those of a clean run without the bad ones."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    CASES,
    MODEL,
    bomb_png,
    goods,
    jpeg_bytes,
    plain_tar,
    run_cli,
    save_png,
    unless_possible,
    write_image,
)
from s2cli import open_features

pytestmark = pytest.mark.timeout(180)


def run_ok(cli, src, out, *extra) -> dict:
    r = cli("extract", src, *MODEL, "-o", out, "--json", "-q", *extra)
    assert r.exit_code == 0, r.stderr + r.stdout
    return json.loads(r.stdout)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_inputs(cli, tmp_path, case):
    d, ref = tmp_path / "in", tmp_path / "ref"
    d.mkdir()
    ref.mkdir()
    goods(d)
    goods(ref)
    fails, same, metas = CASES[case](d, ref)
    t0 = time.perf_counter()
    s = run_ok(cli, d, tmp_path / "out.h5", "-j", 1)  # decoded in a worker process, as in production
    assert time.perf_counter() - t0 < 30
    run_ok(cli, ref, tmp_path / "ref.h5", "-j", 0)
    with open_features(tmp_path / "out.h5") as fo, open_features(tmp_path / "ref.h5") as fr:
        got = {f["key"]: f for f in fo.failures}
        assert {k: (f["stage"], f["error_class"]) for k, f in got.items()} == fails
        assert all(f["error"] and f["source"] for f in got.values())  # a readable reason and where it came from
        assert sorted(fo) == sorted(["good1", "good2", *same])
        assert s["num_images"] == 2 + len(same) and s["num_failed"] == len(fails)
        for k in ("good1", "good2"):
            np.testing.assert_array_equal(fo[k], fr[k])
        for k, rk in same.items():
            assert np.isfinite(fo[k]).all()
            np.testing.assert_array_equal(fo[k], fr[rk])
        for k, want in metas.items():
            decode = fo.meta(k)["meta"]["decode"]
            assert {n: decode.get(n) for n in want} == want
    if case == "one_pixel":
        with open_features(tmp_path / "out.h5") as fo:
            assert fo.meta("dot")["orig_hw"] == [1, 1]


@pytest.mark.slow
def test_a_decompression_bomb_is_refused_quickly_in_little_memory(tmp_path):
    d = tmp_path / "in"
    goods(d)
    (d / "bomb.png").write_bytes(bomb_png(60_000, 60_000))  # 10.8 GB if it were decoded
    code = ("import resource, sys\nfrom s2cli.cli import app\ntry:\n    app(sys.argv[1:], prog_name='s2')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            # the peak of this process's own memory (VmHWM): ru_maxrss also counts the parent's peak before exec,
            # and the pytest process of a full suite is larger than the bound
            "import os\nst = '/proc/self/status'\n"
            "hwm = [ln.split()[1] for ln in open(st) if ln.startswith('VmHWM:')] if os.path.exists(st) else []\n"
            "print(hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code, "extract", str(d), *MODEL, "-o", str(tmp_path / "o.h5"), "-j", "0",
                        "-q"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) < 2_000_000  # KiB: far below the 10.8 GB a decode would take
    with open_features(tmp_path / "o.h5") as ff:
        [f] = ff.failures
        assert f["key"] == "bomb" and f["error_class"] == "DecompressionBombError" and "pixels" in f["error"]


def test_a_file_deleted_between_listing_and_reading(cli, tmp_path, monkeypatch):
    import s2cli.inputs.folder as folder

    d = tmp_path / "in"
    goods(d)
    write_image(d / "gone.png", (30, 30), 3)
    listed = folder.scan_folder

    def scan_then_delete(root, *args):
        samples = listed(root, *args)
        (d / "gone.png").unlink()
        return samples

    monkeypatch.setattr(folder, "scan_folder", scan_then_delete)
    run_ok(cli, d, tmp_path / "o.h5", "-j", 0)
    with open_features(tmp_path / "o.h5") as ff:
        assert list(ff) == ["good1", "good2"]
        [f] = ff.failures
        assert (f["key"], f["stage"], f["error_class"]) == ("gone", "read", "FileNotFoundError")
        assert "deleted or moved after the input was listed" in f["error"]


def _root_reads_everything() -> str | None:
    return ("root reads any file; dropping that needs util-linux `setpriv`, not installed here"
            if os.geteuid() == 0 and not shutil.which("setpriv") else None)


@pytest.mark.slow
@unless_possible(_root_reads_everything())
def test_an_unreadable_file(cli, tmp_path):
    """Permissions: as a normal user chmod 000 is enough. Root reads anything, so as root the run is made without
    the capabilities that let root ignore permissions (setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH)."""
    d = tmp_path / "in"
    goods(d)
    write_image(d / "secret.png", (30, 30), 3)
    (d / "secret.png").chmod(0o000)
    out = tmp_path / "o.h5"
    if os.geteuid() != 0:
        run_ok(cli, d, out, "-j", 0)
    else:
        r = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m", "s2cli",
                            "extract", str(d), *MODEL, "-o", str(out), "-j", "0", "-q"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    with open_features(out) as ff:
        assert list(ff) == ["good1", "good2"]
        [f] = ff.failures
        assert (f["key"], f["stage"], f["error_class"]) == ("secret", "read", "PermissionError")
        assert "permission denied" in f["error"]


# ---- WebDataset faults -----------------------------------------------------------------------------------------
def test_hostile_tar_members(cli, tmp_path):
    good = [("good1.jpg", jpeg_bytes(1)), ("good2.jpg", jpeg_bytes(2))]
    members = [good[0], ("caption.txt", b"a sample with text and no image"), ("garbage.jpg", b"<html>not an image"),
               ("good1.jpg", jpeg_bytes(9)), ("../../x.jpg", jpeg_bytes(3)), good[1]]
    tar = plain_tar(tmp_path / "in" / "000000.tar", members)
    clean = plain_tar(tmp_path / "clean" / "000000.tar", [good[0], ("../../x.jpg", jpeg_bytes(3)), good[1]])
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    out = tmp_path / "out"
    for fmt in ("h5", "safetensors"):
        run_ok(cli, tar, f"{out}-{fmt}/", "--format", fmt, "-j", 1)
        run_ok(cli, clean, f"{out}-{fmt}-clean/", "--format", fmt, "-j", 0)
        with open_features(f"{out}-{fmt}") as fo, open_features(f"{out}-{fmt}-clean") as fc:
            assert list(fo) == ["good1", "../../x", "good2"] == list(fc)  # keys are data, stored verbatim
            for k in fc:
                np.testing.assert_array_equal(fo[k], fc[k])
            got = {(f["key"], f["stage"], f["error_class"]) for f in fo.failures}
            assert got == {("caption", "read", "MissingImage"), ("garbage", "decode", "UnidentifiedImageError"),
                           ("good1", "read", "DuplicateKey")}
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before  # nothing written outside the output
    assert not list(tmp_path.rglob("x*")) and not (tmp_path.parent / "x.h5").exists()


def test_a_tar_cut_mid_member(cli, tmp_path):
    members = [(f"c{i}.jpg", jpeg_bytes(i, (200, 200))) for i in range(4)]
    cut = plain_tar(tmp_path / "cut" / "000000.tar", members, cut=170000)
    clean = plain_tar(tmp_path / "clean" / "000000.tar", members[:3])
    run_ok(cli, cut, tmp_path / "o.h5", "-j", 1)
    run_ok(cli, clean, tmp_path / "c.h5", "-j", 0)
    with open_features(tmp_path / "o.h5") as fo, open_features(tmp_path / "c.h5") as fc:
        assert list(fo) == list(fc) == ["c0", "c1", "c2"]
        for k in fc:
            np.testing.assert_array_equal(fo[k], fc[k])
        [f] = fo.failures
        assert f["stage"] == "read" and f["error_class"] == "ReadError" and "reading the tar failed" in f["error"]


# ---- NaN / Inf ---------------------------------------------------------------------------------------------------
def test_non_finite_features_are_recorded_not_stored(cli, tmp_path, monkeypatch):
    import s2cli.extractor as extractor

    d = tmp_path / "in"
    goods(d)
    save_png(d / "black.png", np.zeros((40, 40, 3), np.uint8))
    from s2cli.devicepath import Pending

    submit = extractor.Extractor.submit

    def overflow_on_black(self, images, sizes):  # what an fp16 overflow looks like, for the black image only
        feats, pooled = submit(self, images, sizes).result()
        feats = feats.clone()
        for i in range(len(images)):
            if int(images[i].max()) == 0:
                feats[i, 0, 0] = float("inf")
                feats[i, 1, 0] = float("nan")
        return Pending((feats, pooled))

    monkeypatch.setattr(extractor.Extractor, "submit", overflow_on_black)
    run_ok(cli, d, tmp_path / "o.h5", "-j", 0, "-b", 3)
    with open_features(tmp_path / "o.h5") as ff:
        assert list(ff) == ["good1", "good2"]
        [f] = ff.failures
        assert (f["key"], f["stage"], f["error_class"]) == ("black", "model", "NonFiniteFeatures")
        assert "1 NaN and 1 Inf" in f["error"]
    run_ok(cli, d, tmp_path / "kept.h5", "-j", 0, "--no-check-finite")
    with open_features(tmp_path / "kept.h5") as ff:
        assert "black" in list(ff) and not ff.failures and np.isnan(ff["black"]).sum() == 1


# ---- runs that die -----------------------------------------------------------------------------------------------
KILLER = """
import os, signal, sys
import s2cli.backbones as backbones, s2cli.outdir as outdir, s2cli.extractor as extractor, s2cli.writers as writers
from s2cli.cli import app

point, n = sys.argv[1], int(sys.argv[2])
calls = [0]

def die_on_nth():
    calls[0] += 1
    if calls[0] >= n:
        os.kill(os.getpid(), signal.SIGKILL)

def before(obj, name):
    orig = getattr(obj, name)
    def wrapped(*a, **k):
        die_on_nth()
        return orig(*a, **k)
    setattr(obj, name, wrapped)

def after(obj, name):
    orig = getattr(obj, name)
    def wrapped(*a, **k):
        out = orig(*a, **k)
        die_on_nth()
        return out
    setattr(obj, name, wrapped)

{"load": lambda: before(backbones, "load_backbone"),         # during model load
 "mid-batch": lambda: after(extractor.Extractor, "submit"),   # features computed, not yet written
 "writing": lambda: before(writers, "fsync_rename"),         # a complete shard not yet renamed into place
 "between": lambda: after(outdir.OutputDir, "commit"),       # a shard and its marker done, the next not begun
 "end": lambda: before(outdir.OutputDir, "write_manifest"),  # every shard done, the manifest not written
}[point]()
app(sys.argv[3:], prog_name="s2")
"""


@pytest.fixture(scope="module")
def kill_input(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill")
    d = base / "in"
    for i in range(11):
        write_image(d / f"img{i:02d}.png", (30 + i, 36), i)
    (d / "img05.png").unlink()
    (d / "img05.jpg").write_bytes(b"broken")
    args = ["extract", str(d), *MODEL, "-j", "0", "-b", "2", "--shard-size", "3", "-q"]
    clean = base / "clean"
    r = run_cli(*args, "-o", f"{clean}/")  # the reference in this process; the kills below need their own
    assert r.exit_code == 0, r.stderr
    return args, clean


@pytest.mark.slow
@pytest.mark.parametrize("point,n", [("load", 1), ("mid-batch", 3), ("writing", 2), ("between", 2), ("end", 1)])
def test_kill_9_at_any_point_then_rerun_equals_a_clean_run(tmp_path, kill_input, point, n):
    args, clean = kill_input
    out = tmp_path / "killed"
    r = subprocess.run([sys.executable, "-c", KILLER, point, str(n), *args, "-o", f"{out}/"], capture_output=True,
                       timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    if point == "writing":
        assert [p for p in out.iterdir() if ".tmp-" in p.name]  # killed with a temporary shard on disk
    with open_features(out) as partial:  # a reader sees completed shards only, never the temporary one
        assert len(partial) <= 10
    r = run_cli(*args, "-o", f"{out}/", "--json")  # the rerun: in this process
    assert r.exit_code == 0, r.stderr
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    with open_features(clean) as fc, open_features(out) as fk:
        assert list(fk) == list(fc) and len(fc) == 10  # each key once, in input order
        for k in fc:
            np.testing.assert_array_equal(fk[k], fc[k])
        assert fk.complete
    errors = [json.loads(line)["key"] for line in (out / "errors.jsonl").read_text().splitlines()]
    assert errors == ["img05"]


# ---- full disks ----------------------------------------------------------------------------------------------------
def _assert_full_disk_then_resume(cli_or_run, out: Path, clean: Path):
    names = {p.name for p in out.iterdir()}
    assert not [n for n in names if ".tmp-" in n]
    shards = sorted(n for n in names if n.endswith(".h5"))
    assert shards and all(n.replace(".h5", ".json") in names for n in shards)  # what is there is complete and marked
    with open_features(out) as partial:
        assert 0 < len(partial) < 12
        for k in partial:
            assert np.isfinite(partial[k]).all()


def _rerun_completes_as_clean(cli, d: Path, out: Path, clean: Path) -> None:
    """The same command again (the fault gone) resumes after the first shard and ends with a clean run's features."""
    s = run_ok(cli, d, f"{out}/", "--shard-size", 4, "-j", 0)
    assert s["resumed_images"] == 4 and s["complete"]
    with open_features(clean) as fc, open_features(out) as fo:
        assert list(fo) == list(fc)
        for k in fc:
            np.testing.assert_array_equal(fo[k], fc[k])


@pytest.fixture
def full_disk_input(tmp_path):
    d = tmp_path / "in"
    for i in range(12):
        write_image(d / f"img{i:02d}.png", (40, 40 + i), i)
    return d


def test_a_disk_full_before_any_shard_says_the_arrays_alone_are_a_lower_bound(cli, tmp_path, monkeypatch,
                                                                             full_disk_input):
    """Before a shard of the run was measured the size a shard needs is its arrays alone, which the container's
    overhead exceeds: the message says "at least", and the figure is below what a shard really took (#23.11)."""
    import s2cli.writers as writers
    from s2cli.fsutil import human_bytes

    d, out, clean = full_disk_input, tmp_path / "out", tmp_path / "clean"
    run_ok(cli, d, f"{clean}/", "--shard-size", 4, "-j", 0)
    took = json.loads((clean / "part-00000-00000.json").read_text())["bytes"]
    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(writers.shutil, "disk_usage", lambda path: usage(real(path).total, real(path).used, 4096))
    r = cli("extract", d, *MODEL, "-o", f"{out}/", "--shard-size", 4, "-j", 0, "-q")
    assert r.exit_code == 1, r.stderr + r.stdout
    msg = r.stderr.strip()
    assert "a whole shard needs at least " in msg and "(its arrays alone)" in msg and "needs about" not in msg
    floor = msg.split("needs at least ")[1].split(" (its arrays")[0]
    assert floor in {human_bytes(n) for n in range(1, took)}  # below what the shard took


def test_disk_full_simulated(cli, tmp_path, monkeypatch, full_disk_input):
    """The free space the writer sees drops to 4 KiB after the first shard: a clear exit 1 naming the path and the
    space needed, completed shards intact and marked, and a rerun with space continues to a complete result."""
    import s2cli.writers as writers

    d, out, clean = full_disk_input, tmp_path / "out", tmp_path / "clean"
    run_ok(cli, d, f"{clean}/", "--shard-size", 4, "-j", 0)
    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")

    def nearly_full(path):
        u = real(path)
        done = len(list(out.glob("part-*.json"))) if out.exists() else 0
        return usage(u.total, u.used, 4096) if done >= 1 else u

    monkeypatch.setattr(writers.shutil, "disk_usage", nearly_full)
    r = cli("extract", d, *MODEL, "-o", f"{out}/", "--shard-size", 4, "-j", 0, "-q")
    assert r.exit_code == 1, r.stderr + r.stdout
    msg = r.stderr.strip()
    assert "\n" not in msg and "no space left on device writing" in msg and str(out / "part-00000-00001.h5") in msg
    assert "4.0 KiB free" in msg and "a whole shard needs about" in msg and "rerun the same command" in msg
    _assert_full_disk_then_resume(cli, out, clean)
    monkeypatch.setattr(writers.shutil, "disk_usage", real)
    _rerun_completes_as_clean(cli, d, out, clean)


def _failing_sync_file_range(err: int, when):
    """A stand-in for libc's sync_file_range that fails with `err` on the files `when(path)` names (others go to
    the real one): what the kernel says when the disk failed writing pages out."""
    import ctypes

    from s2cli import fsutil

    real = fsutil.SYNC_FILE_RANGE

    def call(fd, offset, nbytes, flags):
        if when(os.readlink(f"/proc/self/fd/{fd}")):
            ctypes.set_errno(err)
            return -1
        return real(fd, offset, nbytes, flags) if real is not None else 0

    return call


@pytest.mark.parametrize("err", ["EIO", "EINVAL"])
def test_write_behind_raises_what_the_disk_failed_and_passes_what_a_file_system_lacks(tmp_path, monkeypatch, err):
    """An I/O error reported while a file's pages go to disk is raised, naming the file (the fsync at the end would
    not report it again: this call saw it); a file system without sync_file_range (EINVAL) is no error."""
    import errno

    from s2cli import fsutil

    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 8192)
    monkeypatch.setattr(fsutil, "SYNC_FILE_RANGE", _failing_sync_file_range(getattr(errno, err), lambda p: True))
    if err == "EINVAL":
        fsutil.write_behind(f)
        return
    with pytest.raises(OSError) as e:
        fsutil.write_behind(f)
    assert e.value.errno == errno.EIO and e.value.filename == str(f)


@pytest.mark.parametrize("err", ["EIO", "ENOSPC"])
def test_a_disk_error_while_a_shard_is_written_out_fails_that_shard_and_keeps_the_others(cli, tmp_path, monkeypatch,
                                                                                       full_disk_input, err):
    """The disk fails writing the second shard's pages out (EIO; or ENOSPC, which a file system allocating space at
    writeback reports then): one line naming that shard and what failed, exit 1, the first shard complete and
    marked, no temporary left, and the rerun without the fault completes the folder with a clean run's features."""
    import errno

    from s2cli import fsutil, writers

    d, out, clean = full_disk_input, tmp_path / "out", tmp_path / "clean"
    run_ok(cli, d, f"{clean}/", "--shard-size", 4, "-j", 0)
    when = lambda p: "part-00000-00001" in p  # noqa: E731
    monkeypatch.setattr(fsutil, "SYNC_FILE_RANGE", _failing_sync_file_range(getattr(errno, err), when))
    monkeypatch.setattr(writers, "WRITE_BEHIND_BYTES", 1)  # these small features: every batch
    r = cli("extract", d, *MODEL, "-o", f"{out}/", "--shard-size", 4, "-j", 0, "-q")
    assert r.exit_code == 1, r.stderr + r.stdout
    msg = r.stderr.strip()
    shard = out / "part-00000-00001.h5"
    said = {"EIO": f"the disk failed writing {shard}: input/output error",
            "ENOSPC": f"no space left on device writing {shard} ("}[err]
    assert "\n" not in msg and said in msg and "rerun the same command" in msg, msg
    assert "No space left" not in msg  # the kernel's words are not repeated: the space left is said instead
    _assert_full_disk_then_resume(cli, out, clean)
    assert (out / "part-00000-00000.json").exists() and not (out / "part-00000-00001.json").exists()
    monkeypatch.undo()
    _rerun_completes_as_clean(cli, d, out, clean)


def _can_mount_tmpfs() -> str | None:
    if os.geteuid() != 0:
        return "mounting a small tmpfs needs root"
    probe = Path(tempfile.mkdtemp(prefix="s2cli-tmpfs-probe-"))
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True, text=True)
        if r.returncode != 0:
            return f"mount -t tmpfs failed here: {r.stderr.strip()}"
        subprocess.run(["umount", str(probe)], check=True)
        return None
    finally:
        probe.rmdir()


@pytest.mark.slow
@unless_possible(_can_mount_tmpfs())
def test_disk_full_on_a_real_small_tmpfs(tmp_path, full_disk_input):
    d, clean = full_disk_input, tmp_path / "clean"
    args = ["extract", str(d), *MODEL, "--shard-size", "4", "-j", "0", "-q"]
    assert run_cli(*args, "-o", f"{clean}/").exit_code == 0  # the reference in this process
    shard = (clean / "part-00000-00000.h5").stat().st_size
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    size_kib = ((1 << 20) + 3 * shard // 2) // 1024  # the writer's 1 MiB headroom and one and a half shards
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)], check=True)
    try:
        out = mnt / "out"
        r = subprocess.run([sys.executable, "-m", "s2cli", *args, "-o", f"{out}/"], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 1, r.stderr  # a clean exit with a message, not a crash (-11) or a hang
        assert "no space left on device writing" in r.stderr and str(out) in r.stderr
        _assert_full_disk_then_resume(None, out, clean)
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        r = run_cli(*args, "-o", f"{out}/", "--json")  # the rerun with space: in this process
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout)["complete"]
        with open_features(clean) as fc, open_features(out) as fo:
            assert list(fo) == list(fc)
            for k in fc:
                np.testing.assert_array_equal(fo[k], fc[k])
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# ---- bad usage: exit 2, one line with the fix, before any weights load ---------------------------------------------
@pytest.fixture
def no_weights(monkeypatch):
    import s2cli.backbones as backbones

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the usage error was reported")

    monkeypatch.setattr(backbones, "load_backbone", refuse)


@pytest.mark.parametrize("args,words", [
    (["-m", "vit-huge-9000"], ["unknown model", "vit-huge-9000", "s2 models"]),
    (["--scales", "0"], ["--scales must be positive", "0.0"]),
    (["--scales", "-1,2"], ["--scales must be positive", "-1.0"]),
    (["--max-split-size", "999"], ["--max-split-size", "999 > 448"]),
    (["--resize-output-to-idx", "5"], ["--resize-output-to-idx", "5", "-2..1"]),
    (["--keep-cls"], ["bchw", "--keep-cls"]),
    (["-m", "siglip-so400m-384", "--keep-cls"], ["no CLS token", "siglip-so400m-384"]),
    (["--pool-only"], ["--pool-only needs --pool"]),
    (["--scales", "1,2", "--img-sizes", "224"], ["--scales", "--img-sizes"]),
    (["--random-init", "--weights", "w.pth"], ["--random-init", "--weights"]),
    (["--format", "safetensors", "-o", "x.h5"], ["--format", "x.h5"]),
    (["--on-error", "ignore"], ["--on-error", "ignore", "skip"]),
])
def test_bad_usage_is_one_line_exit_2_before_weights(cli, tmp_path, no_weights, args, words):
    d = tmp_path / "in"
    goods(d)
    argv = ["extract", d, *args] if "-o" in args else ["extract", d, "-o", tmp_path / "o.h5", *args]
    cli("extract", d, "--scales", "0")  # imports warmed up: what is timed below is the check itself
    t0 = time.perf_counter()
    r = cli(*argv)
    elapsed = time.perf_counter() - t0
    assert r.exit_code == 2, r.stderr + r.stdout
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith("error: ") and "Fix:" in line
    for w in words:
        assert w in line
    assert elapsed < 1.0
    assert not (tmp_path / "o.h5").exists()


def test_bad_inputs_and_outputs_exit_2_before_weights(cli, tmp_path, no_weights):
    d = tmp_path / "in"
    goods(d)
    (tmp_path / "empty").mkdir()
    r = cli("extract", tmp_path / "empty", "-o", tmp_path / "o.h5")
    assert r.exit_code == 2 and "input folder holds no images" in r.stderr
    (tmp_path / "notes.txt").write_text("mine")
    for out, words in [(tmp_path / "notes.txt", "exists and is not a folder"),
                       (f"{tmp_path / 'notes.txt'}/", "exists and is not a folder"),
                       (tmp_path / "adir.h5", "exists and is not a file")]:
        (tmp_path / "adir.h5").mkdir(exist_ok=True)
        r = cli("extract", d, "-o", out, "--random-init")
        assert r.exit_code == 2, r.stderr + r.stdout
        assert words in r.stderr and "Fix:" in r.stderr and "\n" not in r.stderr.strip()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    r = cli("extract", tmp_path / "nowhere")
    assert r.exit_code == 2 and "does not exist" in r.stderr


NO_TORCH = """
import sys
from s2cli.cli import app
try:
    app(sys.argv[1:], prog_name="s2")
except SystemExit as e:
    assert e.code == 2, e.code
assert "torch" not in sys.modules, "torch was imported before the usage error"
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--scales", "0"], ["-m", "vit-huge-9000"], ["--keep-cls"], ["--pool-only"],
                                  ["--max-split-size", "999"], ["--strategy", "tiles-please"]])
def test_bad_usage_is_refused_before_torch_is_imported(tmp_path, args):
    """What makes the command answer within a second: the whole check runs before torch (seconds to import) loads."""
    d = tmp_path / "in"
    goods(d)
    r = subprocess.run([sys.executable, "-c", NO_TORCH, "extract", str(d), "-o", str(tmp_path / "o.h5"), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert r.stderr.startswith("error: ") and "Fix:" in r.stderr
