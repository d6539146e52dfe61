"""The device side of the data path: uint8 batches staged into pinned host memory and copied to the device on a
side stream (the next batch's copy overlaps the current compute), features copied back into pinned buffers
without blocking (an event says when the writer may read them), and `--decode torch`: JPEG decode
(torchvision; nvJPEG on CUDA, libjpeg-turbo on the CPU) and the fit (crop/squash/pad/keep, bicubic antialias)
done on the run's device. On the CPU the copies are plain (no pinning, no streams; batches stacked into reused
buffers): the same functions run, so the CPU tests exercise them."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch

from .inputs.decode import Decoded, Fit, decode_sample, with_decode_note
from .inputs.samples import Sample
from .pixels import crop_start, fit_size


# ---- host <-> device ---------------------------------------------------------------------------------------------
class Pending:
    """Tensors copied to the host, ready once `event` (a CUDA event, None on the CPU) has completed. `result()`
    waits for it: the writer never reads a buffer the GPU is still filling."""

    def __init__(self, tensors: tuple[Any, ...], event: Any = None, on_wait: Any = None, shown: int | None = None):
        self.tensors, self.event, self._on_wait = tensors, event, on_wait
        self.shown = len(tensors) if shown is None else shown  # the first `shown` are the result, the rest `aside`

    def result(self) -> tuple[Any, ...]:
        if self.event is not None:
            t = time.perf_counter()
            self.event.synchronize()
            if self._on_wait is not None:
                self._on_wait(time.perf_counter() - t)
            self.event = None
        return self.tensors[:self.shown]

    def aside(self) -> tuple[Any, ...]:
        """What came back with the result without being part of it (the batch's finite sums)."""
        self.result()
        return self.tensors[self.shown:]


class Staging:
    """Host batches reused on the CPU, as CUDA's caching host allocator reuses pinned ones: per batch shape a ring
    of `depth` buffers, so a batch is stacked into memory already mapped (every page of a fresh batch faults) and
    is overwritten only `depth` batches later. At most `shapes` shapes are kept (ragged `--fit
    keep` batches come and go)."""

    def __init__(self, depth: int = 2, shapes: int = 4):
        self.depth, self.shapes = depth, shapes
        self.rings: dict[tuple, tuple[list[torch.Tensor], list[int]]] = {}

    def stack(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        first = images[0]
        key = (len(images), tuple(first.shape), first.dtype)
        if key not in self.rings:
            if len(self.rings) >= self.shapes:
                self.rings.pop(next(iter(self.rings)))
            self.rings[key] = ([], [0])
        bufs, turn = self.rings[key]
        if len(bufs) < self.depth:
            bufs.append(torch.empty((len(images), *first.shape), dtype=first.dtype))
        out = bufs[turn[0] % len(bufs)]
        turn[0] += 1
        return stack_into(images, out)


def stack_into(images: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """`torch.stack(images, out=out)` for host tensors, copied by numpy on the calling thread: torch would split
    the copy over its intra-op threads, whose spinning after each copy costs the main process more CPU than the
    copy itself."""
    np.stack([t.numpy() for t in images], out=out.numpy())
    return out


class Transfer:
    """Copies between the host and `device`. CUDA: host batches are stacked into pinned memory and copied on a
    side stream (the compute stream waits for that copy only, and the copied tensor is marked as used by the
    compute stream so its memory is not reused early); results come back into pinned buffers on the compute
    stream, non-blocking, with an event. CPU: the batch is stacked into a reused host buffer (`Staging`: the
    returned tensor is overwritten two batches later; the run normalizes it into a new tensor at once)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.staging = Staging()

    def to_device(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 (B, 3, H, W), or a list of (3, H, W), on the host or already on the device -> one (B, 3, H, W)
        tensor on the device, usable on the current stream."""
        if not isinstance(images, torch.Tensor):
            on = [self._here(t) for t in images]
            if self.device.type == "cpu" and all(t.device.type == "cpu" for t in images):
                return self.staging.stack(images)
            if not self.cuda or any(on):  # (a --decode torch batch may hold a few Pillow fallbacks from the host)
                return torch.stack([t if o else t.to(self.device) for t, o in zip(images, on)])
            first = images[0]
            host = stack_into(images, torch.empty((len(images), *first.shape), dtype=first.dtype, pin_memory=True))
        elif self._here(images) or not self.cuda:
            return images.to(self.device)
        else:
            host = images if images.is_pinned() else images.pin_memory()
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            x = host.to(self.device, non_blocking=True)
        compute.wait_stream(self.copy_stream)
        x.record_stream(compute)
        return x

    def _here(self, t: torch.Tensor) -> bool:
        d = t.device
        return d.type == self.device.type and (self.device.index is None or d.index in (None, self.device.index))

    def to_host(self, *tensors: torch.Tensor | None, on_wait: Any = None, aside: tuple = ()) -> Pending:
        """Device tensors (or None) -> a Pending of host tensors (`aside`: more of them, given by `Pending.aside`).
        CUDA: non-blocking copies into pinned buffers on the compute stream (so the device tensors may be freed at
        once), then an event."""
        if not self.cuda:
            return Pending(tuple(None if t is None else t.cpu() for t in tensors + aside), shown=len(tensors))
        out = []
        for t in tensors + aside:
            if t is None:
                out.append(None)
                continue
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            out.append(h)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return Pending(tuple(out), event, on_wait, shown=len(tensors))


# ---- decode and fit on the device --------------------------------------------------------------------------------
def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as displayed for an EXIF orientation 1..8 (what PIL.ImageOps.exif_transpose does)."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1, -2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return img.transpose(-1, -2).flip(-1)
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return img.transpose(-1, -2).flip(-2)
    return img


def _resize(img: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    from torchvision.transforms.v2 import InterpolationMode, functional as TF

    return TF.resize(img, list(hw), interpolation=InterpolationMode.BICUBIC, antialias=True)


def fit_tensor(img: torch.Tensor, fit: str, side: int, mean: tuple[float, float, float],
               crop_round: str = "floor") -> torch.Tensor:
    """`pixels.fit_image` on a uint8 (3, H, W) tensor, on its device: the same geometry (crop, squash, pad with
    the mean color, keep), with torch's bicubic antialias resize (Pillow's filter, a = -0.5, computed in float
    and rounded) instead of Pillow's fixed-point one."""
    h, w = img.shape[-2:]
    if fit == "squash":
        return _resize(img, (side, side))
    if fit == "pad":
        if w != h:
            m = max(w, h)
            fill = torch.tensor([int(c * 255) for c in mean], dtype=img.dtype, device=img.device).view(3, 1, 1)
            canvas = fill.expand(3, m, m).clone()
            top, left = (m - h) // 2, (m - w) // 2
            canvas[:, top:top + h, left:left + w] = img
            img = canvas
        return _resize(img, (side, side))
    th, tw = fit_size((h, w), "keep", side)
    if (th, tw) != (h, w):
        img = _resize(img, (th, tw))
    if fit == "keep":
        return img
    top, left = crop_start(th, side, crop_round), crop_start(tw, side, crop_round)
    return img[:, top:top + side, left:left + side]


def decode_batch(recs: list[Decoded], fit: Fit, device: torch.device,
                 timing: dict[str, float] | None = None) -> list[Decoded]:
    """Records from `inputs.decode.read_for_device` (`jpeg`: bytes, stored size, orientation) -> the same records
    with `pixels`, the fitted uint8 (3, H, W) on `device`, and no `jpeg`. One batched torchvision call (nvJPEG on
    CUDA); when it fails, each image alone, and an image the device decoder refuses is decoded with Pillow here
    (meta.decode.path = "pil-fallback", with the reason); an image Pillow cannot decode either gets its failure
    record in `error`. Returns the records, in order; adds the decode and fit seconds to `timing`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not recs:
        return recs
    t0 = time.perf_counter()
    data = [torch.as_tensor(r.jpeg.data) for r in recs]  # type: ignore[union-attr]
    try:
        decoded: list[Any] = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except Exception:
        decoded = []
        for d in data:
            try:
                decoded.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except Exception as e:
                decoded.append(e)
    t1 = time.perf_counter()
    for r, d, raw in zip(recs, decoded, data):
        jpeg, r.jpeg = r.jpeg, None
        shape = tuple(jpeg.stored_hw)  # type: ignore[union-attr]
        if isinstance(d, torch.Tensor) and tuple(d.shape[-2:]) != shape:
            d = ValueError(f"decoded {tuple(d.shape[-2:])}, the header says {shape}")
        if isinstance(d, BaseException):
            _pil_fallback(r, raw.numpy().tobytes(), jpeg.source_meta, fit, device,  # type: ignore[union-attr]
                          f"the device decoder failed: {type(d).__name__}: {d}")
            continue
        r.pixels = fit_tensor(orient(d, jpeg.orientation), fit.mode, fit.side, fit.mean, fit.crop_round)  # type: ignore[union-attr]
    if timing is not None:
        timing["decode"] = timing.get("decode", 0.0) + t1 - t0
        timing["fit"] = timing.get("fit", 0.0) + time.perf_counter() - t1
    return recs


def _pil_fallback(rec: Decoded, data: bytes, source_meta: str | None, fit: Fit, device: torch.device,
                  reason: str) -> None:
    """Decode one image with Pillow here (as the pil path does), noting why in meta.decode. The plan made from
    the header's size stays; one from the size Pillow decoded replaces it where the two differ."""
    pil = decode_sample(Sample(rec.key, rec.source, data=data, meta=source_meta), replace(fit, decode="pil", plan=None))
    if pil.error is not None:
        rec.error = pil.error
        return
    if pil.orig_hw != rec.orig_hw:
        rec.orig_hw, rec.plan = pil.orig_hw, fit.plan_of(pil.orig_hw)  # type: ignore[arg-type]
    rec.meta = with_decode_note(pil.meta, {"path": "pil-fallback", "reason": reason})
    rec.pixels = torch.from_numpy(pil.pixels).to(device)
