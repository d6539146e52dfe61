"""Outputs at scale: how long the folder-level reads take as the number of shards grows (the shard-count sweep).

    python benchmarks/bench_outputs.py --shards 100,1000,10000 [--format h5] [--per-shard 2] [--json]

For each N, a synthetic output folder of N tiny shards (`--per-shard` images each) is made fast: the input is a
folder of hard links to one small PNG; one real extraction of one image (timm:test_resnet, random init) gives the
stored item, and every shard is then written and marked through the package's own path (`Run.start_part`, the
format's sink, `Run.finish_part`: the shard, its record and its done marker exactly as a run commits them;
`Run.finalize`: the manifest), without decoding or computing N images, and without fsync. Then each measurement runs in a fresh
process (nothing cached in memory; the OS page cache is warm):

- rerun: `s2cli.extract` of the same input into the finished folder (what `s2 extract` does on a rerun), its
  settings resolved before the clock starts (resolving a `timm:` spec imports timm: seconds, whatever the folder);
  rerun_inputs: the part of it that lists the input folder (`open_inputs`);
- open + 1 key: `open_features(folder)` and one image's features;
- dataset item 0: `FeatureDataset(folder)[0]`;
- inspect: `summary(open_features(folder))`, what `s2 inspect folder` computes;
- status: `status_report(folder)`.

`--keep DIR` keeps the folders (DIR/N-FORMAT-PER_SHARD/out) for reuse; an existing one is reused (time another
s2cli on the same folders with PYTHONPATH=its-checkout and `--hide-index` if it predates index.json). Functions `make_folder` and
`measure` can be called from other benchmarks (benchmarks/bench_host.py's sweep)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL = dict(model="timm:test_resnet", random_init=True, img_sizes=(64, 128), max_split_size=64, workers=0)


def _image(path: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)


def _one_item(root: Path, fmt: str) -> Any:
    """The item a real run hands its sink for one image (captured from a one-image extraction)."""
    import s2cli
    from s2cli import run as runmod

    items: list = []
    new_sink = runmod.Run._new_sink

    def capture(self, path):
        sink = new_sink(self, path)
        write = sink.write
        sink.write = lambda batch: (items.extend(batch), write(batch))[1]
        return sink

    runmod.Run._new_sink = capture
    try:
        (root / "one").mkdir(exist_ok=True)
        _image(root / "one" / "x.png")
        s2cli.extract(str(root / "one"), str(root / f"one{'.h5' if fmt == 'h5' else '.safetensors'}"), overwrite=True,
                      format=fmt, **MODEL)
    finally:
        runmod.Run._new_sink = new_sink
    return items[0]


def _as(item: Any, key: str, source: str) -> Any:
    if dataclasses.is_dataclass(item):
        return dataclasses.replace(item, key=key, source=source)
    return {**item, "key": key, "source": source}


def make_folder(root: Path, n_shards: int, per_shard: int = 2, fmt: str = "h5") -> tuple[Path, Path]:
    """(input folder, output folder) of `n_shards` done shards of `per_shard` images, written and marked as a run
    does. Reused when already made."""
    import torch

    from s2cli import api
    from s2cli.run import Run, Target

    imgs, out = root / "imgs", root / "out"
    if (out / "manifest.json").is_file():
        return imgs, out
    imgs.mkdir(parents=True, exist_ok=True)
    _image(imgs / "a.png")
    for i in range(n_shards * per_shard):
        dst = imgs / f"im{i:07d}.png"
        if not dst.exists():
            os.link(imgs / "a.png", dst)
    (imgs / "a.png").unlink()
    item = _one_item(root, fmt)
    res = api.settings(str(imgs), f"{out}/", shard_size=per_shard, format=fmt, **MODEL)
    inp = api.open_inputs(res)
    res, located = api.locate_weights(res)
    fsync, os.fsync = os.fsync, lambda fd: None  # a synthetic folder need not survive a power cut: no fsync
    try:
        target = Target(res, inp, overwrite=False)
        run = Run(res, inp, target, api.load(res, located), torch.device("cpu"))
        _fill(run, inp, item, imgs)
    finally:
        os.fsync = fsync
    return imgs, out


def _fill(run: Any, inp: Any, item: Any, imgs: Path) -> None:
    for unit in inp.units:
        run.part = run.start_part(unit, 0)
        samples = list(unit.samples())
        keys = [s.key if hasattr(s, "key") else s["key"] for s in samples]
        for k in keys:
            run.part.seen.add(k)
        run.part.first_key, run.part.last_key = keys[0], keys[-1]
        run.part.sink.write([_as(item, k, f"{imgs}/{k}.png") for k in keys])
        run.stats.done += len(keys)
        run.finish_part(last_of_unit=True)
    run.finalize(0.0)


MEASURE = r"""
import json, sys, time
t0 = time.perf_counter()
what, imgs, out, fmt, per_shard = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
import torch  # a training script has it already; s2 extract imports it before any folder work
import s2cli
settings_s = None
if what == "rerun":  # the settings first (describing the model: timm imported for a timm: spec), not the folder's
    res = s2cli.settings(imgs, out + "/", shard_size=per_shard, format=fmt, model="timm:test_resnet", random_init=True,
                         img_sizes=(64, 128), max_split_size=64, workers=0)
    settings_s = time.perf_counter() - t0
