"""Streaming at scale: WebDataset and list inputs, sharded HDF5/safetensors output folders, manifest, resume
after SIGKILL, failure records, pooling, flat memory. Tiny timm models; every shard is written in the test."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, invoke_json, jpeg_bytes, plain_tar, run_cli, write_image
from s2cli import open_features


@pytest.mark.parametrize("spec", ["{d}/{{000000..000002}}.tar", "{d}/*.tar", "{d}", "pipe:cat {d}/{{000000..000002}}.tar"])
def test_webdataset_inputs(cli, shards, tmp_path, spec):
    out = tmp_path / "o.h5"
    s = invoke_json(cli, "extract", spec.format(d=shards), *FAST, "-o", out, "--json")
    assert s["num_images"] == 8 and s["num_failed"] == 1
    with open_features(out) as ff:
        assert list(ff) == ["s000", "s001", "s002", "s003", "s004", "s005", "p000", "p001"]
        assert ff.meta("s004")["meta"] == {"json": {"caption": "image 4", "i": 4}, "txt": "caption 4"}
        assert ff.meta("p000")["meta"] == {"json": {"caption": "plain"}}
        assert ff.meta("p001")["meta"] is None and ff.meta("p001")["source"].endswith("000002.tar#p001")
        [f] = ff.failures
        assert f["key"] == "junk" and f["stage"] == "read" and "no image member" in f["error"]


def test_plain_tar_reads_like_shardwriter(cli, tmp_path):
    import webdataset as wds

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    with wds.ShardWriter(str(a / "%06d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(3):
            sink.write({"__key__": f"k{i}", "jpg": jpeg_bytes(i)})
    plain_tar(b / "000000.tar", [(f"k{i}.jpg", jpeg_bytes(i)) for i in range(3)])
    invoke_json(cli, "extract", a, *FAST, "-o", tmp_path / "a.h5", "--json")
    invoke_json(cli, "extract", b, *FAST, "-o", tmp_path / "b.h5", "--json")
    with open_features(tmp_path / "a.h5") as fa, open_features(tmp_path / "b.h5") as fb:
        assert list(fa) == list(fb) == ["k0", "k1", "k2"]
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k])


def test_truncated_tar_and_duplicate_keys_are_recorded(cli, tmp_path):
    members = [(f"t{i}.jpg", jpeg_bytes(i)) for i in range(4)] + [("t1.jpg", jpeg_bytes(9))]
    tar = plain_tar(tmp_path / "in" / "000000.tar", members)
    out = tmp_path / "o.h5"
    s = invoke_json(cli, "extract", tar, *FAST, "-o", out, "--json")
    with open_features(out) as ff:
        assert list(ff) == ["t0", "t1", "t2", "t3"]
        dup = [f for f in ff.failures if f["error_class"] == "DuplicateKey"]
        assert len(dup) == 1 and dup[0]["key"] == "t1"
    cut = plain_tar(tmp_path / "cut" / "000000.tar", [(f"c{i}.jpg", jpeg_bytes(i, (200, 200))) for i in range(4)], cut=170000)
    s = invoke_json(cli, "extract", cut, *FAST, "-o", tmp_path / "c.h5", "--json")
    assert s["num_images"] == 3 and s["num_failed"] == 1
    with open_features(tmp_path / "c.h5") as ff:
        assert list(ff) == ["c0", "c1", "c2"]
        [f] = ff.failures
        assert f["stage"] == "read" and "reading the tar failed" in f["error"] and f["error_class"] == "ReadError"


def test_list_inputs(cli, tmp_path):
    d = tmp_path / "pics"
    for i, name in enumerate(["x.png", "sub/y.jpg", "z.png"]):
        write_image(d / name, (24, 32), i)
    (tmp_path / "list.txt").write_text("pics/x.png\n# a comment\n\npics/sub/y.jpg\n" + str(d / "z.png") + "\n")
    (tmp_path / "list.csv").write_text(f"path,key\npics/x.png,first\n{d / 'sub/y.jpg'},second\n")
    out = tmp_path / "t.h5"
    invoke_json(cli, "extract", tmp_path / "list.txt", *FAST, "-o", out, "--json")
    with open_features(out) as ff:
        assert list(ff) == ["pics/x", "pics/sub/y", str(d / "z")]
    invoke_json(cli, "extract", tmp_path / "list.csv", *FAST, "-o", tmp_path / "c.h5", "--json")
    with open_features(tmp_path / "c.h5") as fc, open_features(out) as ft:
        assert list(fc) == ["first", "second"]
        np.testing.assert_array_equal(fc["second"], ft["pics/sub/y"])
    pa = pytest.importorskip("pyarrow", reason="pyarrow is in the test extras")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["pics/z.png"]}), tmp_path / "list.parquet")
    invoke_json(cli, "extract", tmp_path / "list.parquet", *FAST, "-o", tmp_path / "p.h5", "--json")
    with open_features(tmp_path / "p.h5") as fp:
        assert list(fp) == ["pics/z"]


def folder(tmp_path: Path, n: int, name="imgs", bad: tuple[int, ...] = ()) -> Path:
    d = tmp_path / name
    for i in range(n):
        if i in bad:
            d.mkdir(exist_ok=True)
            (d / f"img{i:04d}.jpg").write_bytes(b"not a jpeg at all")
        else:
            write_image(d / f"img{i:04d}.png", (20 + i % 7, 24), i)
    return d


@pytest.mark.parametrize("fmt", ["h5", "safetensors"])
def test_sharded_output_folder(cli, tmp_path, fmt):
    d = folder(tmp_path, 8, bad=(5,))
    out = tmp_path / "out"
    s = invoke_json(cli, "extract", d, *FAST, "-o", f"{out}/", "--format", fmt, "--shard-size", 3, "--json")
    assert s["shards_written"] == 3 and s["complete"] and s["total_images"] == 7 and s["total_failed"] == 1
    names = {p.name for p in out.iterdir()}
    assert names == {"errors.jsonl", "manifest.json", f"part-00000-00000.{fmt}", "part-00000-00000.json",
                     f"part-00000-00001.{fmt}", "part-00000-00001.json", f"part-00000-00002.{fmt}",
                     "part-00000-00002.json", "run.json", "rank-00000.json", "index.json"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert [sh["num_images"] for sh in manifest["shards"]] == [3, 2, 2] and manifest["complete"]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["key"], e["stage"]) for e in errors] == [("img0005", "decode")]
    assert set(errors[0]) == {"key", "source", "stage", "error_class", "error"}
    run = json.loads((out / "run.json").read_text())
    assert run["s2cli_version"] and run["input"]["kind"] == "folder" and run["config"]["shard_size"] == 3
    single = tmp_path / f"single.{fmt}"
    invoke_json(cli, "extract", d, *FAST, "-o", single, "--json")
    with open_features(out) as fs, open_features(single) as f1:
        assert list(fs) == list(f1) == [f"img{i:04d}" for i in range(8) if i != 5]
        for k in f1:
            np.testing.assert_array_equal(fs[k], f1[k])
        assert fs.meta("img0007")["shard"] == f"part-00000-00002.{fmt}"
    info = invoke_json(cli, "inspect", out, "--json")
    assert info["num_images"] == 7 and info["num_failed"] == 1 and info["num_shards"] == 3 and info["complete"]
    assert info["feature_shape"] == [4, 192] and info["failed"][0]["key"] == "img0005"


def test_safetensors_layout_reads_with_safe_open(cli, tmp_path):
    from safetensors import safe_open

    d = folder(tmp_path, 3)
    out = tmp_path / "f.safetensors"
    invoke_json(cli, "extract", d, *FAST, "-o", out, "--pool", "mean", "--json")
    with safe_open(str(out), framework="numpy") as f:
        md = f.metadata()
        keys = json.loads(md["keys"])
        assert keys == ["img0000", "img0001", "img0002"]
        assert set(f.keys()) == set(keys) | {"__s2cli_pooled__"}
        x = f.get_tensor("img0001")
        pooled = f.get_tensor("__s2cli_pooled__")
        assert x.shape == (4, 192) and pooled.shape == (3, 192)
        np.testing.assert_allclose(pooled[1], x.mean(0), rtol=1e-5, atol=1e-6)
        assert json.loads(md["s2cli"])["model"] == "timm:test_resnet"
        assert json.loads(md["images"])["img0002"]["orig_hw"] == [22, 24]


def test_pool_mean_cls_and_pool_only(cli, tmp_path):
    d = folder(tmp_path, 3)
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    invoke_json(cli, "extract", d, *FAST, "-o", a, "--pool", "mean", "--json")
    invoke_json(cli, "extract", d, *FAST, "-o", b, "--pool", "mean", "--pool-only", "--json")
    with open_features(a) as fa, open_features(b) as fb:
        np.testing.assert_allclose(fa.pooled("img0000"), fa["img0000"].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(fb.pooled("img0000"), fa.pooled("img0000"))
        with pytest.raises(KeyError, match="pool-only"):
            fb["img0000"]
    r = cli("extract", d, *FAST, "-o", tmp_path / "c.h5", "--pool", "cls")
    assert r.exit_code == 2 and "--pool cls" in r.stderr


def test_changed_config_is_refused_and_overwrite_starts_over(cli, tmp_path):
    d = folder(tmp_path, 4)
    out = f"{tmp_path / 'out'}/"
    invoke_json(cli, "extract", d, *FAST, "-o", out, "--shard-size", 2, "--json")
    r = cli("extract", d, *FAST, "-o", out, "--shard-size", 2, "--split-mode", "pad")
    assert r.exit_code == 2 and "split_mode: 'resize' -> 'pad'" in r.stderr and "--overwrite" in r.stderr
    s = invoke_json(cli, "extract", d, *FAST, "-o", out, "--shard-size", 2, "-b", 1, "--json")  # run-only change
    assert s["num_images"] == 0 and s["resumed_images"] == 4
    s = invoke_json(cli, "extract", d, *FAST, "-o", out, "--shard-size", 2, "--split-mode", "pad", "--overwrite", "--json")
    assert s["num_images"] == 4 and s["shards_written"] == 2


def test_output_folder_with_foreign_files_is_refused(cli, tmp_path):
    d = folder(tmp_path, 2)
    out = tmp_path / "busy"
    out.mkdir()
    (out / "thesis.pdf").write_text("precious")
    r = cli("extract", d, *FAST, "-o", f"{out}/")
    assert r.exit_code == 2 and "thesis.pdf" in r.stderr and (out / "thesis.pdf").read_text() == "precious"


def test_on_error_stop_and_max_failures(cli, tmp_path):
    d = folder(tmp_path, 6, bad=(1, 3, 4))
    r = cli("extract", d, *FAST, "-o", tmp_path / "a.h5", "--on-error", "stop")
    assert r.exit_code == 1 and "img0001" in r.stderr and "--on-error" in r.stderr
    assert not (tmp_path / "a.h5").exists()
    r = cli("extract", d, *FAST, "-o", tmp_path / "b.h5", "--max-failures", 2)
    assert r.exit_code == 1 and "more than --max-failures 2" in r.stderr
    s = invoke_json(cli, "extract", d, *FAST, "-o", tmp_path / "c.h5", "--max-failures", 3, "--json")
    assert s["num_failed"] == 3


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "s2cli", "extract", *map(str, args)]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_clean_run(tmp_path):
    d = folder(tmp_path, 24, bad=(7,))
    slow = ["-m", "timm:test_vit", "--random-init", "--scales", "1,2,3", "-j", "1", "-b", "2", "--shard-size", "3", "-q"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert run_cli("extract", d, "-o", f"{clean}/", *slow).exit_code == 0  # the reference: in this process
    proc = subprocess.Popen(_cmd(d, "-o", f"{killed}/", *slow), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "part-00000-00002.json").exists():
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "part-00000-00002.json").exists()
    with open_features(killed) as partial:  # what a reader sees now: completed shards only
        assert 0 < len(partial) < 23
    r = run_cli("extract", d, "-o", f"{killed}/", *slow, "--json")  # the resume: in this process
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["resumed_images"] > 0
    assert not [p for p in killed.iterdir() if ".tmp-" in p.name]
    with open_features(clean) as fc, open_features(killed) as fk:
        assert list(fk) == list(fc) and len(fc) == 23
        for k in fc:
            np.testing.assert_array_equal(fk[k], fc[k])  # bit-identical on CPU, fp32
    errors = (killed / "errors.jsonl").read_text().splitlines()
    assert [json.loads(e)["key"] for e in errors] == ["img0007"]  # recorded once


def test_resume_inside_a_tar(cli, tmp_path):
    """A tar cut into several parts: a resumed run skips the finished parts without decoding them."""
    plain_tar(tmp_path / "in" / "000000.tar", [(f"k{i:02d}.jpg", jpeg_bytes(i)) for i in range(7)])
    out = tmp_path / "out"
    full = invoke_json(cli, "extract", tmp_path / "in", *FAST, "-o", f"{out}/", "--shard-size", 3, "--json")
    assert full["shards_written"] == 3 and full["complete"]
    # forget the last part, as if the run had been killed while writing it
    marker = json.loads((out / "part-00000-00002.json").read_text())
    (out / "part-00000-00002.json").unlink()
    again = invoke_json(cli, "extract", tmp_path / "in", *FAST, "-o", f"{out}/", "--shard-size", 3, "--json")
    assert again["num_images"] == marker["num_images"] == 1 and again["shards_written"] == 1 and again["complete"]
    with open_features(out) as ff:
        assert list(ff) == [f"k{i:02d}" for i in range(7)]


RSS = """
import resource, sys
from s2cli.cli import app
try:
    app(sys.argv[1:], prog_name="s2")
