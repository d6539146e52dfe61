"""Decoding a sample in a worker: Pillow to RGB as the HF processors do (EXIF, alpha, 16-bit), the image's plan made
from its size, its pixels fitted or rendered to the engine's input; videos' frames; `--decode torch`'s header
probe. What comes out is one `Decoded` record; a failure is a record, never a raise."""
from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ConfigError
from ..items import meta_loads, meta_with
from ..pixels import FITS, LONG_ASPECT, fit_to_array
from ..store import local_of
from ..video import Sampling, looks_like_video, read_clip
from .reading import exif_orientation, read_retrying, video_src
from .samples import Sample, failure, printable, sample_meta

DECODES = ("pil", "torch")


def load_rgb(fh: Any) -> tuple[Image.Image, dict[str, Any]]:
    """Decode one image to RGB the way the HF processors do, and say what was done when it was not plain RGB:
    EXIF orientation applied; the first frame of an animation; alpha (RGBA, LA, palette transparency, the colour
    key of an RGB or grayscale PNG) composited on white; 16-bit grayscale (PNG/TIFF) scaled to 8 bits, not
    clipped; CMYK, palette, 1-bit and gray converted.
    Images over Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`) are refused from their header."""
    notes: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            raw = Image.open(fh)
        except Image.DecompressionBombWarning as w:  # between 1x and 2x the limit Pillow only warns: refuse too
            raise Image.DecompressionBombError(str(w)) from None
        except UnidentifiedImageError:
            raise UnidentifiedImageError(_unidentified(fh)) from None
    with raw:
        frames = getattr(raw, "n_frames", 1)
        if frames > 1:
            raw.seek(0)
            notes.update(frames=frames, frame_used=0)
        if frames == 1 and exif_orientation(raw) == 1:  # the common case: decoded in place, no copies
            raw.load()
            im = raw
        else:
            im = ImageOps.exif_transpose(raw)
            if im is raw:  # older Pillow returns the image itself when there is nothing to do
                im = raw.copy()
    return as_rgb(im, notes)


def as_rgb(im: Image.Image, notes: dict[str, Any]) -> tuple[Image.Image, dict[str, Any]]:
    """A decoded image in RGB, as `load_rgb` makes it (16-bit and float scaled, alpha composited on white)."""
    mode = im.mode
    if mode != "RGB":
        notes["mode"] = mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        a = np.asarray(im, dtype=np.float64)
        hi = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
        im = Image.fromarray(np.clip(np.round(np.nan_to_num(a) * (255.0 / hi)), 0, 255).astype(np.uint8), "L")
    # transformers' convert_to_rgb composites any image with an alpha band or a transparency entry (a palette's,
    # or the colour key of an RGB or grayscale PNG: tRNS)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        im = canvas
        notes["alpha"] = "composited on white"
    return (im if im.mode == "RGB" else im.convert("RGB")), notes


def _unidentified(fh: Any) -> str:
    """What Pillow could not identify, in words: a JPEG of a kind it cannot decode (12/16-bit, lossless), or
    a file that is no image it knows, by its first bytes."""
    try:
        fh.seek(0)
        head = fh.read(1 << 16)
    except (OSError, ValueError):
        head = b""
    name = getattr(fh, "name", None)
    where = f"{printable(name)}: " if isinstance(name, str) else ""
    if head[:2] == b"\xff\xd8":
        for i in range(2, len(head) - 4):  # the first start-of-frame marker: its kind and sample precision
            if head[i] == 0xFF and 0xC0 <= head[i + 1] <= 0xCF and head[i + 1] not in (0xC4, 0xC8, 0xCC):
                bits, lossless = head[i + 4], head[i + 1] in (0xC3, 0xC7, 0xCB, 0xCF)
                kind = f"{bits}-bit" + (" lossless" if lossless else "")
                return (f"{where}a {kind} JPEG, which Pillow cannot decode (it reads 8-bit lossy JPEGs); convert it "
                        "to an 8-bit JPEG or a 16-bit PNG")
        return f"{where}a JPEG whose header Pillow cannot read (damaged or an unsupported kind)"
    return f"{where}not an image format Pillow knows (it begins with {head[:8]!r})"



