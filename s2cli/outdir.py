"""The output-folder protocol: `run.json` (the resolved config; a resumed run must match it), shards each
followed by its done marker (only marked shards count), leftovers of dead writers removed, `errors.jsonl` and
`manifest.json` rebuilt from the markers."""
from __future__ import annotations

import gc
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError
from .formats import DIGEST, NamePattern, marker_digest, of_path, store_identity
from .fsutil import Claim, claim_record, pid_alive, take_claim
from .heartbeat import RemoteClaim, heartbeat_name, live_ranks, liveness, read_heartbeats
from .store import Folder, folder

# `{suffix}`: any registered format's (formats.NamePattern)
SHARD_RE = NamePattern(r"^part-(\d{5})-(\d{5})\.{suffix}$")
OURS_RE = NamePattern(r"^(part-\d{5}-\d{5}\.({suffix}|json)|run\.json|manifest\.json|index\.json|errors\.jsonl|"
                      r"rank-\d{5}\.json)$")
# files `s2 slurm` puts beside the run (its script and SLURM's logs): ours, but not output; --overwrite keeps them
HEARTBEAT_NAME_RE = re.compile(r"^rank-\d{5}\.json$")  # a rank's heartbeat (on remote storage: its claim)
SIDE_RE = re.compile(r"^(s2-slurm\.sbatch|slurm-\d+(_\d+)?\.out)$")
RANK_TMP_RE = NamePattern(r"^\.part-(\d{5})-\d{5}\.({suffix}|json)\.tmp-\d+$")
LOCK_RE = re.compile(r"^\.rank-(\d{5})\.lock$")
MARKER_RE = re.compile(r"^part-\d{5}-\d{5}\.json$")
TMP_RE = re.compile(r"^\..*\.tmp-")
INDEX, INDEX_VERSION = "index.json", 1
INDEX_EVERY = 64  # a run rewrites the index after this many of its shards (or a quarter of those indexed) at least
MOVED = object()  # shard_damage: whole, at another identity (copied, restored)


def marker_name(shard: str) -> str:
    """The done marker's name of a shard."""
    return shard.rsplit(".", 1)[0] + ".json"


# settings an older version saved that no longer exist and decided nothing on their own (extra_prefix repeated
# what num_prefix_tokens holds): not a difference when a run written then is resumed
RETIRED = ("backbone.extra_prefix",)
# settings an older version did not record: compared only when the run being resumed recorded them (its weights'
# revision, the hub repo and commit of its backbone)
ADDED = ("weights_revision", "backbone.hub_id", "backbone.hub_file", "backbone.revision")
# settings an older version did not record because they had one value then: a run that did not record them had it
DEFAULTED = {"backbone.crop_round": "floor"}


