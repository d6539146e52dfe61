"""Sources: turn an input (a folder, read recursively) into keyed samples, then decode and fit each image to
the size the engine needs. Decoding runs in DataLoader workers; a bad file becomes a failure record, never a
crash and never a shifted key."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import ConfigError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
FITS = ("crop", "squash", "pad", "keep")


@dataclass(frozen=True)
class Sample:
    key: str  # path relative to the input, without extension, "/"-separated
    source: str  # where the bytes come from


def scan_folder(root: str | os.PathLike) -> list[Sample]:
    """Every image under `root` (recursive, any-case extensions), sorted by relative path. Two files with the
    same key (`a.jpg`, `a.png`) are an error listing all such pairs, raised before any work starts."""
    root = Path(root)
    if not root.exists():
        raise ConfigError("input does not exist", given=str(root), fix="pass an existing folder of images")
    if not root.is_dir():
        raise ConfigError("input is not a folder", given=str(root), fix="pass a folder of images (read recursively)")
    found: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTS) and not name.startswith("."):
                full = os.path.join(dirpath, name)
                found.append((Path(full).relative_to(root).as_posix(), full))
    found.sort()
    by_key: dict[str, list[str]] = {}
    for rel, full in found:
        by_key.setdefault(rel.rsplit(".", 1)[0], []).append(full)
    clashes = {k: v for k, v in by_key.items() if len(v) > 1}
    if clashes:
        shown = "; ".join(f"{k}: {', '.join(Path(p).name for p in v)}" for k, v in list(clashes.items())[:5])
        more = f" (and {len(clashes) - 5} more)" if len(clashes) > 5 else ""
        raise ConfigError(f"{len(clashes)} keys are shared by several files: {shown}{more}",
                          expected="one file per key (the path without its extension)",
                          fix="rename or remove one file of each pair")
    if not found:
        raise ConfigError("input folder holds no images", given=str(root),
                          expected="files ending in " + ", ".join(IMAGE_EXTS), fix="point at a folder with images")
    return [Sample(rel.rsplit(".", 1)[0], full) for rel, full in found]


def image_size(path: str) -> tuple[int, int]:
    """(h, w) as displayed, from the header alone (EXIF orientation applied, no pixels decoded)."""
    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:
            orientation = 1
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def decode(path: str) -> Image.Image:
    """Pillow decode, EXIF orientation applied, RGB."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


def fit_size(orig_hw: tuple[int, int], fit: str, side: int) -> tuple[int, int]:
    """The (h, w) an image of `orig_hw` has after fitting to the largest scale `side`."""
    if fit == "keep":
        h, w = orig_hw
        if h <= w:
            return side, max(1, int(side * w / h))
        return max(1, int(side * h / w)), side
    return side, side


def fit_image(im: Image.Image, fit: str, side: int, mean: tuple[float, float, float]) -> Image.Image:
    """crop: shortest edge to `side` then center crop (CLIP's processor); squash: to side x side (SigLIP's);
    pad: to a square filled with the mean color first (LLaVA's `pad`), then resized; keep: shortest edge to
    `side`, aspect kept. Resizes are Pillow bicubic (antialiased when shrinking), as the HF processors do."""
    if fit == "squash":
        return im.resize((side, side), Image.BICUBIC)
    if fit == "pad":
        w, h = im.size
        if w != h:
            canvas = Image.new("RGB", (max(w, h), max(w, h)), tuple(int(m * 255) for m in mean))
            canvas.paste(im, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
            im = canvas
        return im.resize((side, side), Image.BICUBIC)
    w, h = im.size
    th, tw = fit_size((h, w), "keep", side)
    if (tw, th) != (w, h):
        im = im.resize((tw, th), Image.BICUBIC)
    if fit == "keep":
        return im
    top, left = (th - side) // 2, (tw - side) // 2
    return im.crop((left, top, left + side, top + side))


def to_uint8_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


class ImageDataset(torch.utils.data.Dataset):
    """Sample i -> dict(key, source, image uint8 (3, H, W) or None, orig_hw, error). Runs in workers."""

    def __init__(self, samples: list[Sample], fit: str, side: int, mean: tuple[float, float, float]):
        if fit not in FITS:
            raise ConfigError("fit is not known", given=fit, expected=" | ".join(FITS), fix="use --fit crop")
        self.samples, self.fit, self.side, self.mean = samples, fit, side, mean

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        rec: dict[str, Any] = {"index": i, "key": s.key, "source": s.source, "image": None, "orig_hw": None, "error": None}
        stage = "read"
        try:
            if not os.access(s.source, os.R_OK):
                raise OSError(f"cannot read {s.source}")
            stage = "decode"
            im = decode(s.source)
            rec["orig_hw"] = (im.height, im.width)
            stage = "preprocess"
            rec["image"] = to_uint8_tensor(fit_image(im, self.fit, self.side, self.mean))
        except Exception as e:  # recorded per sample; the run goes on (plain dict: it crosses process borders)
            rec["error"] = failure(s, stage, e)
        return rec


def failure(sample: Sample, stage: str, error: BaseException) -> dict[str, str]:
    """One failure record: which sample, where it came from, the stage that failed, and why."""
    return {"key": sample.key, "source": sample.source, "stage": stage,
            "error_class": type(error).__name__, "error": str(error)}


def collate(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch
