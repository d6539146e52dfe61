"""SLURM: the batch script `s2 slurm` writes. One srun step runs `s2 extract` once per task (one task per GPU,
or --ntasks), optionally as a job array; each task finds its rank in SLURM's environment (launch.discover_rank).
Nothing about a particular cluster is assumed: partition, account, time, memory and any other sbatch option
come from the command line."""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .errors import ConfigError
from .version import __version__


@dataclass(frozen=True)
class SlurmJob:
    nodes: int = 1
    gpus_per_node: int = 0
    ntasks: int | None = None  # tasks per job; default nodes × gpus_per_node
    array: int | None = None  # K jobs of the same shape
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    cpus_per_gpu: int | None = None
    mem: str | None = None
    sbatch_args: tuple[str, ...] = ()
    job_name: str = "s2-extract"
    signal_grace: int = 120  # seconds before the time limit SLURM sends USR1 to the script (0: no signal asked)
    requeue: bool = True  # a job stopped by a signal with its work unfinished requeues itself

    @property
    def tasks(self) -> int:
        return self.ntasks if self.ntasks is not None else self.nodes * self.gpus_per_node

    @property
    def ranks(self) -> int:
        return self.tasks * (self.array or 1)

    def check(self) -> None:
        for name, v in (("nodes", self.nodes), ("ntasks", self.ntasks), ("array", self.array),
                        ("cpus-per-gpu", self.cpus_per_gpu)):
            if v is not None and v < 1:
                raise ConfigError(f"--{name} must be 1 or more", given=v, fix=f"pass --{name} 1")
        if self.gpus_per_node < 0:
            raise ConfigError("--gpus-per-node must be >= 0", given=self.gpus_per_node, fix="e.g. --gpus-per-node 8")
        if self.tasks < 1:
            raise ConfigError("no tasks to run: give GPUs or tasks", given=f"--nodes {self.nodes} --gpus-per-node 0",
                              fix="pass --gpus-per-node G (one task per GPU) or --ntasks N (e.g. CPU tasks)")
        if self.ntasks is not None and self.ntasks < self.nodes:
            raise ConfigError("--ntasks is smaller than --nodes", given=(self.ntasks, self.nodes),
                              fix="pass at least one task per node")
        if self.cpus_per_gpu is not None and not self.gpus_per_node:
            raise ConfigError("--cpus-per-gpu needs --gpus-per-node", given=self.cpus_per_gpu,
                              fix="pass --gpus-per-node G, or --sbatch-arg=--cpus-per-task=C for CPU tasks")
        if self.signal_grace < 0:
            raise ConfigError("--signal-grace must be >= 0 seconds", given=self.signal_grace,
                              fix="e.g. --signal-grace 120 (0: SLURM sends no warning signal)")
        bad = [a for a in self.sbatch_args if not a.startswith("-")]
        if bad:
            raise ConfigError("--sbatch-arg takes an sbatch option", given=bad[0], expected="e.g. --qos=high",
                              fix="write it as --sbatch-arg=--qos=high")


