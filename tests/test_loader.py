"""The decode loader (inputs/loader.py): torch DataLoader workers that hand every sample's record back in input
order whatever happens to a worker (killed from outside, dying on one sample, stalling past the timeout), a bounded
window ahead of the run."""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import s2cli.inputs.loader as loader_module
from conftest import FAST, wait_until, write_image
from s2cli.inputs.decode import Fit, decode_sample
from s2cli.inputs.loader import DecodeLoader
from s2cli.inputs.samples import Sample

FIT = Fit("crop", 32, (0.5, 0.5, 0.5))


def own_children() -> set[int]:
    """This process's child processes (every thread's)."""
    return {int(c) for task in Path("/proc/self/task").iterdir() for c in (task / "children").read_text().split()}


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def samples(tmp_path: Path, n: int) -> list[Sample]:
    out = []
    for i in range(n):
        write_image(tmp_path / f"s{i:02d}.png", (20 + i, 30), i)
        out.append(Sample(f"s{i:02d}", str(tmp_path / f"s{i:02d}.png")))
    return out


def assert_decoded(got: list, items: list, failed: dict[str, str] | None = None) -> None:
    """`got` holds every item once, in order, each with the record decoding it in this process makes (a failure
    record passed through as itself); `failed`: key -> the error class its record must hold instead."""
    failed = failed or {}
    assert [item for item, _ in got] == items
    for item, rec in got:
        if isinstance(item, dict):
            assert rec.error == item and rec.key == item["key"]
        elif item.key in failed:
            assert rec.error["error_class"] == failed[item.key] and rec.key == item.key
        else:
            assert rec.error is None and rec.key == item.key
            assert np.array_equal(rec.pixels, decode_sample(item, FIT).pixels)


def misbehaving(monkeypatch, key: str, act) -> None:
    """The loader's decode, but `act()` first in the worker that takes the sample `key` (it dies, it stalls)."""
    original = loader_module.decode_sample

    def decode(sample, fit):
        if sample.key == key:
            act()
        return original(sample, fit)

    monkeypatch.setattr(loader_module, "decode_sample", decode)


def failure_item(i: int) -> dict[str, str]:
    return {"key": f"f{i}", "source": f"f{i}", "stage": "read", "error_class": "OSError", "error": "unreadable"}


@pytest.mark.parametrize("workers", [0, 2])
def test_records_come_back_in_input_order_with_failures_passed_through(tmp_path, workers):
    items: list = samples(tmp_path, 9)
    for i in (0, 4, 9):
        items.insert(i, failure_item(i))
    before = own_children()
    with DecodeLoader(FIT, workers, prefetch=2) as loader:
        records = loader.map(items, lambda s: s)
        got = [next(records)]
        started = own_children() - before
        got += list(records)
    assert_decoded(got, items)
    assert len(started) == workers  # -j 0: decoded in this process, no worker started


def test_a_long_run_of_items_that_pass_through_is_read_a_bounded_window_ahead(tmp_path):
    items: list = [failure_item(i) for i in range(3000)] + samples(tmp_path, 3)
    pulled = [0]

    def source():
        for item in items:
            pulled[0] += 1
            yield item

    ahead = []
    with DecodeLoader(FIT, 2, prefetch=2) as loader:
        got = []
        for pair in loader.map(source(), lambda s: s):
            got.append(pair)
            ahead.append(pulled[0] - len(got))
    assert_decoded(got, items)
    window = 2 * 2
    assert max(ahead) <= (window + 1) ** 2  # read ahead as far as the loader's window, never the whole input


def test_the_loader_reads_the_input_no_further_ahead_than_its_window(tmp_path):
    items = samples(tmp_path, 24)
    pulled = [0]

    def source():
        for item in items:
            pulled[0] += 1
            yield item

    with DecodeLoader(FIT, 2, prefetch=2) as loader:
        got, ahead = [], []
        for pair in loader.map(source(), lambda s: s):
            got.append(pair)
            ahead.append(pulled[0] - len(got))
    assert_decoded(got, items)
    assert max(ahead) == 2 * 2  # prefetch x workers in flight: memory flat whatever the input's length


def in_ring(loader: DecodeLoader, a: np.ndarray) -> bool:
    return np.shares_memory(a, np.frombuffer(loader._data.ring.mem, np.uint8))


def assert_ring_all_free(loader: DecodeLoader) -> None:
    """Once no record is held, every slot of the loader's pixel ring is free again, each once."""
    gc.collect()
    ring = loader._data.ring
    ring.reclaim()
    assert sorted(ring.free) == list(range(ring.slots)) and not loader._slot_of


