"""The host pipeline alone, at the LLaVA-1.5-S2 geometry (issue #25): `s2 extract` with an instant device, beside
the limits it cannot beat (decode + fit on the cores it has, the disk's write speed), measured in the same run.

    python benchmarks/bench_host.py                      # 200 synthetic 1024x768 JPEGs, -j 0 and -j 2, 2 repeats
    python benchmarks/bench_host.py --quick              # 48 images, -j 2 only, 1 repeat: a minute
    python benchmarks/bench_host.py --jobs 0,1,2 --repeat 3 --json out.json
    python benchmarks/bench_host.py --baseline /tmp/base    # the same runs with another s2cli, side by side

The instant device: the backbone is a stub whose engine call returns correctly shaped zeros at once (576 x 3072
float16 per image, 3.54 MB), in a host buffer made once per batch size (a GPU run's features come back into
pinned buffers that CUDA's caching host allocator reuses: no fresh host memory per batch), and the device-side
tensor work around it (normalize, the non-finite reduction) is
taken out too, as it runs on the GPU in a GPU run; what is left is what the host does per image in such a run:
read, decode and fit (decode workers), the batch stack and copies, the finite verdict, the item records, the
writer thread (encode, HDF5, hashing) and the done marker. `--host-normalize` keeps normalize on the host CPU (as
the issue's first measurement did). Each variant runs in a fresh process; its CPU is counted around
`s2cli.extract` alone: the main thread (thread_time), the main process (all its threads, RUSAGE_SELF) and the
decode workers (RUSAGE_CHILDREN: reaped when the run closes its pool).

Limits measured in the same run: decode + fit of the same JPEGs on one core in a fresh process (CPU-ms per image,
split into decode and fit by their wall time; the limit of -j N is N cores' worth, capped by the CPUs; with
--baseline, each code against its own), and the disk's write speed for the
same bytes (a plain write + fsync, and an h5py contiguous dataset). Sections are functions in SECTIONS, so
another measurement is one more entry: `pair` (whether two decodes at once slow each other down) and `loader` (the
decode stage's own cost, the decode taken out) say what bounds a run's fraction of the decode limit.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

TOKENS, CHANNELS = 576, 3072  # LLaVA-1.5-S2's output per image
IMAGE_BYTES = TOKENS * CHANNELS * 2  # float16


def make_images(folder: Path, n: int) -> list[Path]:
    """`n` synthetic photo-like 1024x768 JPEGs (s2cli.bench.synthetic_jpegs) written as files."""
    from s2cli.bench import synthetic_jpegs

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in synthetic_jpegs(n, (768, 1024)):
        p = folder / f"{s.key}.jpg"
        p.write_bytes(s.data)
        paths.append(p)
    return paths


def settings(images: Path, out: Path, jobs: int, fmt: str, shard_size: int | None = None) -> Any:
    import s2cli

    return s2cli.api.settings(str(images), str(out) + "/", recipe="llava-1.5-s2", workers=jobs, dtype="float16",
                              format=fmt, random_init=True, **({"shard_size": shard_size} if shard_size else {}))


# ---- the instant device --------------------------------------------------------------------------------------------
def instant_backbone(res: Any) -> Any:
    """A Backbone of the recipe's description whose module does nothing (it is never called: the engine is
    replaced by `install_instant_device`)."""
    import torch

    from s2cli.backbones import Backbone

    class Instant(Backbone):
        def __init__(self, cfg: Any):  # no adapter to build: nothing calls the module
            self.cfg, self.module, self.weights, self.revision = cfg, torch.nn.Linear(1, 1), "instant", None
            self._fn, self._eager, self.nhwc, self.embeddings = self.module, None, False, None

    return Instant(res.backbone)


def install_instant_device(host_normalize: bool) -> None:
    """The engine call returns zeros of the output's shape and dtype at once; normalize (unless `host_normalize`)
    and the device-side non-finite reduction (where the code has one) cost nothing, as device work on a GPU."""
    import torch

    import s2cli.extractor as ex

    landed: dict[int, Any] = {}  # per batch size, the host buffer the features land in (never written again)

    def engine(backbone, x, img_sizes=None, **kw):
        if x.shape[0] not in landed:
            landed[x.shape[0]] = torch.zeros((x.shape[0], TOKENS, CHANNELS), dtype=torch.float16)
        return landed[x.shape[0]]

    ex.multiscale_forward = engine
    if not host_normalize:
        ex.normalize_images = lambda images, mean, std, dtype: images
    if hasattr(ex, "finite_sums"):  # the batched device check: zeros are finite
        ex.finite_sums = lambda *ts: [None if t is None else torch.zeros(t.shape[0]) for t in ts]


class ThreadCPU:
    """Each thread's CPU seconds in this process (utime + stime of /proc/self/task/TID/stat, named by
    threading.enumerate()), sampled every 50 ms while the run goes and once at its end: a thread that ends between
    two samples loses at most its last 50 ms. Linux only (elsewhere, nothing is recorded)."""

    def __init__(self) -> None:
        import threading

        self.cpu: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")
        self._sample()
        self.start = dict(self.cpu)  # what the threads alive now had spent before (imports, setup)
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import threading

        for t in threading.enumerate():
            if t.native_id is not None:
                self.names.setdefault(t.native_id, t.name.split(" (")[0].rstrip("-0123456789") or t.name)
        try:
            tids = os.listdir("/proc/self/task")
        except OSError:
            return
        for tid in tids:
            try:
                fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            self.cpu[int(tid)] = (int(fields[11]) + int(fields[12])) / self._tick

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def stop(self) -> dict[str, float]:
        """CPU seconds per thread name since this started (threads of one name summed; the sampler left out)."""
        self._sample()
        self._stop.set()
        out: dict[str, float] = {}
        for tid, s in self.cpu.items():
            name = self.names.get(tid, "unnamed")
            if name != "bench-sampler":
                out[name] = out.get(name, 0.0) + s - self.start.get(tid, 0.0)
        return out


def child(args: argparse.Namespace) -> None:
    """One variant in this (fresh) process: the run's CPU and wall seconds, printed as JSON."""
    import s2cli

    install_instant_device(args.host_normalize)
    out = Path(args.out)
    res = settings(Path(args.images), out, args.jobs, args.format, args.shard_size)
    bb = instant_backbone(res)
    steps = time_shard_end()
    sampler = ThreadCPU()
    box0 = box_cpu()
    r0, c0, th0, w0 = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN),
                       time.thread_time(), time.perf_counter())
    summary = s2cli.extract(str(args.images), config=res, backbone=bb)
    wall = time.perf_counter() - w0
    box1 = box_cpu()
    th = time.thread_time() - th0
    r1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    threads = sampler.stop()
    cpu = lambda a, b: (b.ru_utime - a.ru_utime) + (b.ru_stime - a.ru_stime)  # noqa: E731
    written = sum(p.stat().st_size for p in out.glob("part-*"))
    from s2cli.readers import open_features

    with open_features(str(out)) as f:
        first = f.failures[0] if f.failures else None
    print(json.dumps({"images": summary.num_images, "failed": summary.num_failed, "wall_s": wall,
                      "main_thread_s": th, "threads_s": threads, "minflt_self": r1.ru_minflt - r0.ru_minflt,
                      "minflt_children": c1.ru_minflt - c0.ru_minflt, "process_s": cpu(r0, r1), "children_s": cpu(c0, c1), "bytes": written, "first_failure": first,
                      "stage_seconds": summary.stage_seconds, "wait_seconds": summary.wait_seconds,
                      "box_busy_s": box1[0] - box0[0], "box_s": box1[1] - box0[1], "shard_end_s": steps}))


