"""A table on remote storage (an s3:// parquet file or folder, an hf:// dataset) whose image column holds relative
paths: each path is read from beside the table, as a remote list's rows are, never from the folder the run starts
in."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import s2cli
from conftest import write_image
from s2cli.inputs.tables import beside

LIB = dict(model="timm:test_resnet", random_init=True, img_sizes=(64, 128), max_split_size=64, workers=0)


def test_a_path_cell_is_read_from_beside_its_table():
    assert beside("/data/t/t.parquet", "imgs/a.png") == "/data/t/imgs/a.png"
    assert beside("s3://b/t/t.parquet", "imgs/a.png") == "s3://b/t/imgs/a.png"
    assert beside("hf://datasets/org/x@0123abc/data/t.parquet", "imgs/a.png") == "hf://datasets/org/x@0123abc/data/imgs/a.png"
    assert beside("s3://b/t/t.parquet", "/abs/a.png") == "/abs/a.png"
    assert beside("hf://datasets/org/x@0123abc/t.parquet", "s3://b/a.png") == "s3://b/a.png"


def table_with_paths(root: Path, seed: int) -> Path:
    """root/t.parquet naming root/imgs/*.png by relative path (one as an HF Image struct {bytes: None, path})."""
    for i, name in enumerate(("a", "b", "c")):
        write_image(root / "imgs" / f"{name}.png", (40 + 8 * i, 56), seed + i)
    image = pa.array([{"bytes": None, "path": "imgs/a.png"}, {"bytes": None, "path": "imgs/b.png"},
                      {"bytes": None, "path": "imgs/c.png"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"key": ["a", "b", "c"], "image": image, "caption": ["x", "y", "z"]}), root / "t.parquet")
    return root / "t.parquet"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["s3-file", "s3-folder", "hub"])
def test_a_remote_tables_relative_paths_are_its_own_images_not_the_working_folders(where, tmp_path, monkeypatch,
                                                                                     request):
    table = table_with_paths(tmp_path / "t", seed=1)
    s2cli.extract(str(table), str(tmp_path / "local.h5"), **LIB)
    decoy = tmp_path / "cwd"
    table_with_paths(decoy, seed=50)  # the same names, other pixels, in the folder the run starts in
    monkeypatch.chdir(decoy)
    if where.startswith("s3"):
        s3 = request.getfixturevalue("s3")
        s3.put(str(tmp_path / "t") + "/", f"{s3.bucket}/t/", recursive=True)
        url = f"s3://{s3.bucket}/t/" + ("t.parquet" if where == "s3-file" else "")
    else:
        request.getfixturevalue("hub").add("org/rel", tmp_path / "t", repo_type="dataset")
        url = "hf://datasets/org/rel"
    s = s2cli.extract(url, str(tmp_path / "remote.h5"), **LIB)
    assert (s.num_images, s.num_failed) == (3, 0)
    with s2cli.open_features(tmp_path / "remote.h5") as got, s2cli.open_features(tmp_path / "local.h5") as want:
        assert list(got) == list(want) == ["a", "b", "c"]
        for k in want:
            np.testing.assert_allclose(got[k], want[k], atol=1e-5)
            assert got.meta(k)["meta"]["caption"] == want.meta(k)["meta"]["caption"]


@pytest.mark.slow
def test_a_save_to_disk_folder_on_s3_is_one_line_saying_to_copy_it(tmp_path, s3):
    import datasets

    datasets.Dataset.from_dict({"image": [b"x"], "label": [1]}).save_to_disk(str(tmp_path / "saved"))
    s3.put(str(tmp_path / "saved") + "/", f"{s3.bucket}/saved/", recursive=True)
    with pytest.raises(s2cli.ConfigError, match="read from a local folder only.*copy it to a local folder"):
        s2cli.plan(f"s3://{s3.bucket}/saved/", **LIB)
