"""Compact storage: bfloat16 round-trips (HDF5 encoding, safetensors BF16), dry-run bytes equal stored bytes,
chunks fit the data, safetensors shards respect the header limit and say so when they cannot."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import s2cli
from conftest import cannot_run, unless_possible
from s2cli import dtypes, formats
from s2cli.formats import hdf5, safetensors as st_format
from s2cli.formats.safetensors import SafetensorsSink
from s2cli.items import Layout, StoredItem

TINY = dict(model="timm:test_resnet", random_init=True, img_sizes=(64, 128), max_split_size=64, workers=0)


@pytest.mark.parametrize("fmt", ["h5", "safetensors"])
def test_bfloat16_round_trips_as_torch_rounds_it(image_dir, tmp_path, fmt, cli):
    s2cli.extract(str(image_dir), str(tmp_path / f"bf.{fmt}"), dtype="bfloat16", pool="mean", **TINY)
    s2cli.extract(str(image_dir), str(tmp_path / f"f32.{fmt}"), pool="mean", **TINY)
    with s2cli.open_features(tmp_path / f"bf.{fmt}") as bf, s2cli.open_features(tmp_path / f"f32.{fmt}") as ref:
        assert bf.dtype == "bfloat16" and len(bf) == 4
        for k in ref:
            want = torch.from_numpy(ref[k]).to(torch.bfloat16)
            assert torch.equal(torch.from_numpy(bf[k]).to(torch.bfloat16), want)
            np.testing.assert_array_equal(bf[k], want.float().numpy())
            np.testing.assert_array_equal(bf.pooled(k), torch.from_numpy(ref.pooled(k)).to(torch.bfloat16).float().numpy())
        item = s2cli.FeatureDataset(tmp_path / f"bf.{fmt}", dtype=torch.bfloat16)[0]
        assert torch.equal(item["features"], torch.from_numpy(ref[item["key"]]).to(torch.bfloat16))
    r = cli("inspect", tmp_path / f"bf.{fmt}", "--json")
    assert r.exit_code == 0, r.stdout
    assert json.loads(r.stdout)["dtype"] == "bfloat16"


def test_hdf5_bfloat16_is_documented_uint16_bits():
    x = np.array([1.0, -2.5, 3.14159, 1e-3, 65504.0], np.float32)
    bits = dtypes.to_bf16_bits(x)
    assert bits.dtype == np.uint16
    assert bits.tolist() == torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).tolist()
    np.testing.assert_array_equal(dtypes.from_bf16_bits(bits), torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def _stored_bytes(path) -> int:
    """Elements x the stored dtype's size (bfloat16 reads back as float32), the int8/float8 scales, the pooled
    vectors in their dtype."""
    with s2cli.open_features(path, raw=True) as r:
        total, item = 0, dtypes.itemsize(r.dtype)
        for k in r:
            if r.feature_shape is not None:
                assert r[k].dtype.itemsize == item
                total += r[k].nbytes
            total += sum(s.nbytes for s in r.scales(k)) if r.dtype in dtypes.QUANTIZED else 0
            try:
                total += r.pooled(k).nbytes
            except KeyError:
                pass
        return total


@pytest.mark.parametrize("options", [dict(pool="mean"), dict(pool="mean", pool_only=True), dict(dtype="float16"),
                                     dict(pool="mean", pool_only=True, dtype="bfloat16"), dict(dtype="int8", pool="mean"),
                                     dict(dtype="float8"), dict(dtype="int8", out="o.safetensors"),
                                     dict(dtype="float8", pool="cls", model="timm:test_vit", keep_cls=True, out="f/")])
def test_dry_run_bytes_are_the_stored_bytes(image_dir, tmp_path, options):
    options = {**TINY, **options}
    out = str(tmp_path / options.pop("out", "o.h5"))
    plan = s2cli.plan(str(image_dir), out, **options)
    s2cli.extract(str(image_dir), out, **options)
    stored = _stored_bytes(out)
    assert abs(plan["total_bytes"] - stored) <= 0.01 * stored


def test_llava_s2_pool_only_dry_run_counts_one_vector(image_dir):
    plan = s2cli.plan(str(image_dir), "o.h5", recipe="llava-1.5-s2", random_init=True, pool="mean", pool_only=True)
    channels = plan["images"][0]["output_shape"][1]
    assert plan["bytes_per_image"] == channels * 4


def test_a_pool_only_file_of_a_few_vectors_has_no_megabyte_chunks(tmp_path):
    C, n = 2560, 8
    sink = hdf5.HDF5Sink(tmp_path / "p.h5", {}, Layout(channels=C, num_scales=1, tokens=None, dtype="float32",
                                                       features=False, pooled=True))
    rng = np.random.default_rng(0)
    sink.write([StoredItem(key=f"k{i}", source="s", meta=None, orig_hw=(4, 4), grid_hw=(1, 1), img_sizes=[(4, 4)],
                           num_prefix_tokens=0, split_mode="resize", pooled=rng.standard_normal(C).astype(np.float32))
                for i in range(n)])
    sink.close()
    size = (tmp_path / "p.h5").stat().st_size
    assert size < n * C * 4 + 256 * 1024, size
    with h5py.File(tmp_path / "p.h5") as f:
        for name, ds in f.items():
            if ds.chunks:
                row = int(np.prod(ds.chunks[1:], dtype=np.int64)) * ds.dtype.itemsize
                assert np.prod(ds.chunks) * ds.dtype.itemsize <= max(hdf5.HDF5_CHUNK_BYTES, row), name


def _items(n: int, meta_bytes: int, C: int = 4, T: int | None = None):
    return [StoredItem(key=f"img-{i:06d}", source=f"/data/images/img-{i:06d}.jpg", meta=json.dumps({"caption": "x" * meta_bytes}),
                       orig_hw=(480, 640), grid_hw=(24, 24), img_sizes=[(336, 336), (672, 672), (1008, 1008)],
                       num_prefix_tokens=0, split_mode="resize", pooled=np.full(C, i, np.float32),
                       features=None if T is None else np.arange(T * C, dtype=np.float32).reshape(T, C) + i)
            for i in range(n)]


@pytest.mark.parametrize("room", [st_format.HEADER_ROOM, 64])
def test_a_streamed_safetensors_shard_is_what_safetensors_itself_reads(tmp_path, monkeypatch, room):
    """The sink writes tensors as they come and the header last, into the room left for it (64 bytes: too little,
    so the data moves once); safetensors' own loader reads every tensor back, the data 8-byte aligned."""
    from safetensors.numpy import load_file

    monkeypatch.setattr(st_format, "HEADER_ROOM", room)
    monkeypatch.setattr(st_format, "MOVE_BLOCK", 1000)  # several blocks to move
    sink = SafetensorsSink(tmp_path / "s.safetensors", {"model": "m"},
                           Layout(channels=4, num_scales=3, tokens=None, dtype="float32", pooled=True))
    items = _items(50, 100, T=7)
    for a in range(0, 50, 8):
        sink.write(items[a:a + 8])
    sink.close()
    raw = (tmp_path / "s.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert (8 + n) % 8 == 0 and json.loads(raw[8:8 + n])["__metadata__"]["keys"]
    loaded = load_file(str(tmp_path / "s.safetensors"))
    for it in items:
        np.testing.assert_array_equal(loaded[it.key], it.features)
    np.testing.assert_array_equal(loaded[st_format.POOLED_TENSOR], np.stack([it.pooled for it in items]))


def test_an_overfull_safetensors_header_says_so(tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.setitem(formats.FORMATS, "safetensors", dataclasses.replace(formats.get("safetensors"), header_limit=20_000))
    sink = SafetensorsSink(tmp_path / "s.safetensors", {}, Layout(channels=4, num_scales=3, tokens=None,
                                                                  dtype="float32", pooled=True))
    sink.write(_items(100, 300))
    with pytest.raises(s2cli.S2Error) as e:
        sink.close()
    msg = str(e.value)
    assert "header" in msg and "--shard-size" in msg and "free space" not in msg
    assert not (tmp_path / "s.safetensors").exists()


def test_default_safetensors_shards_leave_room_for_a_kilobyte_of_metadata_per_image():
    res = s2cli.settings("x/", "out/", recipe="llava-1.5-s2", random_init=True, pool="mean", pool_only=True,
                         format="safetensors")
    one = _items(1, 1024)[0]
    record = {a.name: a.stored(one) for a in Layout(4, 3, None, "float32").attrs()}
    per_image = len(json.dumps({one.key: record})) + 2 * len(json.dumps(one.key))
    assert res.shard_size * per_image < formats.SAFETENSORS_HEADER_LIMIT
    assert res.shard_size < 87_381


def _sink_peak(path, dtype: str, n: int, T: int = 96, C: int = 1024, batch: int = 4) -> int:
    """The peak of Python allocations (numpy's included) while a safetensors sink writes n images of (T, C)."""
    import tracemalloc

    sink = SafetensorsSink(path, {}, Layout(channels=C, num_scales=1, tokens=T, dtype=dtype))
    base = np.random.default_rng(0).standard_normal((T, C)).astype(np.float32)
    tracemalloc.start()
    try:
        for a in range(0, n, batch):
            sink.write([StoredItem(key=f"k{i}", source="s", meta=None, orig_hw=(4, 4), grid_hw=(1, 1), img_sizes=[(4, 4)],
                                   num_prefix_tokens=0, split_mode="resize", features=base + i) for i in range(a, a + batch)])
        sink.close()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_safetensors_sink_memory_is_bounded_by_its_batches_not_its_shard(tmp_path, dtype):
    """Shards of 24 and 96 MB (float32; bfloat16 half) written in 1.5 MB batches: the sink streams each batch to
    the file, so its peak is the queue's batches, the same for both and under 1.2x of a shard (it held the whole
    shard, twice over, until close before)."""
    small = _sink_peak(tmp_path / "small.safetensors", dtype, 64)
    big = _sink_peak(tmp_path / "big.safetensors", dtype, 256)
    shard = (tmp_path / "big.safetensors").stat().st_size
    assert shard >= 256 * 96 * 1024 * dtypes.itemsize(dtype)
    assert big <= 1.2 * (tmp_path / "small.safetensors").stat().st_size and big <= 1.25 * small, (small, big, shard)
    base = np.random.default_rng(0).standard_normal((96, 1024)).astype(np.float32)
    with s2cli.open_features(tmp_path / "big.safetensors") as r:
        np.testing.assert_array_equal(r["k177"], dtypes.decode(dtypes.encode(base + 177, dtype).codes, dtype))


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16", "int8"])
def test_hdf5_fixed_size_features_are_stored_chunk_by_chunk_as_encoded(tmp_path, dtype):
    """Fixed-size features go into the HDF5 file one chunk per image, raw where the item's encoded array is the
    chunk's bytes: read back, they are exactly the encoded arrays (and the file's other datasets are whole)."""
    from s2cli.dtypes import encode

    T, C = 6, 8
    feats = [np.random.default_rng(i).standard_normal((T, C)).astype(np.float32) for i in range(10)]
    sink = hdf5.HDF5Sink(tmp_path / "p.h5", {}, Layout(channels=C, num_scales=1, tokens=T, dtype=dtype))
    for a in range(0, 10, 4):
        sink.write([StoredItem(key=f"k{i}", source="s", meta=None, orig_hw=(4, 4), grid_hw=(1, 1), img_sizes=[(4, 4)],
                               num_prefix_tokens=0, split_mode="resize", features=feats[i]) for i in range(a, min(a + 4, 10))])
    sink.close()
    with h5py.File(tmp_path / "p.h5") as f:
        assert f["features"].shape == (10, T, C) and list(f["keys"].asstr()[:]) == [f"k{i}" for i in range(10)]
        for i, x in enumerate(feats):
            assert np.array_equal(f["features"][i], encode(x, dtype).codes), i


def test_an_hdf5_shard_reads_back_while_a_process_forked_during_its_writing_still_lives(tmp_path):
    """A decode worker forked while a shard is written (a loader started again after a worker died) shares its open
    file until it closes its copy: the shard must still read back once closed (HDF5's file lock is not taken)."""
    import os
    import time

    from s2cli.readers import shard_contents

    sink = hdf5.HDF5Sink(tmp_path / "p.h5", {}, Layout(channels=4, num_scales=1, tokens=2, dtype="float32"))
    sink.write([StoredItem(key="k", source="s", meta=None, orig_hw=(4, 4), grid_hw=(1, 1), img_sizes=[(4, 4)],
                           num_prefix_tokens=0, split_mode="resize", features=np.ones((2, 4), np.float32))])
    pid = os.fork()
    if pid == 0:  # the forked process holds the file as the run had it open, then leaves without touching it
        time.sleep(3)
        os._exit(0)
    try:
        sink.close()
        assert shard_contents(tmp_path / "p.h5")["keys"] == ["k"]
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_an_hdf5_file_another_process_holds_open_for_writing_is_named_so(tmp_path):
    import os
    import time

    from s2cli import open_features
    from s2cli.errors import ConfigError

    ready = tmp_path / "ready"
    pid = os.fork()
    if pid == 0:  # another process writing the file with h5py's default lock
        with h5py.File(tmp_path / "busy.h5", "w") as f:
            f["keys"] = np.array([b"k"])
            f.flush()
            ready.touch()
            time.sleep(10)
        os._exit(0)
    try:
        end = time.time() + 10
        while not ready.exists() and time.time() < end:
            time.sleep(0.01)
        with pytest.raises(ConfigError, match="locked: another process has it open for writing"):
            open_features(tmp_path / "busy.h5")
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)



def _no_page_cache() -> str | None:
    """Why the temporary folder's file system cannot show a shard leaving the page cache (tmpfs and ramfs hold
    files in it: dropping does nothing there), or None."""
    import os
    import tempfile

    tmp = os.path.realpath(tempfile.gettempdir())
    mounts = [line.split()[1:3] for line in Path("/proc/self/mounts").read_text().splitlines()]
    point, fstype = max(((m, t) for m, t in mounts if tmp == m or tmp.startswith(m.rstrip("/") + "/")),
                        key=lambda mt: len(mt[0]))
    return f"the temporary folder {tmp} is on {fstype}, whose files live in memory" if fstype in ("tmpfs", "ramfs") else None


def resident_pages(path) -> int:
    """How many of a file's pages are in the page cache (mincore over a read-only map of it)."""
    import ctypes
    import mmap
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        vec = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
        try:
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw)