except SystemExit as e:
    assert not e.code, e.code
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_host_memory_is_flat_in_the_number_of_images(tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    arr = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for i in range(2000):
        Image.fromarray(np.roll(arr, i)).save(d / f"{i:05d}.png")

    def peak(n: int) -> int:
        r = subprocess.run([sys.executable, "-c", RSS, "extract", str(d), *FAST, "--limit", str(n), "-b", "32",
                            "--shard-size", "100", "-o", f"{tmp_path}/o{n}/", "-q"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.split()[-1])

    small, large = peak(200), peak(2000)
    assert large <= small * 1.10 + 20_000, (small, large)  # kB


@pytest.mark.slow
@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_a_decode_worker_that_dies_or_stalls_is_reported_not_waited_on(cli, tmp_path, monkeypatch, how):
    import s2cli.inputs.loader as loader

    d = folder(tmp_path, 4)
    write_image(d / "zz_bad.png", (20, 20), 99)
    original = loader.decode_sample

    def decode(sample, fit):
        if sample.key == "zz_bad":
            if how == "dies":
                os._exit(3)  # the worker process vanishes mid-task
            time.sleep(600)
        return original(sample, fit)

    monkeypatch.setattr(loader, "decode_sample", decode)  # inherited by the forked workers
    t0 = time.time()
    s = invoke_json(cli, "extract", d, *FAST[:-2], "-j", 2, "--decode-timeout", 3, "-o", tmp_path / "o.h5", "--json")
    assert time.time() - t0 < 60
    assert s["num_images"] == 4 and s["num_failed"] == 1
    with open_features(tmp_path / "o.h5") as ff:
        [f] = ff.failures
        assert f["key"] == "zz_bad"
        if how == "dies":  # noticed at once, the sample tried again on a new loader, recorded once it has killed three
            assert f["error_class"] == "WorkerDied" and "died three times" in f["error"]
        else:
            assert f["error_class"] == "WorkerTimeout" and "stalled or died" in f["error"]


def test_export_for_retrieval(cli, tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is in the test extras")  # noqa: F841
    import pyarrow.parquet as pq

    d = folder(tmp_path, 5)
    out = f"{tmp_path / 'feats'}/"
    invoke_json(cli, "extract", d, *FAST, "-o", out, "--shard-size", 2, "--json")
    s = invoke_json(cli, "export", out, tmp_path / "emb", "--no-normalize", "--dtype", "float32", "--json")
    assert s["num_images"] == 5 and s["dim"] == 192 and s["pool"] == "mean"
    emb = np.load(tmp_path / "emb" / "img_emb" / "img_emb_0.npy")
    meta = pq.read_table(tmp_path / "emb" / "metadata" / "metadata_0.parquet").to_pylist()
    assert emb.shape == (5, 192) and [m["key"] for m in meta] == [f"img{i:04d}" for i in range(5)]
    with open_features(out) as ff:
        np.testing.assert_allclose(emb[3], ff["img0003"].mean(0), rtol=1e-6)
    r = cli("export", out, tmp_path / "emb")
    assert r.exit_code == 2 and "not empty" in r.stderr
    r = cli("export", out, tmp_path / "emb2", "--pool", "pooled")
    assert r.exit_code == 2 and "--pool mean" in r.stderr


def test_decode_workers_run_at_the_configured_niceness(monkeypatch, image_dir):
    """S2CLI_DECODE_NICE lowers the decode workers' priority (the main process keeps the forward's cores) and
    changes nothing in what they decode; a bad value is a ConfigError naming it."""
    import os

    from s2cli.errors import ConfigError
    from s2cli.inputs.decode import Fit, decode_sample
    from s2cli.inputs.folder import scan_folder
    from s2cli.inputs.loader import DecodeLoader

    samples = scan_folder(image_dir)
    fit = Fit("crop", 64, (0.5, 0.5, 0.5))
    base = os.getpriority(os.PRIO_PROCESS, 0)
    before = set(own_children())
    for nice in ("0", "7"):
        monkeypatch.setenv("S2CLI_DECODE_NICE", nice)
        with DecodeLoader(fit, 2) as loader:
            records = loader.map(samples, lambda s: s)
            got = [next(records)[1]]  # mid-run: the loader's workers are up
            pids = sorted(set(own_children()) - before)
            want = [min(19, base + int(nice))] * 2
            for _ in range(100):  # a worker that got no job may still be starting
                if len(pids) == 2 and [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids] == want:
                    break
                time.sleep(0.05)
                pids = sorted(set(own_children()) - before)
            assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids] == want
            got += [rec for _, rec in records]
        for s, rec in zip(samples, got, strict=True):
            assert rec.key == s.key and np.array_equal(rec.pixels, decode_sample(s, fit).pixels)
    for bad in ("x", "25"):
        monkeypatch.setenv("S2CLI_DECODE_NICE", bad)
        with pytest.raises(ConfigError, match="S2CLI_DECODE_NICE"):
            DecodeLoader(fit, 1)


def own_children() -> list[int]:
    """This process's child processes (every thread's)."""
    return [int(c) for task in Path("/proc/self/task").iterdir() for c in (task / "children").read_text().split()]
