"""Where the new input kinds meet the rest (#24): map-style datasets resumed by their keys (a dataset that changed
redoes the units whose keys moved, never leaving features under a key the dataset no longer holds there); tables,
HF datasets, torch Datasets and single files/globs with --devices, s3:// outputs, --retry-failed, export and the
readers; Path inputs and outputs."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_inputs import LIB, arrays, assert_same, features, folder_of

import s2cli
from s2cli import open_features

NAMES = ["ant", "bee", "cat", "dog", "elk"]


class Keyed:
    """A map-style dataset of dict items {key, image, label} in the given order of `arrays()`; `reads` counts
    __getitem__ calls; `stop_at`: the index whose read is interrupted (Ctrl-C), once."""

    def __init__(self, order=(0, 1, 2, 3, 4), stop_at: int | None = None):
        self.order, self.stop_at, self.reads = list(order), stop_at, 0

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        if i == self.stop_at:
            self.stop_at = None
            raise KeyboardInterrupt
        self.reads += 1
        j = self.order[i]
        return {"key": NAMES[j], "image": Image.fromarray(arrays()[j]), "label": j}


@pytest.fixture
def by_name(tmp_path) -> dict[str, np.ndarray]:
    """Features of the five images read from a folder, keyed by NAMES."""
    d = folder_of(tmp_path / "ref", NAMES)
    s2cli.extract(str(d), str(tmp_path / "ref.h5"), **LIB)
    return features(tmp_path / "ref.h5")


def test_a_map_style_dataset_interrupted_resumes_to_the_same_result(tmp_path, by_name):
    out = f"{tmp_path / 'o'}/"
    with pytest.raises(KeyboardInterrupt):
        s2cli.extract(Keyed(stop_at=3), out, shard_size=2, **LIB)
    s = s2cli.extract(Keyed(), out, shard_size=2, **LIB)
    assert (s.resumed_images, s.num_images) == (2, 3)
    assert_same(features(tmp_path / "o"), by_name)


def test_a_map_style_dataset_whose_keys_moved_redoes_those_units_and_no_feature_stays_under_a_wrong_key(
        tmp_path, by_name):
    out = f"{tmp_path / 'o'}/"
    s2cli.extract(Keyed(), out, shard_size=2, **LIB)
    again = Keyed(order=(0, 1, 2, 4, 3))  # the last two items swapped: units [2:4] and [4:5] hold other keys now
    s = s2cli.extract(again, out, shard_size=2, **LIB)
    assert (s.resumed_images, s.num_images) == (2, 3)
    got = features(tmp_path / "o")
    assert_same(got, by_name)  # every key has its own image's features
    with open_features(tmp_path / "o") as ff:
        assert ff.complete and len(ff) == 5 and ff.meta("dog")["meta"]
    grown = Keyed(order=(0, 1, 2, 4, 3, 0))  # an item added to the last unit (its key met before: a failure record)
    s = s2cli.extract(grown, out, shard_size=2, **LIB)
    assert (s.resumed_images, s.num_images, s.num_failed) == (4, 1, 1)
    assert_same(features(tmp_path / "o"), by_name)


def test_a_datasets_dataset_resumes_by_its_key_column_and_redoes_what_moved(tmp_path, by_name):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"key": NAMES, "image": [Image.fromarray(a) for a in arrays()]},
                                    features=datasets.Features({"key": datasets.Value("string"),
                                                                "image": datasets.Image()}))
    out = f"{tmp_path / 'o'}/"
    s2cli.extract(ds, out, shard_size=2, **LIB)
    s = s2cli.extract(ds.select([1, 0, 2, 3, 4]), out, shard_size=2, **LIB)  # the first unit's keys swapped
    assert (s.resumed_images, s.num_images) == (3, 2)
    assert_same(features(tmp_path / "o"), by_name)
