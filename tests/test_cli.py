"""`s2 extract` / `s2 inspect` / `s2 models` end to end, against features computed independently in the test."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import EXAMPLES, MODEL, invoke_json, write_image
from s2cli import multiscale_forward, open_features
from s2cli.backbones import load_backbone, resolve


def oracle_input(path, side, mean, std, fit="crop"):
    """CLIP-style preprocessing written out: shortest edge to `side` (PIL bicubic), center crop, normalize."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    if fit == "crop":
        nw, nh = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
        im = im.resize((nw, nh), Image.BICUBIC)
        top, left = (nh - side) // 2, (nw - side) // 2
        im = im.crop((left, top, left + side, top + side))
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_round_trip_tiny_timm_vit(cli, image_dir, tmp_path):
    """timm's test_vit (160 px, patch 16, 64 channels, a CLS token): the smallest ViT timm has."""
    out = tmp_path / "vit.h5"
    summary = invoke_json(cli, "extract", image_dir, "-m", "timm:test_vit", "--random-init", "--seed", 3,
                          "--scales", "1,2", "-o", out, "-j", 0, "-b", 3, "--json")
    assert summary["num_images"] == 4 and summary["num_failed"] == 0
    bb = load_backbone(resolve("timm:test_vit"), random_init=True, seed=3)
    with open_features(out) as ff:
        assert list(ff) == ["a", "b", "d", "sub/c"]
        for key, name in [("a", "a.png"), ("sub/c", "sub/c.PNG")]:
            x = oracle_input(image_dir / name, 320, bb.cfg.mean, bb.cfg.std)
            with torch.no_grad():
                expect = multiscale_forward(bb, x, img_sizes=[160, 320], max_split_size=160, num_prefix_token=1)[0]
            assert ff[key].shape == (1 + 100, 64 * 2)
            np.testing.assert_allclose(ff[key], expect.numpy(), atol=1e-4, rtol=1e-4)
        meta = ff.meta("b")
        assert meta["orig_hw"] == [64, 48] and meta["grid_hw"] == [10, 10] and meta["num_prefix_tokens"] == 1
        assert meta["img_sizes"] == [[160, 160], [320, 320]] and meta["split_mode"] == "resize"
        assert ff.attrs["weights"] == "random-init(seed=3)"




def test_round_trip_tiny_hf_clip(cli, image_dir, tmp_path, clip_dir):
    path, ref = clip_dir
    out = tmp_path / "clip.h5"
    invoke_json(cli, "extract", image_dir, "-m", f"hf:{path}", "--scales", "1,2,3", "-o", out, "-j", 0, "--json")
    from s2cli.backbones import CLIP_MEAN, CLIP_STD

    def model(x):
        return ref(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]

    with open_features(out) as ff:
        x = oracle_input(image_dir / "b.jpg", 96, CLIP_MEAN, CLIP_STD)
        with torch.no_grad():
            expect = multiscale_forward(model, x, scales=[1 / 3, 2 / 3, 1], max_split_size=32)[0]
        assert ff["b"].shape == (16, 96)
        np.testing.assert_allclose(ff["b"], expect.numpy(), atol=1e-4, rtol=1e-4)
        assert ff.attrs["model"] == f"hf:{path}" and ff.attrs["layer"] == -2


def test_workers_and_batches_do_not_change_features(cli, image_dir, tmp_path, clip_dir):
    path, _ = clip_dir
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    invoke_json(cli, "extract", image_dir, "-m", f"hf:{path}", "-o", a, "-j", 0, "-b", 1, "--json")
    invoke_json(cli, "extract", image_dir, "-m", f"hf:{path}", "-o", b, "-j", 2, "-b", 4, "--max-tiles-per-call", 3, "--json")
    with open_features(a) as fa, open_features(b) as fb:
        assert list(fa) == list(fb)
        for k in fa:
            np.testing.assert_allclose(fa[k], fb[k], atol=1e-5, rtol=1e-5)