@dataclass
class Snapshot:
    """One look at an output folder: the done markers whose shard is whole (input order), the broken ones (each
    with `broken`: why), the manifest read with them, the whole shards' sizes, and those of them whose identity in
    the store changed with the same bytes (`moved`: a rerun records their new identity)."""

    good: list[dict[str, Any]]
    broken: list[dict[str, Any]]
    manifest: dict[str, Any]
    sizes: dict[str, int]
    moved: list[dict[str, Any]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every unit is done: the manifest says so, every shard it lists is here and whole, and none is broken."""
        listed = {s.get("shard") for s in self.manifest.get("shards") or [] if isinstance(s, dict)}
        return bool(self.manifest.get("complete")) and not self.broken and listed <= {m["shard"] for m in self.good}


def unit_complete(markers: list[dict[str, Any]], parts: int | None) -> bool:
    """The one rule for a finished unit of the input: every part of it has its done marker. `parts`: how many parts
    a listed unit has; None for a tar, whose count is known only once it was read to the end: the marker of its
    last part says so."""
    have = {m["part"] for m in markers}
    if parts is not None:
        return len(have) >= max(1, parts)
    last = [m["part"] for m in markers if m.get("last_part")]
    return bool(last) and have >= set(range(last[0] + 1))


class OutputDir:
    """OUTDIR/ holds `run.json` (the resolved config, version, input), shards `part-RRRRR-SSSSS.{h5,safetensors}`,
    each followed by its done marker `part-RRRRR-SSSSS.json` (written last: only marked shards count),
    `errors.jsonl` (every failed sample once) and `manifest.json` (the completed shards). The folder is local
    or on remote storage (a `store.Folder`: an fsspec URL); there, shards are written to a local spool and
    uploaded before their marker, and a rank's claim is its heartbeat object (`heartbeat.RemoteClaim`)."""

    def __init__(self, path: str | os.PathLike | Folder):
        self.folder = folder(path)
        self.path = self.folder.path  # a Path for a local folder; the URL of a remote one
        self.claims: dict[int, Claim | RemoteClaim] = {}  # rank -> this process's claim on it
        self.broken: list[dict[str, Any]] = []  # marked shards found broken when the folder was prepared (dropped)
        self._known: dict[str, list[Any]] | None = None  # marker name -> [its identity, it], as last seen
        self._on_disk: dict[str, Any] = {}  # marker name -> its identity, as index.json holds them
        self.unindexed = 0  # markers the last look found that index.json lacks (or has otherwise, or has gone)
        self._committed = 0  # shards this process marked done since it last wrote the index
        self._snap: Snapshot | None = None  # the last look (`markers`), forgotten when this process writes a marker

    def claim(self, rank: int, world: int = 1) -> None:
        """Claim `rank` of `world` ranks of this folder for this process (held until `release`): a live run holding
        it is refused, and so is a live run of another rank count holding any rank (`refuse_other_count`). Locally
        a flock on `.rank-RRRRR.lock`; on remote storage the rank's heartbeat object."""
        if rank not in self.claims:
            what, fix = f"rank {rank} of {self.path}", ("wait for that run to end, or pass another -o; a killed "
                                                        "run's claim ends with its process")
            if self.folder.remote:
                self.claims[rank] = RemoteClaim(self.folder, rank, what, fix + " (on another host: after "
                                                "S2CLI_STALE_S seconds without a heartbeat)", world=world)
            else:
                self.claims[rank] = take_claim(self.path / f".rank-{rank:05d}.lock", what, fix,  # type: ignore[operator]
                                               info={"rank": rank, "world": world})
        try:
            self.refuse_other_count(rank, world)
        except ConfigError:
            self.claims.pop(rank).release()
            raise

    def refuse_other_count(self, rank: int, world: int) -> None:
        """A live run of another number of ranks writing this folder (its claims, its heartbeats): refused, for every
        rank of this run whatever its own claim, before any of them writes (the two would split the input two ways
        and write it twice)."""
        others = {}
        for r, hb in read_heartbeats(self.folder).items():
            if r != rank and liveness(hb) == "running" and hb.get("world") not in (None, world):
                others[r] = (hb["world"], hb.get("host"), hb.get("pid"))
        for n in self.folder.names() if not self.folder.remote else ():
            m = LOCK_RE.match(n)
            if m and int(m.group(1)) != rank:
                rec = claim_record(self.path / n)  # type: ignore[operator]
                for _ in range(40):  # {}: its holder is writing its record this moment
                    if rec != {}:
                        break
                    time.sleep(0.025)
                    rec = claim_record(self.path / n)  # type: ignore[operator]
                if rec and rec.get("world") not in (None, world):
                    others[int(m.group(1))] = (rec["world"], rec.get("host"), rec.get("pid"))
        if others:
            r, (w, host, pid) = min(others.items())
            raise ConfigError(f"{self.path} is being written by a run of {w} ranks (rank {r}: host {host} pid {pid}) "
                              f"and this run has {world}: each would extract its own share of the input into it",
                              given=str(self.path), fix="wait for that run to end, or pass another -o")

    def release(self) -> None:
        for c in self.claims.values():
            c.release()
        self.claims = {}

    @property
    def run_file(self) -> Path | str:
        """Where run.json is (a Path locally, a URL on remote storage); ask `has_run` whether it exists."""
        return self.path / "run.json" if not self.folder.remote else f"{self.path}/run.json"  # type: ignore[operator]

    @property
    def has_run(self) -> bool:
        """The folder holds a run (its run.json)."""
        return self.folder.is_file("run.json")

    def read_run(self, fix: str) -> dict[str, Any]:
        """The run this folder holds (its run.json); a folder without one is refused with `fix`, a damaged one
        (truncated, not JSON) in one line."""
        if not self.has_run:
            raise ConfigError("not an s2cli output folder (no run.json)", given=str(self.path), fix=fix)
        where = f"{self.folder.url.rstrip('/')}/run.json"
        try:
            run = json.loads(self.folder.read_text("run.json"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where} is damaged ({type(e).__name__}: {e}); it holds the settings of the "
                              "run", given=where, fix="pass --overwrite to start the folder over, or "
                              "restore run.json from a copy (its done shards carry the same settings in their "
                              "`config` attribute)") from None
        if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
            raise ConfigError(f"{where} is not an s2cli run description (no `config`)", given=where,
                              fix="pass --overwrite to start the folder over, or another -o")
        return run

    def read_manifest(self) -> dict[str, Any]:
        """The manifest as written; {} when there is none or it is damaged (it is rebuilt from the markers by the
        next run)."""
        try:
            m = json.loads(self.folder.read_texts(["manifest.json"]).get("manifest.json") or "{}")
        except ValueError:
            return {}
        return m if isinstance(m, dict) else {}

    @property
    def manifest_complete(self) -> bool:
        """The manifest is written and says every unit is done."""
        return bool(self.read_manifest().get("complete"))

    def snapshot(self, verify: bool = False) -> Snapshot:
        """One look at the folder (see `Snapshot`): the manifest, then one listing of the folder with what the store
        says of each file for free (size, identity), the markers taken from the index where their file is the one
        it recorded (read otherwise), each marked shard checked against its marker (`shard_damage`), and the shards
        the manifest lists whose marker is gone. `verify`: every shard's digest too."""
        with gc_paused():
            return self._snapshot(verify)

    def _snapshot(self, verify: bool) -> Snapshot:
        d = self.folder
        manifest = self.read_manifest()  # before the listing: a shard it lists is in the listing, unless taken back
        stats = d.stats()
        recs = self._markers_of(stats)
        good, broken, moved = [], [], []
        for ident, m in recs.values():
            why = shard_damage(d, m, stats, verify, ident)
            if why is None or why is MOVED:
                good.append(m)
                if why is MOVED:
                    moved.append(m)
            else:
                broken.append({**m, "broken": why})
        seen = {str(m["shard"]) for _, m in recs.values()}
        for s in manifest.get("shards") or []:
            if isinstance(s, dict) and isinstance(s.get("shard"), str) and s["shard"] not in seen:
                gone = "" if s["shard"] in stats else ", and so is its shard file"
                broken.append({**s, "failures": [], "broken": f"its done marker is missing (the manifest lists it){gone}"})
        sizes = {m["shard"]: stats[m["shard"]][0] for m in good}
        self._snap = Snapshot(sorted(good, key=_in_order), sorted(broken, key=_in_order), manifest, sizes,
                              sorted(moved, key=_in_order))
        return self._snap

    def _markers_of(self, stats: dict[str, tuple[int, Any]]) -> dict[str, list[Any]]:
        """marker name -> (its file's identity, the marker) for every marker in the listing `stats`: from the index
        (on disk, or as this process last saw it) where the identity is the one recorded, else read now."""
        if self._known is None:
            self._known = self._read_index()
            self._on_disk = {n: i for n, (i, _) in self._known.items()}
        known = self._known
        recs, pending = {}, []
        for name, (_, ident) in stats.items():
            if name.endswith(".json") and MARKER_RE.match(name):
                hit = known.get(name)
                if hit is not None and hit[0] == ident:
                    recs[name] = hit
                else:
                    pending.append(name)
        for name, text in self.folder.read_texts(sorted(pending)).items():
            try:
                m = json.loads(text)
            except ValueError:
                continue  # a damaged marker marks nothing: its shard is redone (and removed as a leftover)
            if isinstance(m, dict) and {"shard", "unit_index", "part"} <= set(m):
                recs[name] = [stats[name][1], m]
        self._known = recs
        self.unindexed = sum(self._on_disk.get(n) != i for n, (i, _) in recs.items()) + len(set(self._on_disk) - set(recs))
        return recs

    def _read_index(self) -> dict[str, list[Any]]:
        try:
            idx = json.loads(self.folder.read_texts([INDEX]).get(INDEX) or "{}")
        except ValueError:
            return {}
        ms = idx.get("markers") if isinstance(idx, dict) and idx.get("version") == INDEX_VERSION else None
        if not isinstance(ms, dict):
            return {}
        return {n: v for n, v in ms.items() if isinstance(v, list) and len(v) == 2 and isinstance(v[1], dict)}

    def write_index(self) -> None:
        """Rewrite `index.json` (atomically) from a fresh look at the folder: every marker with its file's identity.
        Ranks writing at once each write what they saw; a marker missing from the index is read from its file."""
        self.snapshot()
        recs = self._known or {}
        self.folder.write_text(INDEX, json.dumps({"version": INDEX_VERSION, "markers": {
            n: [i, m] for n, (i, m) in sorted(recs.items())}}, separators=(",", ":")))
        self._on_disk = {n: i for n, (i, _) in recs.items()}
        self.unindexed, self._committed = 0, 0

    def index_if_stale(self) -> None:
        """Rewrite the index when the last look found markers it lacks (or lists markers that are gone)."""
        if self._known is None:
            self.snapshot()
        if self.unindexed:
            self.write_index()

    def scan(self, verify: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(done markers whose shard is whole, in input order (unit, part); the broken ones, each with `broken`:
        why): `snapshot`'s."""
        snap = self.snapshot(verify)
        return snap.good, snap.broken

    def markers(self, fresh: bool = False) -> list[dict[str, Any]]:
        """Done markers whose shard is whole (`snapshot`), in input order (unit, part; a part's `--retry-failed`
        shards after it): as this process last looked, unless it wrote a marker since or `fresh` (what other ranks
        wrote meanwhile is then seen too)."""
        if fresh or self._snap is None:
            self.snapshot()
        return self._snap.good  # type: ignore[union-attr]

    def prepare(self, run: dict[str, Any], overwrite: bool, compare: list[str], rank: int = 0, world: int = 1) -> None:
        """Create, resume or refuse: an existing run must have the same values for `compare`. Several ranks may
        prepare at once: run.json is created by the first of them and checked by all."""
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError("output path exists and is not a folder", given=str(self.path),
                              fix="pass a new or empty folder, or a .h5/.safetensors file name")
        if overwrite and world > 1:
            raise ConfigError("--overwrite cannot be used by several ranks at once (each would delete the others' "
                              "new shards)", given=f"{world} ranks", fix=f"remove {self.path} first, then run without --overwrite")
        try:
            self.folder.mkdir()
        except OSError as e:  # a read-only folder or mount: said before any work, in one line
            raise ConfigError(f"cannot create the output folder {self.path} ({e.strerror or e})", given=str(self.path),
                              fix="check the permissions of its parent (or whether it is a read-only mount), or "
                                  "pass another -o") from None
        self.claim(rank, world)  # before anything is read or written: a second run of this rank is refused here
        try:
            self._prepare(run, overwrite, compare, rank, world)
        except BaseException:
            self.release()
            raise

    def _prepare(self, run: dict[str, Any], overwrite: bool, compare: list[str], rank: int, world: int) -> None:
        d = self.folder
        names = d.names()
        entries = [n for n in names if not n.startswith(".") and not SIDE_RE.match(n)]
        foreign = [n for n in entries if not OURS_RE.match(n)]
        if foreign:
            raise ConfigError(f"output folder holds files s2cli did not write, e.g. {foreign[0]}", given=str(self.path),
                              fix="pass a new or empty folder")
        mine = heartbeat_name(rank)
        if overwrite:
            self._refuse_live(rank)
            for n in entries:
                if not (d.remote and n == mine):  # on remote storage that is this run's claim
                    d.unlink(n)
            for n in names:
                if TMP_RE.match(n):
                    d.unlink(n)
        elif "run.json" in names:
            self.check_same(run, compare)
        elif [n for n in entries if not (d.remote and HEARTBEAT_NAME_RE.match(n))]:  # on a store: ranks' claims
            raise ConfigError("output folder has shards but no run.json", given=str(self.path),
                              fix="pass --overwrite to start over, or another -o")
        created = not d.is_file("run.json") and d.create_exclusive("run.json", json.dumps(run, indent=1, sort_keys=True))
        if not created or d.remote:  # another rank created it first (on a store: maybe at the same moment)
            self.check_same(run, compare)  # another rank created it first: it must be the same run
        self._clean_leftovers(rank)
        if world == 1:
            self.settle_retries()

    def _refuse_live(self, rank: int, what: str = "--overwrite would delete the output of a run that is still "
                     "writing it") -> None:
        """Refused (`what`) while any rank of this folder other than `rank` is alive (its claim held, or its heartbeat
        fresh): --overwrite, which deletes everything, and `--devices` workers (rank -1: before any starts)."""
        live = {f"rank {int(m.group(1))}: {who}" for n in self.folder.names()
                if (m := LOCK_RE.match(n)) and int(m.group(1)) != rank and (who := self.folder.claim_holder(n))}
        hbs = read_heartbeats(self.folder)
        live |= {f"rank {r}: host {hbs[r].get('host')} pid {hbs[r].get('pid')}" for r in live_ranks(self.folder, rank)}
        mine = hbs.get(rank)
        if liveness(mine) == "running" and mine["pid"] != os.getpid():  # type: ignore[index]
            live.add(f"rank {rank}: host {mine['host']} pid {mine['pid']}")  # type: ignore[index]
        if live:
            raise ConfigError(f"{what} ({'; '.join(sorted(live))})", given=str(self.path),
                              fix="wait for that run to end (or stop it), then rerun; or pass another -o")

    def refuse_running(self) -> None:
        """Refuse to start workers of a new run (`--devices`) while any run writes this folder: a claim refused for
        one of them is refused for all, before any starts."""
        if self.folder.is_dir():
            self._refuse_live(-1, f"{self.path} is being written by another run")

    def check_same(self, run: dict[str, Any], compare: list[str]) -> None:
        old = self.read_run(fix="pass --overwrite to start over, or another -o")
        new = json.loads(json.dumps(run))  # compare as saved (tuples are lists there)
        before, after = _flat(old["config"], compare), _flat(new["config"], compare)
        before = {**{k: v for k, v in DEFAULTED.items() if k in after}, **before}
        diff = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
                if before.get(k) != after.get(k) and not k.startswith("backbone.description") and k not in RETIRED
                and not (k in ADDED and before.get(k) is None)]
        if not same_input(old.get("input", {}), run["input"]):
            diff.insert(0, f"input: {old.get('input', {}).get('spec')!r} -> {run['input']['spec']!r}")
        if diff:
            raise ConfigError(f"{self.path} holds a run with a different config ({'; '.join(diff)})",
                              fix="rerun with the original settings to resume, pass --overwrite to start over, or use another -o")

    def _clean_leftovers(self, rank: int = 0) -> None:
        """Temporary files of dead writers, and shard files whose marker was never written (never counted).
        Rank-aware: a shard or temporary of another rank that is alive now (its heartbeat says so) is work in
        progress and stays; this rank's own are leftovers of its previous life. Temporaries of shared files
        (manifest, errors, heartbeats) go when their process is gone and no other rank is alive."""
        d = self.folder
        mine = read_heartbeats(d).get(rank)
        if liveness(mine) == "running" and mine["pid"] != os.getpid():  # type: ignore[index]
            raise ConfigError(f"rank {rank} of this folder is running already ({mine['host']} pid {mine['pid']})",  # type: ignore[index]
                              given=str(self.path), fix=f"wait for it to end; if that process is gone, remove "
                              f"{self.path}/rank-{rank:05d}.json (it is stale after S2CLI_STALE_S seconds anyway)")
        live = live_ranks(d, rank)
        snap = self.snapshot()
        marked = {m["shard"] for m in snap.good}
        # a marked shard that is no longer whole is no longer done: marker and shard go, the unit is redone
        self.broken = [m for m in snap.broken if int(m.get("rank", 0)) not in live]
        self.drop(self.broken, log_errors=False)
        for m in snap.moved:  # copied or restored with the same bytes: its marker records where it is now
            if int(m.get("rank", 0)) not in live:
                self._snap = None
                self.folder.write_text(marker_name(m["shard"]), json.dumps({**m, "stat": d.identity(m["shard"])},
                                                                          sort_keys=True))
        names = d.names()
        for n in names:
            if not TMP_RE.match(n):
                continue
            m = RANK_TMP_RE.match(n)
            pid = n.rsplit("-", 1)[-1]
            if m:
                gone = int(m.group(1)) == rank or int(m.group(1)) not in live
            else:
                gone = not live and (not pid.isdigit() or not pid_alive(int(pid)))
            if gone:
                d.unlink(n)
        for n in names:
            m = SHARD_RE.match(n)
            if m and n not in marked and int(m.group(1)) not in live:
                d.unlink(n)

    def drop(self, markers: list[dict[str, Any]], log_errors: bool = True) -> None:
        """Take completed shards back (their input changed): the marker first, so that the shard stops counting
        before it goes; errors.jsonl is rebuilt without their failures."""
        for m in markers:
            self._snap = None
            self.folder.unlink(marker_name(m["shard"]))
            self.folder.unlink(m["shard"])
        if markers and log_errors:
            self.rebuild_errors()

    def refresh(self, marker: dict[str, Any], identity: dict[str, Any]) -> None:
        """Record a tar's identity as it is now in a done shard's marker (`--retry-failed` over a rewritten tar)."""
        self._snap = None
        self.folder.write_text(marker_name(marker["shard"]), json.dumps({**marker, **identity}, sort_keys=True))

    def next_shard_index(self, rank: int) -> int:
        used = [int(m.group(2)) for n in self.folder.names() if (m := SHARD_RE.match(n)) and int(m.group(1)) == rank]
        return max(used, default=-1) + 1

    def shard_path(self, name: str) -> Path:
        """Where the writer puts shard `name`: in the folder, or in the local spool of a remote folder."""
        return self.folder.spool(name)

    def commit(self, marker: dict[str, Any], log_errors: bool = True, written: Path | None = None) -> None:
        """Publish the shard (`written`, where the writer closed it: uploaded from the spool to a remote folder),
        then write its done marker (last), then log its failures (ranks sharing the folder do not append to
        errors.jsonl: it is rebuilt from the markers with the manifest). Killed at any point before the marker,
        the shard does not count and is removed on resume."""
        if written is not None:
            self.folder.publish(written, marker["shard"])
        # the shard's identity as the store gives it (inode + ctime, ETag): a file put in its place later is not it
        marker = {**marker, "stat": self.folder.identity(marker["shard"])}
        self._snap = None
        self.folder.write_text(marker_name(marker["shard"]), json.dumps(marker, sort_keys=True))
        if marker["failures"] and log_errors:
            # the marker holds them; errors.jsonl is rebuilt from the markers on resume
            self.folder.append_text("errors.jsonl", "".join(json.dumps(r) + "\n" for r in marker["failures"]))
        self._committed += 1  # the index is rewritten as markers accumulate: a reader reads few of them one by one
        if self._committed >= max(INDEX_EVERY, len(self._known or ()) // 4):
            self.write_index()

    def settle_retry(self, retry: dict[str, Any], log_errors: bool = True) -> None:
        """After a retry's shard is marked done (`--retry-failed`): the failures it retried leave the markers that
        recorded them for their `retried` history, each with the retry's shard and its outcome (ok, or failed
        again: then the retry's marker records it), so that every image counts once. errors.jsonl is rebuilt (ranks
        sharing the folder: with the manifest). Done again for a retry whose run stopped before it finished this."""
        keys, again = set(retry["retried_keys"]), {f["key"] for f in retry["failures"]}
        for name in retry["retry_of"]:
            mname = marker_name(name)
            try:
                m = json.loads(self.folder.read_text(mname))
            except (OSError, ValueError):  # taken back since (its input changed): nothing to settle
                continue
            moved = [f for f in m["failures"] if f["key"] in keys]
            if not moved:
                continue
            m["failures"] = [f for f in m["failures"] if f["key"] not in keys]
            m["num_failed"] = len(m["failures"])
            self._snap = None
            m["retried"] = m.get("retried", []) + [
                {**f, "retried_in": retry["shard"], "outcome": "failed" if f["key"] in again else "ok"} for f in moved]
            self.folder.write_text(mname, json.dumps(m, sort_keys=True))
        if log_errors:
            self.rebuild_errors()

    def settle_retries(self, log_errors: bool = True) -> None:
        """`settle_retry` for every retry's marker (a run stopped between a retry's marker and the settling)."""
        for m in self.markers():
            if "retry_of" in m:
                self.settle_retry(m, log_errors=False)
        if log_errors:
            self.rebuild_errors()

    def rebuild_errors(self) -> None:
        """errors.jsonl from the markers: every failure of every completed shard, once; a failure retried since
        (`--retry-failed`) with `retried_in` and `outcome`; a retry's own failures with `retry: true`."""
        text = "".join(json.dumps(r) + "\n" for m in self.markers() for r in m.get("retried", []) + m["failures"])
        if self.folder.read_texts(["errors.jsonl"]).get("errors.jsonl") != text:
            self.folder.write_text("errors.jsonl", text)

    def write_manifest(self, units_total: int | None, units_done: int | Any) -> dict[str, Any]:
        """`units_done`: a number, or a function of the markers (ranks sharing the folder: the manifest is then
        rewritten until the markers it was made from are still all there are, so the last writer is complete)."""
        if callable(units_done):
            while True:
                ms = self.markers(fresh=True)
                manifest = self._write_manifest(self.manifest(ms, units_total, units_done(ms)))
                self.rebuild_errors()
                if [m["shard"] for m in self.markers(fresh=True)] == [m["shard"] for m in ms]:
                    return manifest
        return self._write_manifest(self.manifest(self.markers(), units_total, units_done))

    def _write_manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Written unless the one there says the same (a rerun of a finished folder rewrites nothing)."""
        old = self._snap.manifest if self._snap is not None else self.read_manifest()
        if {k: v for k, v in old.items() if k != "updated_at"} != {k: v for k, v in manifest.items() if k != "updated_at"}:
            self.folder.write_text("manifest.json", json.dumps(manifest, indent=1))
            if self._snap is not None:
                self._snap.manifest = manifest
            return manifest
        return old

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




def same_input(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """The input a folder was written from and the one given now are the same: the same spec, or the same local
    path written another way (`dir/`, `./dir`, absolute: compared by the absolute path each run recorded, or that
    the spec gives from here)."""
    a, b = old.get("spec"), new.get("spec")
    if a == b:
        return True
    if not isinstance(a, str) or not isinstance(b, str) or "://" in a + b or a.startswith("pipe:") or b.startswith("pipe:"):
        return False
    here = os.path.abspath(b)
    return here in (old.get("path"), os.path.abspath(a))


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector held off while many small objects are made at once (a folder's markers,
    its keys), which it would otherwise walk again and again as they are made; they hold no cycles."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _in_order(marker: dict[str, Any]) -> tuple[int, int, str]:
    return marker["unit_index"], marker["part"], marker["shard"]  # a part's --retry-failed shards after it


def shard_record(path: Path, digest: str = DIGEST, name: str | None = None) -> dict[str, Any]:
    """What makes a shard whole, for its done marker: its size in bytes and their `digest`, as its format (named by
    the suffix of `name`, the shard's name where `path` is a local copy of it; else of `path`) identifies a shard."""
    fmt = of_path(name or path)
    return (fmt.identity if fmt is not None else store_identity)(path, digest)


def shard_digest(path: Path, digest: str = DIGEST, name: str | None = None) -> str:
    """The `digest` of a shard, as its done marker records it (`shard_record`)."""
    return shard_record(path, digest, name)[digest]


def shard_damage(d: Folder, marker: dict[str, Any], stats: dict[str, tuple[int, Any]], verify: bool = False,
                 marker_id: Any = None) -> str | None | object:
    """Why a marked shard is no longer what its marker recorded (None: it is; MOVED: it is, but the store's
    identity of it is not the one recorded: copied or restored, same bytes). Its file missing; another size; or
    other bytes, checked (its digest) with `verify` and whenever the store's identity of the file (`stats`: inode, ctime
    and mtime locally, the ETag on an object store) differs from the one its marker recorded. Markers written
    before they recorded an identity: locally, the shard modified after the marker file (`marker_id`) is checked."""
    shard = str(marker["shard"])
    st = stats.get(shard)
    if st is None:
        return "its shard file is missing"
    if "bytes" not in marker:
        return None  # written before markers recorded it
    size, ident = st
    if size is None:  # a folder on an object store (a format whose output is one): its files are not listed here
        changed = False
    elif size != marker["bytes"]:
        return f"{size} bytes where its marker recorded {marker['bytes']} (truncated or overwritten)"
    elif "stat" in marker:
        changed = marker["stat"] != ident
    else:
        changed = not d.remote and isinstance(marker_id, list) and _newest(ident) > marker_id[2]
    if not (verify or changed):
        return None
    digest = marker_digest(marker) or DIGEST
    if shard_digest(d.fetch(shard), digest, name=shard) != marker.get(digest):
        return f"its {digest} digest differs from the one its marker recorded (its bytes changed)"
    return MOVED if changed else None


def _newest(ident: list) -> int:
    """The latest mtime in a local identity: a file's [inode, ctime, mtime], or a folder's list of its files' ones."""
    return max((_newest(i) for i in ident), default=0) if ident and isinstance(ident[0], list) else ident[2]


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
