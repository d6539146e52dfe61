"""Video: tell a video container by its first bytes, read its frame timestamps without decoding, choose frames the
way video LLMs sample them (`--num-frames`, `--fps`, `--max-frames`), and decode the chosen ones (seeking to the
keyframe before each when it is far ahead) upright as RGB Pillow images. PyAV only; no torch."""
from __future__ import annotations

import bisect
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
VIDEO_MEMBERS = "mp4;webm;mkv;mov;avi;m4v"  # WebDataset members read as videos
INSTALL = "pip install 's2-features[video]'"


def require_av() -> Any:
    """The `av` module (PyAV), or the one-line error that says how to install it."""
    try:
        import av
    except ImportError:
        raise ConfigError("video input needs PyAV (the `av` package), which is not installed",
                          expected="av >= 12 (its wheels carry FFmpeg's libraries)", fix=INSTALL) from None
    return av


# ISO BMFF brands of still images (HEIF/HEIC, AVIF): an `ftyp` box, and still an image
IMAGE_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"mif1", b"msf1", b"avif", b"avci")


def looks_like_video(head: bytes) -> bool:
    """A container signature in the first bytes: ISO BMFF (mp4, mov: `ftyp`/`moov`/`mdat` box at 4; not the brands
    of HEIF/AVIF images), Matroska/WebM (EBML), AVI (RIFF....AVI ). Images (JPEG, PNG, WebP = RIFF....WEBP, GIF,
    TIFF, BMP) are not."""
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return head[8:12] not in IMAGE_BRANDS
    if len(head) >= 8 and head[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip"):
        return True
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return True
    return head[:4] == b"RIFF" and head[8:12] == b"AVI "


@dataclass(frozen=True)
class Sampling:
    """How frames are chosen. num_frames: N uniformly (LLaVA-OneVision); fps: frames at a rate by timestamps;
    max_frames: a cap on either (or, alone, on every frame)."""

    fps: float | None = None
    num_frames: int | None = None
    max_frames: int | None = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.fps, self.num_frames, self.max_frames))

    def check(self) -> None:
        """Refuse contradictory or out-of-range settings (exit 2, before anything loads)."""
        if self.fps is not None and self.num_frames is not None:
            raise ConfigError("--fps and --num-frames both choose the frames of a video", given=(self.fps, self.num_frames),
                              expected="one of them (--max-frames caps either)",
                              fix="pass --num-frames N (uniform over the clip) or --fps F (by timestamps)")
        if self.fps is not None and not self.fps > 0:
            raise ConfigError("--fps must be positive", given=self.fps, fix="e.g. --fps 1")
        for name, v in (("num-frames", self.num_frames), ("max-frames", self.max_frames)):
            if v is not None and v < 1:
                raise ConfigError(f"--{name} must be at least 1", given=v, fix=f"e.g. --{name} 8")

    def max_count(self) -> int | None:
        """The most frames a video can give, when the settings alone say it."""
        caps = [v for v in (self.num_frames, self.max_frames) if v is not None]
        return min(caps) if caps else None


def choose(timestamps: list[float], s: Sampling) -> list[int]:
    """The indices (presentation order) of the frames `s` takes from a video whose frames are at `timestamps`
    (seconds from its first frame, ascending). num_frames N: numpy.linspace(0, n - 1, N).astype(int) (indices repeat
    when the video has fewer than N frames, so every entry has N); fps F: for t = 0, 1/F, 2/F, ... up to the last
    frame's timestamp, the first frame at or after t, each frame once (F above the video's rate: every frame);
    neither: every frame. Then max_frames M: if more than M, numpy.linspace(0, len - 1, M).astype(int) of them."""
    n = len(timestamps)
    if n == 0:
        return []
    if s.num_frames is not None:
        chosen = np.linspace(0, n - 1, s.num_frames).astype(int).tolist()
    elif s.fps is not None:
        chosen, k, last = [], 0, timestamps[-1]
        while k / s.fps <= last + 1e-9:
            i = bisect.bisect_left(timestamps, k / s.fps - 1e-9)
            if not chosen or chosen[-1] != i:
                chosen.append(i)
            k += 1
    else:
        chosen = list(range(n))
    if s.max_frames is not None and len(chosen) > s.max_frames:
        chosen = [chosen[j] for j in np.linspace(0, len(chosen) - 1, s.max_frames).astype(int)]
    return chosen


