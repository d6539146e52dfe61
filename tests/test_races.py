"""Nothing lost, nothing hung: two runs on one output at the same instant, --overwrite of a live run, a file that
appears during a run, Ctrl-C and SIGTERM mid-run, orphans of --devices, temporaries of killed runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import DEVICES_IMAGES, dead_pid, devices_s2, run_cli, wait_until, write_image
from s2cli import open_features

MODEL = ["-m", "timm:test_resnet", "--random-init", "--img-sizes", "64,128", "--max-split-size", "64"]
pytestmark = pytest.mark.timeout(300)

# `python -c RUNNER READY GO DELAY s2-args...`: says it is ready (file READY), waits for the file GO (the barrier:
# both runs start at the same instant), then runs `s2` with every batch slowed by DELAY seconds
RUNNER = """
import os, sys, time
import s2cli.extractor as extractor
from s2cli.cli import app

ready, go, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
if delay:
    submit = extractor.Extractor.submit
    def slow(*a, **k):
        time.sleep(delay)
        return submit(*a, **k)
    extractor.Extractor.submit = slow
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
app(sys.argv[4:], prog_name="s2")
"""


def start(tmp: Path, name: str, go: Path, delay: float, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp / f"{name}.ready"), str(go), str(delay),
                             "extract", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def together(tmp: Path, runs: dict[str, tuple]) -> dict[str, subprocess.CompletedProcess]:
    """Start the runs at the same instant (a barrier file) and wait for all."""
    go = tmp / "go"
    procs = {name: start(tmp, name, go, delay, *args) for name, (delay, *args) in runs.items()}
    wait_until(lambda: all((tmp / f"{n}.ready").exists() for n in runs), "the runs to be ready")
    go.touch()
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=240)
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def images(d: Path, n: int, seed: int = 0, prefix: str = "img") -> Path:
    for i in range(n):
        write_image(d / f"{prefix}{i:02d}.png", (40 + i, 36), seed + i)
    return d


# ---- 1. one file, two runs --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_runs_on_one_file_at_once_one_is_refused_and_nothing_is_replaced(tmp_path):
    a, b = images(tmp_path / "a", 3, 0, "a"), images(tmp_path / "b", 3, 10, "b")
    out = tmp_path / "same.h5"
    r = together(tmp_path, {"A": (1.0, a, *MODEL, "-j", 0, "-b", 1, "-o", out, "-q"),
                             "B": (1.0, b, *MODEL, "-j", 0, "-b", 1, "-o", out, "-q")})
    assert sorted(x.returncode for x in r.values()) == [0, 2], {n: x.stderr[-2000:] for n, x in r.items()}
    won = next(n for n, x in r.items() if x.returncode == 0)
    lost = r["B" if won == "A" else "A"]
    assert "is being written by another run" in lost.stderr and "pid" in lost.stderr
    with open_features(out) as f:
        assert list(f) == [f"{won.lower()}{i:02d}" for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no claim, no temporary


def test_a_file_that_appears_during_the_run_is_kept_and_so_are_the_features(cli, tmp_path, monkeypatch):
    import s2cli.writers as writers

    d = images(tmp_path / "in", 2)
    out = tmp_path / "o.h5"
    rename = writers.fsync_rename

    def someone_else_writes_first(tmp, final, *a, **k):
        Path(final).write_bytes(b"another program's file")
        return rename(tmp, final, *a, **k)

    monkeypatch.setattr(writers, "fsync_rename", someone_else_writes_first)
    r = cli("extract", d, *MODEL, "-j", 0, "-o", out, "-q")
    assert r.exit_code == 1 and "appeared while this run was writing it" in r.stderr, r.stderr
    assert out.read_bytes() == b"another program's file"
    kept = tmp_path / f"o.{os.getpid()}.h5"
    assert str(kept) in r.stderr
    with open_features(kept) as f:
        assert list(f) == ["img00", "img01"]


def test_overwrite_still_replaces_the_file_that_was_there(cli, tmp_path):
    d = images(tmp_path / "in", 2)
    out = tmp_path / "o.h5"
    out.write_bytes(b"old")
    assert cli("extract", d, *MODEL, "-j", 0, "-o", out, "-q").exit_code == 2
    r = cli("extract", d, *MODEL, "-j", 0, "-o", out, "-q", "--overwrite")
    assert r.exit_code == 0, r.stderr
    with open_features(out) as f:
        assert list(f) == ["img00", "img01"]


# ---- 3. one folder, two runs --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_runs_on_one_folder_at_once_one_is_refused(tmp_path):
    d = images(tmp_path / "in", 4)
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    args = (d, *MODEL, "-j", 0, "-b", 1, "--shard-size", 2, "-o", f"{out}/", "-q")
    r = together(tmp_path, {"A": (1.0, *args), "B": (1.0, *args)})  # each holds its claim for seconds
    assert sorted(x.returncode for x in r.values()) == [0, 2], {n: x.stderr[-2000:] for n, x in r.items()}
    lost = next(x for x in r.values() if x.returncode == 2)
    assert "rank 0 of" in lost.stderr and "is being written by another run" in lost.stderr
    errors = [json.loads(line)["key"] for line in (out / "errors.jsonl").read_text().splitlines()]
    assert errors == ["broken"]  # once, not once per run
    with open_features(out) as f:
        assert list(f) == [f"img{i:02d}" for i in range(4)] and f.complete
    assert not list(out.glob(".rank-*.lock"))


# ---- 4. --overwrite of a folder a live run is writing -----------------------------------------------------------
@pytest.mark.slow
def test_overwrite_of_a_folder_a_live_run_is_writing_is_refused(tmp_path):
    d = images(tmp_path / "in", 6)
    out = tmp_path / "out"
    args = (d, *MODEL, "-j", 0, "-b", 1, "--shard-size", 2, "-o", f"{out}/", "-q")
    go = tmp_path / "go"
    go.touch()
    a = start(tmp_path, "A", go, 1.5, *args, "--json")  # 6 batches of 1.5 s: alive throughout (B, in this process, is
    # refused before any work: well under a second)
    wait_until(lambda: (out / "rank-00000.json").exists(), "the first run's heartbeat")
    run_json = (out / "run.json").read_text()
    b = run_cli("extract", *args, "--overwrite", "--pool", "mean")  # in this process: refused before any work
    assert b.exit_code == 2, b.stderr
    assert f"pid {a.pid}" in b.stderr and "being written by another run" in b.stderr
    stdout, stderr = a.communicate(timeout=240)
    assert a.returncode == 0, stderr
    s = json.loads(stdout)
    assert s["complete"] and s["total_images"] == 6 and s["num_images"] == 6
    assert (out / "run.json").read_text() == run_json
    with open_features(out) as f:
        assert len(f) == 6


def test_overwrite_is_refused_while_another_rank_is_alive(tmp_path):
    from s2cli.errors import ConfigError
    from s2cli.fsutil import take_claim
    from s2cli.outdir import OutputDir

    run = {"input": {"spec": "in"}, "config": {"model": "m"}}
    out = tmp_path / "out"
    first = OutputDir(out)
    first.prepare(run, False, ["model"], rank=0, world=2)
    first.release()  # rank 0 of that run ended
    other = take_claim(out / ".rank-00001.lock", "rank 1", "")  # rank 1 of that run, alive (here, this process)
    try:
        with pytest.raises(ConfigError, match=r"--overwrite would delete .*\(rank 1: host .* pid"):
            OutputDir(out).prepare(run, True, ["model"], rank=0, world=1)
        assert (out / "run.json").exists()
    finally:
        other.release()
    again = OutputDir(out)
    again.prepare(run, True, ["model"], rank=0, world=1)  # rank 1 gone: the folder is started over
    again.release()


# ---- 5. Ctrl-C during -j 2 ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_decode_loader_stops_within_its_deadline_when_a_worker_died_holding_the_queue_lock(tmp_path):
    from s2cli.inputs.decode import Fit
    from s2cli.inputs.loader import DecodeLoader
    from s2cli.inputs.samples import Sample

    for i in range(2):
        write_image(tmp_path / f"x{i}.png", (20, 20), i)
    before = set(own_children())
    loader = DecodeLoader(Fit("crop", 32, (0.5, 0.5, 0.5)), 1)
    records = loader.map([Sample(f"x{i}", str(tmp_path / f"x{i}.png")) for i in range(2)], lambda s: s)
    _, rec = next(records)  # the loader is mid-run: its worker stays, waiting for the next task
    assert rec.error is None
    time.sleep(0.5)  # the idle worker waits for the next task holding its queue's read lock
    [worker] = set(own_children()) - before
    os.kill(worker, signal.SIGKILL)
    time.sleep(0.5)
    closing = threading.Thread(target=loader.close, daemon=True)
    t = time.time()
    closing.start()
    closing.join(60)
    assert not closing.is_alive() and time.time() - t < 30


def own_children() -> list[int]:
    """This process's child processes (every thread's)."""
    return [int(c) for task in Path("/proc/self/task").iterdir() for c in (task / "children").read_text().split()]


@pytest.mark.slow
def test_ctrl_c_during_a_run_with_two_decode_workers_ends_it_within_seconds(tmp_path):
    d = tmp_path / "big"
    for i in range(120):  # long enough that Ctrl-C lands mid-run on a quiet machine too
        write_image(d / f"i{i:03d}.png", (700, 900), i)
    for trial in range(2):
        p = subprocess.Popen([sys.executable, "-m", "s2cli", "extract", str(d), *MODEL, "-j", "2", "-o",
                              str(tmp_path / f"o{trial}.h5"), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
        children = Path(f"/proc/{p.pid}/task/{p.pid}/children")
        wait_until(lambda: len(children.read_text().split()) >= 2, "two decode workers")
        workers = [int(x) for x in children.read_text().split()]
        time.sleep(0.3 + 0.5 * trial)  # mid-decode (the 120 images take about 2 s on a quiet 2-core box)
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C does: the whole process group
        try:
            _, stderr = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            pytest.fail("Ctrl-C did not end the run within 30 s")
        assert p.returncode != 0 and "Traceback" not in stderr, stderr[-3000:]
        wait_until(lambda: not any(alive(w) for w in workers), "the decode workers to end", 10)
        assert not [x for x in tmp_path.iterdir() if ".tmp-" in x.name]


# ---- 6. SIGTERM to a --devices parent ----------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_to_a_devices_parent_stops_its_workers(tmp_path):
    d = images(tmp_path / "in", DEVICES_IMAGES)  # neither worker can simply finish meanwhile
    out = tmp_path / "out"
    p, hb = devices_s2(d, out)
    pids = []
    try:
        wait_until(lambda: all(h.exists() for h in hb), "both workers' heartbeats", 180)
        pids = [json.loads(h.read_text())["pid"] for h in hb]
        assert all(alive(x) for x in pids)
        p.send_signal(signal.SIGTERM)  # the parent alone, as a scheduler or `kill` does
        p.communicate(timeout=60)
        wait_until(lambda: not any(alive(x) for x in pids), "the workers to end with their parent", 15)
    finally:
        for x in pids:
            if alive(x):
                os.kill(x, signal.SIGKILL)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 143
    assert not [x for x in out.iterdir() if ".tmp-" in x.name]
    states = {json.loads(h.read_text())["state"] for h in hb}
    assert states == {"preempted"}  # stopped by the forwarded SIGTERM, not finished, and each said so
    assert len(list(out.glob("part-*.json"))) < DEVICES_IMAGES


# ---- 7. SIGTERM of a single-file run -------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_of_a_single_file_run_leaves_no_temporary(tmp_path):
    d = images(tmp_path / "in", 6)
    out = tmp_path / "o.h5"
    go = tmp_path / "go"
    go.touch()
    p = start(tmp_path, "A", go, 0.5, d, *MODEL, "-j", 0, "-b", 1, "-o", out, "-q")
    tmp = out.with_name(f".o.h5.tmp-{p.pid}")
    wait_until(tmp.exists, "the run's temporary file")
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 143, stderr
    assert not out.exists() and not [x.name for x in tmp_path.iterdir() if x.name.startswith(".o.h5")]


def test_a_later_run_removes_the_temporaries_of_dead_runs_of_its_file(cli, tmp_path):
    d = images(tmp_path / "in", 2)
    out = tmp_path / "o.h5"
    dead = dead_pid()
    leftover = tmp_path / f".o.h5.tmp-{dead}"
    leftover.write_bytes(b"x" * 1000)  # what a run killed with SIGKILL leaves
    other = tmp_path / f".other.h5.tmp-{dead}"
    other.write_bytes(b"x")  # another output's: not this run's business
    r = cli("extract", d, *MODEL, "-j", 0, "-o", out, "-q")
    assert r.exit_code == 0, r.stderr
    assert not leftover.exists() and other.exists()


# ---- the claim of an output that cannot be written --------------------------------------------------------------
@pytest.mark.slow
def test_a_read_only_output_folder_is_one_line_exit_2_before_any_work(tmp_path):
    d = images(tmp_path / "in", 1)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    # root ignores permissions: as root the run is made without those capabilities (as test_faults does)
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    try:
        r = subprocess.run([*drop, sys.executable, "-m", "s2cli", "extract", str(d), *MODEL, "-o", str(ro / "x.h5"),
                            "-q"], capture_output=True, text=True, timeout=120)
    finally:
        ro.chmod(0o755)
    assert r.returncode == 2 and "cannot write in" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


# a stop signal is a Python exception raised wherever the main thread is: between any two steps of a run too
@pytest.mark.parametrize("where", ["s2cli.launch.pin_device", "s2cli.api.load", "s2cli.api._notes",
                                   "s2cli.api.share_total", "s2cli.run.Run.execute"])
def test_a_stop_signal_between_any_two_steps_of_a_run_says_preempted_and_gives_the_claim_back(
        tmp_path, monkeypatch, where):
    import s2cli
    from s2cli.launch import Terminated

    d = images(tmp_path / "in", 2)
    out = tmp_path / "out"
    def stopped(*a, **k):
        raise Terminated(128 + signal.SIGTERM)

    monkeypatch.setattr(where, stopped)
    with pytest.raises(Terminated):
        s2cli.extract(str(d), f"{out}/", model="timm:test_resnet", random_init=True, img_sizes=(64, 128), max_split_size=64, workers=0)
    beat = json.loads((out / "rank-00000.json").read_text())
    assert (beat["state"], beat["signal"]) == ("preempted", "SIGTERM")
    monkeypatch.undo()  # the claim was given back: the same run starts again at once and finishes
    s = s2cli.extract(str(d), f"{out}/", model="timm:test_resnet", random_init=True, img_sizes=(64, 128), max_split_size=64, workers=0)
    assert s.num_images == 2 and json.loads((out / "rank-00000.json").read_text())["state"] == "done"
