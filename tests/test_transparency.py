"""PNG colour-key transparency (tRNS) on RGB and grayscale images is composited on white, as transformers'
convert_to_rgb does for every image that carries transparency."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from s2cli import open_features
from s2cli.inputs.decode import load_rgb


def keyed_png(mode: str) -> bytes:
    rng = np.random.default_rng(0)
    if mode == "RGB":
        arr = rng.integers(0, 4, (24, 20, 3), dtype=np.uint8) * 60  # few colours: the key colour is frequent
        key = (0, 0, 0)
    else:
        arr = rng.integers(0, 4, (24, 20), dtype=np.uint8) * 60
        key = 0
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG", transparency=key)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_colour_key_is_composited_as_transformers_does(mode):
    from transformers.image_transforms import convert_to_rgb

    data = keyed_png(mode)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == mode and raw.info.get("transparency") is not None
        expected = np.asarray(convert_to_rgb(raw, return_numpy=True))
    im, notes = load_rgb(io.BytesIO(data))
    got = np.asarray(im)
    assert (expected == 255).all(axis=-1).any()  # the keyed pixels turned white
    np.testing.assert_array_equal(got, expected)
    assert notes["alpha"] == "composited on white"


def test_a_keyed_png_is_extracted_with_the_note(cli, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "keyed.png").write_bytes(keyed_png("RGB"))
    r = cli("extract", d, "-m", "timm:test_resnet", "--random-init", "--img-sizes", "64,128", "--max-split-size", "64",
            "-j", "0", "-o", tmp_path / "o.h5", "-q")
    assert r.exit_code == 0, r.stderr
    with open_features(tmp_path / "o.h5") as f:
        assert f.meta("keyed")["meta"]["decode"]["alpha"] == "composited on white"
