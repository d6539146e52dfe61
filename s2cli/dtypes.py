"""Stored dtypes: the bytes each takes (planning and the dry run ask here), and how features become the arrays a
format stores and back: bfloat16 bits, and int8 / float8 (e4m3) codes with their scales beside them (numpy only)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

BF16 = "bfloat16"
INT8 = "int8"
FLOAT8 = "float8"
DTYPES = ("float32", "float16", BF16, INT8, FLOAT8)
QUANTIZED = (INT8, FLOAT8)
# the raw dtype each stored dtype has on disk where numpy has none: bfloat16 as uint16 bits, float8 as uint8 bits
RAW = {BF16: np.dtype(np.uint16), INT8: np.dtype(np.int8), FLOAT8: np.dtype(np.uint8)}
SCALE_DTYPE = np.dtype(np.float32)  # the scales stored beside int8/float8 codes
POOLED_QUANTIZED = "float16"  # the dtype of pooled vectors next to int8/float8 features (one row: no scaling pays)
FLOAT8_MAX = 448.0  # the largest finite e4m3fn value
INT8_MAX = 127.0
# how the codes are scaled: "both" = each channel divided by its largest magnitude over the image's tokens, then
# each token by its largest (see docs/features.md for the measurements that chose it over token or channel alone)
SCALING = "both"


def itemsize(dtype: str) -> int:
    """Bytes one stored element of features takes (the scales of int8/float8 are counted by `scale_bytes`)."""
    return RAW[dtype].itemsize if dtype in RAW else np.dtype(dtype).itemsize


def scale_bytes(rows: int, channels: int, dtype: str) -> int:
    """Bytes of the scales stored with one entry of `rows` tokens and `channels` channels (0 unless quantized)."""
    return (rows + channels) * SCALE_DTYPE.itemsize if dtype in QUANTIZED else 0


def pooled_dtype(dtype: str) -> str:
    """The dtype pooled vectors are stored in next to features of `dtype`."""
    return POOLED_QUANTIZED if dtype in QUANTIZED else dtype


def entry_bytes(tokens: int, channels: int, dtype: str) -> int:
    """Bytes one entry's features take as stored: the elements and, quantized, their scales."""
    return tokens * channels * itemsize(dtype) + scale_bytes(tokens, channels, dtype)


def to_bf16_bits(x: Any) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even (finite values)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def from_bf16_bits(b: Any) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _e4m3_values() -> np.ndarray:
    """The value of every e4m3fn code 0..255 (sign, 4 exponent bits of bias 7, 3 mantissa bits; no infinities,
    0x7F/0xFF are NaN)."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    e, m = (codes >> 3) & 0xF, codes & 0x7
    mag = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (e - 7.0))
    mag[(codes & 0x7F) == 0x7F] = np.nan
    return (sign * mag).astype(np.float32)


E4M3 = _e4m3_values()
_POS = E4M3[:127].astype(np.float64)  # codes 0..126: the finite non-negative values, ascending


def to_float8_bits(x: Any) -> np.ndarray:
    """float32 -> e4m3fn bits (uint8), rounded to nearest even and saturated at +-448 (as torch's
    `.to(torch.float8_e4m3fn)` for values in range)."""
    x = np.asarray(x, np.float32)
    a = np.minimum(np.abs(x).astype(np.float64), FLOAT8_MAX)
    hi = np.clip(np.searchsorted(_POS, a), 1, 126)
    lo = hi - 1
    dlo, dhi = a - _POS[lo], _POS[hi] - a
    code = np.where((dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0)), hi, lo).astype(np.uint8)
    return np.where(np.signbit(x), code | np.uint8(0x80), code).astype(np.uint8)


def from_float8_bits(b: Any) -> np.ndarray:
    """e4m3fn bits (uint8) -> float32, exactly."""
    return E4M3[np.asarray(b, dtype=np.uint8)]


@dataclass
class Encoded:
    """Features as a format stores them: `codes` of the stored raw dtype (float32/float16 as they are, bfloat16 and
    float8 as bits), and for int8/float8 the scales: value = code * token_scales[t] * channel_scales[c]."""

    codes: np.ndarray
    token_scales: np.ndarray | None = None  # (rows,) float32, one per token (a video's: per frame token)
    channel_scales: np.ndarray | None = None  # (C,) float32

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + sum(s.nbytes for s in (self.token_scales, self.channel_scales) if s is not None)


def quantize(x: Any, dtype: str, scaling: str = SCALING) -> Encoded:
    """Symmetric int8 or float8 codes of `x` (..., C), with their scales. `scaling`: "both" (channels by their largest
    magnitude over the entry's tokens, then tokens by theirs), "token" or "channel"."""
    x = np.asarray(x, np.float32)
    rows = x.reshape(-1, x.shape[-1])
    ch = np.abs(rows).max(0) if scaling in ("both", "channel") and rows.size else np.ones(rows.shape[-1], np.float32)
    ch = np.where(ch > 0, ch, 1.0).astype(np.float32)
    y = rows / ch
    tok = np.abs(y).max(1) if scaling in ("both", "token") and rows.size else np.ones(rows.shape[0], np.float32)
    tok = np.where(tok > 0, tok, 1.0).astype(np.float32)
    top = INT8_MAX if dtype == INT8 else FLOAT8_MAX
    z = y * (top / tok)[:, None]
    codes = np.clip(np.rint(z), -INT8_MAX, INT8_MAX).astype(np.int8) if dtype == INT8 else to_float8_bits(z)
    return Encoded(codes.reshape(x.shape), (tok / top).astype(np.float32), ch)


def encode(x: Any, dtype: str) -> Encoded:
    """Features as stored in `dtype`."""
    if dtype in QUANTIZED:
        return quantize(x, dtype)
    if dtype == BF16:
        return Encoded(to_bf16_bits(x))
    return Encoded(np.ascontiguousarray(np.asarray(x, dtype=dtype)))


def decode(codes: Any, dtype: str, token_scales: Any = None, channel_scales: Any = None) -> np.ndarray:
    """Stored codes back to values: float32 for bfloat16/int8/float8 (bfloat16 exactly; int8/float8 times their
    scales), float32/float16 as stored."""
    if dtype == BF16:
        return from_bf16_bits(codes)
    if dtype not in QUANTIZED:
        return np.asarray(codes)
    c = np.asarray(codes)
    v = from_float8_bits(c) if dtype == FLOAT8 else c.astype(np.float32)
    rows = v.reshape(-1, v.shape[-1]) * np.asarray(token_scales, np.float32)[:, None]
    return (rows * np.asarray(channel_scales, np.float32)[None, :]).reshape(v.shape)
