"""`s2 bench` and the run's stage timing: fields and sane values on tiny random-init models (no timing asserted),
FLOPs counted by torch equal to the backbone's formula, --compile wired into the run and matching eager."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import GOLDEN, TENSORS, ToyConv, golden_kwargs, invoke_json
from s2cli.backbones import load_backbone, resolve
from s2cli.bench import measure, synthetic_jpegs
from s2cli.config import ExtractConfig, resolve_config

TINY = ("-m", "timm:test_vit", "--random-init", "--layer", "2")
STAGES = {"read", "decode", "fit", "preprocess", "forward", "check", "collect", "commit", "write", "other"}


def test_bench_json_fields_and_sane_values(cli):
    r = invoke_json(cli, "bench", *TINY, "--images", "4", "-b", "2", "-j", "0", "--image-size", "320x240", "--json")
    assert r["images"] == 4 and r["warmup_images"] == 2 and r["device"] == "cpu" and r["compile"] is False
    assert r["e2e_img_s"] > 0 and r["model_only_img_s"] > 0 and r["e2e_over_model_only"] > 0
    assert r["flops_per_image"] > 0 and r["matmul_ceiling_flops_per_s"] > 0 and 0 < r["mfu_model_only"]
    st, wt = r["stage_seconds"], r["wait_seconds"]
    assert set(st) == STAGES and set(wt) == {"decode", "write"}
    assert all(v >= 0 for v in [*st.values(), *wt.values()]) and st["forward"] > 0 and st["decode"] > 0 and st["write"] > 0
    # with -j 0 read/decode/fit run on the main thread too: its stages and waits fit inside the wall time
    main = st["read"] + st["decode"] + st["fit"] + st["preprocess"] + st["forward"] + wt["write"]
    assert main <= r["e2e_seconds"]
    assert r["peak_host_bytes"] > 2 ** 20 and r["peak_gpu_bytes"] is None
    assert r["reference_img_s"] > 0 and r["model_only_vs_reference"] > 0 and r["memory_tool"] == "LiveTensorBytes"
    mem = r["memory"]
    assert set(mem) == {"single_scale", "s2", "s2_chunked", "reference", "reference_split_forward"} and r["memory_batch"] == 2
    assert all(v["peak"] == v["held"] + v["working"] > v["working"] > 0 for v in mem.values())
    assert mem["s2_chunked"]["peak"] <= mem["s2"]["peak"] and mem["single_scale"]["vs_single_scale"] == 1.0


def test_bench_flops_equal_the_formula():
    """A tiny CLIP (the alias's architecture at toy width): torch's flop counter over one image (2 scales, 5
    tiles) equals flops_per_tile's formula summed over the tiles."""
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
            "image_size": 224, "patch_size": 16}
    cfg = dataclasses.replace(resolve("clip-vit-b-16"), channels=32, hf_config=tiny)
    res = resolve_config(ExtractConfig(input="synthetic", output="x.h5", model="clip-vit-b-16", random_init=True,
                                       batch_size=2, workers=0), cfg)
    r = measure(res, synthetic_jpegs(2, (240, 320)), load_backbone(cfg, random_init=True), "synthetic")
    assert r["flops_per_image_formula"] == 5 * cfg.flops_per_tile((224, 224))
    assert r["flops_per_image"] == pytest.approx(r["flops_per_image_formula"], rel=1e-9)


def test_extract_summary_has_stage_timing(cli, image_dir, tmp_path):
    r = invoke_json(cli, "extract", str(image_dir), *TINY, "-o", tmp_path / "o.h5", "-j", "1", "--json", "-q")
    assert r["compile"] is False and r["num_images"] > 0
    assert set(r["stage_seconds"]) == STAGES
    assert r["stage_seconds"]["forward"] > 0 and r["stage_seconds"]["decode"] > 0
    assert r["stage_seconds"]["preprocess"] + r["stage_seconds"]["forward"] + sum(r["wait_seconds"].values()) <= r["seconds"]


