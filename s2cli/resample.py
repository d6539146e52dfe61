"""Fit only what is kept: a center crop of a bicubic resize, computed from the source region the crop keeps, with
the pixels of resizing the whole image and cropping. Pillow's `resize(size, box=...)` gives them exactly when its
fixed-point weights for the kept samples are those of the whole resize (reproduced here as Pillow computes them)
and the two passes run in the order the whole resize takes (`horizontal_first`: Pillow 13 takes the vertical pass
first when the height shrinks more than twice as much as the width, older Pillow always the horizontal one; which
rule this Pillow follows is probed once); otherwise the caller resizes the whole image, as before."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

PRECISION = 1 << 22  # Pillow's 8-bit resampling weights: fixed point with PRECISION_BITS = 32 - 8 - 2


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic filter (a = -0.5), operation for operation."""
    x = np.abs(x)
    near = ((1.5 * x - 2.5) * x) * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def coefficients(in_size: int, in0: float, in1: float, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` (Resample.c) for its bicubic filter over the
    source interval [in0, in1) of an axis of `in_size` samples (single precision, as Pillow takes a box): per
    output sample, its first source sample, how many it reads, and their fixed-point weights."""
    f0, f1 = np.float32(in0), np.float32(in1)
    scale = float(np.float32(f1 - f0)) / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    center = float(f0) + (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    k = np.zeros((out_size, ksize))
    total = np.zeros(out_size)
    for x in range(ksize):  # summed in Pillow's order
        k[:, x] = np.where(x < count, _bicubic(((x + xmin) - center + 0.5) * (1.0 / filterscale)), 0.0)
        total = total + k[:, x]
    k = np.where(total[:, None] != 0.0, k / np.where(total == 0.0, 1.0, total)[:, None], k)
    fixed = np.where(k < 0, (-0.5 + k * PRECISION).astype(np.int64), (0.5 + k * PRECISION).astype(np.int64))
    return xmin, count, fixed


@lru_cache(maxsize=4096)
def kept_interval(in_size: int, out_size: int, start: int, kept: int) -> tuple[float, float] | None:
    """The source interval whose resize to `kept` samples reads the same source samples with the same weights as
    samples start..start+kept of the resize of the whole axis to `out_size`; None where Pillow's arithmetic
    would round a weight differently."""
    a, b = start * in_size / out_size, (start + kept) * in_size / out_size
    whole, part = coefficients(in_size, 0.0, float(in_size), out_size), coefficients(in_size, a, b, kept)
    x0, n0, k0 = (c[start:start + kept] for c in whole)
    x1, n1, k1 = part
    m = min(k0.shape[1], k1.shape[1])
    same = (np.array_equal(x0, x1) and np.array_equal(n0, n1) and np.array_equal(k0[:, :m], k1[:, :m])
            and not k0[:, m:].any() and not k1[:, m:].any())
    return (a, b) if same else None


def _probe_rule() -> str | None:
    """Which pass order this Pillow takes, from one small resize whose two orders give other pixels: "pillow13"
    (vertical first when the height shrinks more than twice as much as the width), "horizontal" (always
    horizontal first), or None when it is neither (then nothing is computed from the kept region)."""
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (40, 8, 3), dtype=np.uint8))  # 8x40 -> 16x8: Pillow 13 goes vertical first
    whole = np.asarray(im.resize((16, 8), Image.BICUBIC))
    hv = np.asarray(im.resize((16, 40), Image.BICUBIC).resize((16, 8), Image.BICUBIC))
    vh = np.asarray(im.resize((8, 8), Image.BICUBIC).resize((16, 8), Image.BICUBIC))
    if np.array_equal(hv, vh):  # pragma: no cover  (the probe could not tell the orders apart)
        return None
    return "horizontal" if np.array_equal(whole, hv) else "pillow13" if np.array_equal(whole, vh) else None


_RULE: list[str | None] = []  # the probed rule, once per process


def horizontal_first(w: int, h: int, tw: int, th: int) -> bool | None:
    """Whether this Pillow's resize of a w x h image to tw x th runs its horizontal pass first (Resample.c's
    `horizontal_first`); None when its rule is not known."""
    if not _RULE:
        _RULE.append(_probe_rule())
    rule = _RULE[0]
    if rule is None:
        return None
    return rule == "horizontal" or not (h - th > 0 and h - th > (w - tw) * 2)


def resize_kept(im: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image | None:
    """`im.resize(size, BICUBIC).crop(box)`, computed from the source region the crop keeps (one pass over the
    kept columns, one over the kept rows, in the order the whole resize takes them; each a resize along one axis,
    whose uint8 result is the whole resize's intermediate restricted to what is kept), with the same pixels; None
    where that cannot be promised (then resize the whole image and crop)."""
    (w, h), (tw, th) = im.size, size
    left, top, right, bottom = box
    kw, kh = right - left, bottom - top
    first = horizontal_first(w, h, tw, th)
    if first is None or im.mode not in ("RGB", "L"):  # other modes are resampled in floats or converted first
        return None
    xs = kept_interval(w, tw, left, kw) if tw != w else (left, right)
    ys = kept_interval(h, th, top, kh) if th != h else (top, bottom)
    if xs is None or ys is None:
        return None

    def across(a: Image.Image) -> Image.Image:  # the kept columns, over all of `a`'s rows
        rows = a.height
        return a.resize((kw, rows), Image.BICUBIC, box=(xs[0], 0, xs[1], rows)) if tw != w else a.crop((left, 0, right, rows))

    def down(a: Image.Image) -> Image.Image:  # the kept rows, over all of `a`'s columns
        cols = a.width
        return a.resize((cols, kh), Image.BICUBIC, box=(0, ys[0], cols, ys[1])) if th != h else a.crop((0, top, cols, bottom))

    return down(across(im)) if first else across(down(im))
