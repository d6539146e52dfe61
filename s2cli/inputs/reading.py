"""Reading a sample's bytes (local file, URL, or a stream's member) with plain reasons and --retries; headers
alone (size, orientation, video or not) without decoding pixels."""
from __future__ import annotations

import io
import os
import stat
import time
from typing import Any

from PIL import Image

from ..store import local_of, open_url
from ..video import header, looks_like_video
from .samples import Sample, printable


def _open(sample: Sample) -> Image.Image:
    if sample.data is None and local_of(sample.source) != sample.source:  # at a URL
        return Image.open(_read(sample))
    if sample.data is None:
        _check_file(str(local_of(sample.source)))
    return Image.open(io.BytesIO(sample.data) if sample.data is not None else sample.source)


class NotAFileError(OSError):
    """A listed name that is no regular file (a FIFO, a socket, a device): refused, never opened (a FIFO would
    block the read forever, whatever --decode-timeout and -j say)."""


def _check_file(src: str) -> None:
    """A local path that exists and is a regular file (symlinks followed), else the plain reason."""
    if not os.path.lexists(src):
        raise FileNotFoundError(f"no such file: {printable(src)} (deleted or moved after the input was listed?)")
    if os.path.isdir(src):
        raise IsADirectoryError(f"a folder, not an image file: {printable(src)}")
    try:
        mode = os.stat(src).st_mode
    except OSError:
        return  # a broken link, a loop: open() says which
    if not stat.S_ISREG(mode):
        what = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise NotAFileError(f"{what}, not an image file: {printable(src)}")


def _read(sample: Sample) -> Any:
    """The stage `read`: the bytes of a sample (of a stream, or the whole file), with a plain reason when the file
    vanished (deleted after the input was listed), is not readable, or is not a file. The file is read whole
    here, so that an I/O error is this stage's (and retried by --retries), never the decoder's."""
    if sample.data is not None:
        return io.BytesIO(sample.data)
    src = sample.source
    if local_of(src) is None:
        return _read_url(src)
    src = str(local_of(src))
    _check_file(src)
    try:
        with open(src, "rb") as fh:
            return io.BytesIO(fh.read())
    except PermissionError:
        raise PermissionError(f"permission denied reading {printable(src)}") from None
    except OSError as e:  # a symlink loop (ELOOP), a broken link, an I/O error
        raise type(e)(f"{e.strerror or e} reading {printable(src)}") from None


RETRY_BACKOFF_S = 0.2  # --retries: the first wait after a failed read; doubled each time, at most RETRY_MAX_WAIT_S
RETRY_MAX_WAIT_S = 5.0


def read_retrying(sample: Sample, retries: int) -> Any:
    """`_read`, tried again up to `retries` times after an OSError (a network file system's hiccup, a file being
    replaced), waiting 0.2 s, 0.4 s, ... (at most 5 s) in between; a folder or a FIFO given as a file is not retried. The
    last error says how many times the read was tried."""
    for attempt in range(retries + 1):
        try:
            return _read(sample)
        except (IsADirectoryError, NotADirectoryError, NotAFileError):
            raise
        except OSError as e:
            if attempt == retries:
                if retries:
                    raise type(e)(f"{e} (tried {retries + 1} times)") from None
                raise
            time.sleep(min(RETRY_BACKOFF_S * 2 ** attempt, RETRY_MAX_WAIT_S))


def _read_url(url: str) -> io.BytesIO:
    """The bytes of an image at a URL (a remote folder's or list's image), with a plain reason when it is gone."""
    try:
        with open_url(url) as fh:
            return io.BytesIO(fh.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"no such object: {printable(url)} (deleted or moved after the input was listed?)") from None



def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored), read from the header without decoding pixels."""
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1


def is_video(sample: Sample) -> bool:
    """The sample's first bytes are a video container's (`video.looks_like_video`), whatever its name."""
    if sample.pixels is not None:
        return False
    with _read(sample) as fh:
        return looks_like_video(fh.read(16))


def video_header(sample: Sample) -> Any:
    """A video sample's container header (`video.header`)."""
    return header(video_src(sample))


def video_src(sample: Sample) -> str | bytes:
    """What PyAV opens for a video sample: its bytes (a stream member, or a file on remote storage, fetched
    whole), or its local path (PyAV seeks in it)."""
    if sample.data is not None:
        return sample.data
    if local_of(sample.source) is None:
        return _read_url(sample.source).getvalue()
    return str(local_of(sample.source))


def image_size(sample: Sample) -> tuple[int, int]:
    """(h, w) as displayed, from the header alone (EXIF orientation applied, no pixels decoded)."""
    if sample.pixels is not None:  # in memory: PIL (w, h), or an array/tensor (H, W, 3), (3, H, W), (H, W)
        if hasattr(sample.pixels, "getbands"):
            return sample.pixels.size[::-1]
        shape = tuple(sample.pixels.shape)
        return shape[1:] if len(shape) == 3 and shape[0] in (1, 3) and shape[-1] not in (1, 3) else shape[:2]
    with _open(sample) as im:
        w, h = im.size
        orientation = exif_orientation(im)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)

