"""Fidelity and size of the stored dtypes against float32: the table in docs/features.md.

    python benchmarks/bench_quant.py [--images examples/images] [--out /tmp/bench_quant]

For EfficientNet-Lite0 with its real offline weights (the default model) and a random-init CLIP-style ViT-B/16
(timm:vit_base_patch16_clip_224), at scales 1,2 over the example photos: the float32 features are extracted once
(`s2cli.extract`), then each stored dtype is applied to them (dtypes.encode/decode, the writers' own code) and
compared with them per token (mean and worst cosine), per image (relative L2) and per channel (the worst channel's
relative error over an image's tokens), with the bytes one image takes. int8/float8 are shown with each scaling
(token, channel, both: the stored one); a last block repeats the ViT with four channels scaled x300, as the massive
activations of trained CLIP ViTs. Then int8 and float8 are extracted for real into .h5 and .safetensors files and
checked to read back as the table's values, with their sizes on disk."""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import s2cli
from s2cli import dtypes

MODELS = {"EfficientNet-Lite0 (real weights)": dict(model="efficientnet-lite0"),
          "ViT-B/16 CLIP-style (random init)": dict(model="timm:vit_base_patch16_clip_224", random_init=True)}
ROWS = [("float16", None), ("bfloat16", None)] + [(d, s) for d in ("int8", "float8") for s in ("token", "channel", "both")]


def stored(x: np.ndarray, dtype: str, scaling: str | None) -> np.ndarray:
    """x through a stored dtype and back, as the writers and readers do (with one scaling for int8/float8)."""
    if scaling is None:
        return dtypes.decode(dtypes.encode(x, dtype).codes, dtype).astype(np.float32)
    e = dtypes.quantize(x, dtype, scaling=scaling)
    return dtypes.decode(e.codes, dtype, e.token_scales, e.channel_scales)


def metrics(feats: list[np.ndarray], dtype: str, scaling: str | None) -> dict[str, float]:
    cos, worst_cos, rel, worst_ch = [], 1.0, [], 0.0
    for x in feats:
        y = stored(x, dtype, scaling).astype(np.float64)
        x = x.astype(np.float64)
        c = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-30)
        cos.append(c.mean())
        worst_cos = min(worst_cos, float(c.min()))
        rel.append(np.linalg.norm(x - y) / np.linalg.norm(x))
        ch = np.linalg.norm(x - y, axis=0) / np.maximum(np.linalg.norm(x, axis=0), 1e-30)
        worst_ch = max(worst_ch, float(ch.max()))
    T, C = feats[0].shape
    return {"mean_cos": float(np.mean(cos)), "worst_cos": worst_cos, "rel_l2": float(np.mean(rel)),
            "worst_rel_l2": float(np.max(rel)), "worst_channel": worst_ch, "bytes": dtypes.entry_bytes(T, C, dtype)}


def table(name: str, feats: list[np.ndarray]) -> list[str]:
    T, C = feats[0].shape
    out = [f"\n**{name}**, {len(feats)} images, {T} x {C} per image, float32 {dtypes.entry_bytes(T, C, 'float32'):,} bytes\n",
           "| dtype | scaling | mean cos/token | worst cos/token | rel. L2 (mean / worst image) | worst channel rel. err. | bytes/image | of float32 |",
           "|---|---|---|---|---|---|---|---|"]
    f32 = dtypes.entry_bytes(T, C, "float32")
    for dtype, scaling in ROWS:
        m = metrics(feats, dtype, scaling)
        label = "" if scaling is None else scaling + (" (stored)" if scaling == dtypes.SCALING else "")
        out.append(f"| {dtype} | {label} | {m['mean_cos']:.6f} | {m['worst_cos']:.6f} | {m['rel_l2']:.4f} / "
                   f"{m['worst_rel_l2']:.4f} | {m['worst_channel']:.4f} | {m['bytes']:,} | {m['bytes'] / f32:.3f} |")
    return out


def check_files(images: str, out: Path, opts: dict, feats: dict[str, np.ndarray]) -> list[str]:
    """int8/float8 extracted for real: what the readers give is the table's values; the files' sizes."""
    lines = []
    for dtype in ("int8", "float8"):
        for suffix in (".h5", ".safetensors"):
            path = out / f"{opts['model'].replace(':', '_')}.{dtype}{suffix}"
            s2cli.extract(images, str(path), dtype=dtype, overwrite=True, **opts)
            with s2cli.open_features(path) as r:
                for k, x in feats.items():
                    np.testing.assert_array_equal(r[k], stored(x, dtype, dtypes.SCALING))
            lines.append(f"{path.name}: {os.path.getsize(path):,} bytes on disk, values as in the table")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default="examples/images")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_quant-"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lines, checks = [], []
    for name, opts in MODELS.items():
        ref = out / f"{opts['model'].replace(':', '_')}.float32.h5"
        s2cli.extract(args.images, str(ref), overwrite=True, **opts)
        with s2cli.open_features(ref) as r:
            feats = {k: r[k] for k in r}
        lines += table(name, list(feats.values()))
        if "ViT" in name:
            spiked = []
            for x in feats.values():
                x = x.copy()
                x[:, [7, 100, 333, 600]] *= 300  # as trained CLIP ViTs' few huge channels
                spiked.append(x)
            lines += table(name + " with 4 channels x300 (synthetic outliers)", spiked)
        checks += check_files(args.images, out, opts, feats)
    print("\n".join(lines))
    print("\n" + "\n".join(checks))
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
