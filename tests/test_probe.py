"""`s2 probe` / `s2cli.probe`: variants extracted through the real extraction path and scored; the scores are
those of scikit-learn run directly on the stored features; outputs that exist are scored as they are; bad
inputs are one line each (exit 2)."""
from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import s2cli
from conftest import invoke_json, run_cli
from s2cli.probe import label_of, parse_try, stratified

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "make_probe_set.py"
TINY = dict(model="timm:test_resnet", random_init=True, max_split_size=64, workers=0)
TINY_FLAGS = ["-m", "timm:test_resnet", "--random-init", "--max-split-size", "64", "-j", "0", "-q"]


def labelled_folder(root: Path, per_class: int = 4, classes=("blue", "red")) -> Path:
    """Class subfolders of noisy images around a colour each (the class is the first folder of the key)."""
    rng = np.random.default_rng(0)
    colours = {"blue": (40, 40, 200), "red": (200, 40, 40), "green": (40, 200, 40)}
    for c in classes:
        for i in range(per_class):
            arr = np.clip(rng.normal(colours[c], 60, size=(40 + 4 * i, 56, 3)), 0, 255).astype(np.uint8)
            (root / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def sklearn_scores(path: Path, keys: list[str], labels: list[str], folds: int, k: int, seed: int):
    """The probe computed here, independently: each stored (T, C) array read with h5py, averaged over its tokens,
    scored by scikit-learn's own pipelines."""
    import h5py
    from sklearn.linear_model import LogisticRegression  # seconds to import: not at collection (every xdist worker)
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    with h5py.File(path, "r") as f:
        index = {(k.decode() if isinstance(k, bytes) else k): i for i, k in enumerate(f["keys"][:])}
        x = np.stack([f["features"][index[key]].mean(0) for key in keys])
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    linear = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    knn = make_pipeline(Normalizer(), KNeighborsClassifier(n_neighbors=k))
    return list(cross_val_score(linear, x, labels, cv=cv)), list(cross_val_score(knn, x, labels, cv=cv))


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """Two variants of a tiny random-init model over 8 labelled images, their files kept."""
    d = tmp_path_factory.mktemp("probe")
    data = labelled_folder(d / "data")
    report = s2cli.probe(str(data), ["img_sizes=64", "img-sizes=64,128"], folds=2, k=3, seed=1,
                         workdir=str(d / "work"), **TINY)
    return d, data, report


@pytest.mark.slow  # extracts with a random-init model (seconds)
def test_probe_scores_equal_sklearn_run_directly_on_the_stored_features(probed):
    d, _, report = probed
    assert report.keys == [f"{c}/{i}" for c in ("blue", "red") for i in range(4)]
    assert report.labels == ["blue"] * 4 + ["red"] * 4
    for v in report.variants:
        probe_acc, knn_acc = sklearn_scores(Path(v.source), report.keys, report.labels, 2, 3, 1)
        assert v.probe_accuracy == probe_acc and v.knn_accuracy == knn_acc
    a, b = report.variants
    assert (a.dim, b.dim) == (a.dim, 2 * a.dim)  # one scale's channels, then two scales' concatenated


@pytest.mark.slow  # extracts with a random-init model (seconds)
def test_probe_costs_come_from_the_plan_and_the_stored_arrays(probed):
    _, data, report = probed
    a, b = report.variants
    assert (a.tiles_per_image, b.tiles_per_image) == (1, 1 + 4)  # 64 px: one tile; 128 px: four more of 64
    for v, sizes in zip(report.variants, ((64,), (64, 128))):
        plan = s2cli.plan(str(data), img_sizes=sizes, **TINY)
        assert v.bytes_per_image == plan["total_bytes"] / plan["num_images"]
        assert v.images_per_s is not None and v.images_per_s > 0


@pytest.mark.slow  # extracts with a random-init model (seconds)
def test_outputs_that_exist_are_scored_as_they_are(probed, cli, tmp_path):
    d, _, report = probed
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="", encoding="utf-8-sig") as fh:  # with a byte-order mark, as spreadsheets save
        w = csv.writer(fh)
        w.writerow(["key", "label"])
        w.writerows(zip(report.keys, report.labels))
    files = [v.source for v in report.variants]
    got = invoke_json(cli, "probe", *files, "--labels", labels, "--folds", "2", "--k", "3", "--seed", "1", "--json")
    for row, v in zip(got["variants"], report.variants):
        assert row["name"] == v.source and row["probe_accuracy"] == v.probe_accuracy
        assert row["knn_accuracy"] == v.knn_accuracy and row["bytes_per_image"] == v.bytes_per_image
        assert row["tiles_per_image"] is None  # an output has no plan
    # without --labels the keys' first folders are the classes, as they were for the extraction
    again = s2cli.probe(files, folds=2, k=3, seed=1)
    assert [v.probe_accuracy for v in again.variants] == [v.probe_accuracy for v in report.variants]


