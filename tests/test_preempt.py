"""Preemption: SIGTERM (a scheduler's time limit, scancel) and SIGUSR1 (`s2 slurm`'s warning before the limit), sent
mid-shard to the whole process group as SLURM does, stop a run in good order: the exit code says which signal, the
heartbeat says `preempted`, no temporary is left, `s2 status` says preempted, and a rerun resumes to the result of
an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from conftest import DEVICES_IMAGES, MODEL, devices_s2, run_cli, slowed_s2, wait_until, write_image
from s2cli import open_features

pytestmark = pytest.mark.slow  # subprocess runs, signals


def s2(*args):
    """`s2 ARGS` in this process (the clean run, `s2 status`, the rerun: none of them is about processes); the runs
    that are signalled are subprocesses (slowed_s2, devices_s2)."""
    return run_cli(*args)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_mid_shard_preempts_the_run_and_a_rerun_resumes_to_the_clean_result(tmp_path, sig):
    d = tmp_path / "in"
    for i in range(8):
        write_image(d / f"im{i}.png", (40 + i, 52), i)
    opts = [*MODEL, "-j", "2", "-b", "1", "--shard-size", "3", "-q"]
    clean = tmp_path / "clean"
    r = s2("extract", d, "-o", f"{clean}/", *opts)
    assert r.exit_code == 0, r.stderr
    out = tmp_path / "out"
    p = slowed_s2(0.5, "extract", d, "-o", f"{out}/", *opts)
    hb = out / "rank-00000.json"
    try:
        # the first shard is done and the second one is being written: the signal lands mid-shard
        wait_until(lambda: (out / "part-00000-00000.json").exists(), "the first shard's marker")
        wait_until(lambda: hb.exists() and json.loads(hb.read_text())["shard"] == "part-00000-00001.h5",
                   "the second shard in flight")
        wait_until(lambda: any(".tmp-" in x.name and "00001" in x.name for x in out.iterdir()),
                   "the second shard's temporary")
        os.killpg(p.pid, sig)  # every process of the run, decode workers too, as SLURM signals a step
        _, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr, stderr  # neither the run nor its decode workers
    assert f"stopped: {sig.name} (exit {128 + sig})" in stderr and "resumes" in stderr  # s2 says what happened
    beat = json.loads(hb.read_text())
    assert (beat["state"], beat["signal"]) == ("preempted", sig.name)
    assert not [x.name for x in out.iterdir() if ".tmp-" in x.name]
    assert not (out / "part-00000-00001.json").exists()  # the shard in flight was abandoned, never marked done
    st = json.loads(s2("status", out, "--json").stdout)
    assert [x["state"] for x in st["ranks"]] == ["preempted"] and not st["stale"] and not st["complete"]
    assert st["preempted"] == [{"rank": 0, "host": beat["host"], "signal": sig.name}]
    text = s2("status", out).stdout
    assert f"stopped on {sig.name}" in text and "to resume" in text

    r = s2("extract", d, "-o", f"{out}/", *opts, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["resumed_images"] == 3
    with open_features(clean) as fc, open_features(out) as fo:
        assert sorted(fo) == sorted(fc) and len(fc) == 8
        for k in fc:
            np.testing.assert_allclose(fo[k], fc[k], atol=1e-5, rtol=0)
    assert json.loads(s2("status", out, "--json").stdout)["ranks"][0]["state"] == "done"


def test_devices_pass_sigusr1_on_to_their_workers(tmp_path):
    d = tmp_path / "in"
    for i in range(DEVICES_IMAGES):  # neither worker can simply finish meanwhile
        write_image(d / f"im{i:03d}.png", (40, 52), i)
    out = tmp_path / "out"
    p, hb = devices_s2(d, out)
    try:
        wait_until(lambda: all(h.exists() for h in hb), "both workers' heartbeats", 180)
        p.send_signal(signal.SIGUSR1)  # the parent alone: it passes the signal on
        _, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 138, stderr
    beats = [json.loads(h.read_text()) for h in hb]
    assert [(b["state"], b.get("signal")) for b in beats] == [("preempted", "SIGUSR1")] * 2, (beats, stderr)
    assert not [x.name for x in out.iterdir() if ".tmp-" in x.name]
