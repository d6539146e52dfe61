"""`--layers`: several hidden layers from one forward. The syntax (a comma list of indices and inclusive ranges),
how they are stored (layer-major: an image's (L, T, C) features as L*T rows, its (L, C) pooled vectors as one row
of L*C), and picking one back. No torch, no I/O."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .errors import ConfigError

SYNTAX = "-1,-2,-12 (a list) or -4:-1 (A:B, both ends included), or both: 1:3,-1"


def parse_layers(value: Any) -> tuple[int, ...] | None:
    """`--layers` as given (text, an int, or a list of ints and texts, as a recipe gives it) -> the layers in the
    order given; None when not set. A range A:B holds every index from A to B, both included, ascending or
    descending as written. A layer listed twice is refused."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    out: list[int] = []
    for p in parts:
        out += _one(p, value)
    if not out:
        raise ConfigError("--layers is empty", given=value, expected=SYNTAX, fix="e.g. --layers -1,-2")
    dup = sorted({x for x in out if out.count(x) > 1})
    if dup:
        raise ConfigError("--layers lists a layer twice", given=value, expected="each layer once",
                          fix=f"drop the repeated {','.join(map(str, dup))}")
    return tuple(out)


def _one(p: Any, whole: Any) -> list[int]:
    if isinstance(p, bool):
        raise ConfigError("--layers takes layer indices", given=whole, expected=SYNTAX, fix="e.g. --layers -1,-2")
    if isinstance(p, int):
        return [p]
    text = str(p).strip()
    try:
        if ":" in text[1:]:
            cut = text.index(":", 1)
            a, b = int(text[:cut]), int(text[cut + 1:])
            return list(range(a, b + 1)) if a <= b else list(range(a, b - 1, -1))
        return [int(text)]
    except ValueError:
        raise ConfigError("--layers is not a list of layer indices", given=whole, expected=SYNTAX,
                          fix="e.g. --layers -1,-2,-12 or --layers=-4:-1") from None


def stored_layers(attrs: dict[str, Any]) -> list[int] | None:
    """The layers an output stores (its `layers` attribute, JSON), or None for one layer stored plainly."""
    import json

    v = attrs.get("layers")
    if v is None:
        return None
    v = json.loads(v) if isinstance(v, (str, bytes)) else v
    return None if v is None else [int(x) for x in v]


def pick_index(layers: Sequence[int], layer: int | None, where: Any) -> int | None:
    """The position of `layer` among the stored `layers` (None: all of them)."""
    if layer is None:
        return None
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or int(layer) not in layers:
        raise ConfigError("that layer is not stored", given=f"layer={layer!r} in {where}",
                          expected=f"one of {','.join(map(str, layers))} (or none: all)",
                          fix=f"pass layer={layers[0]}, as the run's --layers listed it")
    return list(layers).index(int(layer))


def split_rows(x: np.ndarray, n: int) -> np.ndarray:
    """Stored features (..., L*T, C) -> (..., L, T, C)."""
    return x.reshape(*x.shape[:-2], n, x.shape[-2] // n, x.shape[-1])


def split_vector(x: np.ndarray, n: int) -> np.ndarray:
    """Stored pooled vectors (..., L*C) -> (..., L, C)."""
    return x.reshape(*x.shape[:-1], n, x.shape[-1] // n)
