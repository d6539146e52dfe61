"""Absurd aspect ratios: decode memory stays near a normal image's. A strip far under the decompression-bomb limit
is fitted without building the full-size resize a processor would, and one beyond what any fit can use is a
recorded failure with its reason."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import write_image
from s2cli import open_features
from s2cli.pixels import fit_image

# peak RSS (KiB) of the whole process tree of a command: every descendant is waited for, so RUSAGE_CHILDREN of a
# process that only runs the command holds the largest of them
PEAK = """
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(r.stdout, end="")
sys.stderr.write(r.stderr)
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "rc": r.returncode}))
""".replace("import resource", "import json, resource")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_1x20000_strip_is_a_recorded_failure_and_memory_stays_low(tmp_path):
    d = tmp_path / "in"
    write_image(d / "good.png", (48, 40), 1)
    Image.fromarray(np.full((20000, 1, 3), 200, np.uint8)).save(d / "strip.png")  # 1 x 20000: 20 k pixels
    write_image(d / "thin.png", (200, 1), 2)  # 1 x 200: extracted, its crop box alone resized
    r = subprocess.run([sys.executable, "-c", PEAK, sys.executable, "-m", "s2cli", "extract", str(d), "-m",
                        "timm:test_resnet", "--random-init", "--img-sizes", "64,256", "--max-split-size", "64",
                        "-j", "1", "-o", str(tmp_path / "o.h5"), "-q"], capture_output=True, text=True, timeout=280)
    res = json.loads(r.stdout.splitlines()[-1])
    assert res["rc"] == 0, r.stderr[-3000:]
    # the old shortest-edge-first resize built 256 x 5,120,000 pixels (3.9 GB) for the strip
    assert res["peak_kib"] < 1_500_000, res
    with open_features(tmp_path / "o.h5") as f:
        assert list(f) == ["good", "thin"]
        [fail] = f.failures
    assert (fail["key"], fail["stage"], fail["error_class"]) == ("strip", "preprocess", "ImageShapeError")
    assert "1x20000" in fail["error"] and "256:1" in fail["error"]


def test_the_crop_of_a_long_strip_is_the_processors_crop():
    rng = np.random.default_rng(0)
    for hw in [(20, 1000), (3, 300)]:
        im = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
        h, w = hw
        tw = int(128 * w / h)
        left = (tw - 128) // 2
        ref = np.asarray(im.resize((tw, 128), Image.BICUBIC).crop((left, 0, left + 128, 128)))  # CLIP's way
        out = np.asarray(fit_image(im, "crop", 128, (0.5, 0.5, 0.5)))
        assert out.shape == (128, 128, 3)
        assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1


def test_pad_of_a_long_strip_stays_small_and_close():
    im = Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 6000, 3), dtype=np.uint8))
    canvas = Image.new("RGB", (6000, 6000), (127, 127, 127))
    canvas.paste(im, (0, 2950))
    ref = np.asarray(canvas.resize((64, 64), Image.BICUBIC)).astype(int)
    out = np.asarray(fit_image(im, "pad", 64, (0.5, 0.5, 0.5))).astype(int)
    assert np.abs(out - ref).mean() < 2


def test_shapes_no_fit_can_use_are_refused():
    from s2cli.pixels import ImageShapeError, check_shape

    with pytest.raises(ImageShapeError, match=r"1x20000 image .* beyond what any fit can use at 448 px"):
        check_shape(1, 20000, "crop", 448)
    check_shape(1, 448, "crop", 448)
    with pytest.raises(ImageShapeError, match="--fit keep would be"):
        check_shape(100, 20000, "keep", 1008)  # 1008 x 201600: over the decompression-bomb limit
    check_shape(100, 20000, "crop", 1008)
