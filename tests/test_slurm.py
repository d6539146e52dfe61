"""A real single-node SLURM cluster (munged, slurmctld, slurmd on localhost, started by the test with a generated
slurm.conf in a temp dir, stopped by pid): `s2 slurm --submit` as a job array of 2 and as an srun step of 2
tasks, on a small WebDataset input; each output folder must equal a local single-rank run. A job signalled mid-run
as SLURM does before its time limit (USR1 to the batch script) requeues itself and completes (cred_expire=10 in
slurm.conf: a requeued job may start again that many seconds later, 120 by default).
Skipped, with the reason, where Debian's slurm-wlm and munge are not installed or the test is not root; fails
instead of skipping under CI (CI=true) or S2CLI_REQUIRE_SLURM=1, so CI cannot pass without running it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST, cannot_run, free_port, make_shards, run_cli, unless_possible
from s2cli import open_features

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol")


def _unavailable() -> str | None:
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return f"SLURM is not installed (missing {', '.join(missing)}): apt-get install -y slurm-wlm munge, as root"
    if os.geteuid() != 0:
        return "starting munged/slurmd needs root (slurmd runs jobs as their user); run as root, as CI does"
    return None


# a real SLURM cluster started in the test, jobs run by subprocesses; without one, skipped here and failed in CI
pytestmark = [pytest.mark.slow, unless_possible(_unavailable())]


class Cluster:
    """munged + slurmctld + slurmd of this machine, all files in `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.host = socket.gethostname().split(".")[0]
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        self.sock = root / "munge.socket"
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self) -> None:
        r = self.root
        key = r / "munge.key"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, capture_output=True)
        os.chmod(key, 0o600)
        self._spawn(["munged", "-F", "--force", f"--socket={self.sock}", f"--key-file={key}",
                     f"--pid-file={r / 'munged.pid'}", f"--log-file={r / 'munged.log'}", f"--seed-file={r / 'munged.seed'}"])
        self._wait(lambda: self.sock.exists(), "munged socket", r / "munged.log")
        for d in ("state", "spool"):
            (r / d).mkdir(exist_ok=True)
        self.conf.write_text("\n".join([
            "ClusterName=s2test", f"SlurmctldHost={self.host}", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.sock},cred_expire=10",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "ReturnToService=2",
            "SlurmdTimeout=300", "MinJobAge=600",
            f"NodeName={self.host} CPUs={os.cpu_count()} State=UNKNOWN",
            f"PartitionName=s2test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP", ""]))
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn(["slurmd", "-D", "-f", str(self.conf)])
        self._wait(self._node_idle, "the node to be idle", r / "slurmd.log")

    def _node_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, env=self.env)
        return r.returncode == 0 and r.stdout.strip() in ("idle", "mix")

    def _spawn(self, argv: list[str]) -> None:
        log = open(self.root / f"{Path(argv[0]).name}.out", "w")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _wait(self, ready, what: str, log: Path, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.5)
        logs = "".join(f"\n--- {p.name}:\n" + p.read_text()[-2000:] for p in sorted(self.root.glob("*.log")) if p.exists())
        outs = "".join(f"\n--- {p.name}:\n" + p.read_text()[-2000:] for p in sorted(self.root.glob("*.out")))
        raise RuntimeError(f"waiting for {what} failed (exited: {dead}){logs}{outs}")

    def wait_job(self, job_id: str, timeout: float = 600) -> list[str]:
        """Wait until the job (every task of an array) has left the queue; its final states."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            q = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, env=self.env)
            if q.returncode == 0 and not q.stdout.strip():
                break
            time.sleep(1)
        else:
            raise TimeoutError(f"job {job_id} still queued or running after {timeout}s")
        show = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=self.env)
        return [w.split("=", 1)[1] for line in show.stdout.splitlines() for w in line.split() if w.startswith("JobState=")]

    def stop(self) -> None:
        for p in reversed(self.procs):  # slurmd, slurmctld, munged: only the processes this test started
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = _unavailable()
    if why:
        cannot_run(f"the real-SLURM test: {why}")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _s2(*args):
    """`s2 ARGS` in this process (the local reference, the submission, `s2 status`): the jobs are the processes."""
    return run_cli(*args)


@pytest.fixture
def slurm_env(cluster, monkeypatch):
    """The cluster's slurm.conf in this process's environment (for `s2 slurm --submit` run in it, and its jobs)."""
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    return cluster


@pytest.mark.parametrize("mode", [["--array", "2", "--ntasks", "1"], ["--ntasks", "2"]], ids=["array2", "srun2"])
def test_s2_slurm_submit_equals_local_run(cluster, slurm_env, tmp_path, mode):
    shards = make_shards(tmp_path / "shards", n_tars=3, per_tar=4)
    spec = f"{shards}/{{000000..000002}}.tar"
    local = tmp_path / "local"
    r = _s2("extract", spec, *FAST, "-o", f"{local}/", "--shard-size", 3, "-q")
    assert r.exit_code == 0, r.stderr
    out = tmp_path / "out"
    r = _s2("slurm", spec, *FAST, "-o", f"{out}/", "--shard-size", 3, *mode, "--job-name", "s2test",
            "--sbatch-arg=--cpus-per-task=1", "--submit", "--json")
    assert r.exit_code == 0, r.stderr + r.stdout
    sub = json.loads(r.stdout)
    assert sub["job_id"] and sub["ranks"] == 2 and Path(sub["script"]).is_file()
    states = cluster.wait_job(sub["job_id"])
    logs = "".join(p.read_text() for p in sorted(out.glob("slurm-*.out")))
    assert states and set(states) == {"COMPLETED"}, (states, logs)
    summaries = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert sorted((s["rank"], s["world"], s["rank_source"]) for s in summaries) == [(0, 2, "slurm"), (1, 2, "slurm")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and sorted({s["rank"] for s in manifest["shards"]}) == [0, 1]
    with open_features(local) as fl, open_features(out) as fo:
        assert sorted(fo) == sorted(fl) and len(fl) == 12
        for k in fl:
            np.testing.assert_array_equal(fo[k], fl[k])
    st = json.loads(_s2("status", out, "--json").stdout)
    assert st["complete"] and [x["state"] for x in st["ranks"]] == ["done", "done"]


# `--python` for the requeue test: runs `-m s2cli ARGS` with every batch slowed by S2TEST_DELAY seconds
SLOW_PYTHON = """#!{python}
import os, sys, time
import s2cli.extractor as extractor
from s2cli.cli import app

delay = float(os.environ["S2TEST_DELAY"])
submit = extractor.Extractor.submit
def slow(*a, **k):
    time.sleep(delay)
    return submit(*a, **k)
extractor.Extractor.submit = slow
assert sys.argv[1:3] == ["-m", "s2cli"], sys.argv
app(sys.argv[3:], prog_name="s2")
"""


def _show(cluster, job_id: str) -> dict[str, str]:
    r = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=cluster.env)
    return dict(w.split("=", 1) for w in r.stdout.split() if "=" in w)


def test_a_job_signalled_mid_run_requeues_itself_and_completes_as_a_local_run(cluster, slurm_env, tmp_path,
                                                                             monkeypatch):
    shards = make_shards(tmp_path / "shards", n_tars=3, per_tar=4)
    spec = f"{shards}/{{000000..000002}}.tar"
    local = tmp_path / "local"
    r = _s2("extract", spec, *FAST, "-o", f"{local}/", "--shard-size", 2, "-b", 1, "-q")
    assert r.exit_code == 0, r.stderr
    slow = tmp_path / "slowpy"
    slow.write_text(SLOW_PYTHON.format(python=sys.executable))
    slow.chmod(0o755)
    out = tmp_path / "out"
    monkeypatch.setenv("S2TEST_DELAY", "0.4")
    r = _s2("slurm", spec, *FAST, "-o", f"{out}/", "--shard-size", 2, "-b", 1, "--ntasks", 1, "--job-name", "s2requeue",
            "--signal-grace", 60, "--python", slow, "--sbatch-arg=--cpus-per-task=1", "--submit", "--json")
    assert r.exit_code == 0, r.stderr + r.stdout
    sub = json.loads(r.stdout)
    assert "#SBATCH --signal=B:USR1@60" in sub["text"] and "#SBATCH --requeue" in sub["text"]
    job = sub["job_id"]
    deadline = time.time() + 120
    while not list(out.glob("part-*.json")):  # mid-run: a shard done, more to do
        assert time.time() < deadline, (out / f"slurm-{job}.out").read_text() if (out / f"slurm-{job}.out").exists() else job
        time.sleep(0.2)
    # what SLURM does <grace> s before the time limit (--signal=B:USR1@N): USR1 to the batch script alone
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, env=cluster.env)
    states = cluster.wait_job(job, timeout=240)
    log = (out / f"slurm-{job}.out").read_text()
    assert states == ["COMPLETED"], (states, log)
    assert int(_show(cluster, job)["Restarts"]) == 1, log
    assert "SIGUSR1 received" in log and "requeueing job" in log, log
    summaries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert summaries and summaries[-1]["complete"] and summaries[-1]["resumed_images"] > 0, log
    with open_features(local) as fl, open_features(out) as fo:
        assert sorted(fo) == sorted(fl) and len(fl) == 12
        for k in fl:
            np.testing.assert_array_equal(fo[k], fl[k])
    st = json.loads(_s2("status", out, "--json").stdout)
    assert st["complete"] and [x["state"] for x in st["ranks"]] == ["done"]
