"""Sinks: write features to HDF5 or safetensors from a writer thread (the compute loop never waits on disk),
atomically (a file appears under its final name only when complete), into one file or a directory of shards
with per-shard done markers, a manifest and a failure log. And read them back: `open_features`."""
from __future__ import annotations

import errno
import json
import os
import queue
import re
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from .errors import ConfigError, S2Error

STR = h5py.string_dtype("utf-8")
LAYOUT_VERSION = 1
FORMATS = {"h5": ".h5", "safetensors": ".safetensors"}
POOLED_TENSOR = "__s2cli_pooled__"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def write_error(path: Path, e: BaseException, need_bytes: int | None = None) -> S2Error:
    """The one error for a failed write. A full disk says so, with the space left and the space a shard needs;
    completed shards are untouched, so the fix is to make room and rerun."""
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
        try:
            free = f"{_human(shutil.disk_usage(path.parent).free)} free"
        except OSError:
            free = "free space unknown"
        detail = getattr(e, "strerror", None) if getattr(e, "filename", None) else None  # a refused reservation
        need = f"; a whole shard needs about {_human(need_bytes)}" if need_bytes else ""
        return S2Error(f"no space left on device writing {path} ({detail or free}{need})", given=str(path.parent),
                       fix="free space or point -o elsewhere, then rerun the same command: completed shards are "
                           "kept and the run continues after them")
    return S2Error(f"writing {path} failed: {type(e).__name__}: {e}",
                   fix="check free space and permissions of the output folder")


