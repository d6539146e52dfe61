"""Several ranks on one output folder: rank discovery (torchrun, SLURM tasks and arrays), two ranks via torchrun
and via --devices cpu,cpu equal one rank, three ranks killed mid-way resumed by two, rank-aware cleanup,
run.json written once, `s2 status`, and the `s2 slurm` script (its forwarded options parse back to the same
values). CPU only; the real-SLURM test is test_slurm.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import typer

from conftest import FAST, dead_pid, invoke_json, make_shards, run_cli, torch_threads, write_image
from s2cli import open_features
from s2cli.cli import app
from s2cli.commands.extract import extract, option_argv as _option_argv
from s2cli.errors import ConfigError
from s2cli.fsutil import create_exclusive
from s2cli.launch import Rank, discover_rank
from s2cli.outdir import OutputDir


def assert_same_features(a: Path, b: Path, n: int) -> None:
    with open_features(a) as fa, open_features(b) as fb:
        assert sorted(fa) == sorted(fb) and len(fa) == n and len(list(fb)) == n  # every key once
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k])
            assert fa.meta(k)["meta"] == fb.meta(k)["meta"]


# ---- rank discovery ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env,expected", [
    ({}, Rank(0, 1, 0, "single")),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, Rank(3, 8, 1, "torchrun")),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"},
     Rank(1, 2, 1, "torchrun")),  # torchrun inside a SLURM job: torchrun's numbering wins
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_STEP_ID": "0"}, Rank(5, 16, 5, "slurm")),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_STEP_ID": "batch"}, Rank(0, 1, 0, "single")),  # the batch script
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, Rank(2, 4, 0, "slurm")),
    ({"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_MAX": "13"}, Rank(2, 4, 0, "slurm")),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
      "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"}, Rank(3, 6, 1, "slurm")),  # array of srun steps: array first
])
def test_discover_rank(env, expected):
    assert discover_rank(env) == expected


@pytest.mark.parametrize("env", [
    {"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"},
    {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "3"},  # --array=0-8:4
    {"SLURM_ARRAY_TASK_ID": "1"},
])
def test_discover_rank_refuses_what_cannot_number_ranks(env):
    with pytest.raises(ConfigError):
        discover_rank(env)


def test_units_are_dealt_round_robin():
    owners = [[u for u in range(10) if Rank(r, 3).owns(u)] for r in range(3)]
    assert owners == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


# ---- the output folder shared by ranks ------------------------------------------------------------------------
RUN = {"input": {"spec": "in"}, "config": {"model": "m"}}


def test_run_json_is_written_once_and_checked_by_every_rank(tmp_path):
    p = tmp_path / "run.json"
    assert create_exclusive(p, "first") and not create_exclusive(p, "second")
    assert p.read_text() == "first" and not list(tmp_path.glob(".*tmp*"))
    d = OutputDir(tmp_path / "out")
    d.prepare(RUN, False, ["model"], rank=0, world=2)
    d.prepare(RUN, False, ["model"], rank=1, world=2)
    with pytest.raises(ConfigError, match="different config"):
        d.prepare({**RUN, "config": {"model": "other"}}, False, ["model"], rank=1, world=2)
    with pytest.raises(ConfigError, match="several ranks"):
        d.prepare(RUN, True, ["model"], rank=0, world=2)


def _heartbeat(d: Path, rank: int, pid: int, state="running", age=0.0) -> None:
    import socket

    (d / f"rank-{rank:05d}.json").write_text(json.dumps({
        "rank": rank, "host": socket.gethostname(), "pid": pid, "state": state, "started": time.time() - age,
        "updated": time.time() - age, "unit": "wds[x]", "unit_index": 1, "part": 0, "shard": "part-00001-00000.h5"}))


def _dead_pid() -> int:
    return dead_pid()


def test_cleanup_keeps_a_live_ranks_work_and_removes_a_dead_ones(tmp_path):
    out = tmp_path / "out"
    d = OutputDir(out)
    d.prepare(RUN, False, ["model"], rank=0, world=2)
    leftovers = ["part-00001-00000.h5", ".part-00001-00001.h5.tmp-999999", "part-00000-00003.h5"]
    for name in leftovers:
        (out / name).write_bytes(b"x")
    _heartbeat(out, 1, os.getpid())  # rank 1 is alive: its shard in progress must survive rank 0's start
    d.prepare(RUN, False, ["model"], rank=0, world=2)
    assert sorted(p.name for p in out.iterdir() if "part-" in p.name) == sorted(leftovers[:2])
    _heartbeat(out, 1, _dead_pid())  # the same, after rank 1's process died: leftovers, removed
    d.prepare(RUN, False, ["model"], rank=0, world=2)
    assert not [p for p in out.iterdir() if "part-" in p.name]
    _heartbeat(out, 1, os.getpid(), age=3600)  # alive by pid but silent for an hour: stale too
    (out / "part-00001-00002.h5").write_bytes(b"x")
    d.prepare(RUN, False, ["model"], rank=0, world=2)
    assert not (out / "part-00001-00002.h5").exists()
    _heartbeat(out, 0, os.getppid())  # another live process holds rank 0: refused, not shared
    with pytest.raises(ConfigError, match="rank 0 of this folder is running already"):
        d.prepare(RUN, False, ["model"], rank=0, world=2)


def test_several_ranks_need_a_folder(cli, image_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = cli("extract", image_dir, *FAST, "-o", tmp_path / "one.h5")
    assert r.exit_code == 2 and "must then be a folder" in r.stderr
    r = cli("extract", image_dir, *FAST, "-o", f"{tmp_path}/o/", "--devices", "cpu,cpu")
    assert r.exit_code == 2 and "already one rank" in r.stderr


# ---- two ranks equal one --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_devices_cpu_cpu_equals_one_rank(cli, tmp_path):
    shards = make_shards(tmp_path / "shards", n_tars=3, per_tar=4)
    spec = f"{shards}/{{000000..000002}}.tar"
    one, two = tmp_path / "one", tmp_path / "two"
    invoke_json(cli, "extract", spec, *FAST, "-o", f"{one}/", "--shard-size", 3, "--json", "-q")
    rep = invoke_json(cli, "extract", spec, *FAST, "-o", f"{two}/", "--shard-size", 3, "--devices", "cpu,cpu", "--json")
    assert [(w["rank"], w["device"], w["exit_code"]) for w in rep["workers"]] == [(0, "cpu", 0), (1, "cpu", 0)]
    assert sum(w["summary"]["num_images"] for w in rep["workers"]) == 12
    st = rep["status"]
    assert st["complete"] and st["units_done"] == 3 and st["shards_done"] == 6 and st["images"] == 12
    assert [(x["rank"], x["state"], x["shards"]) for x in st["ranks"]] == [(0, "done", 4), (1, "done", 2)]
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["complete"] and {s["rank"] for s in manifest["shards"]} == {0, 1}
    assert_same_features(one, two, 12)


@pytest.mark.slow
def test_devices_reports_a_failed_worker_and_exits_non_zero(cli, tmp_path, image_dir):
    r = cli("extract", image_dir, *FAST, "-o", f"{tmp_path}/o/", "--devices", "cpu,cuda:7")
    assert r.exit_code == 2 and "CUDA" in r.stderr  # checked before any worker starts
    r = cli("extract", image_dir, *FAST, "-o", f"{tmp_path}/o/", "--devices", "cpu,cpu", "--weights",
            tmp_path / "missing.safetensors", "--no-random-init", "--json")
    assert r.exit_code == 2 and "missing.safetensors" in r.stderr  # the launcher locates the weights first
    assert not (tmp_path / "o").exists()
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")  # found, but each worker fails to read it
    r = cli("extract", image_dir, *FAST, "-o", f"{tmp_path}/o/", "--devices", "cpu,cpu", "--weights",
            tmp_path / "broken.safetensors", "--no-random-init", "--json")
    assert r.exit_code == 2  # the workers' exit code
    rep = json.loads(r.stdout)
    assert [(w["rank"], w["exit_code"]) for w in rep["workers"]] == [(0, 2), (1, 2)]
    assert all("broken.safetensors" in w["error"] for w in rep["workers"])
    assert [(x["rank"], x["state"]) for x in rep["status"]["ranks"]] == [(0, "failed"), (1, "failed")]
    r = cli("status", tmp_path / "o")
    assert r.exit_code == 0 and "rank 1 failed: cannot read the checkpoint" in r.stdout


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_rank(tmp_path):
    shards = make_shards(tmp_path / "shards", n_tars=3, per_tar=4)
    spec = f"{shards}/{{000000..000002}}.tar"
    one, two = tmp_path / "one", tmp_path / "two"
    one_thread = dict(os.environ, OMP_NUM_THREADS="1")  # torchrun's default for its workers: same sums, same bits
    with torch_threads(1):  # the one-rank reference in this process, summing as they do
        assert run_cli("extract", spec, *FAST, "-o", f"{one}/", "--shard-size", 3, "-q").exit_code == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                        "s2cli", "extract", spec, *FAST, "-o", f"{two}/", "--shard-size", "3", "--json", "-q"],
                       capture_output=True, text=True, env=one_thread)
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = sorted((json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")), key=lambda s: s["rank"])
    assert [(s["rank"], s["world"], s["rank_source"]) for s in summaries] == [(0, 2, "torchrun"), (1, 2, "torchrun")]
    assert [s["writes_summary"] for s in summaries] == [True, False]  # the barrier passed: rank 0 wrote the manifest
    assert summaries[0]["complete"] and summaries[0]["total_images"] == 12
    assert_same_features(one, two, 12)


@pytest.mark.slow
def test_three_ranks_killed_then_two_resume(tmp_path, monkeypatch):
    d = tmp_path / "imgs"
    for i in range(18):
        write_image(d / f"img{i:04d}.png", (40 + i % 3 * 8, 48), i)
    slow = ["-m", "timm:test_vit", "--random-init", "--scales", "1,2,3", "-j", "0", "-b", "1", "--shard-size", "2", "-q"]
    clean, out = tmp_path / "clean", tmp_path / "out"
    with torch_threads(1):  # the reference in this process, summing as the killed ranks (OMP_NUM_THREADS=1) do
        assert run_cli("extract", d, "-o", f"{clean}/", *slow).exit_code == 0
    procs = [subprocess.Popen([sys.executable, "-m", "s2cli", "extract", str(d), "-o", f"{out}/", *slow],
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="3", LOCAL_RANK=str(r), OMP_NUM_THREADS="1"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
             for r in range(3)]
    deadline = time.time() + 180
    beats = [out / f"rank-{r:05d}.json" for r in range(3)]
    # three shards done, and every rank started (a rank still loading when killed leaves no heartbeat: under load
    # the others could then all be done, and no rank would be seen killed)
    while time.time() < deadline and (len(list(out.glob("part-*.json"))) < 3 or not all(b.exists() for b in beats)):
        time.sleep(0.05)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    st = json.loads(run_cli("status", out, "--json").stdout)
    assert 3 <= st["shards_done"] < 9 and not st["complete"]
    assert len(st["stale"]) >= 1 and all(x["state"] in ("stale", "done") for x in st["ranks"])  # killed, not running
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the two --devices workers, started by the launcher in this process
    r = run_cli("extract", d, "-o", f"{out}/", *slow, "--devices", "cpu,cpu", "--json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["status"]["complete"] and rep["status"]["images"] == 18
    assert sum(w["summary"]["resumed_images"] for w in rep["workers"]) >= 6  # done units were not redone
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    marked = {json.loads(p.read_text())["shard"] for p in out.glob("part-*.json")}
    assert {p.name for p in out.glob("part-*.h5")} == marked  # no shard without its marker is left
    units = [json.loads(p.read_text())["unit_index"] for p in out.glob("part-*.json")]
    assert sorted(units) == list(range(9))  # each unit exactly once, whoever did it
    assert_same_features(clean, out, 18)


def test_status_of_a_folder_and_of_something_else(cli, image_dir, tmp_path):
    invoke_json(cli, "extract", image_dir, *FAST, "-o", f"{tmp_path}/o/", "--shard-size", 3, "--json", "-q")
    st = invoke_json(cli, "status", tmp_path / "o", "--json")
    assert (st["shards_done"], st["shards_total"], st["images"], st["complete"]) == (2, 2, 4, True)
    assert [(x["rank"], x["state"], x["images"]) for x in st["ranks"]] == [(0, "done", 4)]
    r = cli("status", tmp_path / "o")
    assert r.exit_code == 0 and "shards 2/2" in r.stdout and "complete" in r.stdout
    r = cli("status", image_dir)
    assert r.exit_code == 2 and "no run.json" in r.stderr


# ---- s2 slurm ------------------------------------------------------------------------------------------------
def test_forwarded_options_parse_back_to_the_same_values(image_dir):
    cmd = typer.main.get_command(app).commands["extract"]  # type: ignore[attr-defined]
    values = {"input": str(image_dir), "output": "o/", "recipe": "llava-1.5-s2", "random_init": True, "keep_cls": False,
              "scales": "1,2", "batch_size": 4, "decode_timeout": 9.5, "overwrite": False, "image_key": "jpg;png"}
    argv = _option_argv(extract, values, ("ctx",))
    parsed = cmd.make_context("extract", list(argv)).params
    assert {k: parsed[k] for k in values} == values
    assert "--drop-cls" in argv and "--overwrite" not in argv  # an off flag that has an "off" name stays explicit


def test_slurm_script_for_4_nodes_of_8_gpus(cli, image_dir, tmp_path):
    out = tmp_path / "feats"
    r = cli("slurm", image_dir, "-o", f"{out}/", "--recipe", "llava-1.5-s2", "--random-init", "--nodes", 4,
            "--gpus-per-node", 8, "--cpus-per-gpu", 6, "--time", "24:00:00", "--partition", "gpu", "--account", "proj",
            "--mem", "400G", "--sbatch-arg=--qos=high", "--python", "/opt/env/bin/python")
    assert r.exit_code == 0, r.stderr
    script = (out / "s2-slurm.sbatch").read_text()
    assert r.stdout == script
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-gpu=6", "#SBATCH --time=24:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --mem=400G", "#SBATCH --qos=high",
                 f"#SBATCH --output={out}/slurm-%j.out", f"#SBATCH --chdir={Path.cwd()}"]:
        assert line in script.splitlines()
    assert "srun --kill-on-bad-exit=0 /opt/env/bin/python -m s2cli extract" in script and "32 ranks" in script
    assert "--recipe llava-1.5-s2" in script and "--random-init" in script and "--array" not in script
    # the folder holding the script is still a valid output folder; a resubmission with other settings is refused
    invoke_json(cli, "extract", image_dir, *FAST, "-o", f"{out}/", "--json", "-q")
    assert (out / "s2-slurm.sbatch").is_file()
    r = cli("slurm", image_dir, *FAST, "-o", f"{out}/", "--ntasks", 2)
    assert r.exit_code == 0, r.stderr
    r = cli("slurm", image_dir, *FAST, "-o", f"{out}/", "--ntasks", 2, "--split-mode", "pad")
    assert r.exit_code == 2 and "split_mode: 'resize' -> 'pad'" in r.stderr


def test_slurm_array_and_refusals(cli, image_dir, tmp_path, monkeypatch):
    r = cli("slurm", image_dir, *FAST, "-o", f"{tmp_path}/a/", "--array", 5, "--gpus-per-node", 1, "--json")
    j = json.loads(r.stdout)
    assert j["ranks"] == 5 and j["job_id"] is None
    assert "#SBATCH --array=0-4" in j["text"] and "slurm-%A_%a.out" in j["text"]
    r = cli("slurm", image_dir, *FAST, "-o", f"{tmp_path}/b/")
    assert r.exit_code == 2 and "--gpus-per-node G" in r.stderr
    r = cli("slurm", image_dir, *FAST, "-o", tmp_path / "b.h5", "--ntasks", 2)
    assert r.exit_code == 2 and "output folder" in r.stderr
    r = cli("slurm", image_dir, *FAST, "-o", f"{tmp_path}/c/", "--ntasks", 2, "--scales", "x")
    assert r.exit_code == 2 and "--scales" in r.stderr
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    r = cli("slurm", image_dir, *FAST, "-o", f"{tmp_path}/d/", "--ntasks", 2, "--submit")
    assert r.exit_code == 2 and "sbatch is not on PATH" in r.stderr