def test_fit_keep_stores_ragged_grids(cli, image_dir, tmp_path, clip_dir):
    path, _ = clip_dir
    out = tmp_path / "keep.h5"
    invoke_json(cli, "extract", image_dir, "-m", f"hf:{path}", "--fit", "keep", "-o", out, "-j", 0, "--json")
    plan = invoke_json(cli, "extract", image_dir, "-m", f"hf:{path}", "--fit", "keep", "--dry-run", "--json")
    with open_features(out) as ff:
        assert ff.ragged and ff.feature_shape == [None, 64]
        for im in plan["images"]:
            assert list(ff[im["key"]].shape) == im["output_shape"]
            rows, cols = ff.meta(im["key"])["grid_hw"]
            assert rows * cols == im["output_shape"][0]
        # a wide image keeps its aspect: d is 30x70 -> 32x74 at scale 1 -> 1x3 tiles -> 4x12 tokens
        assert ff.meta("d")["grid_hw"] == [4, 12]


def test_dry_run_reports_llava_s2_plan_without_building_a_model(cli, monkeypatch):
    import s2cli.backbones as backbones

    def forbidden(*a, **k):
        raise AssertionError("dry-run must not load a model")

    monkeypatch.setattr(backbones, "load_backbone", forbidden)
    monkeypatch.setattr(backbones.resolve("clip-vit-l-336").kind, "build", forbidden)
    plan = invoke_json(cli, "extract", EXAMPLES, "--model", "clip-vit-l-336", "--random-init", "--scales", "1,2,3",
                       "--dry-run", "--json")
    assert len(plan["images"]) == 8
    for im in plan["images"]:
        assert im["output_shape"] == [576, 3072] and im["tiles"] == 14 and im["grids"] == [[1, 1], [2, 2], [3, 3]]
        assert set(im) >= {"key", "orig_hw", "tiles", "grids", "output_shape"}
    assert plan["total_tiles"] == 112 and plan["bytes_per_image"] == 576 * 3072 * 4
    chelsea = next(i for i in plan["images"] if i["key"] == "chelsea")
    assert chelsea["orig_hw"] == [300, 451]


def test_key_collisions_are_listed_before_work(cli, tmp_path):
    d = tmp_path / "dup"
    write_image(d / "x.jpg", (8, 8), 0)
    write_image(d / "x.png", (8, 8), 1)
    write_image(d / "y.png", (8, 8), 2)
    r = cli("extract", d, "--random-init", "-o", tmp_path / "o.h5")
    assert r.exit_code == 2
    assert "x: x.jpg, x.png" in r.stderr and "\n" not in r.stderr.strip()
    assert not (tmp_path / "o.h5").exists()