def _fsynced_tmp(path: Path, text: str) -> Path:
    """`text` written and fsynced beside `path`, under a temporary name that carries this process's id."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from e
    return tmp


def atomic_write_text(path: Path, text: str) -> None:
    tmp = _fsynced_tmp(path, text)
    try:
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from e


def _fsync_rename(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    dfd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _nbytes(items: list[dict[str, Any]]) -> int:
    return sum(getattr(it.get(k), "nbytes", 0) for it in items for k in ("features", "pooled"))


class _ThreadedSink:
    """The writer thread and the atomic commit shared by every format. Subclasses implement `_open`,
    `_append(items)` and `_finish(failures)`."""

    suffix = ""
    need_bytes: int | None = None  # what a complete shard will take, for the message when the disk is full

    def __init__(self, path: str | os.PathLike, attrs: dict[str, Any], queue_size: int = 4):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise ConfigError("output path exists and is not a file", given=str(self.path), fix="choose another -o path")
        if not self.path.parent.exists():
            raise ConfigError("output folder does not exist", given=str(self.path.parent), fix="create it first")
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.attrs = attrs
        self.failures: list[dict[str, str]] = []
        self.keys: list[str] = []
        self.n = 0
        self.busy_s = 0.0  # seconds the writer thread spent writing (the run's "write" stage)
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._open()
        self._thread = threading.Thread(target=self._run, name="s2cli-writer", daemon=True)
        self._thread.start()

    def write(self, items: list[dict[str, Any]]) -> None:
        """Queue images: dicts with key, source, meta, orig_hw, grid_hw, img_sizes, num_prefix_tokens,
        split_mode, features (T, C) or None, pooled (C,) or None. Blocks only when the queue is full."""
        self._raise_if_failed()
        self._q.put(items)

    def fail(self, record: dict[str, str]) -> None:
        self.failures.append(record)

    def close(self) -> Path:
        """Flush, record failures, fsync and rename into place. Returns the final path."""
        self._q.put(None)
        self._thread.join()
        self._raise_if_failed()
        try:
            self._finish()
            _fsync_rename(self.tmp, self.path)
        except Exception as e:  # h5py reports a full disk as OSError or RuntimeError
            self._discard()
            self.tmp.unlink(missing_ok=True)
            raise write_error(self.path, e, self.need_bytes) from e
        return self.path

    def abort(self) -> None:
        """Drop everything: the final path is never created."""
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=5)
        try:
            self._discard()
        finally:
            self.tmp.unlink(missing_ok=True)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise write_error(self.path, self._error, self.need_bytes) from self._error

    def _run(self) -> None:
        while True:
            items = self._q.get()
            if items is None:
                return
            if self._error is None:
                try:
                    t = time.perf_counter()
                    self._reserve(_nbytes(items))
                    self._append(items)
                    self.keys.extend(it["key"] for it in items)
                    self.n += len(items)
                    self.busy_s += time.perf_counter() - t
                except BaseException as e:  # surfaced to the producer on its next call
                    self._error = e
                    self._discard()  # at once: on a full disk, the sooner the file is emptied the better

    def _reserve(self, nbytes: int) -> None:
        """Refuse a write the disk cannot hold before the format library tries it (HDF5 left half-written by a
        full disk cannot be closed cleanly). 1 MiB of headroom covers chunk and header overhead."""
        free = shutil.disk_usage(self.tmp.parent).free
        if nbytes + (1 << 20) > free:
            raise OSError(errno.ENOSPC, f"{_human(nbytes)} to write + 1 MiB headroom, {_human(free)} free", str(self.tmp))

    # format-specific
    def _open(self) -> None: ...
    def _append(self, items: list[dict[str, Any]]) -> None: ...
    def _finish(self) -> None: ...
    def _discard(self) -> None: ...


class HDF5Sink(_ThreadedSink):
    """HDF5 layout (LAYOUT_VERSION 1):
      attrs      s2cli_version, model, weights, layer, scales, img_sizes, max_split_size, split_mode,
                 num_prefix_tokens, output_shape, merge, fit, dtype, pool, config (resolved, JSON), num_images, num_failed
      keys       (N,) str          image keys, in input order
      features   (N, T, C)         when every image has the same token count T (one image per chunk), or
                 (sum T_i, C)      flat, with `offsets` (N+1,) int64, when token counts differ (fit=keep);
                                   absent with --pool-only
      pooled     (N, C)            with --pool mean|cls
      source (N,) str, meta (N,) str (JSON or ""), orig_hw (N, 2), grid_hw (N, 2), img_sizes (N, S, 2),
      num_prefix_tokens (N,), split_mode (N,) str
      plan       (N,) str          with --strategy other than s2: each image's plan and output maps (JSON)
      failures   (M,) str          one JSON record per failed image: key, source, stage, error_class, error
    """

    suffix = ".h5"

    def __init__(self, path, attrs, channels: int, num_scales: int, tokens: int | None, dtype: str,
                 store_features: bool = True, pooled: bool = False, queue_size: int = 4):
        self.channels, self.num_scales, self.tokens = channels, num_scales, tokens
        self.dtype, self.store_features, self.pooled = np.dtype(dtype), store_features, pooled
        super().__init__(path, attrs, queue_size)

    def _open(self) -> None:
        f = self.f = h5py.File(self.tmp, "w")
        for k, v in self.attrs.items():
            f.attrs[k] = v
        f.attrs["layout_version"] = LAYOUT_VERSION
        C, S = self.channels, self.num_scales
        for name in ("keys", "source", "meta", "split_mode") + (("plan",) if self.attrs.get("strategy", "s2") != "s2" else ()):
            f.create_dataset(name, (0,), STR, maxshape=(None,), chunks=(1024,))
        if self.store_features:
            if self.tokens is None:
                f.create_dataset("features", (0, C), self.dtype, maxshape=(None, C), chunks=(256, C))
                f.create_dataset("offsets", (1,), np.int64, maxshape=(None,), chunks=(1024,), data=[0])
            else:
                f.create_dataset("features", (0, self.tokens, C), self.dtype, maxshape=(None, self.tokens, C),
                                 chunks=(1, self.tokens, C))
        if self.pooled:
            f.create_dataset("pooled", (0, C), self.dtype, maxshape=(None, C), chunks=(min(1024, max(1, 2**20 // C)), C))
        f.create_dataset("orig_hw", (0, 2), np.int32, maxshape=(None, 2), chunks=(1024, 2))
        f.create_dataset("grid_hw", (0, 2), np.int32, maxshape=(None, 2), chunks=(1024, 2))
        f.create_dataset("img_sizes", (0, S, 2), np.int32, maxshape=(None, S, 2), chunks=(1024, S, 2))
        f.create_dataset("num_prefix_tokens", (0,), np.int16, maxshape=(None,), chunks=(1024,))

    def _append(self, items: list[dict[str, Any]]) -> None:
        f, n, m = self.f, self.n, len(items)

        def grow(name: str, values: Any) -> None:
            ds = f[name]
            ds.resize(n + m, axis=0)
            ds[n:n + m] = values

        grow("keys", [it["key"] for it in items])
        grow("source", [it["source"] for it in items])
        grow("meta", [it.get("meta") or "" for it in items])
        grow("split_mode", [it["split_mode"] for it in items])
        if "plan" in f:
            grow("plan", [it.get("plan") or "" for it in items])
        grow("orig_hw", np.array([it["orig_hw"] for it in items], np.int32))
        grow("grid_hw", np.array([it["grid_hw"] for it in items], np.int32))
        grow("img_sizes", np.array([it["img_sizes"] for it in items], np.int32))
        grow("num_prefix_tokens", np.array([it["num_prefix_tokens"] for it in items], np.int16))
        if self.pooled:
            grow("pooled", np.stack([np.asarray(it["pooled"], self.dtype) for it in items]))
        if not self.store_features:
            return
        feats = [np.asarray(it["features"], dtype=self.dtype) for it in items]
        if self.tokens is None:
            off = f["offsets"]
            start = int(off[n])
            ends = np.cumsum([x.shape[0] for x in feats]) + start
            ds = f["features"]
            ds.resize(int(ends[-1]), axis=0)
            ds[start:int(ends[-1])] = np.concatenate(feats, axis=0)
            off.resize(n + m + 1, axis=0)
            off[n + 1:n + m + 1] = ends
        else:
            grow("features", np.stack(feats))

    def _finish(self) -> None:
        self.f.create_dataset("failures", data=np.array([json.dumps(r) for r in self.failures], dtype=object), dtype=STR)
        self.f.attrs["num_images"] = self.n
        self.f.attrs["num_failed"] = len(self.failures)
        self.f.close()

    def _discard(self) -> None:
        # Empty the file first: on a full disk HDF5 cannot flush on close, and an h5py file left half-closed
        # crashes the interpreter when it is collected. Emptied, the close succeeds; the file is removed next.
        try:
            os.truncate(self.tmp, 0)
        except OSError:
            pass
        try:
            self.f.close()
        except Exception:
            pass


class SafetensorsSink(_ThreadedSink):
    """safetensors layout: one tensor per image named by its key, (T, C) (absent with --pool-only); with
    --pool, one tensor `__s2cli_pooled__` (N, C) in the order of the `keys` list. Header metadata (strings):
    `s2cli` (the file attributes, as in HDF5, JSON), `keys` (JSON list, input order), `images` (JSON: key ->
    source, meta, orig_hw, grid_hw, img_sizes, num_prefix_tokens, split_mode), `failures` (JSON list).
    A shard is held in memory until it is written (size shards with --shard-size)."""

    suffix = ".safetensors"

    def __init__(self, path, attrs, channels: int, num_scales: int, tokens: int | None, dtype: str,
                 store_features: bool = True, pooled: bool = False, queue_size: int = 4):
        self.dtype, self.store_features, self.pooled = np.dtype(dtype), store_features, pooled
        super().__init__(path, attrs, queue_size)

    def _open(self) -> None:
        self.tensors: dict[str, np.ndarray] = {}
        self.pooled_rows: list[np.ndarray] = []
        self.images: dict[str, dict[str, Any]] = {}

    def _append(self, items: list[dict[str, Any]]) -> None:
        for it in items:
            k = it["key"]
            if k in self.images or k == POOLED_TENSOR:
                raise S2Error(f"key {k!r} appears twice in one safetensors shard", fix="make keys unique")
            if self.store_features:
                self.tensors[k] = np.ascontiguousarray(np.asarray(it["features"], self.dtype))
            if self.pooled:
                self.pooled_rows.append(np.asarray(it["pooled"], self.dtype))
            self.images[k] = {"source": it["source"], "meta": it.get("meta"), "orig_hw": list(it["orig_hw"]),
                              "grid_hw": list(it["grid_hw"]), "img_sizes": [list(s) for s in it["img_sizes"]],
                              "num_prefix_tokens": int(it["num_prefix_tokens"]), "split_mode": it["split_mode"]}
            if it.get("plan"):
                self.images[k]["plan"] = it["plan"]

    def _finish(self) -> None:
        from safetensors.numpy import save_file

        tensors = dict(self.tensors)
        if self.pooled and self.pooled_rows:
            tensors[POOLED_TENSOR] = np.stack(self.pooled_rows)
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self.attrs.items()}
        attrs.update(num_images=self.n, num_failed=len(self.failures), layout_version=LAYOUT_VERSION)
        meta = {"s2cli": json.dumps(attrs), "keys": json.dumps(list(self.images)), "images": json.dumps(self.images),
                "failures": json.dumps(self.failures)}
        self._reserve(sum(t.nbytes for t in tensors.values()) + sum(map(len, meta.values())))
        save_file(tensors, str(self.tmp), metadata=meta)

    def _discard(self) -> None:
        self.tensors = {}


SINKS = {"h5": HDF5Sink, "safetensors": SafetensorsSink}


def format_of(path: str | os.PathLike) -> str | None:
    suffix = Path(path).suffix.lower()
    return next((f for f, s in FORMATS.items() if s == suffix), None)


# ---- a directory of shards ---------------------------------------------------------------------------------
SHARD_RE = re.compile(r"^part-(\d{5})-(\d{5})\.(h5|safetensors)$")
OURS_RE = re.compile(r"^(part-\d{5}-\d{5}\.(h5|safetensors|json)|run\.json|manifest\.json|errors\.jsonl|rank-\d{5}\.json)$")
# files `s2 slurm` puts beside the run (its script and SLURM's logs): ours, but not output; --overwrite keeps them
SIDE_RE = re.compile(r"^(s2-slurm\.sbatch|slurm-\d+(_\d+)?\.out)$")
RANK_TMP_RE = re.compile(r"^\.part-(\d{5})-\d{5}\.(h5|safetensors|json)\.tmp-\d+$")


class OutputDir:
    """OUTDIR/ holds `run.json` (the resolved config, version, input), shards `part-RRRRR-SSSSS.{h5,safetensors}`,
    each followed by its done marker `part-RRRRR-SSSSS.json` (written last: only marked shards count),
    `errors.jsonl` (every failed sample once) and `manifest.json` (the completed shards)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def run_file(self) -> Path:
        return self.path / "run.json"

    def markers(self) -> list[dict[str, Any]]:
        """Done markers whose shard exists, in input order (unit, part)."""
        out = []
        for p in self.path.glob("part-*-*.json"):
            try:
                m = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if (self.path / m.get("shard", "")).is_file():
                out.append(m)
        return sorted(out, key=lambda m: (m["unit_index"], m["part"]))

    def prepare(self, run: dict[str, Any], overwrite: bool, compare: list[str], rank: int = 0, world: int = 1) -> None:
        """Create, resume or refuse: an existing run must have the same values for `compare`. Several ranks may
        prepare at once: run.json is created by the first of them and checked by all."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError("output path exists and is not a folder", given=str(self.path),
                              fix="pass a new or empty folder, or a .h5/.safetensors file name")
        if overwrite and world > 1:
            raise ConfigError("--overwrite cannot be used by several ranks at once (each would delete the others' "
                              "new shards)", given=f"{world} ranks", fix=f"remove {self.path} first, then run without --overwrite")
        self.path.mkdir(parents=True, exist_ok=True)
        entries = [p for p in self.path.iterdir() if not p.name.startswith(".") and not SIDE_RE.match(p.name)]
        foreign = [p.name for p in entries if not OURS_RE.match(p.name)]
        if foreign:
            raise ConfigError(f"output folder holds files s2cli did not write, e.g. {foreign[0]}", given=str(self.path),
                              fix="pass a new or empty folder")
        if overwrite:
            for p in entries:
                p.unlink()
            for p in self.path.glob(".*.tmp-*"):
                p.unlink()
        elif self.run_file.exists():
            self._check_same(run, compare)
        elif entries:
            raise ConfigError("output folder has shards but no run.json", given=str(self.path),
                              fix="pass --overwrite to start over, or another -o")
        if not self.run_file.exists() and not _create_exclusive(self.run_file, json.dumps(run, indent=1, sort_keys=True)):
            self._check_same(run, compare)  # another rank created it first: it must be the same run
        self._clean_leftovers(rank)
        if world == 1:
            self.rebuild_errors()

    def _check_same(self, run: dict[str, Any], compare: list[str]) -> None:
        old = json.loads(self.run_file.read_text())
        new = json.loads(json.dumps(run))  # compare as saved (tuples are lists there)
        before, after = _flat(old["config"], compare), _flat(new["config"], compare)
        diff = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
                if before.get(k) != after.get(k) and not k.startswith("backbone.description")]
        if old.get("input", {}).get("spec") != run["input"]["spec"]:
            diff.insert(0, f"input: {old.get('input', {}).get('spec')!r} -> {run['input']['spec']!r}")
        if diff:
            raise ConfigError(f"{self.path} holds a run with a different config ({'; '.join(diff)})",
                              fix="rerun with the original settings to resume, pass --overwrite to start over, or use another -o")

    def _clean_leftovers(self, rank: int = 0) -> None:
        """Temporary files of dead writers, and shard files whose marker was never written (never counted).
        Rank-aware: a shard or temporary of another rank that is alive now (its heartbeat says so) is work in
        progress and stays; this rank's own are leftovers of its previous life. Temporaries of shared files
        (manifest, errors, heartbeats) go when their process is gone and no other rank is alive."""
        from .ranks import live_ranks, liveness, read_heartbeats

        mine = read_heartbeats(self.path).get(rank)
        if liveness(mine) == "running" and mine["pid"] != os.getpid():  # type: ignore[index]
            raise ConfigError(f"rank {rank} of this folder is running already ({mine['host']} pid {mine['pid']})",  # type: ignore[index]
                              given=str(self.path), fix=f"wait for it to end; if that process is gone, remove "
                              f"{self.path}/rank-{rank:05d}.json (it is stale after S2CLI_STALE_S seconds anyway)")
        live = live_ranks(self.path, rank)
        marked = {m["shard"] for m in self.markers()}
        for p in self.path.glob(".*.tmp-*"):
            m = RANK_TMP_RE.match(p.name)
            pid = p.name.rsplit("-", 1)[-1]
            if m:
                gone = int(m.group(1)) == rank or int(m.group(1)) not in live
            else:
                gone = not live and (not pid.isdigit() or not _alive(int(pid)))
            if gone:
                p.unlink(missing_ok=True)
        for p in self.path.iterdir():
            m = SHARD_RE.match(p.name)
            if m and p.name not in marked and int(m.group(1)) not in live:
                p.unlink(missing_ok=True)

    def next_shard_index(self, rank: int) -> int:
        used = [int(m.group(2)) for p in self.path.iterdir() if (m := SHARD_RE.match(p.name)) and int(m.group(1)) == rank]
        return max(used, default=-1) + 1

    def commit(self, marker: dict[str, Any], log_errors: bool = True) -> None:
        """Write a shard's done marker (last), then log its failures (ranks sharing the folder do not append to
        errors.jsonl: it is rebuilt from the markers with the manifest)."""
        name = Path(marker["shard"]).with_suffix(".json").name
        atomic_write_text(self.path / name, json.dumps(marker, sort_keys=True))
        if marker["failures"] and log_errors:
            try:
                with open(self.path / "errors.jsonl", "a") as fh:
                    for r in marker["failures"]:
                        fh.write(json.dumps(r) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as e:  # the marker holds them; errors.jsonl is rebuilt from the markers on resume
                raise write_error(self.path / "errors.jsonl", e) from e

    def rebuild_errors(self) -> None:
        """errors.jsonl from the markers: every failure of every completed shard, once."""
        lines = [json.dumps(r) for m in self.markers() for r in m["failures"]]
        atomic_write_text(self.path / "errors.jsonl", "".join(line + "\n" for line in lines))

    def write_manifest(self, units_total: int | None, units_done: int | Any) -> dict[str, Any]:
        """`units_done`: a number, or a function of the markers (ranks sharing the folder: the manifest is then
        rewritten until the markers it was made from are still all there are, so the last writer is complete)."""
        if callable(units_done):
            while True:
                ms = self.markers()
                manifest = self.manifest(ms, units_total, units_done(ms))
                atomic_write_text(self.path / "manifest.json", json.dumps(manifest, indent=1))
                self.rebuild_errors()
                if [m["shard"] for m in self.markers()] == [m["shard"] for m in ms]:
                    return manifest
        manifest = self.manifest(self.markers(), units_total, units_done)
        atomic_write_text(self.path / "manifest.json", json.dumps(manifest, indent=1))
        return manifest

    def manifest(self, ms: list[dict[str, Any]], units_total: int | None, units_done: int) -> dict[str, Any]:
        """The manifest's content for these markers (not written)."""
        manifest = {
            "complete": units_total is not None and units_done >= units_total,
            "units_total": units_total, "units_done": units_done, "num_shards": len(ms),
            "num_images": sum(m["num_images"] for m in ms), "num_failed": sum(m["num_failed"] for m in ms),
            "shards": [{k: m[k] for k in ("shard", "unit", "unit_index", "part", "rank", "num_images", "num_failed")}
                       for m in ms],
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return manifest


def _create_exclusive(path: Path, text: str) -> bool:
    """Write `path` only if it does not exist, atomically (the first of several writers wins). True if written."""
    tmp = _fsynced_tmp(path, text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _flat(config: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """The compared settings, nested dicts flattened to dotted names so a diff names exactly what changed."""
    out: dict[str, Any] = {}
    for k in keys:
        v = config.get(k)
        if isinstance(v, dict):
            out.update({f"{k}.{sub}": sv for sub, sv in v.items()})
        else:
            out[k] = v
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- reading ---------------------------------------------------------------------------------------------------
def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, np.ndarray):
        v = v.tolist()
    return v


class _Reader(Mapping):
    """key -> features (T, C) numpy; `.meta(key)`, `.pooled(key)`, `.attrs`, `.config`, `.failures`."""

    path: Path

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.attrs.get("config", "{}"))

    def _missing(self, key: str) -> KeyError:
        return KeyError(f"no image with key {key!r} in {self.path} ({len(self)} keys; see `s2 inspect`)")

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class FeatureFile(_Reader):
    """One HDF5 file written by s2cli, read lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.f = h5py.File(self.path, "r")
        except OSError as e:
            raise ConfigError("not an HDF5 file", given=str(path), fix="pass a file written by `s2 extract`") from e
        if "keys" not in self.f:
            self.f.close()
            raise ConfigError("not an s2cli feature file (no keys dataset)", given=str(path),
                              fix="pass a file written by `s2 extract`")
        self._keys = [_attr(k) for k in self.f["keys"][:]]
        self._index = {k: i for i, k in enumerate(self._keys)}
        self.ragged = "offsets" in self.f
        self._offsets = self.f["offsets"][:] if self.ragged else None

    @property
    def attrs(self) -> dict[str, Any]:
        return {k: _attr(v) for k, v in self.f.attrs.items()}

    @property
    def failures(self) -> list[dict[str, str]]:
        return [json.loads(_attr(r)) for r in self.f["failures"][:]] if "failures" in self.f else []

    def _i(self, key: str) -> int:
        if key not in self._index:
            raise self._missing(key)
        return self._index[key]

    def __getitem__(self, key: str) -> np.ndarray:
        i = self._i(key)
        if "features" not in self.f:
            raise KeyError(f"{self.path} holds pooled vectors only (--pool-only); use .pooled({key!r})")
        if self.ragged:
            return self.f["features"][int(self._offsets[i]):int(self._offsets[i + 1])]
        return self.f["features"][i]

    def pooled(self, key: str) -> np.ndarray:
        if "pooled" not in self.f:
            raise KeyError(f"{self.path} has no pooled vectors (extract with --pool mean|cls)")
        return self.f["pooled"][self._i(key)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def meta(self, key: str) -> dict[str, Any]:
        i, f = self._i(key), self.f
        m = _attr(f["meta"][i]) if "meta" in f else ""
        return {"key": key, "source": _attr(f["source"][i]), "meta": json.loads(m) if m else None,
                "orig_hw": f["orig_hw"][i].tolist(), "grid_hw": f["grid_hw"][i].tolist(),
                "img_sizes": f["img_sizes"][i].tolist(), "num_prefix_tokens": int(f["num_prefix_tokens"][i]),
                "split_mode": _attr(f["split_mode"][i]),
                **({"plan": json.loads(_attr(f["plan"][i]))} if "plan" in f else {})}

    @property
    def feature_shape(self) -> list[int | None] | None:
        if "features" not in self.f:
            return None
        ds = self.f["features"]
        return [None, ds.shape[1]] if self.ragged else list(ds.shape[1:])

    @property
    def dtype(self) -> str:
        return str((self.f["features"] if "features" in self.f else self.f["pooled"]).dtype)

    def close(self) -> None:
        self.f.close()


class SafetensorsFeatureFile(_Reader):
    """One safetensors shard written by s2cli."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        try:
            self.f = safe_open(str(self.path), framework="numpy")
        except Exception as e:
            raise ConfigError("not a safetensors file", given=str(path), fix="pass a file written by `s2 extract`") from e
        md = self.f.metadata() or {}
        if "s2cli" not in md:
            raise ConfigError("not an s2cli feature file (no s2cli metadata)", given=str(path),
                              fix="pass a file written by `s2 extract`")
        self._attrs = json.loads(md["s2cli"])
        self._keys = json.loads(md["keys"])
        self._images = json.loads(md["images"])
        self._failures = json.loads(md["failures"])
        self._index = {k: i for i, k in enumerate(self._keys)}
        self._names = set(self.f.keys())

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._attrs)

    @property
    def failures(self) -> list[dict[str, str]]:
        return list(self._failures)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._index:
            raise self._missing(key)
        if key not in self._names:
            raise KeyError(f"{self.path} holds pooled vectors only (--pool-only); use .pooled({key!r})")
        return self.f.get_tensor(key)

    def pooled(self, key: str) -> np.ndarray:
        if key not in self._index:
            raise self._missing(key)
        if POOLED_TENSOR not in self._names:
            raise KeyError(f"{self.path} has no pooled vectors (extract with --pool mean|cls)")
        return self.f.get_slice(POOLED_TENSOR)[self._index[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def meta(self, key: str) -> dict[str, Any]:
        if key not in self._index:
            raise self._missing(key)
        m = dict(self._images[key])
        m["meta"] = json.loads(m["meta"]) if m.get("meta") else None
        if "plan" in m:
            m["plan"] = json.loads(m["plan"])
        return {"key": key, **m}

    @property
    def feature_shape(self) -> list[int | None] | None:
        shapes = {tuple(self.f.get_slice(k).get_shape()) for k in self._keys[:64] if k in self._names}
        if not shapes:
            return None
        if len(shapes) == 1:
            return list(next(iter(shapes)))
        return [None, next(iter(shapes))[1]]

    @property
    def dtype(self) -> str:
        name = next((k for k in self._keys if k in self._names), POOLED_TENSOR if POOLED_TENSOR in self._names else None)
        if name is None:
            return str(np.dtype(self._attrs.get("dtype", "float32")))
        return {"F32": "float32", "F16": "float16"}.get(self.f.get_slice(name).get_dtype(), self.f.get_slice(name).get_dtype())

    def close(self) -> None:
        self.f = None  # safe_open has no close; the mmap goes with the object


class FeatureSet(_Reader):
    """An output directory read as one mapping across its completed shards (those with a done marker)."""

    def __init__(self, path: str | os.PathLike, max_open: int = 32):
        self.path = Path(path)
        self.dir = OutputDir(self.path)
        if not self.dir.run_file.is_file():
            raise ConfigError("not an s2cli output folder (no run.json)", given=str(path),
                              fix="pass a folder written by `s2 extract -o OUTDIR/`")
        self.run = json.loads(self.dir.run_file.read_text())
        self._markers = self.dir.markers()
        self._where: dict[str, int] = {}
        self._shard_keys: list[list[str]] = []
        for i, m in enumerate(self._markers):
            with _open_file(self.path / m["shard"]) as r:
                ks = list(r)
            self._shard_keys.append(ks)
            for k in ks:
                self._where.setdefault(k, i)
        self._open: OrderedDict[int, _Reader] = OrderedDict()
        self.max_open = max_open

    def _reader(self, i: int) -> _Reader:
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        r = _open_file(self.path / self._markers[i]["shard"])
        self._open[i] = r
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return r

    def _shard_of(self, key: str) -> _Reader:
        if key not in self._where:
            raise self._missing(key)
        return self._reader(self._where[key])

    def __getitem__(self, key: str) -> np.ndarray:
        return self._shard_of(key)[key]

    def pooled(self, key: str) -> np.ndarray:
        return self._shard_of(key).pooled(key)  # type: ignore[attr-defined]

    def meta(self, key: str) -> dict[str, Any]:
        return {**self._shard_of(key).meta(key), "shard": self._markers[self._where[key]]["shard"]}  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[str]:
        seen = set()
        for ks in self._shard_keys:
            for k in ks:
                if k not in seen:
                    seen.add(k)
                    yield k

    def __len__(self) -> int:
        return len(self._where)

    @property
    def attrs(self) -> dict[str, Any]:
        if self._markers:
            return self._reader(0).attrs
        return {"config": json.dumps(self.run["config"])}

    @property
    def failures(self) -> list[dict[str, str]]:
        return [r for m in self._markers for r in m["failures"]]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return [{k: m[k] for k in ("shard", "unit", "part", "num_images", "num_failed")} for m in self._markers]

    @property
    def complete(self) -> bool:
        mf = self.path / "manifest.json"
        return bool(mf.is_file() and json.loads(mf.read_text()).get("complete"))

    @property
    def feature_shape(self) -> list[int | None] | None:
        shapes = [self._reader(i).feature_shape for i in range(len(self._markers))][:8]
        shapes = [s for s in shapes if s is not None]
        if not shapes:
            return None
        return shapes[0] if all(s == shapes[0] for s in shapes) else [None, shapes[0][1]]

    @property
    def dtype(self) -> str:
        return self._reader(0).dtype if self._markers else self.run["config"].get("dtype", "float32")

    def close(self) -> None:
        for r in self._open.values():
            r.close()
        self._open.clear()


def _open_file(path: Path) -> _Reader:
    if not path.is_file():
        raise ConfigError("no such feature file", given=str(path), fix="pass a file or folder written by `s2 extract`")
    return SafetensorsFeatureFile(path) if format_of(path) == "safetensors" else FeatureFile(path)


def open_features(path: str | os.PathLike) -> _Reader:
    """Open features written by `s2 extract` for lazy reading by key: one .h5 or .safetensors file, or an
    output folder of shards (read across its completed shards)."""
    p = Path(path)
    if p.is_dir():
        return FeatureSet(p)
    return _open_file(p)


# ---- export ----------------------------------------------------------------------------------------------------
def export_embeddings(src: _Reader, out: str | os.PathLike, pool: str = "auto", chunk: int = 100_000) -> dict[str, Any]:
    """One vector per image, in the layout clip-retrieval writes and autofaiss reads:
    OUT/img_emb/img_emb_{i}.npy (n, C) and OUT/metadata/metadata_{i}.parquet (key, source) in the same order
    (metadata_{i}.jsonl when pyarrow is not installed). `pool`: auto (the stored pooled vectors, else the mean of
    the spatial tokens), pooled, or mean."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError("export folder is not empty", given=str(out), fix="pass a new or empty folder")
    (out / "img_emb").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    keys = list(src)
    if not keys:
        raise ConfigError("nothing to export: no images", given=str(src.path), fix="extract some images first")
    stored = _has_pooled(src, keys[0])
    if pool == "pooled" and not stored:
        raise ConfigError("no pooled vectors are stored", given=str(src.path), fix="use --pool mean, or extract with --pool mean|cls")
    use_stored = stored and pool in ("auto", "pooled")
    prefix = int(src.attrs.get("num_prefix_tokens", 0) or 0)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        pa = None
    files = []
    for i, start in enumerate(range(0, len(keys), chunk)):
        part = keys[start:start + chunk]
        vecs = np.stack([src.pooled(k) if use_stored else np.asarray(src[k], np.float32)[prefix:].mean(0)  # type: ignore[attr-defined]
                         for k in part])
        np.save(out / "img_emb" / f"img_emb_{i}.npy", vecs)
        rows = [{"key": k, "source": src.meta(k)["source"]} for k in part]  # type: ignore[attr-defined]
        if pa is not None:
            pq.write_table(pa.Table.from_pylist(rows), out / "metadata" / f"metadata_{i}.parquet")
        else:
            (out / "metadata" / f"metadata_{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(f"img_emb/img_emb_{i}.npy")
    return {"output": str(out), "num_images": len(keys), "dim": int(vecs.shape[1]), "files": files,
            "pool": "stored" if use_stored else "mean"}


def _has_pooled(src: _Reader, key: str) -> bool:
    try:
        src.pooled(key)  # type: ignore[attr-defined]
        return True
    except KeyError:
        return False
