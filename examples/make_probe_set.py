"""A labelled set for `s2 probe`, built from the example photos (examples/images), offline and deterministic.

Each image is a 448x448 crop of one of the photos with textured patches of black and white lines pasted at random
places, each with two labels drawn independently:
  - `fine`: six 64x64 patches of two-pixel lines, vertical or horizontal, laid so that every pair of pixels
    (2i, 2i+1) holds one black and one white pixel. At the model's input size (224, half of 448) each pair becomes
    one pixel: grey in every patch, whichever the class, however the image is shrunk (Pillow's fit, the S² engine's
    bicubic). Only a scale of 448 (scale 2 of EfficientNet-Lite0) still sees the lines;
  - `coarse`: two 112x112 patches of eight-pixel lines, vertical or horizontal: four-pixel lines at 224, resolved
    at scale 1 already.
The list (list.csv: path, fine, coarse) is an `s2 extract` input whose label columns are each image's metadata
(`s2 probe OUT/list.csv --label-column fine`).

    python examples/make_probe_set.py probe-set/ --per-class 20
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = Path(__file__).parent / "images"
SIDE = 448
KINDS = ("vertical", "horizontal")
FINE = (6, 64, 4)  # patches, side, period of the lines (pixels)
COARSE = (2, 112, 16)


def lines(kind: str, y: int, x: int, size: int, period: int) -> np.ndarray:
    """The (size, size) black-and-white lines, `period / 2` pixels wide, of the patch at (y, x): laid in the
    image's coordinates, shifted by one pixel, so that an image pixel p and p + 1 for p even always differ."""
    yy, xx = np.mgrid[y:y + size, x:x + size]
    return (((xx if kind == "vertical" else yy) + 1) // (period // 2) % 2 * 255).astype(np.uint8)


def paste(canvas: np.ndarray, kind: str, spec: tuple[int, int, int], rng: np.random.Generator,
          taken: list[tuple[int, int, int]]) -> None:
    """Paste `spec`'s patches of lines at random places that overlap no place in `taken` (then taken too)."""
    count, size, period = spec
    for _ in range(count):
        while True:
            y, x = (int(v) for v in rng.integers(0, SIDE - size, 2))
            if all(y + size <= a or a + s <= y or x + size <= b or b + s <= x for a, b, s in taken):
                break
        canvas[y:y + size, x:x + size] = lines(kind, y, x, size, period)[..., None]
        taken.append((y, x, size))


def background(photo: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """A random 448x448 crop of the photo, scaled so that its shorter side is 448 to 1.5 times that."""
    scale = SIDE * rng.uniform(1.0, 1.5) / min(photo.size)
    w, h = (max(SIDE, round(v * scale)) for v in photo.size)
    im = photo.resize((w, h), Image.Resampling.BICUBIC)
    x, y = int(rng.integers(0, w - SIDE + 1)), int(rng.integers(0, h - SIDE + 1))
    arr = np.asarray(im.crop((x, y, x + SIDE, y + SIDE)))
    return arr[:, ::-1].copy() if rng.random() < 0.5 else arr.copy()


def build(out: Path, per_class: int, seed: int = 0) -> list[dict[str, str]]:
    """Write OUT/images/NNNN.png and OUT/list.csv: `per_class` images of each fine kind, the coarse kinds in
    equal numbers too, shuffled apart from the fine ones."""
    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in sorted(PHOTOS.iterdir())]
    n = per_class * len(KINDS)
    fine = np.repeat(np.arange(len(KINDS)), per_class)
    coarse = rng.permutation(np.resize(np.arange(len(KINDS)), n))
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        canvas, taken = background(photos[i % len(photos)], rng), []
        paste(canvas, KINDS[coarse[i]], COARSE, rng, taken)
        paste(canvas, KINDS[fine[i]], FINE, rng, taken)
        name = f"images/{i:04d}.png"
        Image.fromarray(canvas).save(out / name)
        rows.append({"path": name, "fine": KINDS[fine[i]], "coarse": KINDS[coarse[i]]})
    with open(out / "list.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["path", "fine", "coarse"])
        w.writeheader()
        w.writerows(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="The folder to write (images/ and list.csv).")
    ap.add_argument("--per-class", type=int, default=20, help="Images per fine class.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = build(args.out, args.per_class, args.seed)
    print(f"{len(rows)} images -> {args.out / 'list.csv'}")


if __name__ == "__main__":
    main()
