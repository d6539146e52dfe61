"""Fit only what is kept (issue #25): a center crop computed from the source region it keeps has exactly the
pixels of resizing the whole image and cropping (the oracle: Pillow's own resize + crop), over a sweep of
geometries on noise images (the hardest case for rounding); where Pillow's arithmetic would differ, the whole
image is resized as before."""
from __future__ import annotations

import numpy as np
from PIL import Image

from s2cli.pixels import fit_image, fit_size
from s2cli.resample import coefficients, kept_interval, resize_kept

rng = np.random.default_rng(25)


def noise(w: int, h: int, mode: str = "RGB") -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def whole_then_crop(im: Image.Image, side: int) -> np.ndarray:
    w, h = im.size
    th, tw = fit_size((h, w), "keep", side)
    top, left = (th - side) // 2, (tw - side) // 2
    return np.asarray(im.resize((tw, th), Image.BICUBIC).crop((left, top, left + side, top + side)))


def test_fit_crop_has_the_pixels_of_resize_then_crop_over_a_sweep_of_geometries():
    kept = 0
    for w, h, side in [(1024, 768, 1008), (640, 480, 1008), (500, 375, 384), (480, 640, 672), (336, 336, 448)] + [
            (int(rng.integers(8, 150)), int(rng.integers(8, 150)), int(rng.choice([24, 32, 48, 64, 100])))
            for _ in range(150)]:
        if max(w, h) > 16 * min(w, h) or max(w, h) / min(w, h) > side:
            continue
        im = noise(w, h, "L" if w % 3 == 0 else "RGB")
        th, tw = fit_size((h, w), "keep", side)
        top, left = (th - side) // 2, (tw - side) // 2
        kept += resize_kept(im, (tw, th), (left, top, left + side, top + side)) is not None
        assert np.array_equal(np.asarray(fit_image(im, "crop", side, (0.5, 0.5, 0.5))), whole_then_crop(im, side)), (w, h, side)
    assert kept >= 10  # the kept path was taken (the five named geometries among them)


def test_the_llava_geometry_is_fitted_from_the_kept_region():
    """1024x768 at 1008 (LLaVA-1.5-S2): 1344x1008 with 168 columns cut from each side; only the kept 1008 are
    computed, from source columns 128..896."""
    assert kept_interval(1024, 1344, 168, 1008) == (128.0, 896.0)
    im = noise(1024, 768)
    out = resize_kept(im, (1344, 1008), (168, 0, 1176, 1008))
    assert out is not None and np.array_equal(np.asarray(out), whole_then_crop(im, 1008))


def test_where_the_arithmetic_differs_the_whole_image_is_resized():
    """A geometry whose kept interval Pillow would weigh differently (its box edges are not exact in single
    precision): refused, and rightly: resizing only the box there gives other pixels; fit_image stays exact."""
    w, h, side = 61, 47, 64
    th, tw = fit_size((h, w), "keep", side)
    left = (tw - side) // 2
    assert kept_interval(w, tw, left, side) is None
    a, b = left * w / tw, (left + side) * w / tw
    whole, part = coefficients(w, 0.0, float(w), tw), coefficients(w, a, b, side)
    assert not np.array_equal(whole[2][left:left + side], part[2][:, :whole[2].shape[1]])
    im = noise(w, h)
    boxed = np.asarray(im.resize((side, side), Image.BICUBIC, box=(a, 0, b, h)))
    assert not np.array_equal(boxed, whole_then_crop(im, side))
    assert np.array_equal(np.asarray(fit_image(im, "crop", side, (0.5, 0.5, 0.5))), whole_then_crop(im, side))


def test_a_vertical_shrink_is_left_to_the_whole_resize():
    """Shrinking vertically, Pillow may take its two passes in the other order: not promised, so refused."""
    assert resize_kept(noise(300, 200), (150, 100), (25, 0, 125, 100)) is None
