"""The output-folder protocol: `run.json` (the resolved config; a resumed run must match it), shards each
followed by its done marker (only marked shards count), leftovers of dead writers removed, `errors.jsonl` and
`manifest.json` rebuilt from the markers."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .fsutil import Claim, pid_alive, take_claim
from .heartbeat import RemoteClaim, heartbeat_name, live_ranks, liveness, read_heartbeats
from .store import Folder, folder

SHARD_RE = re.compile(r"^part-(\d{5})-(\d{5})\.(h5|safetensors)$")
OURS_RE = re.compile(r"^(part-\d{5}-\d{5}\.(h5|safetensors|json)|run\.json|manifest\.json|errors\.jsonl|rank-\d{5}\.json)$")
# files `s2 slurm` puts beside the run (its script and SLURM's logs): ours, but not output; --overwrite keeps them
SIDE_RE = re.compile(r"^(s2-slurm\.sbatch|slurm-\d+(_\d+)?\.out)$")
RANK_TMP_RE = re.compile(r"^\.part-(\d{5})-\d{5}\.(h5|safetensors|json)\.tmp-\d+$")
LOCK_RE = re.compile(r"^\.rank-(\d{5})\.lock$")
MARKER_RE = re.compile(r"^part-\d{5}-\d{5}\.json$")
TMP_RE = re.compile(r"^\..*\.tmp-")


def marker_name(shard: str) -> str:
    """The done marker's name of a shard."""
    return shard.rsplit(".", 1)[0] + ".json"


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
    `errors.jsonl` (every failed sample once) and `manifest.json` (the completed shards). The folder is local
    or on remote storage (a `store.Folder`: an fsspec URL); there, shards are written to a local spool and
    uploaded before their marker, and a rank's claim is its heartbeat object (`heartbeat.RemoteClaim`)."""

    def __init__(self, path: str | os.PathLike | Folder):
        self.folder = folder(path)
        self.path = self.folder.path  # a Path for a local folder; the URL of a remote one
        self.claims: dict[int, Claim | RemoteClaim] = {}  # rank -> this process's claim on it

    def claim(self, rank: int) -> None:
        """Claim `rank` of this folder for this process (held until `release`): a live run holding it is refused.
        Locally a flock on `.rank-RRRRR.lock`; on remote storage the rank's heartbeat object."""
        if rank not in self.claims:
            what, fix = f"rank {rank} of {self.path}", ("wait for that run to end, or pass another -o; a killed "
                                                        "run's claim ends with its process")
            if self.folder.remote:
                self.claims[rank] = RemoteClaim(self.folder, rank, what, fix + " (on another host: after "
                                                "S2CLI_STALE_S seconds without a heartbeat)")
            else:
                self.claims[rank] = take_claim(self.path / f".rank-{rank:05d}.lock", what, fix)  # type: ignore[operator]

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
        """The run this folder holds (its run.json); a folder without one is refused with `fix`."""
        if not self.has_run:
            raise ConfigError("not an s2cli output folder (no run.json)", given=str(self.path), fix=fix)
        return json.loads(self.folder.read_text("run.json"))

    @property
    def manifest_complete(self) -> bool:
        """The manifest is written and says every unit is done."""
        text = self.folder.read_texts(["manifest.json"]).get("manifest.json")
        return bool(text and json.loads(text).get("complete"))

    def markers(self) -> list[dict[str, Any]]:
        """Done markers whose shard exists, in input order (unit, part)."""
        files = self.folder.files()
        out = []
        for text in self.folder.read_texts(sorted(n for n in files if MARKER_RE.match(n))).values():
            try:
                m = json.loads(text)
            except ValueError:
                continue
            if m.get("shard", "") in files:
                out.append(m)
        return sorted(out, key=lambda m: (m["unit_index"], m["part"]))

    def prepare(self, run: dict[str, Any], overwrite: bool, compare: list[str], rank: int = 0, world: int = 1) -> None:
        """Create, resume or refuse: an existing run must have the same values for `compare`. Several ranks may
        prepare at once: run.json is created by the first of them and checked by all."""
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError("output path exists and is not a folder", given=str(self.path),
                              fix="pass a new or empty folder, or a .h5/.safetensors file name")
        if overwrite and world > 1:
            raise ConfigError("--overwrite cannot be used by several ranks at once (each would delete the others' "
                              "new shards)", given=f"{world} ranks", fix=f"remove {self.path} first, then run without --overwrite")
        self.folder.mkdir()
        self.claim(rank)  # before anything is read or written: a second run of this rank is refused here
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
        elif [n for n in entries if not (d.remote and n == mine)]:
            raise ConfigError("output folder has shards but no run.json", given=str(self.path),
                              fix="pass --overwrite to start over, or another -o")
        created = not d.is_file("run.json") and d.create_exclusive("run.json", json.dumps(run, indent=1, sort_keys=True))
        if not created or d.remote:  # another rank created it first (on a store: maybe at the same moment)
            self.check_same(run, compare)  # another rank created it first: it must be the same run
        self._clean_leftovers(rank)
        if world == 1:
            self.rebuild_errors()

    def _refuse_live(self, rank: int) -> None:
        """--overwrite deletes everything: refused while any other rank of this folder is alive (its claim held,
        or its heartbeat fresh)."""
        live = {f"rank {int(m.group(1))}: {who}" for n in self.folder.names()
                if (m := LOCK_RE.match(n)) and int(m.group(1)) != rank and (who := self.folder.claim_holder(n))}
        hbs = read_heartbeats(self.folder)
        live |= {f"rank {r}: host {hbs[r].get('host')} pid {hbs[r].get('pid')}" for r in live_ranks(self.folder, rank)}
        mine = hbs.get(rank)
        if liveness(mine) == "running" and mine["pid"] != os.getpid():  # type: ignore[index]
            live.add(f"rank {rank}: host {mine['host']} pid {mine['pid']}")  # type: ignore[index]
        if live:
            raise ConfigError(f"--overwrite would delete the output of a run that is still writing it "
                              f"({'; '.join(sorted(live))})", given=str(self.path),
                              fix="wait for that run to end (or stop it), then rerun; or pass another -o")

    def check_same(self, run: dict[str, Any], compare: list[str]) -> None:
        old = json.loads(self.folder.read_text("run.json"))
        new = json.loads(json.dumps(run))  # compare as saved (tuples are lists there)
        before, after = _flat(old["config"], compare), _flat(new["config"], compare)
        diff = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
                if before.get(k) != after.get(k) and not k.startswith("backbone.description") and k not in RETIRED
                and not (k in ADDED and before.get(k) is None)]
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
        d = self.folder
        mine = read_heartbeats(d).get(rank)
        if liveness(mine) == "running" and mine["pid"] != os.getpid():  # type: ignore[index]
            raise ConfigError(f"rank {rank} of this folder is running already ({mine['host']} pid {mine['pid']})",  # type: ignore[index]
                              given=str(self.path), fix=f"wait for it to end; if that process is gone, remove "
                              f"{self.path}/rank-{rank:05d}.json (it is stale after S2CLI_STALE_S seconds anyway)")
        live = live_ranks(d, rank)
        marked = {m["shard"] for m in self.markers()}
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
            self.folder.unlink(marker_name(m["shard"]))
            self.folder.unlink(m["shard"])
        if markers and log_errors:
            self.rebuild_errors()

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
        self.folder.write_text(marker_name(marker["shard"]), json.dumps(marker, sort_keys=True))
        if marker["failures"] and log_errors:
            # the marker holds them; errors.jsonl is rebuilt from the markers on resume
            self.folder.append_text("errors.jsonl", "".join(json.dumps(r) + "\n" for r in marker["failures"]))

    def rebuild_errors(self) -> None:
        """errors.jsonl from the markers: every failure of every completed shard, once."""
        lines = [json.dumps(r) for m in self.markers() for r in m["failures"]]
        self.folder.write_text("errors.jsonl", "".join(line + "\n" for line in lines))

    def write_manifest(self, units_total: int | None, units_done: int | Any) -> dict[str, Any]:
        """`units_done`: a number, or a function of the markers (ranks sharing the folder: the manifest is then
        rewritten until the markers it was made from are still all there are, so the last writer is complete)."""
        if callable(units_done):
            while True:
                ms = self.markers()
                manifest = self.manifest(ms, units_total, units_done(ms))
                self.folder.write_text("manifest.json", json.dumps(manifest, indent=1))
                self.rebuild_errors()
                if [m["shard"] for m in self.markers()] == [m["shard"] for m in ms]:
                    return manifest
        manifest = self.manifest(self.markers(), units_total, units_done)
        self.folder.write_text("manifest.json", json.dumps(manifest, indent=1))
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