def box_cpu() -> tuple[float, float]:
    """The whole machine's CPU seconds so far, (busy, all), from /proc/stat (Linux; zeros elsewhere): over a run,
    busy / all is the share of the cores anything used (the run, the kernel's own threads, other processes)."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(v) - v[3] - v[4]) / tick, sum(v) / tick


def time_shard_end() -> dict[str, float]:
    """Wall seconds of the steps that end a shard, summed over the run (filled in as it goes): its fsync and
    rename, its digest for the marker, its pages dropped from the cache. Steps this s2cli does not have (an older
    --baseline) are left out."""
    import importlib

    spent: dict[str, float] = {}
    for module, name in (("s2cli.writers", "fsync_rename"), ("s2cli.run", "shard_record"), ("s2cli.run", "drop_cached")):
        mod = importlib.import_module(module)
        f = getattr(mod, name, None)
        if f is None:
            continue

        def timed(*a: Any, _f: Any = f, _name: str = name, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return _f(*a, **kw)
            finally:
                spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - t

        setattr(mod, name, timed)
    return spent


def run_variant(images: Path, work: Path, jobs: int, fmt: str, host_normalize: bool,
                code: str | None = None, shard_size: int | None = None) -> dict[str, Any]:
    """One variant in a fresh process; `code`: a folder holding another s2cli to run instead of this one."""
    out = work / f"out-j{jobs}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", "--images", str(images), "--out", str(out), "--jobs", str(jobs),
           "--format", fmt] + (["--host-normalize"] if host_normalize else []) + (
           ["--shard-size", str(shard_size)] if shard_size else [])
    env = {**os.environ, "PYTHONPATH": code} if code else None
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"variant -j {jobs} failed:\n{p.stderr[-3000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    n = r["images"]
    if r["failed"] or not n:  # a stub that no longer fits the backbone interface fails every image
        raise SystemExit(f"variant -j {jobs}: {r['failed']} of {r['failed'] + n} images failed: {r['first_failure']}")
    return {**r, "jobs": jobs, "img_s": n / r["wall_s"], "mb_s": r["bytes"] / r["wall_s"] / 1e6,
            "ms_total": 1e3 * (r["process_s"] + r["children_s"]) / n, "ms_process": 1e3 * r["process_s"] / n,
            "ms_main_thread": 1e3 * r["main_thread_s"] / n, "ms_children": 1e3 * r["children_s"] / n}


# ---- the limits --------------------------------------------------------------------------------------------------
def decode_limit(paths: list[Path], res: Any) -> dict[str, Any]:
    """Decode + fit of every image on one core, in this process (CPU seconds; the records' own decode/fit split)."""
    import s2cli
    from s2cli.plan import fit_of

    # which modules this s2cli has, by its own files: a module missing from a --baseline tree would otherwise be
    # imported from the installed (editable) s2cli, mixing two codes
    own = Path(s2cli.__file__).parent
    if (own / "inputs" / "decode.py").exists():
        from s2cli.inputs.decode import decode_sample
        from s2cli.inputs.samples import Sample
    else:  # an s2cli from before the inputs/ package
        from s2cli.sources import Sample, decode_sample  # type: ignore[no-redef]
    if (own / "heap.py").exists():  # its decode workers keep freed memory: the one-core limit is measured alike
        from s2cli.heap import keep_freed_memory

        keep_freed_memory()
    fit = fit_of(res)
    samples = [Sample(p.stem, str(p)) for p in paths]
    decode_sample(samples[0], fit)  # warm-up
    dec = fitted = 0.0
    c0 = time.process_time()
    for s in samples:
        rec = decode_sample(s, fit)
        secs = rec["seconds"] if isinstance(rec, dict) else rec.seconds  # (a dict: an s2cli from before Decoded)
        dec += secs[0] + secs[1]
        fitted += secs[2]
    cpu = time.process_time() - c0
    n = len(samples)
    return {"ms_per_image": 1e3 * cpu / n, "ms_decode": 1e3 * dec / n, "ms_fit": 1e3 * fitted / n,
            "img_s_per_core": n / cpu}


def decode_children(images: Path, work: Path, fmt: str, n: int = 1, code: str | None = None) -> list[dict[str, Any]]:
    """`decode_limit` in `n` fresh processes started at once, with this s2cli or the one in `code`."""
    cmd = [sys.executable, __file__, "--child", "--images", str(images), "--jobs", "decode", "--format", fmt]
    env = {**os.environ, "PYTHONPATH": code} if code else None
    ps = [subprocess.Popen(cmd + ["--out", str(work / f"probe{i}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env) for i in range(n)]
    outs = [p.communicate() for p in ps]
    for p, (_, err) in zip(ps, outs):
        if p.returncode:
            raise SystemExit(f"the decode limit failed:\n{err[-3000:]}")
    return [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]


def write_limit(work: Path, n: int) -> dict[str, Any]:
    """The disk's speed for the bytes the run writes (n images of 576 x 3072 float16): a plain write + fsync, and
    an h5py contiguous dataset written image by image."""
    import h5py

    one = np.ones((TOKENS, CHANNELS), np.float16)
    total = n * one.nbytes
    path = work / "write-limit.bin"
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(n):
            f.write(one.data)
        f.flush()
        os.fsync(f.fileno())
    plain = total / (time.perf_counter() - t) / 1e6
    path.unlink()
    path = work / "write-limit.h5"
    t = time.perf_counter()
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("features", (n, TOKENS, CHANNELS), np.float16)
        for i in range(n):
            ds[i] = one
        f.flush()
        os.fsync(f.id.get_vfd_handle())
    h5 = total / (time.perf_counter() - t) / 1e6
    path.unlink()
    return {"plain_fsync_mb_s": plain, "h5py_mb_s": h5}


# ---- sections ----------------------------------------------------------------------------------------------------
def section_run(args: argparse.Namespace, ctx: dict[str, Any]) -> list[str]:
    """The instant-device runs, each variant `--repeat` times (interleaved), the best wall time kept."""
    codes = {"this": None, **({"baseline": args.baseline} if args.baseline else {})}
    rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for _ in range(args.repeat):  # interleaved, so a burst of load elsewhere hits every variant alike
        for j in args.jobs:
            for name, code in codes.items():
                rows.setdefault((name, j), []).append(
                    run_variant(ctx["images"], ctx["work"], j, args.format, args.host_normalize, code, args.shard_size))
    lim, cpus = ctx["decode"], os.cpu_count() or 1
    out = ["| code | -j | img/s | MB/s | CPU ms/img total | main process | main thread | decode workers | "
           "of decode limit | of write limit (h5py) | stage_seconds | wait_seconds |", "|---|" * 1 + "---|" * 11]
    ctx["runs"] = []
    for (name, j), rs in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0] == "this")):
        r = min(rs, key=lambda r: r["wall_s"])
        own = ctx["decode_baseline"] if name == "baseline" else lim
        limit = own["img_s_per_core"] * max(1, min(j, cpus))
        r["of_decode_limit"] = r["img_s"] / limit
        r["of_write_limit"] = r["mb_s"] / ctx["write"]["h5py_mb_s"]
        r["all_walls"], r["code"] = [x["wall_s"] for x in rs], args.baseline if name == "baseline" else "this"
        ctx["runs"].append(r)
        st = ", ".join(f"{k} {v:.2f}" for k, v in r["stage_seconds"].items())
        wt = ", ".join(f"{k} {v:.2f}" for k, v in r["wait_seconds"].items())
        out.append(f"| {name} | {j} | {r['img_s']:.1f} | {r['mb_s']:.0f} | {r['ms_total']:.1f} | {r['ms_process']:.1f} | "
                   f"{r['ms_main_thread']:.1f} | {r['ms_children']:.1f} | {r['of_decode_limit']:.2f} | "
                   f"{r['of_write_limit']:.2f} | {st} | {wt} |")
    out += ["", "The main process by thread (CPU ms/img, sampled from /proc every 50 ms), minor page faults per image, the "
            "share of the machine's cores busy during the run (/proc/stat: anything's), and the wall seconds of the steps "
            "that end a shard (summed over the run's shards):",
            "", "| code | -j | threads | page faults/img: main process | decode workers | cores busy | shard end (s) |",
            "|---|---|---|---|---|---|---|"]
    for r in ctx["runs"]:
        n = r["images"]
        th = ", ".join(f"{k} {1e3 * v / n:.1f}" for k, v in sorted(r["threads_s"].items(), key=lambda kv: -kv[1]) if v > 0)
        busy = f"{r['box_busy_s'] / r['box_s']:.2f} ({r['box_busy_s']:.2f} of {r['box_s']:.2f} CPU-s)" if r["box_s"] else "-"
        end = ", ".join(f"{k} {v:.3f}" for k, v in r["shard_end_s"].items())
        out.append(f"| {'baseline' if r['code'] != 'this' else 'this'} | {r['jobs']} | {th} | "
                   f"{r['minflt_self'] / n:.0f} | {r['minflt_children'] / n:.0f} | {busy} | {end} |")
    return out


def section_pair(args: argparse.Namespace, ctx: dict[str, Any]) -> list[str]:
    """Whether decode + fit slows down when two run at once (the decode limit of -j 2 counts two cores' worth):
    one decode-limit child alone, then two side by side, `--repeat` times."""
    rows = []
    for _ in range(args.repeat):
        alone, pair = (decode_children(ctx["images"], ctx["work"], args.format, n) for n in (1, 2))
        rows.append(([r["ms_per_image"] for r in alone], [r["ms_per_image"] for r in pair]))
    ctx["pair"] = [{"alone": a, "two_at_once": p} for a, p in rows]
    return ["", "Decode + fit on one core (CPU-ms per image), one process alone and two side by side:", "",
            "| alone | two at once |", "|---|---|"] + [
        f"| {a[0]:.1f} | {', '.join(f'{x:.1f}' for x in p)} |" for a, p in rows]


def section_loader(args: argparse.Namespace, ctx: dict[str, Any]) -> list[str]:
    """The decode stage's own cost (torch's DataLoader, the pixel ring, the records' trip) with the decode taken
    out: each sample's record is a copy of one decoded image's, `-j 2`, 400 samples, in a fresh process."""
    p = subprocess.run([sys.executable, __file__, "--child", "--images", str(ctx["images"]), "--jobs", "loader",
                        "--out", str(ctx["work"] / "loader"), "--format", args.format], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"the loader measurement failed:\n{p.stderr[-3000:]}")
    r = ctx["loader"] = json.loads(p.stdout.strip().splitlines()[-1])
    return ["", f"The decode stage without decoding (-j 2, {r['items']} samples, each a copy of one decoded image's "
            f"record): decode workers {r['ms_workers']:.2f} CPU-ms per sample, the run {r['ms_run']:.2f}."]


def loader_cost(images: Path, out: Path, fmt: str, n: int = 400) -> dict[str, Any]:
    """In this process: `section_loader`'s measurement."""
    import copy

    import s2cli.inputs.loader as loader
    from s2cli.inputs.decode import decode_sample
    from s2cli.inputs.samples import Sample
    from s2cli.plan import fit_of

    paths = sorted(images.glob("*.jpg"))
    fit = fit_of(settings(images, out, 2, fmt))
    rec = decode_sample(Sample(paths[0].stem, str(paths[0])), fit)
    loader.decode_sample = lambda s, f: copy.copy(rec)  # (the workers fork after this)
    samples = [Sample(f"k{i}", str(paths[i % len(paths)])) for i in range(n)]
    c0, s0 = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    with loader.DecodeLoader(fit, 2, batch_size=8) as dl:
        for _ in dl.map(samples, lambda s: s):
            pass
    c1, s1 = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    cpu = lambda a, b: (b.ru_utime - a.ru_utime) + (b.ru_stime - a.ru_stime)  # noqa: E731
    return {"items": n, "ms_workers": 1e3 * cpu(c0, c1) / n, "ms_run": 1e3 * cpu(s0, s1) / n}


SECTIONS: dict[str, Callable[[argparse.Namespace, dict[str, Any]], list[str]]] = {
    "run": section_run, "pair": section_pair, "loader": section_loader}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default=None, help="number of synthetic images (default 200, --quick 48)")
    ap.add_argument("--jobs", default=None, help="comma-separated -j values (default 0,2; --quick 2)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per variant, best kept (default 2, --quick 1)")
    ap.add_argument("--format", default="h5", choices=("h5", "safetensors"))
    ap.add_argument("--host-normalize", action="store_true", help="normalize on the host CPU (not taken out)")
    ap.add_argument("--shard-size", type=int, default=None, help="images per shard (default: the run's, ~1 GB: one "
                    "shard of 200 images)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"which of {', '.join(SECTIONS)} to run")
    ap.add_argument("--baseline", default=None, help="a folder holding another s2cli (e.g. `git archive REV s2cli "
                    "recipes | tar -x -C DIR`): every variant also runs with it, side by side")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one; needs ~2x the output)")
    ap.add_argument("--json", default=None, help="also write every figure here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child and args.jobs == "decode":  # the decode limit with this process's s2cli
        paths = sorted(Path(args.images).glob("*.jpg"))
        print(json.dumps(decode_limit(paths, settings(Path(args.images), Path(args.out), 0, args.format))))
        return None
    if args.child and args.jobs == "loader":  # the decode stage's own cost, in a fresh process
        print(json.dumps(loader_cost(Path(args.images), Path(args.out), args.format)))
        return None
    if args.child:
        args.jobs = int(args.jobs)
        return child(args)
    n = int(args.images or (48 if args.quick else 200))
    args.jobs = [int(j) for j in (args.jobs or ("2" if args.quick else "0,2")).split(",")]
    args.repeat = args.repeat or (1 if args.quick else 2)
    work = Path(args.work or tempfile.mkdtemp(prefix="s2-bench-host-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        load0 = os.getloadavg()
        images = work / "images"
        paths = make_images(images, n)
        ctx: dict[str, Any] = {"images": images, "work": work, "n": n}
        [ctx["decode"]] = decode_children(images, work, args.format)
        if args.baseline:
            [ctx["decode_baseline"]] = decode_children(images, work, args.format, code=args.baseline)
        ctx["write"] = write_limit(work, n)
        lines = []
        for name in args.sections.split(","):
            lines += SECTIONS[name](args, ctx)
        load1 = os.getloadavg()
        d, w = ctx["decode"], ctx["write"]
        b = ctx.get("decode_baseline")
        base = (f"; with the baseline's code {b['ms_per_image']:.1f} CPU-ms/img (decode {b['ms_decode']:.1f} + fit "
                f"{b['ms_fit']:.1f})" if b else "")
        head = [f"# bench_host: {n} synthetic 1024x768 JPEGs -> llava-1.5-s2 (576x3072 float16, "
                f"{IMAGE_BYTES / 1e6:.2f} MB/img), instant device{' (normalize on the host)' if args.host_normalize else ''}, "
                f"--format {args.format}{f', --shard-size {args.shard_size}' if args.shard_size else ''}, best of {args.repeat}; {platform.machine()}, {os.cpu_count()} CPUs, "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load0[0]:.2f} at the start, "
                f"{load1[0]:.2f} at the end; {time.perf_counter() - t0:.0f} s",
                f"decode limit: {d['ms_per_image']:.1f} CPU-ms/img on one core (wall split: decode {d['ms_decode']:.1f} + fit "
                f"{d['ms_fit']:.1f}), {d['img_s_per_core']:.1f} img/s per core{base}; write limit: plain write + fsync "
                f"{w['plain_fsync_mb_s']:.0f} MB/s, h5py contiguous {w['h5py_mb_s']:.0f} MB/s", ""]
        print("\n".join(head + lines))
        if args.json:
            keep = {k: v for k, v in ctx.items() if k not in ("images", "work")}
            Path(args.json).write_text(json.dumps({**keep, "load": [load0, load1]}, indent=1, default=str))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