def test_pixels_come_through_the_ring_and_a_slot_is_not_reused_while_its_pixels_are_held(tmp_path):
    items = samples(tmp_path, 30)
    expected = {s.key: decode_sample(s, FIT).pixels for s in items}
    with DecodeLoader(FIT, 2, prefetch=2) as loader:
        assert loader._data.ring.slots == 2 * 2 + 2 * 1 + 2  # the window, and two batches the run may hold
        held, ways = [], []
        for item, rec in loader.map(items, lambda s: s):
            ways.append(in_ring(loader, rec.pixels))
            if int(item.key[1:]) % 3 == 0:  # kept (as a batch in flight keeps its records): its slot stays taken
                held.append(rec)
            for r in held:  # a slot written again while held would change these
                assert np.array_equal(r.pixels, expected[r.key]), r.key
        assert ways[:8] == [True] * 8  # every slot free at the start
        assert not all(ways)  # ten held at the end: the ring ran out, and those samples came as tensors
        assert sum(ways) > 8  # and the slots of records let go were used again
        del held, rec
        assert_ring_all_free(loader)


def test_no_python_code_runs_when_a_slots_pixels_die(tmp_path):
    """A Ctrl-C or a stop signal raises where Python code runs; one raised in code run from a deallocation (a
    `weakref.finalize` callback) is dropped by Python and the signal lost. Letting pixels go runs none."""
    with DecodeLoader(FIT, 2, prefetch=2) as loader:
        got = list(loader.map(samples(tmp_path, 3), lambda s: s))
    assert all(in_ring(loader, rec.pixels) for _, rec in got)
    pixels = [torch.from_numpy(rec.pixels)[1:] for _, rec in got]  # as the run holds them: views, tensors
    del got
    calls = []
    sys.setprofile(lambda frame, event, arg: calls.append((event, frame.f_code.co_name)) if event == "call" else None)
    try:
        del pixels
    finally:
        sys.setprofile(None)
    assert calls == [], calls
    assert_ring_all_free(loader)


def test_pixels_larger_than_a_slot_come_as_tensors_and_their_slots_are_given_back(tmp_path):
    fit = Fit("keep", 32, (0.5, 0.5, 0.5))  # wider than the 32 x 32 a slot holds
    items = samples(tmp_path, 6)
    with DecodeLoader(fit, 2, prefetch=2) as loader:
        got = list(loader.map(items, lambda s: s))
        assert not any(in_ring(loader, rec.pixels) for _, rec in got)
        for item, rec in got:
            assert rec.pixels.shape[2] > 32 and np.array_equal(rec.pixels, decode_sample(item, fit).pixels)
        del got
        assert_ring_all_free(loader)


def ring_maps() -> int:
    """Anonymous shared mappings of this process (a pixel ring is one)."""
    return sum(1 for line in Path("/proc/self/maps").read_text().splitlines() if "/dev/zero (deleted)" in line)


def test_a_loaders_ring_is_unmapped_once_the_loader_and_its_records_are_gone(tmp_path):
    """A notebook calling extract again and again does not keep a ring per run."""
    gc.collect()
    before = ring_maps()
    with DecodeLoader(FIT, 2, prefetch=2) as loader:
        got = list(loader.map(samples(tmp_path, 6), lambda s: s))
    assert all(in_ring(loader, rec.pixels) for _, rec in got)
    assert ring_maps() == before + 1
    del loader
    gc.collect()
    assert ring_maps() == before + 1  # the records held still read their slots
    del got
    gc.collect()
    assert ring_maps() == before


def test_no_ring_where_no_pixels_cross():
    assert DecodeLoader(Fit("crop", 32, (0.5, 0.5, 0.5), decode="torch"), 2)._data.ring is None  # JPEG bytes
    assert DecodeLoader(FIT, 0)._data is None  # -j 0: decoded in the run's process


@pytest.mark.slow
def test_workers_killed_from_outside_mid_run_lose_no_sample(tmp_path, monkeypatch):
    items = samples(tmp_path, 12)
    original = loader_module.decode_sample

    def slow(sample, fit):  # inherited by the forked workers: each decode takes a while, so kills land mid-decode
        time.sleep(0.2)
        return original(sample, fit)

    monkeypatch.setattr(loader_module, "decode_sample", slow)
    before = own_children()
    with DecodeLoader(FIT, 2, prefetch=2) as loader:
        got = []
        for pair in loader.map(items, lambda s: s):
            got.append(pair)
            if len(got) in (3, 7):  # SIGKILL (as the OOM killer does) every worker of the loader, twice
                time.sleep(0.1)
                for pid in own_children() - before:
                    os.kill(pid, signal.SIGKILL)
        assert loader.restarts == 2
        assert_decoded(got, items)
        del got, pair
        assert_ring_all_free(loader)  # the slots of samples the killed workers held were given back