@dataclass(frozen=True)
class Header:
    """What a container says about its first video stream, without decoding more than one frame."""

    frames: int  # from the header (0: not stored, e.g. WebM/MKV) or estimated from duration x rate
    duration: float  # seconds (0: unknown)
    rate: float  # average frames per second (0: unknown)
    hw: tuple[int, int]  # as displayed (rotation applied)
    rotation: int  # degrees counterclockwise applied to the stored frames
    codec: str

    def to_dict(self) -> dict[str, Any]:
        return {"frames": self.frames, "duration": round(self.duration, 6), "rate": round(self.rate, 6),
                "hw": list(self.hw), "rotation": self.rotation, "codec": self.codec}


class VideoError(ValueError):
    """A video that cannot be used (its failure record, stage `decode`)."""


def _open(src: str | bytes) -> Any:
    av = require_av()
    try:
        return av.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src, "r")
    except av.FFmpegError as e:
        raise VideoError(f"not a readable video container ({e})") from None


def _stream(container: Any) -> Any:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["nothing"]
        raise VideoError(f"no video stream (the file holds: {', '.join(kinds)})")
    stream = container.streams.video[0]
    if stream.codec_context is None or not stream.codec_context.name:
        fmt = getattr(container.format, "name", "?")
        raise VideoError(f"the video stream's codec has no decoder in this FFmpeg build (container {fmt}); "
                         "re-encode it, e.g. to H.264")
    stream.thread_type = "AUTO"
    return stream


def _check_pixels(w: int, h: int) -> None:
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > limit:
        raise VideoError(f"{w}x{h} frames, over Pillow's decompression-bomb limit of {limit} pixels per frame")
    if w <= 0 or h <= 0:
        raise VideoError(f"frames of {w}x{h} pixels")


def _upright(frame: Any) -> tuple[Any, int]:
    """The frame as an RGB Pillow image with its display rotation applied, and that rotation."""
    from PIL import Image

    im = frame.to_image()
    rot = int(round(frame.rotation or 0)) % 360
    turn = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
    return (im.transpose(turn[rot]) if rot in turn else im), rot


def header(src: str | bytes) -> Header:
    """The dry run's facts from the container header (and its first frame, for the display rotation)."""
    with _open(src) as c:
        s = _stream(c)
        w, h = s.codec_context.width, s.codec_context.height
        _check_pixels(w, h)
        tb = float(s.time_base or 0)
        duration = float(s.duration * tb) if s.duration else (c.duration / 1e6 if c.duration else 0.0)
        rate = float(s.average_rate or s.guessed_rate or 0)
        frames = s.frames or int(round(duration * rate))
        rot = 0
        for frame in c.decode(s):
            rot = int(round(frame.rotation or 0)) % 360
            break
    return Header(frames, duration, rate, (w, h) if rot in (90, 270) else (h, w), rot, s.codec_context.name)


def _packets(c: Any, s: Any) -> tuple[list[int], list[int]]:
    """Every frame's pts (presentation order) and the keyframes' pts, from demuxing alone (nothing decoded)."""
    pts, keys = [], []
    for p in c.demux(s):
        if p.size == 0:
            continue
        t = p.pts if p.pts is not None else p.dts
        if t is None:
            raise VideoError("a packet with neither pts nor dts: frame times cannot be known")
        pts.append(t)
        if p.is_keyframe:
            keys.append(t)
    return sorted(pts), sorted(keys)


@dataclass
class Clip:
    """A video's chosen frames: each upright RGB image, its index among the video's frames, its timestamp."""

    frames: list[Any]
    indices: list[int]
    timestamps: list[float]
    total: int  # frames in the video
    rotation: int
    codec: str

    def meta(self) -> dict[str, Any]:
        return {"frame_indices": self.indices, "timestamps": self.timestamps, "num_frames_total": self.total,
                "rotation": self.rotation, "codec": self.codec}