def sbatch_script(job: SlurmJob, command: list[str], outdir: Path, workdir: Path,
                  env: Mapping[str, str] | None = None) -> str:
    """A readable batch script: #SBATCH lines for the job's shape, `env` exported (the HF cache that holds the
    weights, fetched on the submitting host, and HF_HUB_OFFLINE=1: no task reaches the hub), then one srun of
    `command` supervised by the script (signals passed on, requeue when stopped with work left)."""
    job.check()
    shape = (f"{job.nodes} node{'s' * (job.nodes > 1)} × {job.gpus_per_node} GPUs, one task per GPU"
             if job.ntasks is None else f"{job.ntasks} tasks on {job.nodes} node{'s' * (job.nodes > 1)}")
    ranks = (f"{job.array} array jobs × {job.tasks} tasks = {job.ranks} ranks (rank = array index × {job.tasks} + SLURM_PROCID)"
             if job.array else f"{job.ranks} ranks (SLURM_PROCID of SLURM_NTASKS)")
    log = "slurm-%A_%a.out" if job.array else "slurm-%j.out"
    lines = [
        "#!/bin/bash",
        f"# Written by `s2 slurm` (s2cli {__version__}): {shape}; {ranks}.",
        "# Each rank extracts its share of the input into the same folder; resubmit this script to resume (done",
        "# shards are kept, whatever the number of ranks). Watch it with: s2 status " + shlex.quote(str(outdir)),
        *(["# Stopped by USR1 (before the time limit) or TERM with work left, the job requeues itself and resumes."]
          if job.requeue else []),
        f"#SBATCH --job-name={job.job_name}",
        f"#SBATCH --nodes={job.nodes}",
    ]
    if job.ntasks is not None:
        lines.append(f"#SBATCH --ntasks={job.ntasks}")
    else:
        lines.append(f"#SBATCH --ntasks-per-node={job.gpus_per_node}")
    if job.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    for opt, v in (("cpus-per-gpu", job.cpus_per_gpu), ("mem", job.mem), ("partition", job.partition),
                   ("time", job.time), ("account", job.account)):
        if v is not None:
            lines.append(f"#SBATCH --{opt}={v}")
    if job.array:
        lines.append(f"#SBATCH --array=0-{job.array - 1}")
    if job.signal_grace:
        lines.append(f"#SBATCH --signal=B:USR1@{job.signal_grace}")
    if job.requeue:
        lines.append("#SBATCH --requeue")
    lines += [f"#SBATCH --chdir={workdir}", f"#SBATCH --output={outdir / log}"]
    if job.requeue:
        lines.append("#SBATCH --open-mode=append")  # a requeued job's log goes on after its first life's
    lines += [f"#SBATCH {a}" for a in job.sbatch_args]
    head = " ".join(shlex.quote(a) for a in command[:5])  # python -m s2cli extract INPUT
    cmd = " \\\n    ".join([head, *_pairs(command[5:])])
    lines += ["", "set -euo pipefail"]
    if env:
        lines.append("# the weights were fetched on the submitting host into this cache: the tasks read it, offline")
        lines += [f"export {k}={shlex.quote(str(v))}" for k, v in env.items()]
    lines += [f"srun --kill-on-bad-exit=0 {cmd} &", *_supervise(job.requeue), ""]
    return "\n".join(lines)


def _supervise(requeue: bool) -> list[str]:
    """The script's end: srun runs in the background so that the script can act on USR1 (SLURM's warning,
    --signal) and TERM (scancel, preemption) at once: it passes the signal on to the tasks (they stop in good order:
    finished shards kept, the one in flight abandoned, exit 138/143), waits for them, and when they stopped with
    work left, requeues the job (`scontrol requeue`), which then resumes."""
    lines = [
        "task=$!",
        "got=",
        'stop() { got=$1; echo "s2 slurm: SIG$1 received: passing it on to the tasks" >&2; '
        'kill -s "$1" "$task" 2>/dev/null || true; }',
        "trap 'stop USR1' USR1",
        "trap 'stop TERM' TERM",
        "rc=0",
        'wait "$task" || rc=$?',
        'while kill -0 "$task" 2>/dev/null; do rc=0; wait "$task" || rc=$?; done  # a signal interrupts wait',
    ]
    if requeue:
        lines += [
            'if [ -n "$got" ] && [ "$rc" -ne 0 ]; then',
            '    echo "s2 slurm: the tasks stopped on SIG$got with work left (exit $rc): requeueing job $SLURM_JOB_ID" >&2',
            '    scontrol requeue "$SLURM_JOB_ID"',
            "    exit 0",
            "fi",
        ]
    return [*lines, 'exit "$rc"']


def _pairs(argv: list[str]) -> list[str]:
    """Shell-quoted words, an option and its value on one line, for a script a person reads."""
    words = [shlex.quote(a) for a in argv]
    out: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w.startswith("-") and i + 1 < len(words) and not words[i + 1].startswith("-"):
            out.append(f"{w} {words[i + 1]}")
            i += 2
        else:
            out.append(w)
            i += 1
    return out