@pytest.mark.slow
def test_a_sample_that_kills_its_worker_is_recorded_alone_and_the_rest_come_back_in_order(tmp_path, monkeypatch):
    items = samples(tmp_path, 12)
    misbehaving(monkeypatch, "s04", lambda: os.kill(os.getpid(), signal.SIGKILL))
    with DecodeLoader(FIT, 2, prefetch=3) as loader:
        got = list(loader.map(items, lambda s: s))
    # the samples in flight beside it on the other worker, or queued behind it, are decoded again, never blamed
    assert_decoded(got, items, failed={"s04": "WorkerDied"})
    assert "died three times" in got[4][1].error["error"]
    del got
    assert_ring_all_free(loader)


@pytest.mark.slow
def test_a_stalled_decode_is_recorded_after_the_timeout_and_the_rest_go_on(tmp_path, monkeypatch):
    items = samples(tmp_path, 8)
    misbehaving(monkeypatch, "s03", lambda: time.sleep(600))
    before = own_children()
    t0 = time.monotonic()
    with DecodeLoader(FIT, 2, timeout=1.5, prefetch=2) as loader:
        got = list(loader.map(items, lambda s: s))
    assert 1.5 <= time.monotonic() - t0 < 30
    assert_decoded(got, items, failed={"s03": "WorkerTimeout"})
    assert "no result after 1.5s" in got[3][1].error["error"]
    time.sleep(0.5)
    assert not own_children() - before  # the stalled worker was ended with its loader, not left behind


STALLS = """
import sys, time
import s2cli.inputs.loader as loader
from s2cli.cli import app

original = loader.decode_sample
loader.decode_sample = lambda s, fit: time.sleep(3600) if s.key == "a" else original(s, fit)  # a read that hangs
app(sys.argv[1:], prog_name="s2")
"""


@pytest.mark.slow
def test_decode_workers_end_with_a_run_killed_by_sigkill_even_one_blocked_in_a_read(tmp_path):
    d = tmp_path / "in"
    for i, key in enumerate("abcd"):
        write_image(d / f"{key}.png", (20, 30), i)
    p = subprocess.Popen([sys.executable, "-c", STALLS, "extract", str(d), *FAST[:-2], "-j", "2", "--decode-timeout",
                          "600", "-o", str(tmp_path / "o.h5"), "-q"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    workers: list[int] = []
    try:
        children = Path(f"/proc/{p.pid}/task/{p.pid}/children")
        wait_until(lambda: len(children.read_text().split()) >= 2, "two decode workers")
        workers = [int(x) for x in children.read_text().split()]
        time.sleep(2.0)  # the run waits on sample `a`, its worker blocked
        os.kill(p.pid, signal.SIGKILL)  # the run alone, as the OOM killer does
        p.wait(timeout=30)
        wait_until(lambda: not [w for w in workers if running(w)], "the decode workers to end with the run", 15)
    finally:
        for w in workers:
            if running(w):
                os.kill(w, signal.SIGKILL)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def test_a_temporary_folder_too_deep_for_a_unix_socket_still_decodes_with_workers(tmp_path, monkeypatch):
    import tempfile

    deep = tmp_path / ("d" * 60) / ("e" * 60)  # a cluster's TMPDIR can be this deep: a socket's path may not be
    deep.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(deep))
    monkeypatch.setattr(tempfile, "tempdir", None)  # asked again: TMPDIR
    assert len(tempfile.gettempdir()) > loader_module.SOCKET_DIR_MAX
    items = samples(tmp_path, 4)
    with DecodeLoader(FIT, 2, prefetch=2, timeout=30) as loader:
        got = list(loader.map(items, lambda s: s))
    assert_decoded(got, items)


def test_a_deep_temporary_folder_and_no_short_one_is_one_line_before_any_worker_starts(tmp_path, monkeypatch):
    import tempfile

    from s2cli.errors import ConfigError

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(deep))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(loader_module, "SHORT_TEMP_DIRS", (str(tmp_path / "absent"),))
    with pytest.raises(ConfigError, match="too long for the decode workers' sockets.*TMPDIR.*-j 0"):
        DecodeLoader(FIT, 2)