def read_clip(src: str | bytes, s: Sampling, indices: list[int] | None = None) -> Clip:
    """Decode the frames `s` chooses (or the frames at `indices`; duplicates decoded once), or raise VideoError: no
    video stream, no decoder, frames over the pixel limit, a header that promises more frames than the file holds
    (truncated), a chosen frame that does not decode."""
    av = require_av()
    try:
        with _open(src) as c:
            st = _stream(c)
            _check_pixels(st.codec_context.width, st.codec_context.height)
            pts, keys = _packets(c, st)
            if not pts:
                raise VideoError("no video frames (zero-length or empty stream)")
            if st.frames and len(pts) < st.frames:
                raise VideoError(f"the header says {st.frames} frames but only {len(pts)} can be read (truncated?)")
            tb = float(st.time_base)
            times = [(p - pts[0]) * tb for p in pts]
            _check_complete(st, times)
            chosen = choose(times, s) if indices is None else indices
            if any(not 0 <= i < len(pts) for i in chosen):
                raise VideoError(f"frame indices {chosen} are not all within the video's {len(pts)} frames")
            images = _decode_at(c, st, sorted({pts[i] for i in chosen}), keys)
    except av.FFmpegError as e:
        raise VideoError(f"decoding failed ({e})") from None
    rot = images.pop("rotation", 0)
    return Clip([images[pts[i]] for i in chosen], chosen, [round(times[i], 6) for i in chosen], len(pts), rot,
                st.codec_context.name)


def _stream_duration(st: Any) -> float | None:
    """The video stream's own duration in seconds, as its header states it (mp4: the track's; Matroska/WebM: the
    DURATION tag its muxer writes), or None."""
    if st.duration and st.time_base:
        return float(st.duration * st.time_base)
    tag = (st.metadata or {}).get("DURATION")
    try:
        h, m, s = tag.split(":")  # type: ignore[union-attr]
        return int(h) * 3600 + int(m) * 60 + float(s)
    except (AttributeError, ValueError):
        return None


def _check_complete(st: Any, times: list[float]) -> None:
    """Refuse a stream whose readable frames end well before the duration its header states (a truncated file):
    more than 1.5 frame intervals missing at the end."""
    declared = _stream_duration(st)
    if declared is None:
        return
    gaps = np.diff(times)
    step = float(np.median(gaps)) if len(gaps) else (1.0 / float(st.average_rate) if st.average_rate else 0.0)
    readable = times[-1] + step
    if declared - readable > 1.5 * step + 1e-3:
        raise VideoError(f"the header says {declared:.3f} s but the readable frames end at {readable:.3f} s "
                         f"({len(times)} frames; truncated?)")


def _decode_at(c: Any, st: Any, wanted: list[int], keys: list[int]) -> dict[Any, Any]:
    """pts -> upright image for each wanted pts (ascending). Decodes forward, seeking to the keyframe at or before
    the next wanted frame when that keyframe lies past the last decoded frame."""
    out: dict[Any, Any] = {}
    pos = None  # pts of the last decoded frame
    frames = None
    for want in wanted:
        k = keys[bisect.bisect_right(keys, want) - 1] if keys and keys[0] <= want else None
        if frames is None or (k is not None and pos is not None and k > pos):
            c.seek(k if k is not None else 0, stream=st, backward=True)  # the demux left the file at its end
            frames = c.decode(st)
            pos = None
        for frame in frames:
            pos = frame.pts
            if frame.pts is not None and frame.pts >= want:
                break
        else:
            raise VideoError(f"the frame at pts {want} did not decode (truncated or corrupt stream)")
        if frame.pts != want:
            raise VideoError(f"the frame at pts {want} did not decode (the decoder gave pts {frame.pts} next)")
        _check_pixels(frame.width, frame.height)
        out[want], out["rotation"] = _upright(frame)
    return out
