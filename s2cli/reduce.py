"""Token reduction at write time (`--reduce`): what the models that use these features do right after the
encoder, applied to each image's token grid before it is stored. Pure numpy, no torch.

  avg:K     K x K area pooling of the grid (LLaVA-S2's and Oryx's pooling). A grid not divisible by K keeps its
            last row/column of windows, each the mean of the cells it covers (torch avg_pool2d, ceil_mode=True).
  s2c:K     space-to-channel: each K x K block of neighbours concatenated on channels, in row-major order within
            the block (channel (dy * K + dx) * C + c), the input of NVILA's and Qwen2-VL's 2 x 2 mergers. A grid
            not divisible by K is zero-padded at the bottom/right first, as VILA's downsample projector does.
            Needs a model without prefix tokens (their channels would not match).
  budget:N  bilinear resize of the grid (align_corners=False, as F.interpolate) to at most N tokens, aspect
            kept, as LLaVA-OneVision's anyres_max: when h*w > N, t = sqrt(h*w / N) and the grid becomes
            (floor(h / t), floor(w / t)) (OneVision resizes only past 1.1x; here every grid over N is resized).

Prefix tokens (CLS) are kept apart: they stay in front, unchanged. Features are (prefix + h*w, C), row-major."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

MODES = ("avg", "s2c", "budget")


@dataclass(frozen=True)
class Reduction:
    mode: str
    k: int  # K for avg/s2c, N for budget

    @property
    def spec(self) -> str:
        return f"{self.mode}:{self.k}"

    def grid(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The grid after the reduction."""
        h, w = int(hw[0]), int(hw[1])
        if self.mode == "budget":
            if h * w <= self.k:
                return h, w
            t = math.sqrt(h * w / self.k)
            return max(1, int(h // t)), max(1, int(w // t))
        return -(-h // self.k), -(-w // self.k)

    def channels(self, c: int) -> int:
        return c * self.k * self.k if self.mode == "s2c" else c

    def shape(self, hw: tuple[int, int], channels: int, prefix: int) -> tuple[int, int]:
        """(tokens, channels) stored for an image of grid `hw`."""
        gh, gw = self.grid(hw)
        return prefix + gh * gw, self.channels(channels)

    def apply(self, feats: np.ndarray, hw: tuple[int, int], prefix: int) -> tuple[np.ndarray, tuple[int, int]]:
        """(features after the reduction, its grid) of one image's features (prefix + h*w, C)."""
        h, w = int(hw[0]), int(hw[1])
        x = np.asarray(feats)
        if x.shape[0] != prefix + h * w:
            raise ConfigError("--reduce needs one token grid per image", given=f"{x.shape[0]} tokens, grid {h}x{w}, "
                              f"{prefix} prefix", expected=f"{prefix + h * w} tokens", fix="drop --reduce for this strategy")
        grid = x[prefix:].astype(np.float32, copy=False).reshape(h, w, -1)
        out = {"avg": _avg, "s2c": _s2c, "budget": _bilinear}[self.mode](grid, self.k, self.grid((h, w)))
        gh, gw = out.shape[:2]
        body = out.reshape(gh * gw, -1)
        if prefix:
            body = np.concatenate([x[:prefix].astype(np.float32), body])
        return body, (gh, gw)


def parse(spec: str | None) -> Reduction | None:
    """`avg:K`, `s2c:K`, `budget:N` (None or "none": no reduction)."""
    if spec is None or spec == "none":
        return None
    mode, _, k = spec.partition(":")
    if mode not in MODES or not k.isdigit() or int(k) < 1 or (mode != "budget" and int(k) < 2):
        raise ConfigError("--reduce is not known", given=spec, expected="avg:K | s2c:K (K >= 2) | budget:N | none",
                          fix="e.g. --reduce s2c:2 (NVILA, Qwen2-VL), --reduce avg:2, --reduce budget:729")
    return Reduction(mode, int(k))


def _pad(x: np.ndarray, k: int) -> np.ndarray:
    h, w = x.shape[:2]
    return np.pad(x, ((0, -h % k), (0, -w % k), (0, 0)))


def _avg(x: np.ndarray, k: int, out: tuple[int, int]) -> np.ndarray:
    h, w, c = x.shape
    s = _pad(x, k).reshape(out[0], k, out[1], k, c).sum((1, 3), dtype=np.float64)
    n = _pad(np.ones((h, w, 1)), k).reshape(out[0], k, out[1], k, 1).sum((1, 3))
    return (s / n).astype(np.float32)


def _s2c(x: np.ndarray, k: int, out: tuple[int, int]) -> np.ndarray:
    c = x.shape[2]
    blocks = _pad(x, k).reshape(out[0], k, out[1], k, c).transpose(0, 2, 1, 3, 4)  # (gh, gw, dy, dx, c)
    return np.ascontiguousarray(blocks.reshape(out[0], out[1], k * k * c))


def _bilinear(x: np.ndarray, _: int, out: tuple[int, int]) -> np.ndarray:
    if out == x.shape[:2]:
        return x
    (i0, i1, a), (j0, j1, b) = _taps(x.shape[0], out[0]), _taps(x.shape[1], out[1])
    rows = x[i0] * (1 - a)[:, None, None] + x[i1] * a[:, None, None]
    return (rows[:, j0] * (1 - b)[None, :, None] + rows[:, j1] * b[None, :, None]).astype(np.float32)


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of a bilinear resize along one axis (align_corners=False, as torch)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)