@pytest.mark.slow  # extracts with a random-init model (seconds)
def test_the_plot_draws_accuracy_against_cost(probed, cli, tmp_path):
    files = [v.source for v in probed[2].variants]
    r = cli("probe", *files, "--folds", "2", "-o", tmp_path / "probe.png")
    assert r.exit_code == 0, r.stderr
    with Image.open(tmp_path / "probe.png") as im:
        assert im.format == "PNG" and im.width > 300
    assert "8 images (blue 4, red 4)" in r.stdout


def test_a_sample_is_stratified_deterministic_and_in_input_order():
    labels = ["a"] * 30 + ["b"] * 10
    chosen = stratified(labels, 8, seed=0)
    assert chosen == sorted(chosen) and len(chosen) == 8
    assert [labels[i] for i in chosen].count("b") == 2  # the classes in proportion, 3:1
    assert stratified(labels, 8, seed=0) == chosen and stratified(labels, 8, seed=1) != chosen
    assert stratified(labels, None, seed=0) == list(range(40))


@pytest.mark.slow  # extracts with a random-init model (seconds)
def test_a_limited_probe_extracts_the_same_sample_for_every_variant(tmp_path):
    data = labelled_folder(tmp_path / "data", per_class=5)
    report = s2cli.probe(str(data), ["img_sizes=64", "img_sizes=96"], limit=6, folds=3, seed=2,
                         workdir=str(tmp_path / "w"), **TINY)
    assert len(report.keys) == 6 and report.classes == {"blue": 3, "red": 3}
    for v in report.variants:
        with s2cli.open_features(v.source) as ff:
            assert list(ff) == report.keys


def test_labels_come_from_a_metadata_field_or_the_first_folder():
    assert label_of("cats/001", None, None, None) == "cats"
    assert label_of("001", None, None, None) is None
    assert label_of("x", {"label": "dog", "split": "train"}, None, "label") == "dog"  # a list's column
    assert label_of("x", {"json": {"cls": 3}, "txt": "a cat"}, None, "cls") == "3"  # a json sidecar or member
    assert label_of("x", {"json": {"cls": 3}, "txt": "a cat"}, None, "txt") == "a cat"
    assert label_of("x", {"other": 1}, None, "label") is None
    assert label_of("cats/001", None, {"cats/001": "feline"}, None) == "feline"  # --labels wins