@dataclass(eq=False)
class DeviceJpeg:
    """`--decode torch`: a JPEG the device decoder takes, as the worker read and probed it (`read_for_device`)."""

    data: Any  # the file's bytes, uint8 (an array; a torch tensor while it crosses from a worker)
    stored_hw: tuple[int, int]  # (h, w) as stored, before the EXIF orientation
    orientation: int  # EXIF orientation 1..8
    source_meta: str | None  # the sample's own metadata: a Pillow fallback's record starts from it


@dataclass(eq=False)
class Decoded:
    """One decoded sample, as a decode worker hands it to the run: where it came from, its metadata, its size, the
    image's plan (made once, here, from its size: `Fit.plan`) and its pixels; or its failure record. Plain fields
    of str, dict, tuples and arrays (numpy, or torch tensors through shared memory), so it pickles cheaply across
    processes. Every consumer (the run, the Extractor, the strategies, the video frames, `s2cli.views`) reads
    these fields; nothing rebuilds the plan. Records compare by identity (their arrays have no one truth value)."""

    key: str
    source: str
    meta: str | None = None  # JSON text (items.meta_loads); what decoding did is in its `decode` entry
    error: dict[str, str] | None = None  # the failure record (samples.failure); then nothing below is set
    orig_hw: tuple[int, int] | None = None  # the image's (h, w) as displayed (EXIF orientation applied)
    plan: Any = None  # the image's plan from `orig_hw` (strategies.ImagePlan for S², ViewImagePlan for views)
    pixels: Any = None  # the engine's input: (3, H, W) uint8, or a list of them (a strategy's views); None: `jpeg`
    frames: list[Any] | None = None  # a video: each chosen frame's pixels, as `pixels` (all of one size and plan)
    video: dict[str, Any] | None = None  # a video: the chosen frames' indices and timestamps, its facts
    jpeg: DeviceJpeg | None = None  # --decode torch: decoded and fitted on the run's device (devicepath)
    frame: int | None = None  # a video's frame going through the image path: its position among the computed ones
    seconds: tuple[float, float, float] = (0.0, 0.0, 0.0)  # read, decode, fit in the worker: the run's stage split

    @classmethod
    def failed(cls, error: dict[str, str]) -> "Decoded":
        """The record of a sample that failed (`error`: its failure record)."""
        return cls(error["key"], error["source"], error=error)

    def map_arrays(self, convert: Callable[[Any], Any]) -> "Decoded":
        """Apply `convert` to every array the record holds (its pixels or views, a video's frames, JPEG bytes), in
        place: numpy to torch and back as the record crosses processes or enters the engine."""
        if self.pixels is not None:
            self.pixels = [convert(a) for a in self.pixels] if isinstance(self.pixels, list) else convert(self.pixels)
        if self.frames is not None:
            self.frames = [[convert(a) for a in f] if isinstance(f, list) else convert(f) for f in self.frames]
        if self.jpeg is not None:
            self.jpeg.data = convert(self.jpeg.data)
        return self


def _fitted(im: Image.Image, plan: Any, fit: "Fit") -> Any:
    return fit_to_array(im, fit)


@dataclass(frozen=True)
class Fit:
    """How every image is brought to the engine's input: the fit mode, the side, the pad color, and the run's
    strategy: its per-image planner and its rendering."""

    mode: str
    side: int
    mean: tuple[float, float, float]
    strategy: Any = None  # a StrategyCfg: the settings of a dynamic-resolution strategy's views
    decode: str = "pil"  # "torch": workers only read and probe (read_for_device); the main thread decodes
    render: Callable[[Image.Image, Any, "Fit"], Any] | None = None  # (image, its plan, fit) -> pixels; None: fitted
    retries: int = 0  # --retries: a read that fails with an OSError is tried again this many times
    video: Sampling = Sampling()  # how a video's frames are chosen; inactive: a video is a failure
    plan: Callable[[tuple[int, int]], Any] | None = None  # the image's plan from its (h, w) (strategies.Planner)
    crop_round: str = "floor"  # a center crop's offset rounding (the backbone's: pixels.crop_start)

    def __post_init__(self) -> None:
        if self.mode not in FITS:
            raise ConfigError("fit is not known", given=self.mode, expected=" | ".join(FITS), fix="use --fit crop")
        if self.decode not in DECODES:
            raise ConfigError("--decode is not known", given=self.decode, expected=" | ".join(DECODES), fix="use --decode pil")

    def plan_of(self, orig_hw: tuple[int, int]) -> Any:
        """The plan of an image of `orig_hw` (None without a planner: a bare Fit decodes pixels alone)."""
        return None if self.plan is None else self.plan(orig_hw)

    def pixels(self, im: Image.Image, plan: Any) -> Any:
        """The engine's input from the decoded image and its plan: the strategy's rendering, or the fit."""
        return (self.render or _fitted)(im, plan, self)