def test_bench_usage_errors(cli):
    r = cli("bench", *TINY, "--images", "0")
    assert r.exit_code == 2 and "--images" in r.stderr
    r = cli("bench", *TINY, "--image-size", "big")
    assert r.exit_code == 2 and "WxH" in r.stderr
    if not torch.cuda.is_available():
        r = cli("bench", *TINY, "--images", "2", "--device", "cuda")
        assert r.exit_code == 2 and "CUDA" in r.stderr


def test_compile_is_wired_and_recorded(tmp_path):
    """--compile reaches the Extractor (the backbone's forward is wrapped by torch.compile, the eager one kept
    for the flop counter) and is saved with the resolved config. Compiled-vs-eager features are not compared
    here: inductor takes ~90 s to compile a ViT on a 2-core CPU (measured with benchmarks/bench_overlap.py --compile)."""
    from s2cli.config import build_config
    from s2cli.extractor import Extractor

    cfg = build_config(str(tmp_path), str(tmp_path / "o.h5"), model="timm:test_vit", random_init=True,
                       compile=True)
    res = resolve_config(cfg, resolve(cfg.model))
    bb = load_backbone(res.backbone, random_init=True)
    eager = bb.eager_forward
    Extractor(res, bb, torch.device("cpu"), torch.float32)
    assert bb.compiled and bb.eager_forward is eager and bb._fn is not eager
    assert dict(res.provenance)["compile"] == "flag" and '"compile": true' in res.to_json()


