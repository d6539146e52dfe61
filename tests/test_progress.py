"""Progress where people look: a plain line every S2CLI_PROGRESS_S seconds when stderr is not a terminal (SLURM
logs), a total for WebDataset input (estimated from the tars read, or --num-samples), and one aggregated progress
for `--devices` workers."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import s2cli
from conftest import FAST, make_shards, write_image

LIB = dict(model="timm:test_resnet", random_init=True, img_sizes=(64, 128), max_split_size=64, workers=0)
LINE = re.compile(r"^extract: (\d+)(?:/(\d+))? entr(?:y|ies)(?: \([\d.]+%\))?, (\d+) failed, (\d+) shards, [\d.]+ img/s"
                  r"(, ETA \d+:\d\d:\d\d)?$")


def lines(stderr: str) -> list[tuple[int, int | None, int, int, bool]]:
    """The progress lines: (images seen, total or None, failed, shards, with an ETA)."""
    out = []
    for line in stderr.splitlines():
        m = LINE.match(line.strip())
        if m:
            out.append((int(m[1]), int(m[2]) if m[2] else None, int(m[3]), int(m[4]), m[5] is not None))
    return out


def test_a_run_whose_stderr_is_no_terminal_prints_progress_lines(cli, tmp_path, monkeypatch):
    d = tmp_path / "in"
    for i in range(6):
        write_image(d / f"im{i}.png", (40, 50 + i), i)
    monkeypatch.setenv("S2CLI_PROGRESS_S", "0")  # a line whenever a batch ends
    r = cli("extract", d, *FAST, "-b", 2, "--shard-size", 2, "-o", f"{tmp_path / 'out'}/")
    assert r.exit_code == 0, r.stderr
    got = lines(r.stderr)
    assert got[-1] == (6, 6, 0, 3, True)
    assert [x[0] for x in got] == sorted(x[0] for x in got) and len(got) >= 3 and all(x[1] == 6 for x in got)
    monkeypatch.setenv("S2CLI_PROGRESS_S", "600")  # the interval is honoured: a short run prints none
    r = cli("extract", d, *FAST, "-o", tmp_path / "o.h5")
    assert r.exit_code == 0 and lines(r.stderr) == [] and "6 entries, 0 failed" in r.stderr


class Totals(s2cli.Progress):
    def start(self, res, total, done_before, shards_before, rank):
        self.totals = [total]

    def total(self, total):
        self.totals.append(total)


def test_a_webdataset_total_is_estimated_from_the_tars_read_or_given(tmp_path):
    spec = str(make_shards(tmp_path / "shards", n_tars=3, per_tar=4) / "{000000..000002}.tar")
    p = Totals()
    s2cli.extract(spec, f"{tmp_path / 'a'}/", progress=p, shard_size=3, **LIB)
    assert p.totals == [None, 12, 12]  # unknown, then 4 samples a tar x 3 tars after each tar read
    p = Totals()
    s2cli.extract(spec, f"{tmp_path / 'b'}/", progress=p, num_samples=12, shard_size=3, **LIB)
    assert p.totals == [12]


def test_a_webdataset_run_prints_its_estimated_total_and_num_samples_is_refused_for_a_folder(cli, tmp_path, monkeypatch):
    spec = str(make_shards(tmp_path / "shards", n_tars=3, per_tar=4) / "{000000..000002}.tar")
    monkeypatch.setenv("S2CLI_PROGRESS_S", "0")
    r = cli("extract", spec, *FAST, "--shard-size", 2, "-o", f"{tmp_path / 'out'}/")
    assert r.exit_code == 0, r.stderr
    got = lines(r.stderr)
    assert got[0][1] is None and got[-1] == (12, 12, 0, 6, True)  # before the first tar ended: no total yet
    d = tmp_path / "in"
    write_image(d / "a.png", (40, 40), 0)
    r = cli("extract", d, *FAST, "--num-samples", 5, "-o", f"{tmp_path / 'f'}/")
    assert r.exit_code == 2 and "--num-samples" in r.stderr and "drop --num-samples" in r.stderr


@pytest.mark.slow
def test_devices_show_one_progress_of_all_their_workers(tmp_path):
    d = tmp_path / "in"
    for i in range(8):
        write_image(d / f"im{i}.png", (40, 50 + i), i)
    env = dict(os.environ, S2CLI_PROGRESS_S="0", S2CLI_HEARTBEAT_S="0.2")
    r = subprocess.run([sys.executable, "-m", "s2cli", "extract", str(d), *FAST, "--shard-size", "2", "-o",
                        f"{tmp_path / 'out'}/", "--devices", "cpu,cpu"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    got = lines(r.stderr)
    assert got and got[-1] == (8, 8, 0, 4, True)  # both workers' images in one line
    assert [x[0] for x in got] == sorted(x[0] for x in got)
