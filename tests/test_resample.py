"""Fit only what is kept (issue #25): a center crop computed from the source region it keeps has exactly the
pixels of resizing the whole image and cropping (the oracle: Pillow's own resize + crop), over a sweep of
geometries on noise images (the hardest case for rounding); where Pillow's arithmetic would differ, the whole
image is resized as before."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from s2cli.pixels import fit_image, fit_size
from s2cli.resample import coefficients, horizontal_first, kept_interval, resize_kept

rng = np.random.default_rng(25)


@pytest.fixture(autouse=True)
def _own_rng(monkeypatch):
    """Each test draws its noise from the same start, whichever tests ran before it in this process (pytest-xdist
    splits the module across workers)."""
    monkeypatch.setattr(f"{__name__}.rng", np.random.default_rng(25))


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


def reference_fit(im: Image.Image, fit: str, side: int, mean: tuple[float, float, float]) -> np.ndarray:
    """`pixels.fit_image` as it was before any region-only resize: the whole image resized, then cropped."""
    w, h = im.size
    if fit == "squash":
        return np.asarray(im.resize((side, side), Image.BICUBIC))
    if fit == "pad":
        m = max(w, h)
        canvas = Image.new(im.mode, (m, m), tuple(int(c * 255) for c in mean) if im.mode == "RGB" else int(mean[0] * 255))
        canvas.paste(im, ((m - w) // 2, (m - h) // 2))
        return np.asarray(canvas.resize((side, side), Image.BICUBIC))
    th, tw = fit_size((h, w), "keep", side)
    out = im.resize((tw, th), Image.BICUBIC) if (tw, th) != (w, h) else im
    if fit == "keep":
        return np.asarray(out)
    top, left = (th - side) // 2, (tw - side) // 2
    return np.asarray(out.crop((left, top, left + side, top + side)))


def test_every_fit_mode_keeps_the_pixels_of_resizing_the_whole_image_over_a_sweep_of_sizes():
    """Upscales and downscales, landscape, portrait and tall (Pillow 13 runs a tall image's vertical pass
    first), RGB and grayscale, every fit mode: byte for byte the whole resize, with the kept region taken where
    Pillow's arithmetic allows it (crop edges on exact samples)."""
    r = np.random.default_rng(2512)  # the geometries: fixed whichever tests run before
    sizes = [(int(r.integers(6, 260)), int(r.integers(6, 260))) for _ in range(120)]
    sizes += [(int(r.integers(6, 60)), int(r.integers(130, 260))) for _ in range(30)]  # tall: vertical first
    # photo-like aspect ratios (4:3, 3:2, 16:9, portraits, tall strips), whose crop edges fall on exact samples
    sizes += [(p * k, q * k) for p, q in [(4, 3), (3, 4), (3, 2), (16, 9), (1, 3), (2, 5), (3, 1)] for k in (8, 16, 40, 56)]
    sizes += [(p * k, q * k) for p, q in [(1, 3), (2, 5), (1, 4), (2, 7)] for k in (24, 32, 48, 64, 72, 96)]  # tall
    kept = {True: 0, False: 0}
    for i, (w, h) in enumerate(sizes):
        side = int(r.choice([16, 24, 32, 48, 64, 100, 112, 160]))
        if max(w, h) / min(w, h) > min(side, 16):  # past LONG_ASPECT fits are close, not exact (documented)
            continue
        mode = "L" if i % 4 == 0 else "RGB"
        im = noise(w, h, mode)
        th, tw = fit_size((h, w), "keep", side)
        top, left = (th - side) // 2, (tw - side) // 2
        if (tw, th) != (w, h) and resize_kept(im, (tw, th), (left, top, left + side, top + side)) is not None:
            kept[horizontal_first(w, h, tw, th)] += 1
        for fit in ("crop", "squash", "keep") + (("pad",) if mode == "RGB" else ()):
            got = np.asarray(fit_image(im, fit, side, (0.48, 0.46, 0.41)))
            assert np.array_equal(got, reference_fit(im, fit, side, (0.48, 0.46, 0.41))), (w, h, side, fit, mode)
    assert kept[True] >= 30 and kept[False] >= 5, kept  # both pass orders were taken from the kept region


@pytest.mark.slow  # 12-megapixel resizes
def test_photo_sized_downscales_are_fitted_from_the_kept_region():
    """A 12-megapixel phone photo (4032x3024) and its portrait, a 1920x1080 frame both ways, and a 1:3 strip (its
    vertical pass first), shrunk to 1008, 672 or 336."""
    for w, h, side in [(4032, 3024, 1008), (3024, 4032, 336), (1920, 1080, 1008), (1080, 1920, 1008), (1344, 4032, 672)]:
        im = noise(w, h)
        th, tw = fit_size((h, w), "keep", side)
        top, left = (th - side) // 2, (tw - side) // 2
        out = resize_kept(im, (tw, th), (left, top, left + side, top + side))
        assert out is not None, (w, h, side)
        assert np.array_equal(np.asarray(out), whole_then_crop(im, side)), (w, h, side)


def test_the_pass_order_is_pillows():
    """Pillow 13 shrinks a tall image vertically first (its two orders round differently): the probed rule says
    so, and the kept region follows it (the horizontal-first computation would differ)."""
    w, h, tw, th = 8, 40, 16, 8
    assert horizontal_first(w, h, tw, th) is False
    assert horizontal_first(1024, 768, 1344, 1008) is True and horizontal_first(4032, 3024, 1344, 1008) is True
    im = noise(60, 240)
    tw, th = 48, 192  # 60x240 -> 48x192, cut to 48x48: the height shrinks 48, the width 12
    assert horizontal_first(60, 240, tw, th) is False
    out = resize_kept(im, (tw, th), (0, 72, 48, 120))
    assert out is not None and np.array_equal(np.asarray(out), np.asarray(im.resize((tw, th), Image.BICUBIC).crop((0, 72, 48, 120))))
    horizontal = np.asarray(im.resize((tw, 240), Image.BICUBIC).resize((tw, th), Image.BICUBIC).crop((0, 72, 48, 120)))
    assert not np.array_equal(np.asarray(out), horizontal)


@pytest.mark.parametrize("margin", range(0, 9))
def test_crop_start_rounds_as_transformers_and_as_torchvision(margin):
    from torchvision.transforms.functional import center_crop

    from s2cli.pixels import crop_start

    assert crop_start(10 + margin, 10) == margin // 2  # transformers' image_transforms.center_crop
    row = torch.arange(10 + margin).view(1, 1, -1).expand(1, 10, -1)
    assert crop_start(10 + margin, 10, "half-even") == int(center_crop(row, [10, 10])[0, 0, 0])


@pytest.mark.parametrize("wh", [(95, 64), (64, 97), (99, 64), (128, 64)])
def test_the_torch_fit_crops_where_pillows_fit_does_with_either_rounding(wh):
    from s2cli.devicepath import fit_tensor
    from s2cli.pixels import fit_size

    img = torch.arange(wh[0] * wh[1] * 3, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, wh[1], wh[0])
    for rounding in ("floor", "half-even"):
        th, tw = fit_size((wh[1], wh[0]), "keep", 32)
        whole = fit_tensor(img, "keep", 32, (0.5, 0.5, 0.5))
        crop = fit_tensor(img, "crop", 32, (0.5, 0.5, 0.5), rounding)
        top = (th - 32) // 2 if rounding == "floor" else int(round((th - 32) / 2))
        left = (tw - 32) // 2 if rounding == "floor" else int(round((tw - 32) / 2))
        assert torch.equal(crop, whole[:, top:top + 32, left:left + 32])
