"""Pixel operations shared by the input side and the strategies: an image fitted to the engine's input (crop,
squash, pad, keep), a strategy's views rendered, (3, H, W) uint8 arrays. No I/O, no decoding."""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .resample import resize_kept

FITS = ("crop", "squash", "pad", "keep")


def fit_size(orig_hw: tuple[int, int], fit: str, side: int) -> tuple[int, int]:
    """The (h, w) an image of `orig_hw` has after fitting to the largest scale `side`."""
    if fit == "keep":
        h, w = orig_hw
        if h <= w:
            return side, max(1, int(side * w / h))
        return max(1, int(side * h / w)), side
    return side, side


CROP_ROUNDS = ("floor", "half-even")


def crop_start(size: int, crop: int, rounding: str = "floor") -> int:
    """Where a center crop of `crop` starts in `size`: the margin halved, rounded down ("floor", transformers'
    processors) or to even ("half-even", torchvision's CenterCrop, hence open_clip's preprocess)."""
    if rounding == "half-even":
        return int(round((size - crop) / 2.0))
    if rounding == "floor":
        return (size - crop) // 2
    raise ValueError(f"crop rounding {rounding!r} is not one of {CROP_ROUNDS}")


class ImageShapeError(ValueError):
    """An image whose shape no fit can use (recorded as the image's failure, stage `preprocess`)."""


# beyond this aspect ratio a fit does not build the intermediate image a processor would (crop: the crop box alone
# is resized; pad: the image is reduced before it is padded), so memory stays near the output's size; the pixels
# are then close to the processor's, not always bit-equal (Pillow's box resize rounds its passes differently)
LONG_ASPECT = 16


def check_shape(w: int, h: int, fit: str, side: int) -> None:
    """Refuse an image no fit can use at `side` px: one whose aspect ratio exceeds `side` (fitted whole, its short
    side would be under one pixel; cropped, a sliver of under 1/side of it would be kept), and with fit `keep`
    one whose fitted size exceeds Pillow's decompression-bomb limit."""
    ratio = max(w, h) / max(1, min(w, h))
    if ratio > side:
        raise ImageShapeError(f"a {w}x{h} image (aspect ratio {ratio:.0f}:1) is beyond what any fit can use at "
                              f"{side} px (at most {side}:1); crop or split it first")
    th, tw = fit_size((h, w), "keep", side)
    limit = Image.MAX_IMAGE_PIXELS
    if fit == "keep" and limit and th * tw > limit:
        raise ImageShapeError(f"a {w}x{h} image fitted with --fit keep would be {tw}x{th}, over Pillow's "
                              f"decompression-bomb limit of {limit} pixels; use --fit crop or pad, or crop it first")


def fit_image(im: Image.Image, fit: str, side: int, mean: tuple[float, float, float],
              crop_round: str = "floor") -> Image.Image:
    """crop: shortest edge to `side` then center crop (CLIP's processor); squash: to side x side (SigLIP's);
    pad: to a square filled with the mean color first (LLaVA's `pad`), then resized; keep: shortest edge to
    `side`, aspect kept. Resizes are Pillow bicubic (antialiased when shrinking), as the HF processors do; crop
    resizes only the region it keeps where that gives the same pixels (`resample.resize_kept`). Past
    an aspect ratio of LONG_ASPECT, crop resizes only the crop box and pad reduces first (close, not always
    bit-equal); past `check_shape`, an ImageShapeError."""
    w, h = im.size
    check_shape(w, h, fit, side)
    if fit == "squash":
        return im.resize((side, side), Image.BICUBIC)
    if fit == "pad":
        if max(w, h) > LONG_ASPECT * min(w, h) and max(w, h) > 4 * side:
            im = im.reduce(max(w, h) // (4 * side))  # the padded canvas stays near (4 side)^2 pixels
            w, h = im.size
        if w != h:
            canvas = Image.new("RGB", (max(w, h), max(w, h)), tuple(int(m * 255) for m in mean))
            canvas.paste(im, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
            im = canvas
        return im.resize((side, side), Image.BICUBIC)
    th, tw = fit_size((h, w), "keep", side)
    top, left = crop_start(th, side, crop_round), crop_start(tw, side, crop_round)
    if fit == "crop" and max(w, h) > LONG_ASPECT * min(w, h):  # never the whole long strip at full size
        sx, sy = w / tw, h / th
        return im.resize((side, side), Image.BICUBIC, box=(left * sx, top * sy, (left + side) * sx, (top + side) * sy))
    if (tw, th) != (w, h):
        box = (left, top, left + side, top + side)
        if fit == "crop" and (kept := resize_kept(im, (tw, th), box)) is not None:
            return kept  # the kept region alone, the same pixels
        im = im.resize((tw, th), Image.BICUBIC)
    if fit == "keep":
        return im
    return im.crop((left, top, left + side, top + side))


def render_views(im: Image.Image, plan: Any, fit: Any) -> list[np.ndarray]:
    """A strategy's views of the original image, each (3, H, W) uint8, as their authors render them with Pillow:
    squash = resize to the canvas (bicubic, antialiased when shrinking, as `image.resize(size)` does); letterbox =
    resize aspect-kept, then paste centered on a black canvas (LLaVA-NeXT); fit = the --fit mode to a square.
    A plan whose views share one source (dual) renders only its first view."""
    out = []
    for v in plan.views[:1] if plan.same_source else plan.views:
        if v.render == "fit":
            r = fit_image(im, fit.strategy.fit, v.canvas[0], fit.mean, fit.crop_round)
        elif v.render == "letterbox":
            r = Image.new("RGB", (v.canvas[1], v.canvas[0]), (0, 0, 0))
            r.paste(im.resize((v.resize[1], v.resize[0]), Image.BICUBIC), (v.pad[1], v.pad[0]))
        else:
            r = im.resize((v.canvas[1], v.canvas[0]), Image.BICUBIC)
        out.append(to_uint8_array(r))
    return out


def fit_to_array(im: Image.Image, fit: Any) -> np.ndarray:
    """The S² engine's input: the image fitted once to the largest scale, (3, H, W) uint8."""
    return to_uint8_array(fit_image(im, fit.mode, fit.side, fit.mean, fit.crop_round))


def to_uint8_array(im: Image.Image) -> np.ndarray:
    """(3, H, W) uint8, contiguous."""
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))

