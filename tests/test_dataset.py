"""FeatureDataset: DataLoader workers under fork, spawn and forkserver see every key once with the features
open_features reads; collate pads ragged token counts with a mask; the training example runs."""
from __future__ import annotations

import multiprocessing as mp
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import s2cli

ROOT = Path(__file__).parent.parent
TINY = dict(model="timm:test_resnet", random_init=True, img_sizes=(64, 128), max_split_size=64, workers=0)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A fixed-size file, a ragged (fit=keep) safetensors file and a ragged folder of 3 shards with pooled vectors."""
    from PIL import Image

    d = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    for i, hw in enumerate([(40, 60), (64, 48), (50, 50), (30, 70), (80, 40)]):
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    s2cli.extract(str(d), str(d / "fixed.h5"), **TINY)
    s2cli.extract(str(d), str(d / "ragged.safetensors"), fit="keep", **TINY)
    s2cli.extract(str(d), str(d / "folder/"), fit="keep", shard_size=2, pool="mean", **TINY)
    return d


def _methods():
    return [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]


@pytest.mark.slow
@pytest.mark.parametrize("method", _methods())
@pytest.mark.parametrize("name", ["fixed.h5", "ragged.safetensors", "folder"])
def test_dataloader_workers_yield_every_key_once_with_the_stored_features(outputs, method, name):
    path = outputs / name
    ds = s2cli.FeatureDataset(path)
    dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context=method,
                                     collate_fn=s2cli.collate_features)
    seen = []
    with s2cli.open_features(path) as ref:
        for batch in dl:
            for j, key in enumerate(batch["key"]):
                n = int(batch["lengths"][j])
                want = np.asarray(ref[key])
                assert n == want.shape[0]
                np.testing.assert_array_equal(batch["features"][j, :n].numpy(), want)
                assert not batch["mask"][j, n:].any() and batch["mask"][j, :n].all()
                assert (batch["features"][j, n:] == 0).all()
                assert batch["meta"][j]["source"] == ref.meta(key)["source"]
                seen.append(key)
        assert sorted(seen) == sorted(ref) and len(seen) == len(set(seen))


def test_pooled_items_and_a_subset_of_keys(outputs):
    with s2cli.open_features(outputs / "folder") as ref:
        keys = list(ref)[::-1][:3]
        want = np.stack([ref.pooled(k) for k in keys])
    ds = s2cli.FeatureDataset(outputs / "folder", what="pooled", keys=keys)
    batch = s2cli.collate_features([ds[i] for i in range(len(ds))])
    assert batch["key"] == keys
    np.testing.assert_array_equal(batch["features"].numpy(), want)


def test_the_dataset_pickles_without_an_open_file(outputs):
    ds = s2cli.FeatureDataset(outputs / "fixed.h5")
    first = ds[0]["features"]  # opens the file in this process
    again = pickle.loads(pickle.dumps(ds))
    assert again._reader is None
    torch.testing.assert_close(again[0]["features"], first)


def test_collate_pads_ragged_items_and_masks_the_padding():
    items = [{"key": "a", "features": torch.ones(3, 2), "meta": {}}, {"key": "b", "features": 2 * torch.ones(1, 2), "meta": {}}]
    b = s2cli.collate_features(items)
    assert b["features"].shape == (2, 3, 2)
    assert b["mask"].tolist() == [[True, True, True], [True, False, False]]
    assert b["features"][1].tolist() == [[2, 2], [0, 0], [0, 0]]


def test_unknown_keys_and_modes_are_refused(outputs):
    with pytest.raises(s2cli.ConfigError, match="not in"):
        s2cli.FeatureDataset(outputs / "fixed.h5", keys=["nope"])
    with pytest.raises(s2cli.ConfigError, match="what"):
        s2cli.FeatureDataset(outputs / "fixed.h5", what="tokens")


@pytest.mark.slow
def test_train_projector_example_runs_and_learns():
    ctx = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    r = subprocess.run([sys.executable, "examples/train_projector.py", "--steps", "30", "--workers", "2",
                        "--context", ctx], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1].split()
    first, final = float(last[2]), float(last[5])
    assert final < 0.95 * first
