"""The output-folder protocol: `run.json` (the resolved config; a resumed run must match it), shards each
followed by its done marker (only marked shards count), leftovers of dead writers removed, `errors.jsonl` and
`manifest.json` rebuilt from the markers."""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .fsutil import Claim, atomic_write_text, claim_held, create_exclusive, pid_alive, take_claim, write_error
from .heartbeat import live_ranks, liveness, read_heartbeats

SHARD_RE = re.compile(r"^part-(\d{5})-(\d{5})\.(h5|safetensors)$")
OURS_RE = re.compile(r"^(part-\d{5}-\d{5}\.(h5|safetensors|json)|run\.json|manifest\.json|errors\.jsonl|rank-\d{5}\.json)$")
# files `s2 slurm` puts beside the run (its script and SLURM's logs): ours, but not output; --overwrite keeps them
SIDE_RE = re.compile(r"^(s2-slurm\.sbatch|slurm-\d+(_\d+)?\.out)$")
RANK_TMP_RE = re.compile(r"^\.part-(\d{5})-\d{5}\.(h5|safetensors|json)\.tmp-\d+$")
LOCK_RE = re.compile(r"^\.rank-(\d{5})\.lock$")


# settings an older version saved that no longer exist and decided nothing on their own (extra_prefix repeated
# what num_prefix_tokens holds): not a difference when a run written then is resumed
RETIRED = ("backbone.extra_prefix",)
# settings an older version did not record: compared only when the run being resumed recorded them (its weights'
# revision, the hub repo and commit of its backbone)
ADDED = ("weights_revision", "backbone.hub_id", "backbone.hub_file", "backbone.revision")


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
    `errors.jsonl` (every failed sample once) and `manifest.json` (the completed shards)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.claims: dict[int, Claim] = {}  # rank -> this process's claim on it (`.rank-RRRRR.lock`)
        self.broken: list[dict[str, Any]] = []  # marked shards found broken when the folder was prepared (dropped)

    def claim(self, rank: int) -> None:
        """Claim `rank` of this folder for this process (held until `release`): a live run holding it is refused."""
        if rank not in self.claims:
            self.claims[rank] = take_claim(self.path / f".rank-{rank:05d}.lock", f"rank {rank} of {self.path}", (
                "wait for that run to end, or pass another -o; a killed run's claim ends with its process"))

    def release(self) -> None:
        for c in self.claims.values():
            c.release()
        self.claims = {}

    @property
    def run_file(self) -> Path:
        return self.path / "run.json"

    def read_run(self, fix: str) -> dict[str, Any]:
        """The run this folder holds (its run.json); a folder without one is refused with `fix`, a damaged one
        (truncated, not JSON) in one line."""
        if not self.run_file.is_file():
            raise ConfigError("not an s2cli output folder (no run.json)", given=str(self.path), fix=fix)
        try:
            run = json.loads(self.run_file.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{self.run_file} is damaged ({type(e).__name__}: {e}); it holds the settings of the "
                              "run", given=str(self.run_file), fix="pass --overwrite to start the folder over, or "
                              "restore run.json from a copy (its done shards carry the same settings in their "
                              "`config` attribute)") from None
        if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
            raise ConfigError(f"{self.run_file} is not an s2cli run description (no `config`)", given=str(self.run_file),
                              fix="pass --overwrite to start the folder over, or another -o")
        return run

    def read_manifest(self) -> dict[str, Any]:
        """The manifest as written; {} when there is none or it is damaged (it is rebuilt from the markers by the
        next run)."""
        try:
            m = json.loads((self.path / "manifest.json").read_text())
        except (OSError, ValueError):
            return {}
        return m if isinstance(m, dict) else {}

    @property
    def manifest_complete(self) -> bool:
        """The manifest is written and says every unit is done."""
        return bool(self.read_manifest().get("complete"))

    def scan(self, verify: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(done markers whose shard is whole, in input order (unit, part); the broken ones, each with `broken`:
        why). A shard is whole when it exists with the size its marker recorded and, if it was modified after its
        marker was written (or with `verify`: always), the same sha256. Markers written before they recorded
        these are taken on their shard's existence."""
        good, broken = [], []
        for p in self.path.glob("part-*-*.json"):
            try:
                m = json.loads(p.read_text())
            except (OSError, ValueError):
                continue  # a damaged marker marks nothing: its shard is redone (and removed as a leftover)
            if not isinstance(m, dict) or not {"shard", "unit_index", "part"} <= set(m):
                continue
            shard = self.path / str(m["shard"])
            if not shard.is_file():
                continue
            why = shard_damage(shard, m, verify, p.stat().st_mtime_ns)
            if why is None:
                good.append(m)
            else:
                broken.append({**m, "broken": why})
        return sorted(good, key=_in_order), sorted(broken, key=_in_order)

    def markers(self) -> list[dict[str, Any]]:
        """Done markers whose shard is whole (`scan`), in input order (unit, part; a part's `--retry-failed` shards
        after it)."""
        return self.scan()[0]

    def prepare(self, run: dict[str, Any], overwrite: bool, compare: list[str], rank: int = 0, world: int = 1) -> None:
        """Create, resume or refuse: an existing run must have the same values for `compare`. Several ranks may
        prepare at once: run.json is created by the first of them and checked by all."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError("output path exists and is not a folder", given=str(self.path),
                              fix="pass a new or empty folder, or a .h5/.safetensors file name")
        if overwrite and world > 1:
            raise ConfigError("--overwrite cannot be used by several ranks at once (each would delete the others' "
                              "new shards)", given=f"{world} ranks", fix=f"remove {self.path} first, then run without --overwrite")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a read-only folder or mount: said before any work, in one line
            raise ConfigError(f"cannot create the output folder {self.path} ({e.strerror or e})", given=str(self.path),
                              fix="check the permissions of its parent (or whether it is a read-only mount), or "
                                  "pass another -o") from None
        self.claim(rank)  # before anything is read or written: a second run of this rank is refused here
        try:
            self._prepare(run, overwrite, compare, rank, world)
        except BaseException:
            self.release()
            raise

    def _prepare(self, run: dict[str, Any], overwrite: bool, compare: list[str], rank: int, world: int) -> None:
        entries = [p for p in self.path.iterdir() if not p.name.startswith(".") and not SIDE_RE.match(p.name)]
        foreign = [p.name for p in entries if not OURS_RE.match(p.name)]
        if foreign:
            raise ConfigError(f"output folder holds files s2cli did not write, e.g. {foreign[0]}", given=str(self.path),
                              fix="pass a new or empty folder")
        if overwrite:
            self._refuse_live(rank)
            for p in entries:
                p.unlink()
            for p in self.path.glob(".*.tmp-*"):
                p.unlink()
        elif self.run_file.exists():
            self.check_same(run, compare)
        elif entries:
            raise ConfigError("output folder has shards but no run.json", given=str(self.path),
                              fix="pass --overwrite to start over, or another -o")
        if not self.run_file.exists() and not create_exclusive(self.run_file, json.dumps(run, indent=1, sort_keys=True)):
            self.check_same(run, compare)  # another rank created it first: it must be the same run
        self._clean_leftovers(rank)
        if world == 1:
            self.settle_retries()

    def _refuse_live(self, rank: int) -> None:
        """--overwrite deletes everything: refused while any other rank of this folder is alive (its claim held,
        or its heartbeat fresh)."""
        live = {f"rank {int(m.group(1))}: {who}" for p in self.path.glob(".rank-*.lock")
                if (m := LOCK_RE.match(p.name)) and int(m.group(1)) != rank and (who := claim_held(p))}
        hbs = read_heartbeats(self.path)
        live |= {f"rank {r}: host {hbs[r].get('host')} pid {hbs[r].get('pid')}" for r in live_ranks(self.path, rank)}
        mine = hbs.get(rank)
        if liveness(mine) == "running" and mine["pid"] != os.getpid():  # type: ignore[index]
            live.add(f"rank {rank}: host {mine['host']} pid {mine['pid']}")  # type: ignore[index]
        if live:
            raise ConfigError(f"--overwrite would delete the output of a run that is still writing it "
                              f"({'; '.join(sorted(live))})", given=str(self.path),
                              fix="wait for that run to end (or stop it), then rerun; or pass another -o")

    def check_same(self, run: dict[str, Any], compare: list[str]) -> None:
        old = self.read_run(fix="pass --overwrite to start over, or another -o")
        new = json.loads(json.dumps(run))  # compare as saved (tuples are lists there)
        before, after = _flat(old["config"], compare), _flat(new["config"], compare)
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
        mine = read_heartbeats(self.path).get(rank)
        if liveness(mine) == "running" and mine["pid"] != os.getpid():  # type: ignore[index]
            raise ConfigError(f"rank {rank} of this folder is running already ({mine['host']} pid {mine['pid']})",  # type: ignore[index]
                              given=str(self.path), fix=f"wait for it to end; if that process is gone, remove "
                              f"{self.path}/rank-{rank:05d}.json (it is stale after S2CLI_STALE_S seconds anyway)")
        live = live_ranks(self.path, rank)
        good, broken = self.scan()
        marked = {m["shard"] for m in good}
        # a marked shard that is no longer whole is no longer done: marker and shard go, the unit is redone
        self.broken = [m for m in broken if int(m.get("rank", 0)) not in live]
        self.drop(self.broken, log_errors=False)
        for p in self.path.glob(".*.tmp-*"):
            m = RANK_TMP_RE.match(p.name)
            pid = p.name.rsplit("-", 1)[-1]
            if m:
                gone = int(m.group(1)) == rank or int(m.group(1)) not in live
            else:
                gone = not live and (not pid.isdigit() or not pid_alive(int(pid)))
            if gone:
                p.unlink(missing_ok=True)
        for p in self.path.iterdir():
            m = SHARD_RE.match(p.name)
            if m and p.name not in marked and int(m.group(1)) not in live:
                p.unlink(missing_ok=True)

    def drop(self, markers: list[dict[str, Any]], log_errors: bool = True) -> None:
        """Take completed shards back (their input changed): the marker first, so that the shard stops counting
        before it goes; errors.jsonl is rebuilt without their failures."""
        for m in markers:
            (self.path / m["shard"]).with_suffix(".json").unlink(missing_ok=True)
            (self.path / m["shard"]).unlink(missing_ok=True)
        if markers and log_errors:
            self.rebuild_errors()

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

    def settle_retry(self, retry: dict[str, Any], log_errors: bool = True) -> None:
        """After a retry's shard is marked done (`--retry-failed`): the failures it retried leave the markers that
        recorded them for their `retried` history, each with the retry's shard and its outcome (ok, or failed
        again: then the retry's marker records it), so that every image counts once. errors.jsonl is rebuilt (ranks
        sharing the folder: with the manifest). Done again for a retry whose run stopped before it finished this."""
        keys, again = set(retry["retried_keys"]), {f["key"] for f in retry["failures"]}
        for name in retry["retry_of"]:
            path = self.path / Path(name).with_suffix(".json").name
            try:
                m = json.loads(path.read_text())
            except (OSError, ValueError):  # taken back since (its input changed): nothing to settle
                continue
            moved = [f for f in m["failures"] if f["key"] in keys]
            if not moved:
                continue
            m["failures"] = [f for f in m["failures"] if f["key"] not in keys]
            m["num_failed"] = len(m["failures"])
            m["retried"] = m.get("retried", []) + [
                {**f, "retried_in": retry["shard"], "outcome": "failed" if f["key"] in again else "ok"} for f in moved]
            atomic_write_text(path, json.dumps(m, sort_keys=True))
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
        lines = [json.dumps(r) for m in self.markers() for r in m.get("retried", []) + m["failures"]]
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


def _in_order(marker: dict[str, Any]) -> tuple[int, int, str]:
    return marker["unit_index"], marker["part"], marker["shard"]  # a part's --retry-failed shards after it


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def shard_record(path: Path) -> dict[str, Any]:
    """What makes a shard whole, for its done marker: its size in bytes and its sha256."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def shard_damage(path: Path, marker: dict[str, Any], verify: bool = False, marked_ns: int | None = None) -> str | None:
    """Why a marked shard is no longer what its marker recorded (None: it is): another size (truncated,
    overwritten), or other bytes: checked with `verify`, and whenever the shard was modified after its marker was
    written (`marked_ns`: the marker file's mtime), which a run never does."""
    if "bytes" not in marker:
        return None  # written before markers recorded it
    try:
        st = path.stat()
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if st.st_size != marker["bytes"]:
        return f"{st.st_size} bytes where its marker recorded {marker['bytes']} (truncated or overwritten)"
    touched = marked_ns is not None and st.st_mtime_ns > marked_ns
    if (verify or touched) and file_sha256(path) != marker.get("sha256"):
        return "its sha256 differs from the one its marker recorded (its bytes changed)"
    return None


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