t1 = time.perf_counter()
inputs_s = None
if what == "rerun":
    from s2cli.api import open_inputs
    inp = open_inputs(res)  # listing the input folder: the inputs' part of a rerun
    inputs_s = time.perf_counter() - t1
    s = s2cli.extract(inp, out + "/", config=res)
    assert s.num_images == 0 and s.complete, s
elif what == "open_key":
    with s2cli.open_features(out) as ff:
        x = ff[next(iter(ff))]
elif what == "dataset_item":
    ds = s2cli.FeatureDataset(out)
    x = ds[0]
    ds.close()
elif what == "inspect":
    from s2cli.readers import summary
    with s2cli.open_features(out) as ff:
        info = summary(ff)
    assert info["complete"], info
elif what == "status":
    from s2cli.status import status_report
    assert status_report(out)["complete"]
print(json.dumps({"seconds": time.perf_counter() - t1, "settings_s": settings_s, "inputs_s": inputs_s}))
"""

WHAT = ("rerun", "open_key", "dataset_item", "inspect", "status")


def measure(imgs: Path, out: Path, fmt: str = "h5", per_shard: int = 2, repeat: int = 2,
            hide_index: bool = False) -> dict[str, float]:
    """Seconds of each measurement (the best of `repeat` fresh processes; imports not counted). `hide_index`:
    index.json moved aside meanwhile (to time a version of s2cli from before it, which refuses it as a foreign file)."""
    index, aside = out / "index.json", out.parent / "index.json.aside"
    if hide_index and index.exists():
        index.rename(aside)
    try:
        return _measure(imgs, out, fmt, per_shard, repeat)
    finally:
        if aside.exists():
            aside.rename(index)


def _measure(imgs: Path, out: Path, fmt: str, per_shard: int, repeat: int) -> dict[str, float]:
    got = {}
    for what in WHAT:
        best = None
        for _ in range(repeat):
            p = subprocess.run([sys.executable, "-c", MEASURE, what, str(imgs), str(out), fmt, str(per_shard)],
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"{what} failed:\n{p.stderr[-3000:]}")
            got_one = json.loads(p.stdout.strip().splitlines()[-1])
            if best is None or got_one["seconds"] < best["seconds"]:
                best = got_one
        got[what] = round(best["seconds"], 3)
        if best["inputs_s"] is not None:
            got[f"{what}_inputs"] = round(best["inputs_s"], 3)
    return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", default="100,1000,10000")
    ap.add_argument("--per-shard", type=int, default=2)
    ap.add_argument("--format", default="h5", choices=("h5", "safetensors"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--keep", default=None, help="keep the folders under this directory (reused when there)")
    ap.add_argument("--hide-index", action="store_true", help="move index.json aside while measuring (time an "
                    "s2cli from before it, on folders made by this one: PYTHONPATH=that-checkout)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="s2cli-bench-outputs-"))
    rows = []
    for n in [int(x) for x in args.shards.split(",")]:
        t = time.perf_counter()
        imgs, out = make_folder(base / f"{n}-{args.format}-{args.per_shard}", n, args.per_shard, args.format)
        made = time.perf_counter() - t
        row = {"shards": n, "images": n * args.per_shard, "made_s": round(made, 1),
               **measure(imgs, out, args.format, args.per_shard, args.repeat, args.hide_index)}
        rows.append(row)
        print(json.dumps(row) if args.json else "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if not args.keep:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
