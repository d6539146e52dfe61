"""`s2 bench` and the run's stage timing: fields and sane values on tiny random-init models (no timing asserted),
FLOPs counted by torch equal to the backbone's formula, --compile wired into the run and matching eager."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from s2cli.backbones import load_backbone, resolve
from s2cli.bench import bench, synthetic_jpegs
from s2cli.config import ExtractConfig, resolve_config

from conftest import invoke_json

TINY = ("-m", "timm:vit_tiny_patch16_224", "--random-init", "--layer", "2")


def test_bench_json_fields_and_sane_values(cli):
    r = invoke_json(cli, "bench", *TINY, "--images", "4", "-b", "2", "-j", "0", "--image-size", "320x240", "--json")
    assert r["images"] == 4 and r["warmup_images"] == 2 and r["device"] == "cpu" and r["compile"] is False
    assert r["e2e_img_s"] > 0 and r["model_only_img_s"] > 0 and r["e2e_over_model_only"] > 0
    assert r["flops_per_image"] > 0 and r["matmul_ceiling_flops_per_s"] > 0 and 0 < r["mfu_model_only"]
    st, wt = r["stage_seconds"], r["wait_seconds"]
    assert set(st) == {"read", "decode", "fit", "preprocess", "forward", "write"} and set(wt) == {"decode", "write"}
    assert all(v >= 0 for v in [*st.values(), *wt.values()]) and st["forward"] > 0 and st["decode"] > 0 and st["write"] > 0
    # with -j 0 read/decode/fit run on the main thread too: its stages and waits fit inside the wall time
    main = st["read"] + st["decode"] + st["fit"] + st["preprocess"] + st["forward"] + wt["write"]
    assert main <= r["e2e_seconds"]
    assert r["peak_host_bytes"] > 2 ** 20 and r["peak_gpu_bytes"] is None


def test_bench_flops_equal_the_formula():
    """A tiny CLIP (the alias's architecture at toy width): torch's flop counter over one image (2 scales, 5
    tiles) equals flops_per_tile's formula summed over the tiles."""
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
            "image_size": 224, "patch_size": 16}
    cfg = dataclasses.replace(resolve("clip-vit-b-16"), channels=32, hf_config=tiny)
    res = resolve_config(ExtractConfig(input="synthetic", output="x.h5", model="clip-vit-b-16", random_init=True,
                                       batch_size=2, workers=0), cfg)
    r = bench(res, synthetic_jpegs(2, (240, 320)), load_backbone(cfg, random_init=True), "synthetic")
    assert r["flops_per_image_formula"] == 5 * cfg.flops_per_tile((224, 224))
    assert r["flops_per_image"] == pytest.approx(r["flops_per_image_formula"], rel=1e-9)


def test_extract_summary_has_stage_timing(cli, image_dir, tmp_path):
    r = invoke_json(cli, "extract", str(image_dir), *TINY, "-o", tmp_path / "o.h5", "-j", "1", "--json", "-q")
    assert r["compile"] is False and r["num_images"] > 0
    assert set(r["stage_seconds"]) == {"read", "decode", "fit", "preprocess", "forward", "write"}
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
    here: inductor takes ~90 s to compile a ViT on a 2-core CPU (measured with benchmarks/bench_p3.py --compile)."""
    from s2cli.config import build_config
    from s2cli.pipeline import Extractor

    cfg = build_config(str(tmp_path), str(tmp_path / "o.h5"), model="timm:vit_tiny_patch16_224", random_init=True,
                       compile=True)
    res = resolve_config(cfg, resolve(cfg.model))
    bb = load_backbone(res.backbone, random_init=True)
    eager = bb.eager_forward
    Extractor(res, bb, torch.device("cpu"), torch.float32)
    assert bb.compiled and bb.eager_forward is eager and bb._fn is not eager
    assert dict(res.user.provenance)["compile"] == "flag" and '"compile": true' in res.to_json()


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
    assert out.rstrip().splitlines()[-1].startswith("| S² 1,2,3, --max-tiles-per-call 32 |")
