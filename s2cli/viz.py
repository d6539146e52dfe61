"""Pictures: `plan_figure` draws every scale's or view's tiles over the image as the backbone sees it;
`features_figure` puts the image beside a PCA (3 components as RGB) of each stored feature map, per scale or
perspective and merged. Pillow only."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .inputs.decode import load_rgb

PANEL = 256  # the longer side of every panel, in pixels
LABEL = 18  # height of the label strip above the panels
GAP = 8
PALETTE = ((255, 0, 0), (0, 200, 0), (0, 90, 255), (255, 160, 0), (200, 0, 200), (0, 200, 200))
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class Panel:
    """Where one panel lies on the figure: its left/top corner, size, the scale from its source pixels, label."""

    label: str
    x: int
    y: int
    size: tuple[int, int]  # (w, h)
    scale: float
    color: tuple[int, int, int]
    boxes: tuple[tuple[int, int, int, int], ...] = ()  # (top, left, bottom, right) in source pixels


def _panel_size(hw: tuple[int, int]) -> tuple[tuple[int, int], float]:
    f = PANEL / max(hw)
    return (max(1, round(hw[1] * f)), max(1, round(hw[0] * f))), f


def _compose(items: list[tuple[Image.Image, str, tuple[int, int, int], float, tuple]]) -> tuple[Image.Image, list[Panel]]:
    """Lay panels out left to right under their labels; tiles boxes are drawn in the panel's color."""
    width = sum(im.width for im, *_ in items) + GAP * (len(items) + 1)
    fig = Image.new("RGB", (width, LABEL + PANEL + GAP), BACKGROUND)
    draw = ImageDraw.Draw(fig)
    panels, x = [], GAP
    for im, label, color, scale, boxes in items:
        fig.paste(im, (x, LABEL))
        draw.text((x, 3), label, fill=(0, 0, 0))
        for t, left, b, r in boxes:
            draw.rectangle((x + round(left * scale), LABEL + round(t * scale),
                            x + round(r * scale) - 1, LABEL + round(b * scale) - 1), outline=color, width=2)
        panels.append(Panel(label, x, LABEL, im.size, scale, color, tuple(boxes)))
        x += im.width + GAP
    return fig, panels


def plan_figure(path: str | Path, res: Any) -> tuple[Image.Image, list[Panel]]:
    """One panel per scale (s2) or view (other strategies): the image exactly as the backbone receives it (the
    extraction's own decode and fit: `s2cli.views`), with its tiles. A video (told by its content): `video_figure`."""
    from .inputs.reading import is_video
    from .inputs.samples import Sample
    from .plan import decoded, views_of
    from .strategies import strategy_of

    if is_video(Sample("viz", str(path))):
        return video_figure(path, res)
    rec = decoded(path, res)
    items = []
    for i, (a, label, boxes) in enumerate(strategy_of(res).pictures(res, rec.plan, views_of(rec.pixels))):
        size, f = _panel_size(a.shape[1:])
        pic = Image.fromarray(a.transpose(1, 2, 0)).resize(size, Image.BILINEAR)
        items.append((pic, label, PALETTE[i % len(PALETTE)], f, boxes))
    return _compose(items)


def video_figure(path: str | Path, res: Any) -> tuple[Image.Image, list[Panel]]:
    """One panel per sampled frame of a video, as the backbone receives it (the extraction's decode, sampling and
    fit), labelled with the frame's index and timestamp."""
    from .plan import decoded_video

    facts, frames = decoded_video(path, res)
    items = []
    for idx, ts, views in zip(facts["frame_indices"], facts["timestamps"], frames):
        a = views[0]
        size, f = _panel_size(a.shape[1:])
        pic = Image.fromarray(a.transpose(1, 2, 0)).resize(size, Image.BILINEAR)
        items.append((pic, f"frame {idx} t={ts:.3f}s", (0, 0, 0), f, ()))
    return _compose(items)


