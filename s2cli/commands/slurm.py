"""`s2 slurm`: an sbatch script that runs `s2 extract` as ranks of one run (forwarding every extract option)."""
from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Optional

import typer

from ..errors import ConfigError, S2Error
from . import options as o
from ._common import err, given, offline, out, reported, settings
from .extract import CONSOLE_ONLY, extract_argv


@o.with_options(skip=CONSOLE_ONLY)
def slurm(
    ctx: typer.Context,
    input: o.Input,
    nodes: Annotated[int, typer.Option("--nodes", help="Nodes per job (per array task with --array).")] = 1,
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", help="GPUs per node; one task (rank) per GPU.")] = 0,
    ntasks: Annotated[Optional[int], typer.Option("--ntasks", help="Tasks per job instead of nodes × GPUs (e.g. CPU tasks).")] = None,
    array: Annotated[Optional[int], typer.Option("--array", help="A job array of K jobs (--array=0-(K-1)), each --nodes × --gpus-per-node tasks.")] = None,
    partition: Annotated[Optional[str], typer.Option("--partition", help="sbatch --partition.")] = None,
    time_limit: Annotated[Optional[str], typer.Option("--time", help="sbatch --time, e.g. 24:00:00.")] = None,
    account: Annotated[Optional[str], typer.Option("--account", help="sbatch --account.")] = None,
    cpus_per_gpu: Annotated[Optional[int], typer.Option("--cpus-per-gpu", help="sbatch --cpus-per-gpu.")] = None,
    mem: Annotated[Optional[str], typer.Option("--mem", help="sbatch --mem (per node), e.g. 200G.")] = None,
    sbatch_arg: Annotated[Optional[list[str]], typer.Option("--sbatch-arg", help="Any other sbatch option, as one #SBATCH line (repeatable), e.g. --sbatch-arg=--qos=high.")] = None,
    job_name: Annotated[str, typer.Option("--job-name", help="sbatch --job-name.")] = "s2-extract",
    signal_grace: Annotated[int, typer.Option("--signal-grace", help="Seconds before the time limit SLURM sends USR1 (#SBATCH --signal=B:USR1@N): the tasks stop in good order; 0: no warning signal.")] = 120,
    requeue: Annotated[bool, typer.Option("--requeue/--no-requeue", help="A job stopped by USR1/TERM with work left requeues itself (scontrol requeue) and resumes.")] = True,
    python: Annotated[Optional[str], typer.Option("--python", help="Python that runs s2cli on the nodes. [default: the one running s2]")] = None,
    submit: Annotated[bool, typer.Option("--submit", help="Submit the script with sbatch and print the job id.")] = False,
    as_json: o.Json = False,
    **kw: Any,
) -> None:
    """Write a SLURM batch script that runs `s2 extract` as ranks of one run (srun: one task per GPU, or a job
    array), into OUTDIR/s2-slurm.sbatch; print it; --submit submits it. Every `s2 extract` option is forwarded.

    Examples:
      s2 slurm 'shards/{00000..09999}.tar' -o feats/ --recipe llava-1.5-s2 --nodes 4 --gpus-per-node 8 --time 24:00:00
      s2 slurm photos.txt -o feats/ --array 16 --gpus-per-node 1 --partition gpu --submit
    """
    import shlex
    import subprocess
    from pathlib import Path as _P

    from .. import api
    from ..slurm import SlurmJob, sbatch_script

    v = {k: val for k, val in given(ctx).items() if k in o.OPTIONS or k == "input"}  # forwarded: what was set
    with reported(), offline(v.get("offline")):
        # validate everything a task would (config, recipe, input) before anything is written or submitted
        res = settings(v)
        inp = api.open_inputs(res)
        if v.get("output") is None or not res.output_is_dir:
            raise ConfigError("s2 slurm needs an output folder that its tasks share", given=v.get("output"),
                              fix="pass -o OUTDIR/")
        from ..outdir import OutputDir
        from ..store import local_of

        if local_of(res.output) is None:
            raise ConfigError("s2 slurm writes its script and SLURM's logs into the output folder, which must be "
                              "local", given=res.output, fix="pass a local -o OUTDIR/ (or write your own batch "
                              "script that runs s2 extract -o URL/)")
        res, _ = api.locate_weights(res)  # the weights, downloaded here once (the tasks run offline) or checked
        inp.fetch_ahead()  # a hub dataset's files into the HF cache here, as the weights: the tasks run offline
        if OutputDir(res.output).has_run:  # resubmitting: the tasks would refuse other settings, say so now
            OutputDir(res.output).check_same({"input": inp.describe(), "config": res.to_dict()}, res.compare_keys())
        if v.get("overwrite"):
            raise ConfigError("--overwrite cannot be forwarded to several ranks", fix=f"remove {res.output} first")
        job = SlurmJob(nodes=nodes, gpus_per_node=gpus_per_node, ntasks=ntasks, array=array, partition=partition,
                       time=time_limit, account=account, cpus_per_gpu=cpus_per_gpu, mem=mem,
                       sbatch_args=tuple(sbatch_arg or ()), job_name=job_name,
                       signal_grace=signal_grace, requeue=requeue)
        outdir = _P(res.output).resolve()
        # no -q: a task's stderr is the job's log, where it writes a progress line every S2CLI_PROGRESS_S seconds
        command = [python or sys.executable, *extract_argv(v)[1:], "--json"]
        from ..hub import cache_env

        script = sbatch_script(job, command, outdir, _P.cwd(), env={**cache_env(), "HF_HUB_OFFLINE": "1"})
        outdir.mkdir(parents=True, exist_ok=True)
        path = outdir / "s2-slurm.sbatch"
        path.write_text(script)
        job_id = None
        if submit:
            try:
                r = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
            except FileNotFoundError:
                raise ConfigError("sbatch is not on PATH", given=str(path),
                                  fix="run on a SLURM login node, or submit the script yourself: sbatch " + shlex.quote(str(path))) from None
            if r.returncode != 0:
                raise S2Error(f"sbatch refused the job: {r.stderr.strip()}", given=str(path),
                              fix="adjust the sbatch options (--partition, --account, --time, --sbatch-arg) and rerun")
            job_id = r.stdout.strip().split(";")[0]
    if as_json:
        print(json.dumps({"script": str(path), "job_id": job_id, "ranks": job.ranks, "text": script}))
        return
    out.print(script, highlight=False, markup=False, end="")
    err.print(f"wrote {path}", highlight=False)
    if job_id is not None:
        print(f"submitted job {job_id}; watch it with: s2 status {shlex.quote(str(outdir))}")




