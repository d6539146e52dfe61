"""Launch: where a run computes. Resolves `--device` and `--precision` to a torch device and dtype, discovers
this process's rank (torchrun, SLURM tasks or arrays, `--devices` workers) and pins its device."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

from ._lazy import torch
from .errors import ConfigError

PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # torch dtype names


def resolve_device(spec: str) -> torch.device:
    """auto (CUDA when present, else CPU) | cpu | cuda | cuda:K."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError("--device is not known", given=spec, expected="auto | cpu | cuda | cuda:K",
                          fix="pass --device auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device asks for CUDA but none is available", given=spec, fix="pass --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError("no such CUDA device", given=spec,
                              expected=f"cuda:0..cuda:{torch.cuda.device_count() - 1}", fix="pass --device cuda:0")
    elif dev.type != "cpu":
        raise ConfigError("--device is not supported", given=spec, expected="auto | cpu | cuda | cuda:K",
                          fix="pass --device auto")
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    dtype = getattr(torch, PRECISION_DTYPES[precision])
    if dtype is torch.float16 and device.type == "cpu":
        raise ConfigError("fp16 compute is not supported on the CPU", given=precision, fix="pass --precision bf16 or fp32")
    return dtype


# ---- ranks: which share of the input this process does -------------------------------------------------------
@dataclass(frozen=True)
class Rank:
    """This process's place among the processes sharing one output folder. `source` says where it came from:
    torchrun, slurm (srun tasks and/or a job array), devices (`s2 extract --devices`), or single."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    source: str = "single"

    def owns(self, unit_index: int) -> bool:
        """Units are dealt round-robin; the assignment depends only on the unit's index and the world size."""
        return unit_index % self.world == self.rank


def _env_int(env: Mapping[str, str], name: str) -> int:
    text = env[name]
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name} is not an integer", given=text,
                          fix=f"unset {name}, or start the run with torchrun/srun, which set it") from None


def discover_rank(env: Mapping[str, str] | None = None) -> Rank:
    """In order: torchrun (RANK, WORLD_SIZE, LOCAL_RANK); SLURM tasks of one step (SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID) and/or a SLURM job array (SLURM_ARRAY_TASK_ID with SLURM_ARRAY_TASK_COUNT, or
    SLURM_ARRAY_TASK_MIN/MAX) — an array of K jobs of T tasks each is K×T ranks, array task first; else one rank.
    SLURM tasks count only inside a job step (srun sets SLURM_STEP_ID; a batch script itself is one process)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        r, w = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
        local = _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        source = env.get("S2CLI_RANK_SOURCE", "torchrun")
        return _checked(Rank(r, w, local, source), "RANK/WORLD_SIZE")
    rank, world, local, parts = 0, 1, 0, []
    in_step = "SLURM_STEP_ID" in env and env["SLURM_STEP_ID"] not in ("batch", "extern")
    if in_step and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _env_int(env, "SLURM_PROCID"), _env_int(env, "SLURM_NTASKS")
        local = _env_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        parts.append("SLURM_PROCID/SLURM_NTASKS")
    if "SLURM_ARRAY_TASK_ID" in env:
        task = _env_int(env, "SLURM_ARRAY_TASK_ID")
        low = _env_int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        if "SLURM_ARRAY_TASK_COUNT" in env:
            count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        elif "SLURM_ARRAY_TASK_MAX" in env:
            count = _env_int(env, "SLURM_ARRAY_TASK_MAX") - low + 1
        else:
            raise ConfigError("SLURM_ARRAY_TASK_ID is set without SLURM_ARRAY_TASK_COUNT or SLURM_ARRAY_TASK_MAX",
                              given=env["SLURM_ARRAY_TASK_ID"], fix="submit the array with sbatch --array=0-(K-1)")
        if not 0 <= task - low < count:
            raise ConfigError("the SLURM array is not contiguous: its task ids cannot number the ranks",
                              given=f"task {task} of min {low}, count {count}",
                              fix="submit with --array=0-(K-1) (no step, no list; a %limit is fine)")
        rank, world = (task - low) * world + rank, count * world
        parts.append("SLURM_ARRAY_TASK_ID")
    if parts:
        return _checked(Rank(rank, world, local, "slurm"), " + ".join(parts))
    return Rank()


def _checked(r: Rank, where: str) -> Rank:
    if r.world < 1 or not 0 <= r.rank < r.world or r.local_rank < 0:
        raise ConfigError(f"the rank from {where} is out of range", given=f"rank {r.rank} of {r.world}, local {r.local_rank}",
                          expected="0 <= rank < world size", fix="start the run with torchrun or srun, which set these")
    return r


def rank_device(spec: str, rank: Rank) -> torch.device:
    """--device for this rank: `auto` and `cuda` become cuda:(LOCAL_RANK mod visible GPUs); cpu and cuda:K stay."""
    dev = resolve_device(spec)
    if dev.type == "cuda" and dev.index is None and spec in ("auto", "cuda"):
        dev = torch.device("cuda", rank.local_rank % torch.cuda.device_count())
    return dev


def pin_device(dev: torch.device) -> None:
    """Make `dev` this process's current device before any model loads (no context on another GPU)."""
    if dev.type == "cuda":
        torch.cuda.set_device(dev)