@pytest.mark.slow
@unless_possible(_no_page_cache())
def test_a_committed_shard_leaves_the_page_cache_and_reads_back_the_same(tmp_path, image_dir, cli):
    """A shard, once hashed and marked, is dropped from the page cache (the next shard's writes reuse its pages);
    written again here, the same file would sit there whole. Its features read back unchanged (from the disk)."""
    import subprocess

    out = tmp_path / "o"
    r = cli("extract", image_dir, "-m", "timm:test_vit", "--random-init", "--scales", "1,2", "--shard-size", "2",
            "-o", f"{out}/", "-q")
    assert r.exit_code == 0, r.output
    shards = sorted(out.glob("part-*.h5"))
    assert len(shards) >= 2
    resident = [resident_pages(p) for p in shards]  # (before anything here reads them)
    fresh = tmp_path / "copy.h5"
    subprocess.run(["cp", str(shards[0]), str(fresh)], check=True)  # written through the page cache, not dropped
    pages = -(-fresh.stat().st_size // 4096)
    if resident_pages(fresh) < pages // 2:  # what is written is not kept in the page cache here: nothing to drop
        cannot_run(f"{tmp_path}'s file system keeps no written pages in the page cache")
    assert all(n < pages // 4 for n in resident), (resident, pages)
    with s2cli.open_features(out, verify=True) as ff:
        assert ff.complete and not ff.broken_shards and len(ff.keys()) == 4


def _cachestat(fd: int) -> tuple[int, int, int]:
    """(pages cached, dirty, under writeback) of an open file: Linux's cachestat (6.5 and later)."""
    import ctypes

    class Range(ctypes.Structure):
        _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]

    class Stat(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]

    libc = ctypes.CDLL(None, use_errno=True)
    r, s = Range(0, 0), Stat()
    if libc.syscall(451, fd, ctypes.byref(r), ctypes.byref(s), 0):  # cachestat (one number on every architecture)
        raise OSError(ctypes.get_errno(), "cachestat")
    return s.cache, s.dirty, s.writeback


def dirty_pages(path) -> int:
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        return _cachestat(fd)[1]
    finally:
        os.close(fd)


def _no_dirty_page_count() -> str | None:
    """Why this machine cannot count a file's dirty pages or start their writing out, or None."""
    import os
    import tempfile

    from s2cli import fsutil

    if fsutil.SYNC_FILE_RANGE is None:
        return "no sync_file_range (not Linux)"
    fd, path = tempfile.mkstemp()
    try:
        _cachestat(fd)
    except (OSError, AttributeError) as e:
        return f"no cachestat (Linux >= 6.5): {e}"
    finally:
        os.close(fd)
        os.unlink(path)
    return _no_page_cache()


@unless_possible(_no_dirty_page_count())
def test_write_behind_starts_a_files_dirty_pages_on_their_way_to_disk(tmp_path):
    """What is written sits dirty in memory until the kernel's timer (30 s) or an fsync; write_behind starts it out
    at once, without waiting for the disk: no page of the file is dirty any more when it returns."""
    from s2cli import fsutil

    one, folder = tmp_path / "one.bin", tmp_path / "shard"
    (folder / "sub").mkdir(parents=True)
    files = [one, folder / "a.bin", folder / "sub" / "b.bin"]
    for p in files:
        p.write_bytes(np.random.default_rng(0).bytes(8 << 20))
    if min(dirty_pages(p) for p in files) == 0:
        cannot_run(f"{tmp_path}'s file system wrote the pages out on its own")
    fsutil.write_behind(one)
    assert dirty_pages(one) == 0 and dirty_pages(files[1]) > 0  # the one file, not its neighbours
    fsutil.write_behind(folder)
    assert [dirty_pages(p) for p in files] == [0, 0, 0]
    fsutil.write_behind(tmp_path / "gone")  # best effort: nothing to do, no error


@unless_possible(_no_dirty_page_count())
@pytest.mark.parametrize("fmt", ["h5", "safetensors"])
def test_a_shard_is_written_out_batch_by_batch_not_all_at_its_end(image_dir, tmp_path, monkeypatch, fmt, cli):
    """Once WRITE_BEHIND_BYTES were written (here: every batch), the writer thread starts the shard's new pages on
    their way to disk (the run goes on meanwhile): the fsync when the shard ends waits for the last of them, not for
    the whole shard. Below the threshold (small features, a huge threshold here) the shard is asked nothing before
    its fsync, and is the same."""
    from s2cli import writers

    seen: list[tuple[int, int]] = []  # per call: the temporary's dirty pages before and after

    def behind(path):
        before = dirty_pages(path)
        real(path)
        seen.append((before, dirty_pages(path)))

    real = writers.write_behind
    monkeypatch.setattr(writers, "write_behind", behind)
    args = ["extract", image_dir, "-m", "timm:test_vit", "--random-init", "--scales", "1,2", "--batch-size", "1",
            "--shard-size", "2", "-j", "0", "--format", fmt, "-q"]
    monkeypatch.setattr(writers, "WRITE_BEHIND_BYTES", 1)
    r = cli(*args, "-o", f"{tmp_path / 'each'}/")
    assert r.exit_code == 0, r.output
    assert len(seen) == 4  # 4 images, one a batch
    assert all(before > 0 for before, _ in seen), seen
    assert all(after == 0 for _, after in seen), seen
    seen.clear()
    monkeypatch.setattr(writers, "WRITE_BEHIND_BYTES", 1 << 40)
    r = cli(*args, "-o", f"{tmp_path / 'none'}/")
    assert r.exit_code == 0, r.output
    assert seen == []
    with s2cli.open_features(tmp_path / "each") as a, s2cli.open_features(tmp_path / "none") as b:
        assert a.complete and b.complete and list(a) == list(b) and len(a) == 4
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