def decode_sample(sample: Sample, fit: Fit) -> Decoded:
    """Sample -> its `Decoded` record: `pixels` (3, H, W) uint8 (or a strategy's views), `orig_hw` and `plan`, or
    `error` (a failure record)."""
    if fit.decode == "torch":
        return read_for_device(sample, fit)
    rec = Decoded(sample.key, printable(sample.source))
    stage = "read"
    t0 = time.perf_counter()
    try:
        rec.meta = sample_meta(sample)
        if sample.pixels is not None:  # a Python dataset's item, already in memory
            stage, t1 = "decode", t0
            im, notes = pixels_rgb(sample.pixels)
        else:
            fh = read_retrying(sample, fit.retries)
            stage = "decode"
            t1 = time.perf_counter()
            with fh:
                head = fh.read(16)
                fh.seek(0)
                if looks_like_video(head):
                    fetched = fh.getvalue() if sample.data is None and local_of(sample.source) is None else None
                    return _decode_video(sample, fit, rec, t0, t1, fetched)
                im, notes = load_rgb(fh)
        t2 = time.perf_counter()
        if notes:
            rec.meta = meta_with(rec.meta, decode=notes)
        rec.orig_hw = (im.height, im.width)
        stage = "preprocess"
        rec.plan = fit.plan_of(rec.orig_hw)
        rec.pixels = fit.pixels(im, rec.plan)
        rec.seconds = (t1 - t0, t2 - t1, time.perf_counter() - t2)
    except Exception as e:  # recorded per sample; the run goes on
        return Decoded(rec.key, rec.source, meta=rec.meta, error=failure(sample, stage, e))
    return rec


def pixels_rgb(pixels: Any) -> tuple[Image.Image, dict[str, Any]]:
    """An image already in memory -> RGB: a PIL image (converted as a decoded file is), or uint8 pixels as an
    array or tensor, (H, W, 3), (3, H, W) or (H, W)."""
    if isinstance(pixels, Image.Image):
        return as_rgb(pixels, {})
    a = pixels.numpy() if hasattr(pixels, "numpy") else np.asarray(pixels)
    if a.dtype != np.uint8 or a.ndim not in (2, 3):
        raise ValueError(f"pixels of dtype {a.dtype} and shape {tuple(a.shape)}; expected uint8 (H, W, 3), (3, H, W) "
                         "or (H, W)")
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] != 3:
        raise ValueError(f"pixels of shape {tuple(a.shape)}; expected 3 channels (H, W, 3) or (3, H, W)")
    return as_rgb(Image.fromarray(np.ascontiguousarray(a)), {})


def _decode_video(sample: Sample, fit: Fit, rec: Decoded, t0: float, t1: float,
                  fetched: bytes | None = None) -> Decoded:
    """A video's record: `frames`, each chosen frame fitted as an image is, `orig_hw` (upright) and the plan every
    frame shares, and in `video` the chosen frames' indices and timestamps (video.read_clip); or `error`, one
    record for the whole video."""
    stage = "decode"
    try:
        if not fit.video.active:
            raise ValueError("a video, and no frame sampling was given (--num-frames N, --fps F or --max-frames M)")
        clip = read_clip(fetched if fetched is not None else video_src(sample), fit.video)
        t2 = time.perf_counter()
        stage = "preprocess"
        rec.orig_hw = (clip.frames[0].height, clip.frames[0].width)
        rec.plan = fit.plan_of(rec.orig_hw)
        rec.frames = [fit.pixels(im, rec.plan) for im in clip.frames]
        rec.video = clip.meta()
        rec.seconds = (t1 - t0, t2 - t1, time.perf_counter() - t2)
    except Exception as e:  # the whole video fails: no entry, one record
        return Decoded(rec.key, rec.source, meta=rec.meta, error=failure(sample, stage, e))
    return rec


