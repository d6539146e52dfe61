"""Object stores (#17): inputs and outputs at fsspec URLs. A real S3 API on loopback (moto's server) for the
round trip with a kill -9 and a resume, equal to the local run; https:// shards from a loopback HTTP server;
remote folders and lists keep the local keys; a URL that cannot be honoured is one line, exit 2, and never a
local folder named after it; memory:// for the protocol's order of writes and the remote claim."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest

import s2cli
from conftest import FAST, MODEL, dead_pid, make_shards
from s2cli.errors import ConfigError
from s2cli.outdir import OutputDir

TINY = dict(model="timm:test_resnet", random_init=True, img_sizes=(64, 128), max_split_size=64, workers=0)


def assert_same_features(got, want):
    assert list(got) == list(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5)
        assert got.meta(k)["source"].endswith(want.meta(k)["source"].rsplit("/", 1)[-1])


def s2(*args, cwd=None, env=None):
    return subprocess.Popen([sys.executable, "-m", "s2cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---- the done-when test: S3 in and out, kill -9, resume, equal to the local run ---------------------------------
@pytest.mark.slow
def test_s3_shards_in_and_folder_out_survive_a_kill_and_resume_to_the_local_result(s3, tmp_path, cli, monkeypatch):
    shards = make_shards(tmp_path / "shards", n_tars=3, per_tar=8)
    s3.put(str(shards) + "/", f"{s3.bucket}/shards/", recursive=True)
    local_in, url_in = str(shards / "{000000..000002}.tar"), f"s3://{s3.bucket}/shards/{{000000..000002}}.tar"
    out = f"s3://{s3.bucket}/out/"
    s2cli.extract(local_in, str(tmp_path / "ref") + "/", shard_size=1, **TINY)

    p = s2("extract", url_in, *FAST, "--shard-size", 1, "-o", out, "-q", cwd=tmp_path)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None:
            s3.invalidate_cache()
            if len(s3.glob(f"{s3.bucket}/out/part-*.json")) >= 3:
                break
            time.sleep(0.05)
        assert p.poll() is None, p.communicate()[1][-3000:]
        p.send_signal(signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    s3.invalidate_cache()
    assert not s3.exists(f"{s3.bucket}/out/manifest.json")  # killed mid-way
    markers = s3.glob(f"{s3.bucket}/out/part-*.json")
    for m in markers:  # a marker only for a shard that is complete remotely
        assert s3.exists(f"{s3.bucket}/out/{json.loads(s3.cat_file(m))['shard']}")
    assert not (tmp_path / "s3:").exists()

    monkeypatch.chdir(tmp_path)
    r = cli("extract", url_in, *FAST, "--shard-size", 1, "-o", out, "--json")  # the resume: in this process
    assert r.exit_code == 0, r.stderr[-3000:]
    assert not (tmp_path / "s3:").exists()
    summary = json.loads(r.stdout)
    assert summary["complete"] and summary["total_images"] == 24 and summary["resumed_images"] >= 3
    with s2cli.open_features(out) as got, s2cli.open_features(tmp_path / "ref") as want:
        assert len(got.shards) == 24
        assert_same_features(got, want)

    status = json.loads(cli("status", out, "--json").stdout)
    assert status["complete"] and status["images"] == 24 and status["ranks"][0]["state"] == "done"
    inspected = json.loads(cli("inspect", out, "--json").stdout)
    assert inspected["num_images"] == 24 and inspected["num_shards"] == 24 and inspected["complete"]
    assert inspected["size_bytes"] == sum(s3.size(f) for f in s3.glob(f"{s3.bucket}/out/part-*.h5"))
    assert not list(tmp_path.glob("s3*"))


@pytest.mark.slow
def test_s3_without_s3fs_is_one_line_exit_2_naming_it_and_no_local_folder(tmp_path, image_dir):
    blocker = tmp_path / "blocker" / "s3fs"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('s3fs is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}
    work = tmp_path / "work"
    work.mkdir()
    for args in (["extract", image_dir, *FAST, "-o", "s3://bucket/out/"],
                 ["extract", "s3://bucket/imgs/", *FAST, "-o", work / "o/"],
                 ["extract", "s3://bucket/shards/{000..001}.tar", *FAST, "-o", work / "o/"],
                 ["inspect", "s3://bucket/out/"]):
        stdout, stderr = s2(*args, cwd=work, env=env).communicate(timeout=300)
        lines = [x for x in stderr.strip().splitlines() if x.strip()]
        assert "pip install s3fs" in stderr and len(lines) == 1, stderr
        assert "Traceback" not in stderr
    assert list(work.iterdir()) == []  # neither ./s3:/bucket/out nor an output for the refused inputs


# ---- inputs on remote storage --------------------------------------------------------------------------------------
def test_https_shards_from_a_loopback_server_equal_the_local_shards(tmp_path, http_folder):
    shards = make_shards(tmp_path / "shards", n_tars=2, per_tar=3)
    base = http_folder(shards)
    s2cli.extract(f"{base}/{{000000..000001}}.tar", str(tmp_path / "web") + "/", shard_size=2, **TINY)
    s2cli.extract(str(shards / "{000000..000001}.tar"), str(tmp_path / "ref") + "/", shard_size=2, **TINY)
    with s2cli.open_features(tmp_path / "web") as got, s2cli.open_features(tmp_path / "ref") as want:
        assert len(got) == 6
        assert_same_features(got, want)
    with pytest.raises(ConfigError, match="1 of 3 shards do not exist"):
        s2cli.plan(f"{base}/{{000000..000002}}.tar", **TINY)


def test_a_remote_folder_and_a_remote_list_keep_the_keys_of_their_local_twins(s3, tmp_path, image_dir):
    (image_dir / "a.json").write_text('{"caption": "A"}')
    s3.put(str(image_dir) + "/", f"{s3.bucket}/imgs/", recursive=True)
    lst = "path,key,label\na.png,first,1\nsub/c.PNG,,2\n"
    (image_dir / "list.csv").write_text(lst + f"{image_dir / 'd.webp'},dee,3\n")
    s3.pipe_file(f"{s3.bucket}/imgs/list.csv", (lst + f"s3://{s3.bucket}/imgs/d.webp,dee,3\n").encode())
    for local, url in ((str(image_dir), f"s3://{s3.bucket}/imgs/"),
                       (str(image_dir / "list.csv"), f"s3://{s3.bucket}/imgs/list.csv")):
        name = Path(local).name
        s2cli.extract(url, str(tmp_path / f"remote-{name}.h5"), **{**TINY, "workers": 2})  # forked readers
        s2cli.extract(local, str(tmp_path / f"local-{name}.h5"), **TINY)
        with s2cli.open_features(tmp_path / f"remote-{name}.h5") as got, \
                s2cli.open_features(tmp_path / f"local-{name}.h5") as want:
            assert list(got) == list(want) and len(got) >= 3
            for k in want:
                np.testing.assert_allclose(got[k], want[k], atol=1e-5)
                assert got.meta(k).get("meta") == want.meta(k).get("meta")
    with s2cli.open_features(tmp_path / "remote-list.csv.h5") as got:
        assert list(got) == ["first", "sub/c", "dee"]
    with pytest.raises(ConfigError, match="input does not exist"):
        s2cli.plan(f"s3://{s3.bucket}/nothing-here/", **TINY)


# ---- what cannot be honoured is refused ----------------------------------------------------------------------------
def test_urls_that_cannot_be_honoured_are_one_line_exit_2_and_no_local_folder(cli, image_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # not installed (whether or not it is here)
    for out, said in (("s3://bucket/feats.h5", "single output file on remote storage"),
                      ("nosuch://bucket/out/", "nosuch:// is not a storage protocol"),
                      ("gs://bucket/out/", "gs:// URLs need the gcsfs package, which is not installed"),
                      ("memory://out/x.safetensors", "single output file on remote storage")):
        r = cli("extract", image_dir, *FAST, "-o", out)
        assert r.exit_code == 2 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli("slurm", image_dir, *MODEL, "-o", "memory://o/")
    assert r.exit_code == 2 and "must be local" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]


# ---- the protocol on remote storage (memory://) ---------------------------------------------------------------------
def test_each_shard_is_uploaded_whole_before_its_marker_and_resume_skips_it(image_dir, tmp_path, monkeypatch):
    from s2cli.store import RemoteFolder, spool_root

    fs = fsspec.filesystem("memory")
    order: list[str] = []
    put, pipe = RemoteFolder.publish, RemoteFolder.write_text
    monkeypatch.setattr(RemoteFolder, "publish", lambda self, local, name: (order.append(name), put(self, local, name))[1])
    monkeypatch.setattr(RemoteFolder, "write_text", lambda self, name, text: (order.append(name), pipe(self, name, text))[1])
    out = "memory://t-order/out/"
    s2cli.extract(str(image_dir), out, shard_size=1, **TINY)
    shards = [n for n in order if n.endswith(".h5")]
    assert len(shards) == 4
    for shard in shards:
        assert order.index(shard) < order.index(shard.replace(".h5", ".json"))
    assert not list(spool_root().glob(f"s2cli-spool-*-{os.getpid()}-*"))  # the spool is gone with the run

    fs.rm_file("/t-order/out/part-00000-00002.json")  # as after a kill between the upload and the marker
    s = s2cli.extract(str(image_dir), out, shard_size=1, **TINY)
    assert s.num_images == 1 and s.resumed_images == 3 and s.complete
    assert sorted(n.rsplit("/", 1)[-1] for n in fs.glob("/t-order/out/part-*.h5")) == [
        "part-00000-00000.h5", "part-00000-00001.h5", "part-00000-00003.h5", "part-00000-00004.h5"]
    s2cli.extract(str(image_dir), str(tmp_path / "ref") + "/", shard_size=1, **TINY)
    with s2cli.open_features(out) as got, s2cli.open_features(tmp_path / "ref") as want:
        assert_same_features(got, want)
    ds = s2cli.FeatureDataset(out)
    assert [ds[i]["key"] for i in range(len(ds))] == ["a", "b", "d", "sub/c"]


def test_export_and_inspect_read_a_remote_folder_and_export_refuses_a_url(image_dir, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = "memory://t-export/out/"
    s2cli.extract(str(image_dir), out, pool="mean", **TINY)
    s2cli.extract(str(image_dir), str(tmp_path / "ref") + "/", pool="mean", **TINY)
    r = cli("export", out, "memory://t-export/emb/")
    assert r.exit_code == 2 and "writes a local folder" in r.stderr
    for src, dst in ((out, "emb"), (tmp_path / "ref", "emb-ref")):
        r = cli("export", src, tmp_path / dst, "--json")
        assert r.exit_code == 0, r.stderr
    for f in sorted((tmp_path / "emb-ref").rglob("*.npy")):
        np.testing.assert_allclose(np.load(tmp_path / "emb" / f.relative_to(tmp_path / "emb-ref")), np.load(f), atol=1e-3)
    keys = [json.loads(cli("inspect", p, "--keys", "--json").stdout) for p in (out, tmp_path / "ref")]
    assert keys[0] == keys[1] and len(keys[0]) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb", "emb-ref", "imgs", "ref"]


def test_the_remote_claim_refuses_a_live_run_takes_over_a_dead_one_and_gives_back_what_it_found(tmp_path):
    fs = fsspec.filesystem("memory")
    hb = "/t-claim/out/rank-00000.json"
    dead_id = dead_pid()
    now = time.time()
    live = {"state": "running", "host": socket.gethostname(), "pid": os.getppid(), "updated": now, "started": now}
    fs.pipe_file(hb, json.dumps(live).encode())
    with pytest.raises(ConfigError, match=f"being written by another run \\(host {socket.gethostname()} pid {os.getppid()}"):
        OutputDir("memory://t-claim/out/").claim(0)
    elsewhere = {**live, "host": "another-host", "pid": 1, "updated": now - 5}
    fs.pipe_file(hb, json.dumps(elsewhere).encode())
    with pytest.raises(ConfigError, match="another-host"):
        OutputDir("memory://t-claim/out/").claim(0)
    stale = {**elsewhere, "updated": now - 3600}  # silent for longer than S2CLI_STALE_S: taken over
    fs.pipe_file(hb, json.dumps(stale).encode())
    d = OutputDir("memory://t-claim/out/")
    d.claim(0)
    assert json.loads(fs.cat_file(hb))["pid"] == os.getpid()
    d.release()  # no run followed the claim: the folder is as it was
    assert json.loads(fs.cat_file(hb)) == stale
    fs.pipe_file(hb, json.dumps({**live, "pid": dead_id}).encode())  # killed on this host: taken over at once
    d.claim(0)
    d.release()