def test_corrupt_file_is_recorded_not_fatal(cli, image_dir, tmp_path, clip_dir):
    path, _ = clip_dir
    clean = tmp_path / "clean.h5"
    invoke_json(cli, "extract", image_dir, "-m", f"hf:{path}", "-o", clean, "-j", 0, "--json")
    (image_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    write_image(image_dir / "trunc.png", (40, 40), 7)
    data = (image_dir / "trunc.png").read_bytes()
    (image_dir / "trunc.png").write_bytes(data[: len(data) // 2])
    out = tmp_path / "dirty.h5"
    summary = invoke_json(cli, "extract", image_dir, "-m", f"hf:{path}", "-o", out, "-j", 2, "-b", 2, "--json")
    assert summary["num_images"] == 4 and summary["num_failed"] == 2
    report = invoke_json(cli, "inspect", out, "--json")
    failed = {f["key"]: f for f in report["failed"]}
    assert set(failed) == {"broken", "trunc"}
    assert failed["broken"]["stage"] == "decode" and failed["broken"]["source"].endswith("broken.jpg")
    assert failed["broken"]["error_class"] and failed["broken"]["error"]
    with open_features(clean) as fc, open_features(out) as fd:
        assert list(fd) == list(fc)  # the good images, each under its own key, unchanged
        for k in fc:
            np.testing.assert_array_equal(fc[k], fd[k])


def test_inspect_json_fields(cli, tmp_path, image_dir):
    out = tmp_path / "e.h5"
    invoke_json(cli, "extract", image_dir, "--random-init", "--scales", "1,2", "-o", out, "-j", 0, "--json")
    info = invoke_json(cli, "inspect", out, "--json")
    assert info["num_images"] == 4 and info["num_failed"] == 0 and info["failed"] == []
    assert info["model"] == "efficientnet-lite0" and info["weights"] == "random-init(seed=0)"
    assert info["scales"] == [1.0, 2.0] and info["img_sizes"] == [224, 448] and info["max_split_size"] == 224
    assert info["split_mode"] == "resize" and info["num_prefix_tokens"] == 0 and info["output_shape"] == "bchw"
    assert info["feature_shape"] == [49, 2560] and info["dtype"] == "float32"
    one = invoke_json(cli, "inspect", out, "--key", "sub/c", "--json")
    assert set(one) >= {"key", "source", "orig_hw", "grid_hw", "img_sizes", "num_prefix_tokens", "split_mode",
                        "shape", "mean", "std", "finite"}
    assert one["key"] == "sub/c" and one["shape"] == [49, 2560] and one["finite"] is True
    with open_features(out) as ff:
        assert one["mean"] == pytest.approx(float(np.asarray(ff["sub/c"], np.float64).mean()))
    r = cli("inspect", out, "--key", "nope")
    assert r.exit_code == 2 and "nope" in r.stderr


def test_float16_storage(cli, tmp_path, image_dir):
    out = tmp_path / "h.h5"
    invoke_json(cli, "extract", image_dir, *MODEL, "-o", out, "-j", 0, "--dtype", "float16", "--json")
    with open_features(out) as ff:
        assert ff.dtype == "float16" and ff["a"].dtype == np.float16


@pytest.mark.parametrize("args, words", [
    (["--model", "nope"], ["unknown model", "nope"]),
    (["--scales", "1,-2"], ["--scales", "-2"]),
    (["--scales", "a,b"], ["--scales", "a,b"]),
    (["--split-mode", "tile"], ["--split-mode", "tile"]),
    (["--fit", "zoom"], ["--fit", "zoom"]),
    (["--resize-output-to-idx", "3"], ["--resize-output-to-idx", "3"]),
    (["--scales", "1", "--img-sizes", "224"], ["--scales", "--img-sizes"]),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], ["--device"]),
])
def test_bad_usage_exits_2_in_one_line(cli, image_dir, tmp_path, args, words):
    r = cli("extract", image_dir, "-o", tmp_path / "x.h5", *args)
    assert r.exit_code == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "Fix:" in line
    for w in words:
        assert w in line
    assert not (tmp_path / "x.h5").exists()


def test_missing_input_and_existing_output(cli, tmp_path, image_dir):
    r = cli("extract", tmp_path / "nowhere")
    assert r.exit_code == 2 and "does not exist" in r.stderr
    out = tmp_path / "exists.h5"
    out.write_text("keep me")
    r = cli("extract", image_dir, "--random-init", "-o", out)
    assert r.exit_code == 2 and "--overwrite" in r.stderr and out.read_text() == "keep me"


def test_output_is_atomic(cli, tmp_path, image_dir, monkeypatch):
    from s2cli.formats.hdf5 import HDF5Sink

    def explode(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(HDF5Sink, "_finish", explode)
    r = cli("extract", image_dir, *MODEL, "-o", tmp_path / "never.h5", "-j", 0)
    assert r.exit_code != 0
    assert os.listdir(tmp_path) == ["imgs"]  # neither the final file nor a temporary one is left


def test_default_output_name_is_printed(cli, tmp_path, image_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("extract", image_dir, "--random-init", "-j", 0, "--limit", 1, "-q")
    assert r.exit_code == 0, r.stderr
    assert "imgs.efficientnet-lite0.h5" in r.stderr and (tmp_path / "imgs.efficientnet-lite0.h5").is_file()


def test_models_lists_aliases(cli):
    rows = invoke_json(cli, "models", "--json")
    by = {r["name"]: r for r in rows}
    assert by["clip-vit-l-336"]["layer"] == -2 and by["dinov2-l"]["num_prefix_tokens"] == 1


@pytest.mark.slow
def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "s2cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == __import__("s2cli").__version__


def test_saved_config_round_trips(cli, tmp_path, image_dir):
    out = tmp_path / "c.h5"
    invoke_json(cli, "extract", image_dir, "--random-init", "--seed", 4, "-o", out, "-j", 0, "--json")
    with open_features(out) as ff:
        cfg = ff.config
    assert cfg["seed"] == 4 and cfg["random_init"] is True and cfg["img_sizes"] == [224, 448]
    assert cfg["backbone"]["source"] == "efficientnet_lite0" and json.dumps(cfg)


def test_model_stage_failure_isolates_the_bad_image(cli, tmp_path, image_dir, monkeypatch):
    """A forward that fails for one image records that image (stage "model"); its batch-mates keep their features."""
    import s2cli.extractor as extractor

    clean = tmp_path / "clean.h5"
    invoke_json(cli, "extract", image_dir, *MODEL, "-o", clean, "-j", 0, "-b", 4, "--json")
    Image.new("RGB", (20, 20), (7, 7, 7)).save(image_dir / "poison.png")
    original = extractor.Extractor.submit

    def submit(self, images, sizes):
        if (torch.stack(list(images)) == 7).flatten(1).all(dim=1).any():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return original(self, images, sizes)

    monkeypatch.setattr(extractor.Extractor, "submit", submit)
    out = tmp_path / "dirty.h5"
    summary = invoke_json(cli, "extract", image_dir, *MODEL, "-o", out, "-j", 0, "-b", 5, "--json")
    assert summary["num_images"] == 4 and summary["num_failed"] == 1
    with open_features(out) as fd, open_features(clean) as fc:
        assert [f["key"] for f in fd.failures] == ["poison"] and fd.failures[0]["stage"] == "model"
        assert "illegal memory access" in fd.failures[0]["error"]
        assert list(fd) == list(fc)
        for k in fc:
            np.testing.assert_allclose(fd[k], fc[k], atol=1e-5, rtol=1e-5)


def test_bf16_compute_is_close_to_fp32(cli, tmp_path, image_dir, clip_dir):
    path, _ = clip_dir
    a, b = tmp_path / "fp32.h5", tmp_path / "bf16.h5"
    invoke_json(cli, "extract", image_dir, "-m", f"hf:{path}", "-o", a, "-j", 0, "--json")
    invoke_json(cli, "extract", image_dir, "-m", f"hf:{path}", "-o", b, "-j", 0, "--precision", "bf16", "--json")
    with open_features(a) as fa, open_features(b) as fb:
        assert fb.config["precision"] == "bf16"
        for k in fa:
            assert np.abs(fa[k] - fb[k]).max() < 0.1 * np.abs(fa[k]).max()
            assert not np.array_equal(fa[k], fb[k])


def test_a_run_where_every_sample_failed_exits_1(cli, tmp_path):
    (tmp_path / "l.txt").write_text("not/there.jpg\nalso/missing.png\n")
    out = tmp_path / "o.h5"
    r = cli("extract", tmp_path / "l.txt", "-m", "timm:resnet18", "--random-init", "-o", out, "-j", 0)
    assert r.exit_code == 1, r.stderr + r.stdout
    assert "every sample failed (2)" in r.stderr and "list's folder" in r.stderr
    with open_features(out) as ff:  # the failure records are kept
        assert len(ff) == 0


# ---- the face: one error prefix, -o wherever a command writes, entries counted as entries -------------------------
@pytest.mark.parametrize("args", [
    ["export", "feats/", "--nope"],                       # click's usage error
    ["extract", "imgs/", "--batch-size", "x"],            # click's bad value
    ["recipes", "show", "nope"],                          # an S2Error
    ["inspect", "nowhere.h5"],
])
def test_every_error_is_one_line_with_one_prefix(cli, tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    r = cli(*args)
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert r.stderr.startswith("error: ") and "\n" not in r.stderr.strip() and "Traceback" not in r.stderr, r.stderr


def _tiny_h5(cli, d, out, *extra):
    r = cli("extract", d, "-m", "timm:test_resnet", "--random-init", "--img-sizes", "64", "--max-split-size", "64",
            "-j", 0, "-o", out, *extra)
    assert r.exit_code == 0, r.stderr
    return r


def test_export_takes_o_and_its_image_paths_open_from_anywhere(cli, tmp_path, monkeypatch):
    """`s2 export feats -o emb/` as every writing command takes -o; `image_path` is absolute: a source recorded
    relative to the folder the extraction ran in (`imgs/a.png`) is joined to that folder (`source_root`)."""
    import pyarrow.parquet as pq

    run = tmp_path / "run"
    write_image(run / "imgs" / "a.png", (40, 60), 1)
    write_image(run / "imgs" / "b.png", (30, 50), 2)
    monkeypatch.chdir(run)
    _tiny_h5(cli, "imgs", "o.h5")
    with open_features(run / "o.h5") as ff:
        assert ff.meta("a")["source"] == "imgs/a.png" and ff.attrs["source_root"] == str(run)
    monkeypatch.chdir(tmp_path)  # exported from elsewhere
    r = cli("export", run / "o.h5", "-o", "emb/", "--json")
    assert r.exit_code == 0, r.stderr
    paths = pq.read_table(tmp_path / "emb" / "metadata" / "metadata_0.parquet").column("image_path").to_pylist()
    assert paths == [str(run / "imgs" / "a.png"), str(run / "imgs" / "b.png")] and all(map(os.path.isfile, paths))
    assert cli("export", run / "o.h5", "emb2/").exit_code == 0  # the positional OUT still works
    for args in ([], ["a/", "-o", "b/"]):
        r = cli("export", run / "o.h5", *args)
        assert r.exit_code == 2 and "OUT or as -o" in r.stderr, r.stderr


def test_export_image_path_rule():
    from s2cli.export import image_path

    assert image_path("imgs/a.png", "/data/run") == "/data/run/imgs/a.png"
    assert image_path("/abs/a.png", "/data/run") == "/abs/a.png"
    assert image_path("s3://b/a.png", "/data/run") == "s3://b/a.png"
    assert image_path("shards/0.tar#k", "/r") == "/r/shards/0.tar#k"
    assert image_path("imgs/a.png", None) == "imgs/a.png"  # written before the root was recorded: as stored


def test_runs_count_entries(cli, tmp_path):
    write_image(tmp_path / "one" / "a.png", (40, 60), 1)
    r = _tiny_h5(cli, tmp_path / "one", tmp_path / "o.h5")
    assert "1 entry, 0 failed" in r.stderr and "images" not in r.stderr
    r = _tiny_h5(cli, tmp_path / "one", tmp_path / "d/", "--dry-run")
    assert "1 entry, " in r.stdout


def test_viz_features_shows_what_the_backbone_saw(cli, tmp_path):
    """A wide photo extracted with the centre crop: its panel is the crop the backbone saw (the pixels of
    `s2cli.views`), not the whole photo; with --fit keep, the whole photo."""
    import s2cli
    from s2cli.viz import LABEL

    img = write_image(tmp_path / "imgs" / "w.png", (40, 120), 7)
    for fit in ("crop", "keep"):
        out = tmp_path / f"{fit}.h5"
        _tiny_h5(cli, tmp_path / "imgs", out, "--fit", fit)
        png = tmp_path / f"{fit}.png"
        panels = invoke_json(cli, "viz", "features", out, "--key", "w", "-o", png, "--json")
        (view,) = s2cli.views(img, model="timm:test_resnet", img_sizes=(64,), max_split_size=64, fit=fit)
        w, h = panels[0]["size"]
        assert (w == h) is (fit == "crop")
        want = Image.fromarray(view.transpose(1, 2, 0)).resize((w, h), Image.BILINEAR)
        x = panels[0]["x"]
        got = Image.open(png).convert("RGB").crop((x, LABEL, x + w, LABEL + h))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
