"""Fit only what is kept: a center crop of a bicubic resize, computed from the source region the crop keeps, with
the pixels of resizing the whole image and cropping. Pillow's `resize(size, box=...)` gives them exactly when its
fixed-point weights for the kept samples are those of the whole resize (reproduced here as Pillow computes them)
and its two passes run in the same order (horizontal first: the whole resize does so when it does not shrink
vertically); otherwise the caller resizes the whole image, as before."""
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


def resize_kept(im: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image | None:
    """`im.resize(size, BICUBIC).crop(box)`, computed from the source region the crop keeps (one horizontal pass
    over the kept columns, then one vertical pass over the kept rows), with the same pixels; None where that
    cannot be promised (then resize the whole image and crop)."""
    (w, h), (tw, th) = im.size, size
    left, top, right, bottom = box
    if th < h or im.mode not in ("RGB", "L"):  # shrinking vertically, Pillow may take its passes in the other
        return None  # order; other modes are resampled in floats or converted first
    xs = kept_interval(w, tw, left, right - left) if tw != w else (left, right)
    ys = kept_interval(h, th, top, bottom - top) if th != h else (top, bottom)
    if xs is None or ys is None:
        return None
    out = im.resize((right - left, h), Image.BICUBIC, box=(xs[0], 0, xs[1], h)) if tw != w else im.crop((left, 0, right, h))
    if th == h:
        return out.crop((0, top, right - left, bottom))
    return out.resize((right - left, bottom - top), Image.BICUBIC, box=(0, ys[0], right - left, ys[1]))
