"""Weights from the hub, against a loopback Hugging Face Hub (tests/hubserver.py at HF_ENDPOINT): download on
first use into the HF cache, `s2 fetch` then offline with the hub stopped, revisions recorded and checked on
resume, one downloader among ranks started at once, the launcher's and `s2 slurm`'s fetch before they start
anything, and misses in one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hubserver import HubServer

from conftest import TINY, invoke_json, write_image
from s2cli import hub as s2hub

ROOT = Path(__file__).parent.parent


def tiny_clip_repo(folder: Path, seed: int = 0) -> Path:
    """A tiny random CLIP vision tower with its image processor, as save_pretrained writes them."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(**TINY)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    for i, hw in enumerate([(40, 60), (64, 48), (50, 50)]):
        write_image(d / f"{i}.png", hw, i)
    return d


def _one_line_exit_2(r) -> str:
    msg = r.stderr.strip()
    assert r.exit_code == 2, (r.exit_code, r.stderr, r.stdout)
    assert "\n" not in msg and "Traceback" not in msg and "HFValidationError" not in msg, msg
    return msg


def test_first_use_downloads_into_the_hf_cache_then_reads_it_without_the_network(hub, cli, tmp_path, images):
    sha = hub.add("org/tiny-clip", tiny_clip_repo(tmp_path / "clip"))
    out = invoke_json(cli, "extract", images, "-m", "hf:org/tiny-clip", "-o", tmp_path / "a.h5", "--json", "-q")
    assert out["num_images"] == 3 and out["weights"] == f"org/tiny-clip@{sha}"
    # each file once (config, preprocessor, weights), into the standard cache named by HF_HOME
    assert dict(hub.downloads) == {("org/tiny-clip", f): 1 for f in ("config.json", "preprocessor_config.json", "model.safetensors")}
    snap = Path(os.environ["HF_HOME"]) / "hub" / "models--org--tiny-clip" / "snapshots" / sha
    assert sorted(p.name for p in snap.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    # the same features as the same weights loaded from the folder itself
    local = invoke_json(cli, "extract", images, "-m", f"hf:{tmp_path / 'clip'}", "-o", tmp_path / "b.h5", "--json", "-q")
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        assert a.attrs["weights"] == f"org/tiny-clip@{sha}" and b.attrs["weights"] == local["weights"]
        np.testing.assert_array_equal(a["features"][:], b["features"][:])
    # a later run asks the hub nothing
    asked = len(hub.requests)
    invoke_json(cli, "extract", images, "-m", "hf:org/tiny-clip", "-o", tmp_path / "c.h5", "--json", "-q")
    assert len(hub.requests) == asked


def test_an_alias_downloads_its_repo_on_first_use(hub, cli, tmp_path, images, monkeypatch):
    """`s2 extract imgs/ --model clip-vit-l-336`: the alias's repo comes from the hub (a tiny CLIP stands in for
    openai/clip-vit-large-patch14-336, and the alias is shrunk to match it)."""
    import dataclasses

    from s2cli import backbones

    sha = hub.add("openai/clip-vit-large-patch14-336", tiny_clip_repo(tmp_path / "clip"))
    big = backbones._REGISTRY["clip-vit-l-336"]
    small = dataclasses.replace(big, input_size=32, patch_size=8, channels=32, hf_config={**TINY, "hidden_act": "quick_gelu"})
    monkeypatch.setitem(backbones._REGISTRY, "clip-vit-l-336", small)
    out = invoke_json(cli, "extract", images, "--model", "clip-vit-l-336", "--scales", "1,2,3", "-o", tmp_path / "o.h5",
                      "--json", "-q")
    assert out["weights"] == f"openai/clip-vit-large-patch14-336@{sha}" and out["num_images"] == 3
    with h5py.File(tmp_path / "o.h5") as f:
        assert f["features"].shape == (3, 16, 96)  # layer -2, CLS dropped, 3 scales


def test_revision_is_recorded_and_a_resume_refuses_another(hub, cli, tmp_path, images):
    first = hub.add("org/tiny-clip", tiny_clip_repo(tmp_path / "v1", seed=1), revision="v1")
    hub.add("org/tiny-clip", tmp_path / "v1")  # main = v1
    out = invoke_json(cli, "extract", images, "-m", "hf:org/tiny-clip", "-o", tmp_path / "run/", "--json", "-q")
    assert out["weights"] == f"org/tiny-clip@{first}"
    run = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert run["weights_revision"] == f"org/tiny-clip@{first}" and run["backbone"]["revision"] == first
    # main moves on; `s2 fetch` brings it here
    second = hub.add("org/tiny-clip", tiny_clip_repo(tmp_path / "v2", seed=2))
    fetched = invoke_json(cli, "fetch", "hf:org/tiny-clip", "--json")
    assert fetched[0]["revision"] == f"org/tiny-clip@{second}"
    msg = _one_line_exit_2(cli("extract", images, "-m", "hf:org/tiny-clip", "-o", tmp_path / "run/", "-q"))
    assert f"weights_revision: 'org/tiny-clip@{first}' -> 'org/tiny-clip@{second}'" in msg
    # a revision named after @: a tag, or a commit sha
    tagged = invoke_json(cli, "extract", images, "-m", "hf:org/tiny-clip@v1", "-o", tmp_path / "t.h5", "--json", "-q")
    pinned = invoke_json(cli, "extract", images, "-m", f"hf:org/tiny-clip@{first}", "-o", tmp_path / "p.h5", "--json", "-q")
    assert tagged["weights"] == pinned["weights"] == f"org/tiny-clip@{first}"


def test_a_checkpoint_file_is_recorded_by_its_hash(cli, tmp_path, images):
    import hashlib

    from safetensors.torch import save_file

    from s2cli.backbones import load_backbone, resolve

    src = load_backbone(resolve("timm:test_vit"), random_init=True, seed=3)
    save_file(src.module.state_dict(), str(tmp_path / "w.safetensors"))
    digest = hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
    out = invoke_json(cli, "extract", images, "-m", "timm:test_vit", "--weights", tmp_path / "w.safetensors",
                      "-o", tmp_path / "run/", "--json", "-q")
    assert out["weights"] == f"{tmp_path / 'w.safetensors'}@sha256:{digest}"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["weights_revision"] == f"sha256:{digest}"
    save_file(load_backbone(resolve("timm:test_vit"), random_init=True, seed=4).module.state_dict(),
              str(tmp_path / "w.safetensors"))  # other weights under the same name
    msg = _one_line_exit_2(cli("extract", images, "-m", "timm:test_vit", "--weights", tmp_path / "w.safetensors",
                               "-o", tmp_path / "run/", "-q"))
    assert f"weights_revision: 'sha256:{digest}'" in msg


@pytest.mark.parametrize("case", ["missing repo", "missing revision", "unreachable hub", "offline, not cached",
                                  "a typo'd folder", "a folder under ~", "not an id"])
def test_misses_are_one_line_with_exit_2(case, hub, cli, tmp_path, images, monkeypatch):
    hub.add("org/tiny-clip", tiny_clip_repo(tmp_path / "clip"))
    model, expect = {
        "missing repo": ("hf:org/nope", "no model org/nope on the hub"),
        "missing revision": ("hf:org/tiny-clip@v9", "has no revision v9"),
        "unreachable hub": ("hf:org/tiny-clip", "cannot be reached"),
        "offline, not cached": ("hf:org/tiny-clip", "s2 fetch hf:org/tiny-clip"),
        "a typo'd folder": ("hf:./typo_dir", "no such folder"),
        "a folder under ~": ("hf:~/models/clip", "no such folder"),
        "not an id": ("hf:org/na me", "not a hub model id"),
    }[case]
    if case == "unreachable hub":
        hub.stop()
    if case == "offline, not cached":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.monotonic()
    msg = _one_line_exit_2(cli("extract", images, "-m", model, "-o", tmp_path / "o.h5", "-q"))
    assert expect in msg and time.monotonic() - t < 10
    assert not (tmp_path / "o.h5").exists() and not hub.downloads


@pytest.mark.slow
def test_offline_miss_is_one_line_before_torch_is_imported(tmp_path, images):
    from test_core import NO_TORCH

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for model in ("clip-vit-l-336", "hf:org/tiny-clip"):
        t = time.monotonic()
        r = subprocess.run([sys.executable, "-c", NO_TORCH, "extract", str(images), "-m", model, "-o", str(tmp_path / "o.h5")],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
        assert r.returncode == 2 and "torch is blocked" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "are not on this machine" in lines[0] and f"s2 fetch {model}" in lines[0]
        assert time.monotonic() - t < 10  # an interpreter start and s2cli's imports; no network, no torch


@pytest.mark.slow
def test_fetch_then_run_offline_with_the_hub_stopped(hub, cli, tmp_path, images):
    sha = hub.add("org/tiny-clip", tiny_clip_repo(tmp_path / "clip"))
    hub.add("openai/clip-vit-large-patch14-336", tmp_path / "clip")  # the model of --recipe llava-1.5-s2
    r = cli("fetch", "hf:org/tiny-clip", "--recipe", "llava-1.5-s2")
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split("\t")[:2] == ["hf:org/tiny-clip", f"org/tiny-clip@{sha}"]
    assert lines[1].startswith("clip-vit-l-336\topenai/clip-vit-large-patch14-336@")
    assert lines[0].split("\t")[2] == str(s2hub.cache_dir() / "models--org--tiny-clip" / "snapshots" / sha)
    assert "HF_HUB_OFFLINE=1" in r.stderr and f"HF_HOME={os.environ['HF_HOME']}" in r.stderr
    # no optimizer states, no other frameworks' weights: the allow-list only
    assert {f for _, f in hub.downloads} == {"config.json", "preprocessor_config.json", "model.safetensors"}
    hub.stop()
    checked = invoke_json(cli, "fetch", "hf:org/tiny-clip", "--offline", "--json")
    assert checked[0]["revision"] == f"org/tiny-clip@{sha}"
    out = invoke_json(cli, "extract", images, "-m", "hf:org/tiny-clip", "--offline", "-o", tmp_path / "o.h5", "--json", "-q")
    assert out["weights"] == f"org/tiny-clip@{sha}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "s2cli", "extract", str(images), "-m", "hf:org/tiny-clip", "-o",
                        str(tmp_path / "p.h5"), "--json", "-q"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["weights"] == f"org/tiny-clip@{sha}"


def test_fetch_skips_other_frameworks_and_optimizer_states(hub, cli, tmp_path):
    repo = tiny_clip_repo(tmp_path / "clip")
    for junk in ("optimizer.pt", "flax_model.msgpack", "tf_model.h5", "pytorch_model.bin", "README.md"):
        (repo / junk).write_bytes(b"x" * 10)
    hub.add("org/tiny-clip", repo)
    invoke_json(cli, "fetch", "hf:org/tiny-clip", "--json")
    assert {f for _, f in hub.downloads} == {"config.json", "preprocessor_config.json", "model.safetensors"}


def test_fetch_needs_something_to_fetch(cli):
    _one_line_exit_2(cli("fetch"))


def test_slurm_fetches_on_the_submitting_host_and_runs_tasks_offline(hub, cli, tmp_path, images):
    sha = hub.add("org/tiny-clip", tiny_clip_repo(tmp_path / "clip"))
    out = invoke_json(cli, "slurm", images, "-o", tmp_path / "run/", "-m", "hf:org/tiny-clip", "--gpus-per-node", "2",
                      "--json")
    text = out["text"]
    assert "export HF_HUB_OFFLINE=1" in text and f"export HF_HOME={os.environ['HF_HOME']}" in text
    assert text.index("export HF_HUB_OFFLINE=1") < text.index("srun ")
    assert s2hub.cached(s2hub.Ref("org/tiny-clip"), weights=True).sha == sha  # the tasks will find it
    # offline, with the weights not here: refused in one line, nothing written
    msg = _one_line_exit_2(cli("slurm", images, "-o", tmp_path / "run2/", "-m", "hf:org/other", "--gpus-per-node", "2",
                               "--offline"))
    assert "s2 fetch hf:org/other" in msg and not (tmp_path / "run2").exists()


def test_slurm_exports_a_separate_hub_cache(cli, tmp_path, images, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
    out = invoke_json(cli, "slurm", images, "-o", tmp_path / "run/", "--random-init", "--ntasks", "1", "--json")
    assert f"export HF_HUB_CACHE={tmp_path / 'hubcache'}" in out["text"] and "export HF_HUB_OFFLINE=1" in out["text"]


@pytest.mark.slow
def test_devices_launcher_downloads_once_then_workers_run_offline(hub, cli, tmp_path, images):
    sha = hub.add("org/tiny-clip", tiny_clip_repo(tmp_path / "clip"))
    out = invoke_json(cli, "extract", images, "-m", "hf:org/tiny-clip", "-o", tmp_path / "run/", "--devices", "cpu,cpu",
                      "--json", "-q")
    assert [w["exit_code"] for w in out["workers"]] == [0, 0]
    assert {w["summary"]["weights"] for w in out["workers"]} == {f"org/tiny-clip@{sha}"}
    assert set(hub.downloads.values()) == {1}
    # only the launcher asked the hub: two metadata calls (the config, then the weights), none from the workers
    assert sum(1 for m, p in hub.requests if p.startswith("/api/models/org/tiny-clip/revision")) == 2


@pytest.mark.slow
def test_two_ranks_started_at_once_download_once(tmp_path, images, monkeypatch):
    with HubServer(delay=1.5) as slow:
        sha = slow.add("org/tiny-clip", tiny_clip_repo(tmp_path / "clip"))
        env = {**os.environ, "HF_ENDPOINT": slow.url, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2"}
        procs = [subprocess.Popen([sys.executable, "-m", "s2cli", "extract", str(images), "-m", "hf:org/tiny-clip",
                                   "-o", str(tmp_path / "run/"), "--device", "cpu", "--json", "-q"],
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for r in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
        assert {json.loads(o.strip().splitlines()[-1])["weights"] for o, _ in outs} == {f"org/tiny-clip@{sha}"}
        assert dict(slow.downloads) == {("org/tiny-clip", f): 1 for f in ("config.json", "preprocessor_config.json",
                                                                          "model.safetensors")}
        assert any("waiting for another process that is downloading org/tiny-clip" in e for _, e in outs)


def test_repo_ids_and_paths_are_told_apart():
    assert s2hub.parse_ref("org/name@v1.0", "hf:x") == s2hub.Ref("org/name", "v1.0")
    assert s2hub.parse_ref("gpt2", "hf:x") == s2hub.Ref("gpt2")
    for bad in ("./typo_dir", "~/models/clip", "/abs/path", "a/b/c", "org/na me", "org--x/y", "org/name@"):
        with pytest.raises(Exception) as e:
            s2hub.parse_ref(bad, "hf:" + bad)
        assert type(e.value).__name__ == "ConfigError" and "\n" not in str(e.value)
