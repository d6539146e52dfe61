"""Run: one extraction's loop. Units of the input are cut into parts (one output shard each); samples are decoded
and fitted in worker processes, handed to the run's strategy to compute on the Extractor, and written by the
writer thread. A part's batches never mix with another part's, so a resumed run computes exactly what an
uninterrupted one would. `Target` says where a run writes, `Summary` what it did."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from . import formats
from .backbones import Backbone
from .config import Resolved
from .dtypes import entry_bytes, itemsize, pooled_dtype
from .errors import ConfigError, S2Error
from .extractor import Extractor
from .fsutil import Claim, drop_cached, file_identity, take_claim
from .heartbeat import Heartbeat
from .inputs.decode import Decoded
from .inputs.loader import DecodeLoader
from .inputs.samples import Sample
from .inputs.units import Input, Unit
from .items import Layout, StoredItem
from .launch import Rank, Terminated, final_barrier, resolve_precision, signals_deferred
from .outdir import OutputDir, shard_record, unit_complete
from .plan import fit_of
from .reduce import parse as parse_reduce
from .strategies import strategy_of
from .version import __version__
from .writers import ThreadedSink, check_output_file, remove_dead_temporaries

Progress = Callable[[int, int, int], None]  # (images done, failed, shards written) in this run


def parts_of(unit: Unit, shard_size: int) -> int | None:
    """How many parts (output shards) a unit has: known for a listed unit, not for a tar until it was read."""
    return None if unit.size is None else -(-unit.size // shard_size)


def keys_digest(keys: list[str]) -> str:
    """What identifies a part of a listed unit: a digest of its keys, in order."""
    return hashlib.sha256("\n".join(keys).encode("utf-8", "surrogatepass")).hexdigest()


def part_matches(marker: dict, unit: Unit | None, shard_size: int) -> bool:
    """A done marker still describes the part of the input it names: the unit exists and (listed units) the part's
    keys are the ones it was made from (their digest; markers written before it had one: their first and last
    keys are among the part's keys); a tar is the same file as when it was read (its name, size and modification
    time; markers written before they recorded these, and tars that cannot be stat'ed: kept)."""
    if unit is None:
        return False
    keys = unit.part_keys(marker["part"], shard_size)
    if keys is None:  # a tar: the same file (name, then size and modification time when it recorded them)
        ident = unit.identity()
        if marker.get("unit", unit.id) != unit.id:
            return False
        return ident is None or not ident.keys() & marker.keys() or all(marker.get(k) == v for k, v in ident.items())
    if not keys:
        return False
    if "keys_sha256" in marker:
        return marker["keys_sha256"] == keys_digest(keys)
    return all(k is None or k in keys for k in (marker.get("first_key"), marker.get("last_key")))


def units_complete(units: list[Unit], markers: list[dict], shard_size: int) -> int:
    by_unit: dict[int, list[dict]] = {}
    for m in markers:
        by_unit.setdefault(m["unit_index"], []).append(m)
    return sum(1 for unit in units if unit_complete(by_unit.get(unit.index, []), parts_of(unit, shard_size)))


class Target:
    """Where a run writes: one file, or an output directory of shards (resumable)."""

    def __init__(self, res: Resolved, inp: Input, overwrite: bool, rank: Rank = Rank()):
        self.res, self.inp, self.ranks, self.rank = res, inp, rank, rank.rank
        self.dir = OutputDir(res.output) if res.output_is_dir else None
        self.heartbeat = None
        self.claim: Claim | None = None  # a single file's claim (a folder's are its OutputDir's)
        self.replaces: tuple[int, int, int] | None = None  # the file --overwrite may replace, as it was at the start
        self.done: dict[tuple[int, int], dict] = {}  # (unit, part) -> its marker (a retry's shards aside)
        self.markers: list[dict] = []  # every done marker, retries' too
        self.retry: dict[tuple[int, int], list[dict]] = {}  # --retry-failed: (unit, part) -> markers with its failures
        self.changed = 0  # done shards that no longer matched the input (it changed since): taken back, redone
        self.accepted = 0  # --retry-failed: done shards of tars rewritten since, kept (their failures retried)
        self.broken: list[dict] = []  # done shards found broken (not the size their marker recorded): redone
        self.identities: dict[int, dict] = {}  # a tar unit's identity, taken before it was read
        self.units_total = len(inp.units)  # less when --limit ends the input (shards) in an earlier unit
        self.keys: set[str] | None = None  # shards into a folder: the keys of its done shards (a key in two tars)
        if rank.world > 1 and self.dir is None:
            raise ConfigError("several ranks share one output, which must then be a folder",
                              given=f"-o {res.output} with {rank.world} ranks ({rank.source})", fix="pass -o OUTDIR/")
        if self.dir is not None:
            self._check_retry(overwrite)
            run = {"s2cli_version": __version__, "input": inp.describe(), "config": res.to_dict(),
                   "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            self.dir.prepare(run, overwrite, res.compare_keys(), rank.rank, rank.world)
            self.broken = self.dir.broken
            try:
                self.changed = self._drop_changed()
                self.keys = self._done_keys()
                self.markers = self.dir.markers()
                self.done = {(m["unit_index"], m["part"]): m for m in self.markers if "retry_of" not in m}
                if res.retry_failed:
                    self.retry = self._failed_parts()
                with signals_deferred():  # a stop signal once the heartbeat exists: it says so (below), never "running"
                    self.heartbeat = Heartbeat(self.dir.folder, rank.rank, rank.world, rank.source)
            except BaseException as e:
                if self.heartbeat is not None:
                    self.close_after(e)  # preempted or failed, and the claim given back
                else:
                    self.release()
                raise
        else:
            self._claim_file(Path(res.output), overwrite)
        self._by_unit: dict[int, list[dict]] = {}
        for (u, _), m in self.done.items():
            self._by_unit.setdefault(u, []).append(m)

    def _check_retry(self, overwrite: bool) -> None:
        """--retry-failed needs a run to retry, and keeps what it wrote."""
        if not self.res.retry_failed:
            return
        if overwrite:
            raise ConfigError("--retry-failed and --overwrite contradict each other: one keeps the output, the other "
                              "starts it over", fix="drop one of them")
        if not self.dir.has_run:  # type: ignore[union-attr]
            raise ConfigError("--retry-failed retries the failures an output folder records, and this one holds no run",
                              given=self.res.output, fix="run without --retry-failed first")

    def _failed_parts(self) -> dict[tuple[int, int], list[dict]]:
        """This rank's parts with failed images to retry, and the markers that record them. Not retried: a repeated
        key (the first one was kept) and a tar stream that broke (no image of its own: rerun after fixing the tar)."""
        out: dict[tuple[int, int], list[dict]] = {}
        for m in self.markers:
            if self.ranks.owns(m["unit_index"]) and any(retryable(f) for f in m["failures"]):
                out.setdefault((m["unit_index"], m["part"]), []).append(m)
        return out

    @property
    def retry_keys(self) -> int:
        return len({(u, p, f["key"]) for (u, p), ms in self.retry.items() for m in ms for f in m["failures"]
                    if retryable(f)})

    def _drop_changed(self) -> int:
        """Done shards of this rank's units (or of units that are gone) whose part of the input changed since they
        were written (images added, removed, renamed) are taken back, so they are redone: a resume extracts what
        a clean run over the input as it is now would."""
        units = {u.index: u for u in self.inp.units}
        mine = [m for m in self.dir.markers()  # type: ignore[union-attr]
                if m["unit_index"] not in units or self.ranks.owns(m["unit_index"])]
        stale = [m for m in mine if not part_matches(m, units.get(m["unit_index"]), self.res.shard_size)]
        if self.res.retry_failed and stale:
            stale = self._retry_changed(stale, units)
        self.dir.drop(stale, log_errors=self.ranks.world == 1)  # type: ignore[union-attr]
        return len(stale)

    def _retry_changed(self, stale: list[dict], units: dict[int, Unit]) -> list[dict]:
        """--retry-failed over an input that changed since: a tar rewritten (the usual way to fix a sample in it) is
        taken as it is now (its done shards kept, their markers given its new size and time) and its recorded
        failures are retried from it; images added, removed or renamed are refused: a plain rerun brings the
        folder up to date first (nothing is taken back here)."""
        S = self.res.shard_size
        tars = [m for m in stale if (u := units.get(m["unit_index"])) is not None and u.part_keys(m["part"], S) is None
                and m.get("unit", u.id) == u.id]
        if len(tars) < len(stale):
            raise ConfigError(f"the input changed since {self.res.output} was written: {len(stale) - len(tars)} of its "
                              "done shards no longer match it (images added, removed or renamed), and --retry-failed "
                              "retries recorded failures only", given=self.inp.spec,
                              fix="rerun without --retry-failed first (it redoes what changed), then retry")
        for m in tars:
            self.dir.refresh(m, units[m["unit_index"]].identity() or {})  # type: ignore[union-attr]
        self.accepted = len(tars)
        return []

    def _done_keys(self) -> set[str] | None:
        """The keys the done shards hold, when the input has tars (listed inputs have unique keys): a key met again
        in another tar is a duplicate. A done shard of this rank's that cannot be read, or holds another number of
        keys than its marker says, is broken: taken back and redone."""
        if self.dir is None or all(u.size is not None for u in self.inp.units):
            return None
        from .readers import shard_keys

        keys: set[str] = set()
        bad = []
        for m in self.dir.markers():
            if isinstance(m.get("keys"), list) and len(m["keys"]) == m["num_images"]:  # listed by its marker
                keys.update(m["keys"])
                continue
            try:
                ks = shard_keys(self.dir.folder.fetch(m["shard"]))
                why = None if len(ks) == m["num_images"] else f"holds {len(ks)} keys where its marker recorded {m['num_images']}"
            except (S2Error, OSError, ValueError, KeyError) as e:
                ks, why = [], f"cannot be read: {e}"
            if why is None:
                keys.update(ks)
            elif self.ranks.owns(m["unit_index"]):
                bad.append({**m, "broken": why})
        self.dir.drop(bad, log_errors=self.ranks.world == 1)
        self.broken += bad
        return keys

    def _claim_file(self, out: Path, overwrite: bool) -> None:
        """Claim a single-file output (`.NAME.lock` beside it) before anything is read or written, then remove
        the temporaries of dead runs of it. The file there now is the only one the final rename may replace."""
        directory = formats.get(self.res.format).store == formats.DIR
        check_output_file(out, overwrite, directory)
        self.claim = take_claim(out.with_name(f".{out.name}.lock"), str(out), fix=(
            "wait for that run to end, or pass another -o; a killed run's claim ends with its process"))
        try:
            check_output_file(out, overwrite, directory)  # again: a run that just ended may have written it
            self.replaces = file_identity(out)
            remove_dead_temporaries(out)
        except BaseException:
            self.close("failed")
            raise

    @property
    def images_done_before(self) -> int:
        return sum(m["num_images"] for m in self.markers)

    @property
    def failures_before(self) -> int:
        """Failures recorded before this run (--retry-failed: but those it retries, which it records again if so)."""
        return sum(m["num_failed"] for m in self.markers) - (self.retry_keys if self.res.retry_failed else 0)

    def close(self, state: str, error: str | None = None, release: bool = True, **fields: Any) -> None:
        """Say in this rank's heartbeat how it ended (done, failed or preempted) and, unless told not to, give back
        the claim on the output."""
        if self.heartbeat is not None:
            self.heartbeat.close(state, error, **fields)
            self.heartbeat = None
        if release:
            self.release()

    def close_after(self, e: BaseException) -> None:
        """Close after the run ended with `e`: preempted (a stop signal: SIGTERM, SIGUSR1; a rerun resumes) or
        failed, said in the heartbeat."""
        if isinstance(e, Terminated):
            self.close("preempted", f"preempted by {e.signame}", signal=e.signame)
        else:
            self.close("failed", e.one_line() if isinstance(e, S2Error) else f"{type(e).__name__}: {e}")

    def release(self) -> None:
        """Give back the claim on the output (another run may take it from now on)."""
        if self.dir is not None:
            self.dir.release()
            self.dir.folder.close()  # a remote folder's local spool
        if self.claim is not None:
            self.claim.release()
            self.claim = None

    def finish(self, s: Summary, shards_written: int) -> None:
        """A folder's run has ended well: the heartbeat says done, the manifest (and the index) are written whole
        (a signal then ends it), and the claim is given back; `s` gets the folder's totals."""
        self.close("done", release=False)
        try:
            with signals_deferred():  # every shard is done: the manifest is written whole, then a signal ends it
                self._write_manifest(s)
                self.dir.index_if_stale()  # type: ignore[union-attr]
        finally:
            self.release()  # after the manifest: a run that claims the folder next sees it
        s.shards_written, s.resumed_images = shards_written, self.images_done_before

    def _write_manifest(self, s: Summary) -> None:
        ranks, d = self.ranks, self.dir

        def done(markers: list[dict]) -> int:
            return units_complete(self.inp.units, markers, self.res.shard_size)

        if ranks.world == 1:
            manifest = d.write_manifest(self.units_total, done(d.markers()))  # type: ignore[union-attr]
        else:
            # every rank rewrites the manifest until it is current, unless a torchrun barrier says all ranks are
            # done, and then rank 0 alone writes it
            together = final_barrier(ranks)
            if together and ranks.rank != 0:
                ms = d.markers(fresh=True)  # type: ignore[union-attr]
                manifest = d.manifest(ms, self.units_total, done(ms))  # type: ignore[union-attr]
            else:
                manifest = d.write_manifest(self.units_total, done)  # type: ignore[union-attr]
            s.rank, s.world, s.rank_source = ranks.rank, ranks.world, ranks.source
            s.writes_summary = together and ranks.rank == 0
        s.total_images, s.total_failed, s.complete = manifest["num_images"], manifest["num_failed"], manifest["complete"]

    @property
    def nothing_to_do(self) -> bool:
        """A folder whose every unit of the input is done already (a rerun of a finished run): it is finished
        without loading the model. (A rank whose share is empty in an unfinished folder loads it as the others do.)"""
        return self.dir is not None and not self.res.retry_failed and all(self.unit_done(u) for u in self.inp.units)

    def finish_done(self, weights: str, device: str) -> Summary:
        """Finish a run with nothing to do (`nothing_to_do`): the manifest brought up to date, and its Summary."""
        s = Summary(output=self.res.output, num_images=0, num_failed=0, seconds=0.0, images_per_s=None,
                    weights=weights, device=device, compile=self.res.compile, stage_seconds={}, wait_seconds={})
        self.finish(s, 0)
        return s

    @property
    def units_to_read(self) -> int:
        """The units of this rank's share that this run reads (not already complete)."""
        return sum(1 for u in self.inp.units if self.ranks.owns(u.index) and not self.unit_done(u))

    def unit_done(self, unit: Unit) -> bool:
        """Every part of the unit is done, so it need not even be read."""
        return unit_complete(self._by_unit.get(unit.index, []), parts_of(unit, self.res.shard_size))

    def work(self) -> Iterator[tuple[Unit, int, Sample | dict | None]]:
        """(unit, part, sample) for every sample of this rank still to do; a sample of None marks an already-done
        part's sample (read past without decoding, so a resumed tar keeps its part boundaries). Shards under
        --limit: the first N samples of the shards in order (a failure record counts as a sample)."""
        if self.res.retry_failed:
            yield from self._retry_work()
            return
        S, left = self.res.shard_size, self.inp.limit
        for unit in self.inp.units:
            if left is not None and left <= 0:
                self.units_total = unit.index
                return
            if not self.ranks.owns(unit.index) or self.unit_done(unit):
                if left is not None:  # counted from its markers, or read past (another rank's)
                    ms = self._by_unit.get(unit.index)
                    left -= (sum(m["num_images"] + m["num_failed"] for m in ms) if ms and self.unit_done(unit)
                             else sum(1 for _ in itertools.islice(unit.samples(), left)))
                continue
            ident = unit.identity()
            if ident is not None:
                self.identities[unit.index] = ident
            for i, s in enumerate(unit.samples()):
                if left is not None:
                    if left <= 0:
                        break
                    left -= 1
                part = i // S if self.dir is not None else 0
                yield unit, part, (None if (unit.index, part) in self.done else s)
        if left is not None and left <= 0:
            self.units_total = min(self.units_total, unit.index + 1)

    def _retry_work(self) -> Iterator[tuple[Unit, int, Sample | dict]]:
        """--retry-failed: (unit, part, sample) for the samples recorded as failed, found again in the input."""
        S = self.res.shard_size
        for unit in self.inp.units:
            wanted = {p: {f["key"] for m in ms for f in m["failures"] if retryable(f)}
                      for (u, p), ms in self.retry.items() if u == unit.index}
            if not wanted:
                continue
            for i, s in enumerate(unit.samples()):
                key = s["key"] if isinstance(s, dict) else s.key
                if key in wanted.get(i // S, ()):
                    yield unit, i // S, s


def retryable(failure: dict) -> bool:
    """A failure `--retry-failed` retries: an image's (not a repeated key's, nor a broken tar stream's)."""
    return failure.get("error_class") != "DuplicateKey" and not failure["key"].endswith(":<stream>")


@dataclass
class Summary:
    """What a run did (`s2 extract --json` prints `to_dict()`). The folder fields are set for an output folder,
    the rank fields for one rank of several."""

    output: str
    num_images: int
    num_failed: int
    seconds: float
    images_per_s: float | None
    weights: str
    device: str
    compile: bool
    stage_seconds: dict[str, float]
    wait_seconds: dict[str, float]
    compile_cache: dict[str, Any] | None = None
    rank: int | None = None
    world: int | None = None
    rank_source: str | None = None
    writes_summary: bool | None = None
    shards_written: int | None = None
    resumed_images: int | None = None
    total_images: int | None = None
    total_failed: int | None = None
    complete: bool | None = None

    @property
    def nothing_extracted(self) -> bool:
        """Every sample this run saw failed, and nothing was done before it."""
        return bool(self.num_failed) and not self.num_images and not self.resumed_images

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        optional = {f.name for f in dataclasses.fields(self) if f.default is None}
        return {k: v for k, v in d.items() if k not in optional or v is not None}

    def __getitem__(self, key: str) -> Any:  # summary["num_images"], as the dict it replaces
        return self.to_dict()[key]


@dataclass
class _Part:
    """An output shard in the making: unit, part number, its sink and what has gone into it."""

    unit: Unit
    part: int
    sink: ThreadedSink
    started: float
    seen: set
    first_key: str | None = None
    last_key: str | None = None
    retry_of: list[dict] | None = None  # --retry-failed: the markers whose failures this part extracts again
    nbytes: int = 0  # the shard's size, once committed


@dataclass
class TotalEstimate:
    """WebDataset input, whose tars are counted only by reading them: the samples of a run's share estimated as
    those before it, plus the new samples of the tars read to the end, plus their mean count (read-past samples of
    done parts included) times the tars still to read; it is refined as each tar ends."""

    before: int  # images done or failed before this run
    units: int  # tars this run reads
    finished: int = 0  # tars read to the end
    samples: int = 0  # their samples
    fresh: int = 0  # of them, new in this run
    unit: int | None = None  # the tar being read, its samples and its new ones so far
    in_unit: int = 0
    fresh_in_unit: int = 0

    def see(self, unit_index: int, fresh: bool) -> int | None:
        """A sample of tar `unit_index` (`fresh`: not already done); the new estimate when a tar just ended."""
        total = None
        if unit_index != self.unit:
            total = self.end_unit()
            self.unit = unit_index
        self.in_unit += 1
        self.fresh_in_unit += fresh
        return total

    def end_unit(self) -> int | None:
        if self.unit is None:
            return None
        self.finished, self.samples, self.fresh = self.finished + 1, self.samples + self.in_unit, self.fresh + self.fresh_in_unit
        self.in_unit = self.fresh_in_unit = 0
        return self.before + self.fresh + round(self.samples / self.finished * max(0, self.units - self.finished))


@dataclass
class Stats:
    """Counts of this run, and where the time went: seconds each stage was busy wherever it ran (decode workers,
    main thread, writer thread) and the main thread's waits on the decode loader and on the writer."""

    done: int = 0
    failed: int = 0
    shards: list[str] = field(default_factory=list)
    busy: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "decode": 0.0, "fit": 0.0, "write": 0.0})
    waits: dict[str, float] = field(default_factory=lambda: {"decode": 0.0, "write": 0.0})
    # the main thread's own stages besides the Extractor's (preprocess, forward, check): the stored items made from
    # the results (collect), a shard's end queued with its marker's fields (commit)
    main: dict[str, float] = field(default_factory=lambda: {"collect": 0.0, "commit": 0.0})


@dataclass
class _Video:
    """A video whose frames are in the engine: its record, each frame's stored item once computed, how many frames
    are still out, and whether one of them failed (then the whole video is one failure and nothing is stored)."""

    rec: Decoded
    positions: list[int]  # which of the chosen frames are computed (all; with --frames-as-images each index once)
    items: list[StoredItem | None]
    waiting: int
    failed: bool = False


class VideoFrames:
    """Videos through the image path: a video's record becomes one record per chosen frame (batched with the other
    frames and images; each carries the video's plan, made once), and its frames' results become one entry
    (frames, tokens, channels) with the frames' indices and timestamps in its metadata, or (`as_images`) one entry
    per distinct frame, `key#000123`."""

    def __init__(self, as_images: bool):
        self.as_images = as_images
        self.open: dict[str, _Video] = {}  # frame record key -> its video, while frames are out

    def expand(self, rec: Decoded) -> list[Decoded]:
        frames, idx = rec.frames or [], rec.video["frame_indices"]  # type: ignore[index]
        keep = [j for j in range(len(frames)) if not self.as_images or idx[j] not in idx[:j]]
        v = _Video(dataclasses.replace(rec, frames=None), keep, [None] * len(keep), len(keep))
        out = []
        for pos, j in enumerate(keep):
            key = f"{rec.key}#{idx[j]:06d}" if self.as_images else rec.key
            out.append(dataclasses.replace(rec, key=key, pixels=frames[j], frames=None, frame=pos))
            self.open[key] = v
        return out

    def failed(self, record: dict[str, str]) -> dict[str, str] | None:
        """A frame's failure: the video's one failure record (the first time), else None; a record that is not a
        frame's passes through."""
        v = self.open.get(record["key"])
        if v is None:
            return record
        self._done(v, record["key"])
        if v.failed:
            return None
        v.failed = True
        return {**record, "key": v.rec.key, "error": f"a frame ({record['key']}) failed: {record['error']}"}

    def add(self, rec: Decoded, item: StoredItem) -> list[StoredItem]:
        """A frame's item; returns the video's entries once its last frame is in (none if a frame failed)."""
        v = self.open[rec.key]
        v.items[rec.frame] = item  # type: ignore[index]
        self._done(v, rec.key)
        if v.waiting or v.failed:
            return []
        facts: dict[str, Any] = v.rec.video  # type: ignore[assignment]
        if self.as_images:
            return [it.replace(meta=v.rec.meta).with_meta(video={  # type: ignore[union-attr]
                "frame_index": facts["frame_indices"][j], "timestamp": facts["timestamps"][j],
                **{k: facts[k] for k in ("num_frames_total", "rotation", "codec")}})
                for j, it in zip(v.positions, v.items)]
        first = v.items[0]
        feats = [it.features for it in v.items]  # type: ignore[union-attr]
        return [first.replace(key=v.rec.key, meta=v.rec.meta, pooled=None,  # type: ignore[union-attr]
                              features=None if feats[0] is None else np.stack(feats)).with_meta(video=facts)]

    def _done(self, v: _Video, key: str) -> None:
        v.waiting -= 1
        if v.waiting == 0:
            for k in [k for k, o in self.open.items() if o is v]:
                del self.open[k]


# what the decode loader is given for a sample of a part already done: passed through, never decoded
_ALREADY_DONE = {"key": "", "stage": "", "error": "", "error_class": "", "source": ""}


class Run:
    """Extract every sample of the target's share of the input. Failed samples are recorded, never substituted.
    One batch is in flight: a batch is submitted (on CUDA the GPU works on it while the main thread goes on),
    then the batch before it is written."""

    def __init__(self, res: Resolved, inp: Input, target: Target, backbone: Backbone, device: torch.device,
                 on_progress: Progress | None = None):
        self.res, self.inp, self.target, self.backbone, self.device = res, inp, target, backbone, device
        self.on_progress = on_progress
        self.estimate: TotalEstimate | None = None  # WebDataset: the total estimated as the tars are read
        self.on_total: Callable[[int], None] | None = None
        self.strategy = strategy_of(res)
        self.reduction = parse_reduce(res.reduce)
        self.written = (0, 0)  # bytes and images of the shards this run committed (what a shard takes)
        self.fit = fit_of(res)
        self.ex = Extractor(res, backbone, device, resolve_precision(res.precision, device), self.fit)
        self.stats = Stats()
        self.part: _Part | None = None
        self.batch: list[Decoded] = []
        self.in_flight: list[tuple[_Part, list[Decoded], list[Callable[[], list]]]] = []
        self.file_sink: ThreadedSink | None = None
        self.ending: _Part | None = None  # the part whose shard is being ended on its writer thread
        self.shape: tuple[dict[str, Any], int] | None = None  # every shard's layout, once (`_sink_shape`)
        try:
            with signals_deferred():  # a signal while its temporary is made ends the run once it can be removed
                self.file_sink = self._new_sink(res.output) if target.dir is None else None
        except Terminated:
            if self.file_sink is not None:
                self.file_sink.abort()
            raise
        if self.file_sink is not None:  # never replace a file that appeared under the name during the run
            self.file_sink.guard, self.file_sink.replaces = True, target.replaces
        # the keys written so far, across units: one file's, or (shards in a folder: the same key may be in two
        # tars) the whole folder's, its done shards' included; listed inputs have unique keys, and a part's own
        self.file_keys: set[str] = set()
        self.folder_keys = target.keys
        self.videos = VideoFrames(res.frames_as_images)
        self.next_index = target.dir.next_shard_index(target.rank) if target.dir is not None else 0

    def execute(self) -> Summary:
        t0 = time.perf_counter()
        res = self.res
        # the whole next batch decodes while the current one runs (by default the loader keeps two batches in
        # flight): a sample is handed out only when the loop takes a record, so one batch's worth would put its last
        # samples after the forward
        loader = DecodeLoader(self.fit, res.workers, timeout=res.decode_timeout, prefetch=res.prefetch_factor,
                              batch_size=res.batch_size)
        try:
            decoded = loader.map(self.target.work(), lambda w: _ALREADY_DONE if w[2] is None else w[2])
            for (unit, part_no, sample), rec in _timed(decoded, self.stats.waits, "decode"):
                for stage, s in zip(("read", "decode", "fit"), rec.seconds):
                    self.stats.busy[stage] += s
                if self.estimate is not None and (total := self.estimate.see(unit.index, sample is not None)):
                    self.on_total(total)  # type: ignore[misc]
                if sample is not None:  # None: a sample of a part already done, read past
                    self.admit(unit, part_no, rec)
            self.finish_part(last_of_unit=True)
            self.settle()
            self._progress()
            self.close_file()
        except BaseException as e:
            self.abort(e)
            raise
        finally:
            loader.close()
        return self.finalize(time.perf_counter() - t0)

    def admit(self, unit: Unit, part_no: int, rec: Decoded) -> None:
        """A decoded sample: into the current part's batch, or recorded as failed."""
        if self.part is None or (self.part.unit.index, self.part.part) != (unit.index, part_no):
            self.finish_part(last_of_unit=self.part is not None and self.part.unit.index != unit.index)
            with signals_deferred():  # the new shard's temporary exists only once `abort` can find it
                self.part = self.start_part(unit, part_no)
        part, key = self.part, rec.key
        if key in part.seen:  # one rule for every output kind: the first sample of a key is kept
            self.record_failure(part, {"key": key, "source": rec.source,
                                       "stage": "read", "error_class": "DuplicateKey",
                                       "error": f"key {key!r} appears again in {unit.id} (a key seen earlier in the "
                                                "input); the first one is kept"})
            return
        part.seen.add(key)
        if rec.error is not None:
            self.record_failure(part, rec.error)
            return
        part.first_key = part.first_key or key
        part.last_key = key
        if rec.frames is not None:  # a video: its chosen frames go through the image path
            for frame in self.videos.expand(rec):
                self._batch(frame)
            return
        self._batch(rec)

    def _batch(self, rec: Decoded) -> None:
        rec.map_arrays(torch.as_tensor)  # (no pixels yet: JPEG bytes for the device decoder, --decode torch)
        self.batch.append(rec)
        if len(self.batch) >= self.res.batch_size:
            self.flush()

    def flush(self) -> None:
        """Submit the batch to the strategy's engine, then write the batch before it."""
        if not self.batch:
            return
        part, recs, self.batch = self.part, self.batch, []
        resolvers = self.strategy.compute(self.ex, recs, lambda r: self._frame_or_sample_failed(part, r))  # type: ignore[arg-type]
        self.drain()
        self.in_flight.append((part, recs, resolvers))  # type: ignore[arg-type]

    def drain(self) -> None:
        """Wait for the batches in flight and write their images, in input order."""
        st = self.stats
        while self.in_flight:
            part, recs, resolvers = self.in_flight.pop(0)
            results = [r for resolve in resolvers for r in resolve()]
            t0, waited = time.perf_counter(), st.waits["write"]
            order = {id(rec): i for i, rec in enumerate(recs)}
            results.sort(key=lambda r: order[id(r[0])])
            items = []
            for rec, feats, pooled in results:
                item = self._reduced(self.strategy.item(self.res, rec, feats, pooled))
                items += self.videos.add(rec, item) if rec.frame is not None else [item]
            if items:
                t = time.perf_counter()
                part.sink.write(items)
                st.waits["write"] += time.perf_counter() - t
                st.done += len(items)
            if self.ending is not None and self.ending.sink.ended:  # the shard before is done: counted (or its
                self.settle()  # failure raised) now, not only when the next one ends
            self._progress()
            if self.target.heartbeat is not None:
                self.target.heartbeat.update(images=st.done, failed=st.failed)
            st.main["collect"] += time.perf_counter() - t0 - (st.waits["write"] - waited)

    def start_part(self, unit: Unit, part: int) -> _Part:
        t = self.target
        if t.dir is None:  # one file: one key space across all units
            return _Part(unit, part, self.file_sink, time.perf_counter(), self.file_keys)  # type: ignore[arg-type]
        name = f"part-{t.rank:05d}-{self.next_index:05d}{formats.get(self.res.format).suffix}"
        self.next_index += 1
        if t.heartbeat is not None:
            t.heartbeat.update(unit=unit.id, unit_index=unit.index, part=part, shard=name, write=True)
        retry_of = t.retry.get((unit.index, part)) if self.res.retry_failed else None
        # keys are unique across the folder (the first kept); a retry's shard holds keys recorded as failed only
        seen = self.folder_keys if self.folder_keys is not None and retry_of is None else set()
        return _Part(unit, part, self._new_sink(str(t.dir.shard_path(name))), time.perf_counter(), seen,
                     retry_of=retry_of)

    def finish_part(self, last_of_unit: bool) -> None:
        """Write what is left of the part; in a folder, end its shard and commit its done marker (on the writer
        thread: the main thread goes on with the next part meanwhile)."""
        self.flush()
        self.drain()
        cur = self.part
        if cur is None or self.target.dir is None:
            return
        with signals_deferred():  # a stop signal now waits until the shard's end is queued (then `abort` settles it)
            self._commit(cur, last_of_unit)
            self.part = None
        self._progress()

    def _commit(self, cur: _Part, last_of_unit: bool) -> None:
        """End the part's shard: its writer thread serialises and renames it, hashes it and writes its done marker
        (last). One shard ends at a time: the one before is settled first."""
        self.settle()
        t0 = time.perf_counter()
        t = self.target
        keys = cur.unit.part_keys(cur.part, self.res.shard_size)
        identity = t.identities.get(cur.unit.index, {}) if keys is None else {"keys_sha256": keys_digest(keys),
                                                                               "num_keys": len(keys)}
        retry = {} if cur.retry_of is None else {  # a retry's shard names what it retried (never a tar's last part)
            "retry_of": [m["shard"] for m in cur.retry_of], "retried_keys": sorted(cur.seen)}
        from .readers import shard_contents  # its keys, shape and dtype as a reader sees them: readers need not open it

        known = {**identity, **retry, "unit": cur.unit.id, "unit_index": cur.unit.index, "part": cur.part,
                 "rank": t.rank, "first_key": cur.first_key, "last_key": cur.last_key, "s2cli_version": __version__,
                 "last_part": last_of_unit and not retry, "host": socket.gethostname()}

        def commit(path: Path) -> None:  # on the writer thread, once the shard is in place
            elapsed = time.perf_counter() - cur.started
            marker = {**known, **shard_record(path), **shard_contents(path), "shard": path.name, "num_images": cur.sink.n,
                      "num_failed": len(cur.sink.failures),
                      "failures": [{**f, "retry": True} for f in cur.sink.failures] if retry else cur.sink.failures,
                      "seconds": round(elapsed, 3), "finished_at": time.time(), "started_at": time.time() - elapsed}
            cur.nbytes = marker["bytes"]
            t.dir.commit(marker, log_errors=t.ranks.world == 1 and not retry, written=path)  # type: ignore[union-attr]
            drop_cached(formats.store_files(path))  # hashed, read back and marked: its pages serve the next shard's writes
            if retry:  # the failures it retried move to their shards' history: each image counts once
                t.dir.settle_retry(marker, log_errors=t.ranks.world == 1)  # type: ignore[union-attr]

        cur.sink.end(commit)
        self.ending = cur
        self.stats.main["commit"] += time.perf_counter() - t0

    def settle(self) -> None:
        """Wait for the shard being ended (its marker written), and count it."""
        cur = self.ending
        if cur is None:
            return
        t, st = self.target, self.stats
        t0 = time.perf_counter()
        try:
            path = cur.sink.wait()
        except BaseException:
            if cur.sink.ended:  # failed; else a stop signal came while waiting: `abort` waits for it again
                self.ending = None
            raise
        self.ending = None
        st.waits["write"] += time.perf_counter() - t0
        st.busy["write"] += cur.sink.busy_s
        st.shards.append(path.name)
        if cur.sink.n:
            self.written = (self.written[0] + cur.nbytes, self.written[1] + cur.sink.n)
            if self.part is not None and self.res.output_is_dir:  # the shard being written: as this one took
                self.part.sink.need_bytes = round(self.written[0] / self.written[1] * self.res.shard_size)
                self.part.sink.need_floor = False
        if t.heartbeat is not None:
            t.heartbeat.update(shards_written=len(st.shards), images=st.done, failed=st.failed, shard=None, write=True)

    def _frame_or_sample_failed(self, part: _Part, rec: dict[str, str]) -> None:
        """A failure in the engine: a frame's is its video's (recorded once), a sample's its own."""
        record = self.videos.failed(rec)
        if record is not None:
            self.record_failure(part, record)

    def record_failure(self, part: _Part, rec: dict[str, str]) -> None:
        res = self.res
        part.sink.fail(rec)
        self.stats.failed += 1
        if res.on_error == "stop":
            raise S2Error(f"stopping at the first failure (--on-error stop): {rec['key']} [{rec['stage']}] "
                          f"{rec['error_class']}: {rec['error']} ({rec['source']})",
                          fix="fix or remove that input, or use --on-error skip to record failures and go on")
        total = self.stats.failed + self.target.failures_before
        if res.max_failures is not None and total > res.max_failures:
            raise S2Error(f"{total} samples failed, more than --max-failures {res.max_failures}; "
                          f"the last: {rec['key']} [{rec['stage']}] {rec['error']}",
                          fix="look at the failure records (errors.jsonl or `s2 inspect`), fix the input, rerun to resume")

    def close_file(self) -> None:
        if self.file_sink is not None:
            t = time.perf_counter()
            self.file_sink.close()
            self.stats.waits["write"] += time.perf_counter() - t
            self.stats.busy["write"] += self.file_sink.busy_s

    def abort(self, e: BaseException) -> None:
        """Throw away the unfinished shard or file (finished shards stay: one being ended gets its marker first)
        and say in the heartbeat why."""
        try:
            self.settle()
        except BaseException:  # that shard failed too (its file removed, no marker): `e` is what the run ends with
            pass
        if self.part is not None and self.part.sink is not self.file_sink:
            self.part.sink.abort()
        if self.file_sink is not None:
            self.file_sink.abort()
        self.target.close_after(e)

    def finalize(self, seconds: float) -> Summary:
        """Close the heartbeat, write the manifest (folders), and say what was done."""
        st, res = self.stats, self.res
        stage = {**st.busy, **self.ex.seconds, **st.main}
        for k, v in self.ex.decode_seconds.items():
            stage[k] += v
        # the main thread's seconds in no stage above and no wait (the loop itself, starting and stopping the decode
        # loader, opening shards): with it, the main thread's stages and waits add up to the run's seconds
        named = self.ex.seconds | st.main | self.ex.decode_seconds  # (-j 0: decoding is inside the decode wait)
        stage["other"] = seconds - sum(named.values()) - sum(st.waits.values())
        s = Summary(
            output=res.output, num_images=st.done, num_failed=st.failed, seconds=round(seconds, 3),
            images_per_s=round(st.done / seconds, 3) if seconds > 0 else None, weights=self.backbone.weights,
            device=str(self.device), compile=res.compile, stage_seconds={k: round(v, 4) for k, v in stage.items()},
            wait_seconds={k: round(v, 4) for k, v in st.waits.items()})
        if res.compile:
            from .backbones import compile_cache_stats

            s.compile_cache = compile_cache_stats()
        if self.target.dir is not None:
            self._finalize_dir(s)
        else:
            self.target.close("done")
        return s

    def _finalize_dir(self, s: Summary) -> None:
        self.target.finish(s, len(self.stats.shards))

    def _reduced(self, item: StoredItem) -> StoredItem:
        """The item as it is stored: its token grid reduced (--reduce, each layer alike) and the reduction
        recorded; with --layers, its (L, T, C) features as L*T rows and its (L, C) pooled vector as one row."""
        layered = self.res.layers is not None
        if self.reduction is not None and item.features is not None:
            if layered:
                done = [self.reduction.apply(x, item.grid_hw, item.num_prefix_tokens) for x in item.features]
                feats, grid = np.stack([f for f, _ in done]), done[0][1]
            else:
                feats, grid = self.reduction.apply(item.features, item.grid_hw, item.num_prefix_tokens)
            record = {"op": self.reduction.spec, "grid_before": list(item.grid_hw), "grid_hw": list(grid)}
            item = item.replace(features=feats, grid_hw=grid, reduce=json.dumps(record))
        if layered:
            f, p = item.features, item.pooled
            item = item.replace(features=None if f is None else f.reshape(-1, f.shape[-1]),
                                pooled=None if p is None else p.reshape(-1))
        return item

    def _sink_shape(self) -> tuple[dict[str, Any], int]:
        """What every shard of the run holds (channels, scales, tokens, ...) and the pooled width: planned once per
        run, for a square image of the largest scale's side."""
        res = self.res
        shape = self.strategy.sink_shape(res)
        videos = res.sampling.active and not res.frames_as_images
        if videos:  # an entry is (frames, tokens, channels) or (tokens, channels): the ragged layout holds both
            shape["tokens"] = shape["tokens_per_image"] = None
        pooled_channels = res.pooled_width(shape["channels"])
        if self.reduction is not None:  # the stored shape: after the reduction (pooled vectors are not reduced)
            tokens, shape["channels"] = res.stored(self.strategy.plan_entry(res, (res.side, res.side))[0])["output_shape"]
            shape["tokens"] = tokens if shape["tokens"] is not None else None
            shape["tokens_per_image"] = tokens if shape["tokens_per_image"] is not None else None
        if res.layers is not None:  # each image's layers as L x T rows, its pooled vectors as one row of L x C
            n = res.num_layers
            shape.update({k: shape[k] * n for k in ("tokens", "tokens_per_image") if shape[k] is not None})
            pooled_channels *= n
        return shape, pooled_channels

    def _new_sink(self, path: str) -> ThreadedSink:
        res = self.res
        if self.shape is None:
            self.shape = self._sink_shape()
        shape, pooled_channels = self.shape
        videos = res.sampling.active and not res.frames_as_images
        layout = Layout(channels=shape["channels"], num_scales=shape["num_scales"], tokens=shape["tokens"],
                        dtype=res.dtype, features=not res.pool_only, pooled=res.pool != "none",
                        pooled_channels=pooled_channels, plans=shape["plans"], reduced=self.reduction is not None,
                        videos=videos)
        fmt = formats.get(res.format)
        sink = fmt.sink_class()(path, res.file_attrs(self.backbone.weights), layout,
                                directory=fmt.store == formats.DIR)
        if res.output_is_dir:
            sink.need_bytes = self._shard_bytes(shape, pooled_channels)
            sink.need_floor = not self.written[1]  # before any shard was measured: the arrays alone
        return sink

    def _shard_bytes(self, shape: dict[str, Any], pooled_channels: int) -> int | None:
        """What a whole shard takes, for the message when its disk (or a remote output's spool) is full: as the
        shards this run wrote took, per image; before the first, its arrays (tokens, pooled vectors; None when the
        tokens vary)."""
        res, (nbytes, images) = self.res, self.written
        if images:
            return round(nbytes / images * res.shard_size)
        if shape["tokens_per_image"] is None:
            return None
        tokens = 0 if res.pool_only else entry_bytes(shape["tokens_per_image"], shape["channels"], res.dtype)
        pooled = pooled_channels * itemsize(pooled_dtype(res.dtype)) if res.pool != "none" else 0
        return res.shard_size * (tokens + pooled)

    def _progress(self) -> None:
        if self.on_progress:
            self.on_progress(self.stats.done, self.stats.failed, len(self.stats.shards))


def _timed(it: Iterator[Any], acc: dict[str, float], key: str) -> Iterator[Any]:
    """`it`, adding the seconds spent waiting for each item to acc[key]."""
    it = iter(it)
    while True:
        t = time.perf_counter()
        try:
            x = next(it)
        except StopIteration:
            return
        acc[key] += time.perf_counter() - t
        yield x