def pca_rgb(tokens: np.ndarray) -> np.ndarray:
    """(N, C) features -> (N, 3) uint8: the first 3 principal components, each min-max scaled to 0..255 (sign
    chosen so the largest loading is positive, so a picture does not flip between runs)."""
    x = np.asarray(tokens, np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = vt[:3]
    comps = comps * np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])[:, None]
    y = x @ comps.T
    if y.shape[1] < 3:
        y = np.concatenate([y, np.zeros((y.shape[0], 3 - y.shape[1]))], axis=1)
    lo, hi = y.min(axis=0), y.max(axis=0)
    return np.round((y - lo) / np.where(hi > lo, hi - lo, 1) * 255).astype(np.uint8)


def feature_maps(ff: Any, key: str) -> list[tuple[str, np.ndarray]]:
    """The stored maps of one image, as (label, (h, w, C) array) per map and channel group, and merged over groups."""
    x = np.asarray(ff[key], np.float32)
    m = ff.meta(key)
    plan = m.get("plan")
    if plan is not None:
        prefix, groups = plan["output"]["prefix"], plan["output"]["groups"]
        maps = [(a["name"], tuple(a["hw"]), a["offset"]) for a in plan["output"]["maps"]]
    else:
        prefix = m["num_prefix_tokens"]
        groups = [f"scale{i}" for i in range(len(m["img_sizes"]))]
        maps = [("merged", tuple(m["grid_hw"]), 0)]
    out = []
    for name, (h, w), off in maps:
        fm = x[prefix + off: prefix + off + h * w].reshape(h, w, -1)
        c = fm.shape[-1] // len(groups)
        if len(groups) > 1:
            out += [(f"{name} {g}", fm[..., i * c:(i + 1) * c]) for i, g in enumerate(groups)]
        out.append((name if len(groups) == 1 else f"{name} (all)", fm))
    return out


def features_figure(ff: Any, key: str) -> tuple[Image.Image, list[Panel]]:
    """The image as the backbone saw it (when its source is a readable file: `seen`) beside a PCA picture of every
    map."""
    from .errors import ConfigError

    m = ff.meta(key)
    if m.get("frames"):
        raise ConfigError("this entry is a video (frames, tokens, channels), and `s2 viz features` draws one image's maps",
                          given=key, fix="extract with --frames-as-images and pass a frame's key (key#000123)")
    items = []
    src = Path(m["source"])
    if src.is_file():
        if m.get("frame_index") is not None:  # a video's frame (--frames-as-images), decoded as the extraction does
            from .video import Sampling, read_clip

            im = read_clip(str(src), Sampling(), indices=[m["frame_index"]]).frames[0]
        else:
            with open(src, "rb") as fh:
                im, _ = load_rgb(fh)  # decoded as the extraction decodes it
        im = seen(im, ff, m)
        size, f = _panel_size((im.height, im.width))
        items.append((im.resize(size, Image.BILINEAR), key, (0, 0, 0), f, ()))
    for label, fm in feature_maps(ff, key):
        h, w, _ = fm.shape
        rgb = pca_rgb(fm.reshape(h * w, -1)).reshape(h, w, 3)
        size, f = _panel_size((h, w))
        items.append((Image.fromarray(rgb).resize(size, Image.NEAREST), f"{label} {h}x{w}", (0, 0, 0), f, ()))
    return _compose(items)


def seen(im: Image.Image, ff: Any, m: dict[str, Any]) -> Image.Image:
    """A decoded image as the backbone saw it: for S², fitted once to the largest scale as the extraction fits it
    (the run's --fit, side and pad color, from the stored config), so a centre crop shows the crop; a strategy's
    views (the image's plan in its metadata) cover the whole image, shown as decoded."""
    from .pixels import fit_image

    if m.get("plan") is not None:
        return im
    cfg = json.loads(ff.attrs["config"])
    return fit_image(im, cfg["fit"], max(cfg["img_sizes"]), tuple(cfg["backbone"]["mean"]),
                     cfg["backbone"].get("crop_round", "floor"))


def plan_summary(panels: list[Panel]) -> str:
    return json.dumps([{"label": p.label, "x": p.x, "size": list(p.size), "tiles": len(p.boxes)} for p in panels])