@pytest.mark.slow
def test_compile_cache_survives_between_runs(tmp_path, image_dir, clip_dir):
    """--compile keeps inductor's graphs in $XDG_CACHE_HOME/s2cli/inductor: the first run compiles (cache
    misses, files written there), a second process reuses them (hits, no misses), and both store the features
    of the eager run within float tolerance. Real torch.compile on the CPU (~30-60 s on 2 cores)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import run_cli
    from s2cli import open_features

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    args = ["extract", str(image_dir), "-m", f"hf:{clip_dir[0]}", "-j", "0", "--json", "-q"]
    r = run_cli(*args, "-o", tmp_path / "eager.h5")  # the eager reference: in this process
    assert r.exit_code == 0, r.stderr[-2000:]
    runs = [json.loads(r.stdout)]
    for name in ("first", "second"):  # each compiling run a process of its own: the second finds the first's cache
        p = subprocess.run([sys.executable, "-m", "s2cli", *args, "-o", str(tmp_path / f"{name}.h5"), "--compile"],
                           capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr[-2000:]
        runs.append(json.loads(p.stdout))
    cache = tmp_path / "cache" / "s2cli" / "inductor"
    assert runs[0].get("compile_cache") is None
    assert runs[1]["compile_cache"]["dir"] == str(cache) and runs[1]["compile_cache"]["graph_cache_misses"] > 0
    assert any(cache.rglob("*")), "nothing was written to the compile cache"
    assert runs[2]["compile_cache"]["graph_cache_hits"] > 0 and runs[2]["compile_cache"]["graph_cache_misses"] == 0
    with open_features(tmp_path / "eager.h5") as e, open_features(tmp_path / "first.h5") as a, \
            open_features(tmp_path / "second.h5") as b:
        assert list(e.keys()) == list(a.keys()) == list(b.keys())
        for k in e.keys():
            assert torch.allclose(torch.from_numpy(e[k]), torch.from_numpy(a[k]), atol=1e-4)
            assert torch.equal(torch.from_numpy(a[k]), torch.from_numpy(b[k]))


def test_live_tensor_bytes_on_a_known_allocation():
    """Hand-counted: 4000 + 8000 bytes, the first freed, then 8000 more while the second lives: peak 16000. Views,
    in-place results and views of held tensors are not new memory; held tensors count in `held`."""
    from s2cli.bench import peak_memory

    held = torch.zeros(100)

    def f():
        a = torch.empty(1000)
        b = torch.empty(2000)
        del a
        b[:10], b.view(20, 100).t(), b.add_(1), held[:5], held.view(10, 10)
        c = b + 1
        del b, c
        return torch.empty(10)  # the result counts while it is alive: 40 bytes, under the peak

    assert peak_memory(f, held=[held]) == {"held": 400, "working": 16000, "peak": 16400}


def test_reference_forward_matches_the_golden_outputs():
    """The reference's forward as bench times it gives the reference's golden outputs (master branch cases)."""
    from s2cli.bench import reference_forward

    cases = [n for n, c in GOLDEN["cases"].items() if c["branch"] == "master"]
    assert len(cases) == 5
    for name in cases:
        case, kw = GOLDEN["cases"][name], golden_kwargs(GOLDEN["cases"][name])
        model = ToyConv(TENSORS[f"{name}.weight"], TENSORS[f"{name}.bias"], case["stride"],
                        kw.get("output_shape", "bnc"), kw.get("num_prefix_token", 0))
        # the golden bar (1e-5): bit-exactness depends on the CPU's kernels (AVX512 here differs by ~7e-7)
        torch.testing.assert_close(reference_forward(model, TENSORS[f"{name}.input"], **kw), TENSORS[f"{name}.output"],
                                   atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def vit_l_memory():
    """LLaVA-1.5-S2's setting, counted without computing: CLIP ViT-L/14-336 (timm, random init on the meta
    device: shapes and lifetimes only), bf16, batch 32, scales 336, 672, 1008 (14 tiles per image)."""
    import timm

    from s2cli.bench import memory_figures

    with torch.device("meta"):
        m = timm.create_model("vit_large_patch14_clip_336", pretrained=False).eval().to(torch.bfloat16)
    x = torch.empty(32, 3, 1008, 1008, device="meta", dtype=torch.bfloat16)
    return memory_figures(m.forward_features, x, list(m.parameters()), img_sizes=[336, 672, 1008],
                          max_split_size=336, split_mode="resize", resize_output_to_idx=0, num_prefix_token=1,
                          output_shape="bnc", antialias=False)


@pytest.mark.slow
def test_chunked_s2_memory_is_below_unchunked_and_reference(vit_l_memory):
    r = vit_l_memory
    assert r["s2_chunked"]["peak"] < r["s2"]["peak"]
    assert r["s2_chunked"]["peak"] < r["reference_split_forward"]["peak"] < r["reference"]["peak"]
    assert r["single_scale"]["vs_single_scale"] == 1.0


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="target missed: 1.29x (the 1008 input, the 3x wider output and the 672 image "
                                       "of scale 2 are held beside the single-scale working set); see README Measured")
def test_chunked_s2_memory_within_1_2x_of_single_scale(vit_l_memory):
    assert vit_l_memory["s2_chunked"]["vs_single_scale"] <= 1.2


@pytest.mark.slow
def test_bench_host_quick_runs_and_reports_every_figure(tmp_path):
    """benchmarks/bench_host.py --quick on 6 images: the decode and write limits and the instant-device run (its
    CPU per image in total, main process, main thread and decode workers, img/s, MB/s, the cores' busy share, the
    shard's end steps), each positive; the `pair` and `loader` sections."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "bench_host.py"
    r = subprocess.run([sys.executable, str(script), "--quick", "--images", "6", "--json", str(tmp_path / "r.json"),
                        "--sections", "run,pair,loader"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| code | -j | img/s |" in r.stdout and "decode limit:" in r.stdout and "write limit:" in r.stdout
    got = json.loads((tmp_path / "r.json").read_text())
    [run] = got["runs"]
    assert run["images"] == 6 and run["failed"] == 0 and run["bytes"] > 6 * 576 * 3072 * 2
    for k in ("img_s", "mb_s", "ms_total", "ms_process", "ms_main_thread", "ms_children", "of_decode_limit"):
        assert run[k] > 0, k
    assert got["decode"]["ms_per_image"] > 0 and got["write"]["h5py_mb_s"] > 0
    assert run["threads_s"]["MainThread"] > 0 and run["minflt_self"] > 0  # the main process by thread, page faults
    assert "| code | -j | threads | page faults/img" in r.stdout
    assert 0 < run["box_busy_s"] <= run["box_s"]  # the cores' busy share during the run
    assert set(run["shard_end_s"]) == {"fsync_rename", "shard_record", "drop_cached"}  # each step timed, once per shard
    [pair] = got["pair"]
    assert len(pair["alone"]) == 1 and len(pair["two_at_once"]) == 2 and min(pair["two_at_once"]) > 0
    assert got["loader"]["items"] == 400 and got["loader"]["ms_workers"] > 0 and got["loader"]["ms_run"] > 0


@pytest.mark.slow
def test_bench_gpu_script_smoke_runs_on_the_cpu():
    """benchmarks/bench_gpu.py, the one command a GPU session runs, in --smoke (tiny models, 4 small images, CPU):
    its correctness checks pass and it prints the table last."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "bench_gpu.py"
    r = subprocess.run([sys.executable, str(script), "--smoke", "--device", "cpu"], capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "| P1 bf16 vs fp32 |" in out and "| P2 bf16 --decode torch vs fp32 pil |" in out and "| NO |" not in out
    assert "| P1 llava-1.5-s2, bf16, eager | 4 |" in out and "--decode torch | 4 |" in out
    assert "| single_scale | " in out and "| s2_chunked | " in out
    assert out.rstrip().splitlines()[-1].startswith("| reference_split_forward | ")


def test_main_thread_stages_and_waits_add_up_to_the_run(cli, image_dir, tmp_path):
    """Every second of the main thread is in stage_seconds or wait_seconds: its stages (the Extractor's, collect,
    commit, and `other` for the loop itself) and its waits add up to the run's seconds, `other` never negative
    (a second counted twice would make it so)."""
    r = invoke_json(cli, "extract", str(image_dir), *TINY, "-o", str(tmp_path / "o") + "/", "--shard-size", "3",
                    "-b", "2", "-j", "1", "--json", "-q")
    st, wt = r["stage_seconds"], r["wait_seconds"]
    main = sum(st[k] for k in ("preprocess", "forward", "check", "collect", "commit", "other")) + sum(wt.values())
    assert st["other"] >= 0 and main == pytest.approx(r["seconds"], abs=0.01), (st, wt, r["seconds"])
    assert st["collect"] > 0 and st["commit"] > 0 and st["check"] >= 0, st


def test_shards_are_hashed_and_marked_on_the_writer_thread(monkeypatch, image_dir, tmp_path):
    """A folder shard's end (serialisation, rename, digest, done marker) runs on its writer thread, not the main
    thread; the markers still hold each shard's size and digest, and a marker is written only once its shard is
    in place."""
    import threading

    import s2cli
    from s2cli import run as run_mod
    from s2cli.outdir import OutputDir, marker_name, shard_digest

    seen = []
    record = run_mod.shard_record

    def spy(path):
        seen.append((threading.current_thread() is threading.main_thread(), path.is_file(),
                     (path.parent / marker_name(path.name)).exists()))
        return record(path)

    monkeypatch.setattr(run_mod, "shard_record", spy)
    out = tmp_path / "o"
    s = s2cli.extract(str(image_dir), str(out) + "/", model="timm:test_vit", random_init=True, layer=2,
                      shard_size=2, batch_size=1, workers=0)
    assert s.num_images == 4 and s.shards_written == 2 and len(seen) == 2
    assert seen == [(False, True, False)] * 2  # off the main thread, the shard in place, no marker yet
    for m in OutputDir(out).markers():
        assert m["xxh3_128"] == shard_digest(out / m["shard"]) and m["bytes"] == (out / m["shard"]).stat().st_size
