"""The library core: `s2cli.extract` and its Summary, planning and `views` without torch, `s2 viz plan` showing
exactly what the backbone receives, the strategy registry, the one rule for a complete unit, and the code's shape
(function length, no strategy checks outside the registry)."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

import s2cli
from conftest import NO_TORCH
from s2cli.inputs.decode import load_rgb
from s2cli.inputs.samples import Sample
from s2cli.inputs.units import Unit
from s2cli.outdir import unit_complete
from s2cli.run import parts_of
from s2cli.strategies import strategy_of

ROOT = Path(__file__).parent.parent
PKG = ROOT / "s2cli"
MODULES = sorted(PKG.rglob("*.py"))  # every module, subpackages (commands/, ...) included



def _rgba(path: Path) -> Path:
    """Half-transparent colors: alpha composited on white by the extraction, dropped onto black by a plain convert."""
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, size=(60, 90, 4), dtype=np.uint8)
    a[..., 3] = np.linspace(0, 255, 90, dtype=np.uint8)[None, :]
    Image.fromarray(a, "RGBA").save(path)
    return path


def _gray16(path: Path) -> Path:
    """16-bit grayscale: scaled to 8 bits by the extraction, clipped to white by a plain convert."""
    a = (np.arange(70 * 50, dtype=np.uint32).reshape(70, 50) * 18).astype(np.uint16)
    Image.fromarray(a).save(path)  # uint16: mode I;16
    return path


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["extract", "{img}", "--recipe", "llava-1.5-s2", "--random-init", "--dry-run", "--json"],
    ["extract", "{img}", "--recipe", "llava-next-anyres", "--random-init", "--dry-run", "--json"],
    ["viz", "plan", "{img}/a.png", "--recipe", "llava-1.5-s2", "-o", "{tmp}/p.png", "--json"],
    ["viz", "plan", "{img}/a.png", "-m", "clip-vit-b-16", "--strategy", "internvl", "-o", "{tmp}/q.png", "--json"],
])
def test_dry_run_and_viz_plan_run_without_torch(tmp_path, argv):
    img = tmp_path / "imgs"
    img.mkdir()
    _rgba(img / "a.png")
    _gray16(img / "b.png")
    args = [a.format(img=img, tmp=tmp_path) for a in argv]
    r = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out  # a plan with images, or the panels drawn


@pytest.mark.slow
def test_the_blocker_really_blocks_torch(tmp_path):
    """The test above would fail if the command imported torch: a real run (which needs torch) fails under it."""
    img = tmp_path / "imgs"
    img.mkdir()
    _rgba(img / "a.png")
    r = subprocess.run([sys.executable, "-c", NO_TORCH, "extract", str(img), "-m", "timm:test_resnet", "--random-init",
                        "-o", str(tmp_path / "o.h5"), "-q"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "torch is blocked" in r.stderr


@pytest.mark.parametrize("make", [_rgba, _gray16])
@pytest.mark.parametrize("options", [{"model": "timm:test_resnet", "img_sizes": (48, 96), "max_split_size": 48},
                                     {"model": "timm:test_vit", "strategy": "internvl", "max_tiles": 4}])
def test_views_and_viz_plan_are_what_the_backbone_receives(tmp_path, monkeypatch, make, options):
    """The uint8 images the Extractor is handed in a real run equal `s2cli.views`, and `s2 viz plan`'s panels are
    those views (resized for the picture only). The old viz decode (exif_transpose + convert) differs here."""
    import s2cli.extractor as extractor
    from s2cli.viz import plan_figure

    d = tmp_path / "imgs"
    d.mkdir()
    path = make(d / "x.png")
    seen: list[np.ndarray] = []
    submit, strategy = extractor.Extractor.submit, extractor.Extractor.strategy_features

    def spy_submit(self, images, plan):
        seen.extend(np.asarray(im) for im in images)
        return submit(self, images, plan)

    def spy_strategy(self, recs):
        seen.extend(np.asarray(a) for r in recs for a in r.pixels)
        return strategy(self, recs)

    monkeypatch.setattr(extractor.Extractor, "submit", spy_submit)
    monkeypatch.setattr(extractor.Extractor, "strategy_features", spy_strategy)
    s2cli.extract(str(d), str(tmp_path / "o.h5"), random_init=True, workers=0, **options)
    res = s2cli.settings(str(d), **options)
    views = s2cli.views(path, res)
    assert len(seen) == len(views) and all(np.array_equal(a, b) for a, b in zip(seen, views))

    fig, panels = plan_figure(path, res)
    with Image.open(path) as raw:
        naive = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
    pictures = strategy_of(res).pictures(res, strategy_of(res).plan(res, _orig_hw(path)), views)
    shown = 0
    for p, (pic, label, _) in zip(panels, pictures):
        assert p.label == label
        if not any(pic is v for v in views):
            continue  # an S² scale below the largest: resized for the picture, as the engine resizes the tensor
        want = np.asarray(Image.fromarray(pic.transpose(1, 2, 0)).resize(p.size, Image.BILINEAR))
        got = np.asarray(fig.crop((p.x, p.y, p.x + p.size[0], p.y + p.size[1])))
        lines = Image.new("L", p.size, 0)  # the tile outlines drawn over the panel, as viz draws them
        for t, left, b, r in p.boxes:
            ImageDraw.Draw(lines).rectangle((round(left * p.scale), round(t * p.scale), round(r * p.scale) - 1,
                                             round(b * p.scale) - 1), outline=255, width=2)
        under = np.asarray(lines) == 0
        assert under.mean() > 0.5 and np.array_equal(got[under], want[under]), p.label
        shown += 1
    assert shown >= len(views) if strategy_of(res).name != "s2" else shown == 1
    with open(path, "rb") as fh:
        decoded, _ = load_rgb(fh)
    assert not np.array_equal(naive, np.asarray(decoded))  # the picture used to show other pixels


def _orig_hw(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.height, im.width


def test_extract_returns_a_summary_and_writes_what_the_cli_writes(tmp_path, image_dir, cli):
    opts = ["-m", "timm:test_resnet", "--random-init", "--img-sizes", "64,128", "--max-split-size", "64", "-j", "0"]
    s = s2cli.extract(str(image_dir), str(tmp_path / "lib/"), model="timm:test_resnet", random_init=True,
                      img_sizes=(64, 128), max_split_size=64, workers=0)
    from s2cli.run import Summary

    assert isinstance(s, Summary)
    d = s.to_dict()
    assert d["num_images"] == 4 and d["complete"] is True and "rank" not in d and d["shards_written"] == 1
    r = cli("extract", image_dir, "-o", tmp_path / "cli/", *opts, "--json", "-q")
    assert r.exit_code == 0, r.stderr
    assert set(json.loads(r.stdout)) == set(d)
    with s2cli.open_features(tmp_path / "lib") as a, s2cli.open_features(tmp_path / "cli") as b:
        assert list(a) == list(b)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_summary_of_a_file_has_no_folder_fields(tmp_path, image_dir):
    s = s2cli.extract(str(image_dir), str(tmp_path / "o.h5"), model="timm:test_resnet", random_init=True,
                      img_sizes=(64,), max_split_size=64, workers=0)
    assert set(s.to_dict()) == {"output", "num_images", "num_failed", "seconds", "images_per_s", "weights", "device",
                                "compile", "stage_seconds", "wait_seconds"}
    assert s["num_images"] == s.num_images == 4 and not s.nothing_extracted


def test_plan_is_the_dry_run(image_dir):
    p = s2cli.plan(str(image_dir), recipe="llava-1.5-s2")
    assert p["num_images"] == 4 and {tuple(map(tuple, i["grids"])) for i in p["images"]} == {((1, 1), (2, 2), (3, 3))}
    assert all(i["output_shape"] == [576, 3072] for i in p["images"])


# ---- pure decisions ---------------------------------------------------------------------------------------------
def _unit(size):
    return Unit(0, "u", [Sample(str(i), f"/x/{i}.jpg") for i in range(size)]) if size is not None else Unit(0, "t", url="t.tar")


@pytest.mark.parametrize("size, parts, last, complete", [
    (10, [0, 1], None, False), (10, [0, 1, 2], None, True), (9, [0, 1, 2], None, True), (0, [0], None, True),
    (0, [], None, False), (None, [0, 1], None, False), (None, [0, 1], 1, True), (None, [1], 1, False),
    (None, [0, 2], 2, False),
])
def test_unit_complete(size, parts, last, complete):
    """A listed unit is complete with ceil(size / shard_size) parts (at least one); a tar once the marker of its
    last part is there and every part before it."""
    markers = [{"part": p, "last_part": p == last} for p in parts]
    assert unit_complete(markers, parts_of(_unit(size), shard_size=4)) is complete


def test_every_strategy_is_one_record_in_the_registry():
    from s2cli.strategies import STRATEGIES, strategy_of

    assert list(STRATEGIES) == ["s2", "dynamic-s2", "anyres", "internvl", "native", "dual"]
    for name, record in STRATEGIES.items():
        res = s2cli.settings("x/", model="dinov2-l", strategy=name,
                             **({"img_sizes": (224, 448, 672)} if name == "dynamic-s2" else {}))
        assert strategy_of(res) is record and record.summary
        entry, inputs = record.plan_entry(res, (300, 500))
        assert entry["tiles"] == sum(n for _, n in inputs) > 0
        assert ("strategy" in res.to_dict()) is (name != "s2")


def test_no_code_outside_the_registry_asks_which_strategy_runs():
    pattern = re.compile(r"strategy(_cfg)?\s*(is|==|!=|\bin\b)|\"s2\"\s*(==|!=)|(==|!=)\s*\"s2\"|fit\.strategy\s+is")
    hits = [f"{p.relative_to(PKG)}:{i}: {line.strip()}" for p in MODULES if p.name != "strategies.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_no_function_body_over_80_lines():
    """Bodies after the docstring (a CLI command's parameter list is its option table, not counted)."""
    long = []
    for p in MODULES:
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = n.body[1:] if ast.get_docstring(n) and len(n.body) > 1 else n.body
                if n.end_lineno - body[0].lineno + 1 > 80:
                    long.append(f"{p.relative_to(PKG)}:{n.name} ({n.end_lineno - body[0].lineno + 1} lines)")
    assert not long, long


def test_the_code_checks_read_the_subpackages_too():
    assert {"cli.py", "commands/extract.py", "commands/options.py"} <= {p.relative_to(PKG).as_posix() for p in MODULES}


# ---- outputs written before the core was rebuilt (s2cli 0.1.0 at d9e7ddb, the commands below) -------------------
OLD = Path(__file__).parent / "data" / "written-by-0.1.0"
OLD_ARGS = ["-m", "timm:test_resnet", "--random-init", "--img-sizes", "64,128", "--max-split-size", "64", "-j", "0",
            "--shard-size", "2"]  # out/ was: s2 extract imgs -o out/ OLD_ARGS; old.h5: --img-sizes 64;
# old.safetensors: --strategy dual --img-sizes 128 --pool mean


@pytest.mark.parametrize("name", ["out", "old.h5", "old.safetensors"])
def test_outputs_written_before_open_and_inspect(cli, name):
    r = cli("inspect", OLD / name, "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["num_images"] == 3 and info["model"] == "timm:test_resnet"
    with s2cli.open_features(OLD / name) as ff:
        assert sorted(ff) == ["a", "b", "c"] and ff["a"].shape[0] > 0 and ff.meta("b")["orig_hw"] == [64, 48]


def test_a_folder_written_before_resumes_and_the_same_settings_give_the_same_features(cli, tmp_path, monkeypatch):
    """The resume check compares the new flat config with the one saved by 0.1.0 (which also held the retired
    backbone.extra_prefix): the same command is accepted (nothing left to do), another setting is refused, and a
    fresh run of the same command computes the same features."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(OLD / "imgs", "imgs")
    shutil.copytree(OLD / "out", "out")
    r = cli("extract", "imgs", "-o", "out/", *OLD_ARGS, "--json", "-q")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["num_images"], s["resumed_images"], s["complete"]) == (0, 3, True)
    r = cli("extract", "imgs", "-o", "out/", *OLD_ARGS[:-2], "--shard-size", "3", "-q")
    assert r.exit_code == 2 and "shard_size: 2 -> 3" in r.stderr
    r = cli("extract", "imgs", "-o", "new/", *OLD_ARGS, "--json", "-q")
    assert r.exit_code == 0, r.stderr
    with s2cli.open_features("out") as old, s2cli.open_features("new") as new:
        assert list(old) == list(new)
        for k in old:
            np.testing.assert_allclose(new[k], old[k], atol=1e-5, rtol=0)
            assert new.meta(k) == old.meta(k)
        assert json.loads(new.attrs["config"])["set_by"] == json.loads(old.attrs["config"])["set_by"]