def with_decode_note(meta: str | None, note: dict[str, Any]) -> str:
    """`meta` (JSON text or None) with `note` merged into its `decode` entry."""
    return meta_with(meta, decode={**(meta_loads(meta) or {}).get("decode", {}), **note})


def probe_jpeg(data: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """From the header alone: whether the device decoder (torchvision decode_jpeg) takes these bytes. Returns
    ({stored_hw, orientation, mode}, None) for an 8-bit RGB or grayscale JPEG (baseline or progressive) that ends
    with its end-of-image marker and is within Pillow's decompression-bomb limit; else (None, the reason)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        with im:
            fmt, mode, (w, h) = im.format, im.mode, im.size
            try:
                orientation = int(im.getexif().get(0x0112, 1))
            except Exception:
                orientation = 1
    except Exception as e:
        return None, f"header not readable ({type(e).__name__})"
    if fmt != "JPEG":
        return None, f"{fmt or 'unknown'} image, not a JPEG"
    if mode not in ("RGB", "L"):
        return None, f"JPEG in mode {mode}"
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None, "no JPEG end-of-image marker (truncated, or data after the image)"
    return {"stored_hw": (h, w), "orientation": orientation if 1 <= orientation <= 8 else 1, "mode": mode}, None


def read_for_device(sample: Sample, fit: Fit) -> Decoded:
    """`--decode torch`, in the decode worker: read the bytes and probe the header (`probe_jpeg`). A JPEG the
    device decoder takes travels as bytes (`jpeg`; `orig_hw` upright from the header, and the plan made from it)
    and is decoded and fitted by the main thread on the run's device (`devicepath.decode_batch`); anything else is
    decoded here with Pillow exactly as `--decode pil` does, its meta.decode saying path "pil-fallback" and why.
    A read failure is the same record as with Pillow."""
    t0 = time.perf_counter()
    pil = replace(fit, decode="pil", retries=0)  # (a read that failed is read once more, for the same record)
    if sample.pixels is not None:  # already in memory: no bytes to probe
        return decode_sample(sample, pil)
    try:
        own_meta = sample_meta(sample)
        with read_retrying(sample, fit.retries) as fh:
            data = fh.read()
    except Exception:
        return decode_sample(sample, pil)  # the same failure record as the pil path
    t1 = time.perf_counter()
    info, reason = probe_jpeg(data)
    if info is not None and max(info["stored_hw"]) > LONG_ASPECT * max(1, min(info["stored_hw"])):
        info, reason = None, f"aspect ratio over {LONG_ASPECT}:1 (Pillow fits it without the full-size resize)"
    if info is None:
        rec = decode_sample(Sample(sample.key, sample.source, data=data, meta=own_meta), pil)
        if rec.error is None:
            rec.meta = with_decode_note(rec.meta, {"path": "pil-fallback", "reason": reason})
            rec.seconds = (t1 - t0, *rec.seconds[1:])
        return rec
    h, w = info["stored_hw"]
    orig_hw = (w, h) if info["orientation"] in (5, 6, 7, 8) else (h, w)
    meta = own_meta if info["mode"] == "RGB" else with_decode_note(own_meta, {"mode": info["mode"]})
    jpeg = DeviceJpeg(np.frombuffer(bytearray(data), dtype=np.uint8), info["stored_hw"], info["orientation"], own_meta)
    return Decoded(sample.key, printable(sample.source), meta=meta, orig_hw=orig_hw, plan=fit.plan_of(orig_hw),
                   jpeg=jpeg, seconds=(t1 - t0, time.perf_counter() - t1, 0.0))