@pytest.mark.slow  # extracts with a random-init model (seconds)
def test_a_label_column_of_a_list_labels_its_images(tmp_path):
    data = labelled_folder(tmp_path / "data")
    rows = [(f"data/{c}/{i}.png", f"img{c}{i}", {"blue": "cold", "red": "warm"}[c]) for c in ("blue", "red")
            for i in range(4)]
    with open(tmp_path / "list.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "key", "tone"), *rows])
    assert data.is_dir()
    report = s2cli.probe(str(tmp_path / "list.csv"), label_column="tone", folds=2, img_sizes=(64,), **TINY)
    assert report.keys == [k for _, k, _ in rows] and report.labels == [t for _, _, t in rows]
    assert [v.name for v in report.variants] == ["as given"]


def test_try_is_parsed_through_the_extract_options():
    v = parse_try("scales=1,2; layer=-2;antialias=true;max-split-size=448;recipe=llava-1.5-s2;fit=none")
    assert v.options == {"scales": (1.0, 2.0), "layer": -2, "antialias": True, "max_split_size": 448,
                         "recipe": "llava-1.5-s2", "fit": None}
    for name in ("keep_ext", "input_format", "limit", "meta_columns"):  # which images, under which keys: refused
        with pytest.raises(s2cli.ConfigError, match=f"cannot change {name}"):
            parse_try(f"scales=1;{name}=1")


def _one_line_error(r, *words: str) -> None:
    assert r.exit_code == 2, r.stdout + r.stderr
    line = r.stderr.strip()
    assert line.startswith("error:") and "\n" not in line, line
    for w in words:
        assert w in line, line


def test_bad_inputs_are_one_line_errors(cli, tmp_path):
    data = labelled_folder(tmp_path / "data")
    _one_line_error(cli("probe", data, *TINY_FLAGS, "--try", "scales=1", "--try", "bogus=3"), "unknown option 'bogus'",
                    "scales")
    _one_line_error(cli("probe", data, *TINY_FLAGS, "--try", "layer=two"), "wrong type", "layer=two")
    _one_line_error(cli("probe", data, *TINY_FLAGS, "--try", "keep_ext=true"), "cannot change keep_ext")
    _one_line_error(cli("probe", data, *TINY_FLAGS, "--folds", "5"), "fewer images per class than folds",
                    "'blue': 4")
    _one_line_error(cli("probe", data, *TINY_FLAGS, "--limit", "4"), "fewer images per class than folds")
    _one_line_error(cli("probe", data / "red", *TINY_FLAGS), "no label", "class subfolders")
    one = labelled_folder(tmp_path / "one", classes=("red",))
    _one_line_error(cli("probe", one, *TINY_FLAGS), "one class", "red")
    labels = tmp_path / "labels.csv"
    labels.write_text("key,label\nblue/0,b\nblue/1,b\nred/0,r\n")
    _one_line_error(cli("probe", data, *TINY_FLAGS, "--labels", labels), "5 of 8 images have no label", "blue/2")
    _one_line_error(cli("probe", data, *TINY_FLAGS, "--label-column", "tone"), "have no label", "--label-column tone")
    _one_line_error(cli("probe", data, *TINY_FLAGS, "--k", "0"), "--k", "positive")
    (tmp_path / "bad.csv").write_text("name,class\n")
    _one_line_error(cli("probe", data, *TINY_FLAGS, "--labels", tmp_path / "bad.csv"), "`key` and `label`")
    assert not list(tmp_path.glob("**/*.h5"))  # nothing was extracted


@pytest.mark.slow  # extracts with a random-init model (seconds)
def test_outputs_and_images_are_not_mixed_and_bad_outputs_are_refused(probed, cli, tmp_path):
    d, data, report = probed
    _one_line_error(cli("probe", report.variants[0].source, data), "not both")
    _one_line_error(cli("probe", report.variants[0].source, "--try", "scales=1"), "not both")
    _one_line_error(cli("probe", report.variants[0].source, "--folds", "5"), "fewer images per class than folds")
    _one_line_error(cli("probe", report.variants[0].source, "--folds", "2", "--vector", "pooled"), "--vector pooled",
                    "pooled vectors")
    _one_line_error(cli("probe", report.variants[0].source, "--vector", "max"), "--vector is not known")


def _example():
    """examples/make_probe_set.py, imported."""
    spec = importlib.util.spec_from_file_location("make_probe_set", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_fine_lines_are_grey_at_the_model_size_and_the_coarse_ones_are_not():
    import torch
    import torch.nn.functional as F

    m = _example()
    for kind in m.KINDS:
        for (count, size, period), grey in ((m.FINE, True), (m.COARSE, False)):
            canvas = np.full((m.SIDE, m.SIDE), 128, np.uint8)
            y, x = 101, 58  # any place: the lines are laid in the image's coordinates
            canvas[y:y + size, x:x + size] = m.lines(kind, y, x, size, period)
            assert canvas[y:y + size, x:x + size].std() > 120  # black and white at 448
            pil = np.asarray(Image.fromarray(canvas).resize((224, 224), Image.Resampling.BICUBIC), np.float32)
            engine = F.interpolate(torch.from_numpy(canvas).float()[None, None], size=(224, 224), mode="bicubic",
                                   align_corners=False)[0, 0].numpy()
            for half in (pil, engine):  # Pillow's fit (scale 1 alone), the S² engine's resize (scale 1 of 1,2)
                inner = half[(y + 8) // 2:(y + size - 8) // 2, (x + 8) // 2:(x + size - 8) // 2]
                assert (inner.std() < 1) == grey, (kind, size, inner.std())


# the worked example of docs/probe.md, as it is written there
WORKED = [["python", "examples/make_probe_set.py", "probe-set/"],
          ["s2", "probe", "probe-set/list.csv", "--label-column", "fine", "--try", "scales=1", "--try", "scales=1,2",
           "--workdir", "probe-feats/", "-o", "fine.png"],
          ["s2", "probe", "probe-feats/0-scales=1.h5", "probe-feats/1-scales=1,2.h5", "--label-column", "coarse"]]


@pytest.mark.slow
def test_the_worked_example_runs_as_documented_and_shows_where_scale_2_pays(tmp_path, monkeypatch):
    doc = (ROOT / "docs" / "probe.md").read_text()
    for argv in WORKED:
        assert " ".join(argv) in doc
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "make_probe_set.py").symlink_to(EXAMPLE)
    (tmp_path / "examples" / "images").symlink_to(ROOT / "examples" / "images")
    monkeypatch.chdir(tmp_path)
    got = []
    for argv in WORKED:  # the script in an interpreter of its own, as written; `s2 ...` in this process
        if argv[0] == "python":
            r = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, r.stderr
        else:
            r = run_cli(*argv[1:], "--json")
            assert r.exit_code == 0, r.stderr
        got.append(r.stdout)
    fine, coarse = ({v["name"]: v["probe_accuracy_mean"] for v in json.loads(out)["variants"]} for out in got[1:])
    assert fine["scales=1,2"] >= fine["scales=1"] + 0.25  # the fine lines: only scale 2 sees them
    assert coarse["probe-feats/0-scales=1.h5"] >= 0.8  # the coarse lines: scale 1 suffices ...
    assert coarse["probe-feats/1-scales=1,2.h5"] <= coarse["probe-feats/0-scales=1.h5"] + 0.1  # ... and 2 adds little
    with Image.open(tmp_path / "fine.png") as im:
        assert im.format == "PNG"


@pytest.mark.slow  # extracts with a random-init model (seconds)
def test_webdataset_shards_are_probed_by_a_field_of_their_json_members(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(0)
    (tmp_path / "shards").mkdir()
    with wds.ShardWriter(str(tmp_path / "shards" / "%06d.tar"), maxcount=5, verbose=0) as sink:
        for i in range(10):
            arr = np.clip(rng.normal((200, 40, 40) if i % 2 else (40, 40, 200), 50, (40, 48, 3)), 0, 255)
            sink.write({"__key__": f"k{i:03d}", "png": _png_bytes(arr.astype(np.uint8)),
                        "json": {"cls": "red" if i % 2 else "blue"}})
    report = s2cli.probe(str(tmp_path / "shards" / "{000000..000001}.tar"), label_column="cls", limit=6, folds=3,
                         workdir=str(tmp_path / "w"), img_sizes=(64,), **TINY)
    assert report.classes == {"blue": 3, "red": 3} and len(set(report.keys)) == 6
    assert all(lab == ("red" if int(k[1:]) % 2 else "blue") for k, lab in zip(report.keys, report.labels))
    with s2cli.open_features(report.variants[0].source) as ff:
        assert list(ff) == report.keys  # only the sampled images were extracted, from the tars' bytes


def _png_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow  # extracts with a random-init model (seconds)
def test_an_output_folder_is_probed_through_its_reader(probed, tmp_path):
    _, data, report = probed
    s2cli.extract(str(data), f"{tmp_path}/feats/", img_sizes=(64,), shard_size=3, seed=1, **TINY)
    got = s2cli.probe([f"{tmp_path}/feats/", report.variants[0].source], folds=2, k=3, seed=1)
    folder, file = got.variants  # the same features (same weights, images, sizes), in shards and in one file
    assert folder.probe_accuracy == file.probe_accuracy == report.variants[0].probe_accuracy
    assert folder.bytes_per_image == file.bytes_per_image


@pytest.mark.slow  # extracts with a random-init model (seconds)
def test_an_image_that_fails_is_left_out_of_every_variant_and_named(tmp_path):
    data = labelled_folder(tmp_path / "data")
    (data / "red" / "broken.png").write_bytes(b"not an image")
    report = s2cli.probe(str(data), ["img_sizes=64", "img_sizes=64,128"], folds=2, **TINY)
    assert report.dropped == ["red/broken"] and "red/broken" not in report.keys and len(report.keys) == 8
    assert all(len(v.probe_accuracy) == 2 for v in report.variants)