def parse_devices(spec: str) -> list[str]:
    """--devices: `all` (every visible GPU), GPU indices `0,1,2,3`, or device names `cpu,cpu` / `cuda:0,cuda:1`;
    one worker process per entry."""
    if spec.strip() == "all":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError("--devices all found no CUDA device", given=spec, fix="pass --devices cpu,cpu to run CPU workers")
        return [f"cuda:{i}" for i in range(n)]
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ConfigError("--devices is empty", given=spec, expected="all | 0,1,2,3 | cpu,cpu", fix="e.g. --devices 0,1")
    out = [f"cuda:{s}" if s.isdigit() else s for s in items]
    for d in out:
        resolve_device(d)  # the same checks as --device
    return out


def barrier_timeout() -> float:
    """Seconds the final torchrun barrier waits for the slowest rank (S2CLI_BARRIER_TIMEOUT, default 30 min)."""
    return float(os.environ.get("S2CLI_BARRIER_TIMEOUT", "1800"))


def final_barrier(rank: Rank) -> bool:
    """Under torchrun, wait for every rank (gloo, with a timeout) so that one of them writes the summary.
    True when all ranks arrived. Nothing depends on it for correctness: without a group, or when the barrier
    fails, every rank writes the manifest from the markers it sees."""
    if rank.source != "torchrun" or rank.world == 1 or not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        return False
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=barrier_timeout())
    try:
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=rank.rank, world_size=rank.world, timeout=timeout)
        dist.monitored_barrier(timeout=timeout)
        return True
    except Exception:  # a rank that died or is late: fall back to every rank writing the manifest
        return False
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# the signals that stop a run in good order: SIGTERM (a scheduler's time limit or preemption, `scancel`, `kill`) and
# SIGUSR1 (what `s2 slurm`'s script asks SLURM to send <grace> seconds before the time limit)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Terminated(SystemExit):
    """A stop signal arrived (raised by `sigterm_raises`): the run's cleanup runs as for any error (the shard in
    flight is abandoned, temporaries removed, the heartbeat says `preempted`), then the process exits with
    128 + the signal's number (143 for SIGTERM, 138 for SIGUSR1), the status a shell shows for it."""

    def __init__(self, code: int):
        super().__init__(code)
        self.signum = code - 128

    @property
    def signame(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"


_deferred: list[int] = []  # signals that arrived inside `signals_deferred`, raised at its end
_deferring = 0


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM and SIGUSR1 raise `Terminated` in the main thread, so temporaries are removed, the
    heartbeat says why and `--devices` workers are stopped. Only for a signal that still has its default action:
    a handler the caller (or a launcher) installed stays in charge."""
    main = threading.current_thread() is threading.main_thread()
    mine = [s for s in STOP_SIGNALS if main and signal.getsignal(s) is signal.SIG_DFL]

    raised: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if raised:  # a second signal (SLURM signals the step, and the batch script forwards it) must not cut the cleanup
            return
        if _deferring:
            _deferred.append(signum)
            return
        raised.append(signum)
        raise Terminated(128 + signum)

    for s in mine:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s in mine:
            signal.signal(s, signal.SIG_DFL)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """A stop signal that arrives inside waits until its end (then raises `Terminated`): a shard being closed and
    marked done is finished, never left half-renamed or with half a marker."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _deferred:
        signum = _deferred.pop(0)
        _deferred.clear()
        raise Terminated(128 + signum)


PARENT_ENV = "S2CLI_PARENT_PID"  # a `--devices` worker's parent: the worker ends when it does


def die_with_parent() -> None:
    """In a `--devices` worker: get SIGTERM when the parent process ends, however it ends (Linux), and end now if
    it is already gone, so that no worker extracts on unseen as an orphan."""
    parent = os.environ.get(PARENT_ENV, "")
    if not parent.isdigit():
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent still forwards SIGTERM and SIGINT
        pass
    if os.getppid() != int(parent):
        raise Terminated(128 + signal.SIGTERM)


def _stop(procs: list, deadline: float = 10.0, signum: int = signal.SIGTERM) -> None:
    """Send `signum` (SIGTERM) to every worker still running, then SIGKILL those still there after `deadline`
    seconds; reap all."""
    import subprocess

    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)
    end = time.monotonic() + deadline
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_workers(argv: list[str], devices: list[str], env: Mapping[str, str] | None = None,
                on_tick: Callable[[], None] | None = None, tick_s: float = 1.0) -> list[dict]:
    """`--devices`: start `argv --device D --json -q` once per device, as rank i of len(devices) (RANK,
    WORLD_SIZE, LOCAL_RANK in its environment, and `env`), wait for all (calling `on_tick` every `tick_s` seconds
    meanwhile: the live progress), and return each worker's exit code, JSON summary and last error line. Workers
    share nothing but the output folder; one failing does not stop the others. SIGTERM, SIGUSR1 or Ctrl-C to this
    process is passed on to the workers (Ctrl-C as SIGTERM; SIGKILL after a deadline) before it ends; a worker
    also ends when this process dies (`die_with_parent`)."""
    import subprocess
    import tempfile

    procs: list[subprocess.Popen] = []
    with sigterm_raises():
        try:
            logs = []
            for i, dev in enumerate(devices):
                wenv = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
                wenv.update(env or {})
                wenv.update(RANK=str(i), WORLD_SIZE=str(len(devices)), LOCAL_RANK=str(i), S2CLI_RANK_SOURCE="devices",
                           **{PARENT_ENV: str(os.getpid())})
                logs.append(tempfile.TemporaryFile(mode="w+"))
                procs.append(subprocess.Popen([*argv, "--device", dev, "--json", "-q"], env=wenv,
                                              stdout=subprocess.PIPE, stderr=logs[-1], text=True))
            while on_tick is not None and any(p.poll() is None for p in procs):
                time.sleep(tick_s)  # a worker prints one JSON line at its end: its pipe cannot fill meanwhile
                on_tick()
            if on_tick is not None:
                on_tick()  # what they did in the end
            return [_result(i, dev, p, log) for i, (dev, p, log) in enumerate(zip(devices, procs, logs))]
        except Terminated as e:  # the scheduler's signal goes on to the workers: they stop as preempted too
            _stop(procs, signum=e.signum)
            raise
        finally:
            _stop(procs)


def _result(i: int, dev: str, p, log) -> dict:
    """A worker's end: its exit code, its JSON summary (the last JSON line it printed), its last error line."""
    import json

    stdout, _ = p.communicate()
    log.seek(0)
    errors = [line.strip() for line in log.read().splitlines() if line.strip()]
    log.close()
    summary = None
    for line in reversed(stdout.splitlines()):
        try:
            summary = json.loads(line)
            break
        except ValueError:
            continue
    return {"rank": i, "device": dev, "exit_code": p.returncode, "summary": summary,
            "error": errors[-1] if p.returncode != 0 and errors else None}
