"""Images' metadata as table columns (`s2 export`'s parquet, `to_hf_dataset`): every field of every image, JSON
objects flattened to dotted columns as clip-retrieval does (`pandas.json_normalize`), one type per column.

The rules, in the order they apply to one image's metadata:
  - metadata that is not a JSON object (a list, a number, a string) is the one field `meta`;
  - a nested object is flattened: {"exif": {"iso": 100}} is the column `exif.iso`; an empty object stays `{}`;
  - a field named like a column the table has of its own (`key`, `image_path`, `source`, ...) is kept as
    `meta.<name>` (clip-retrieval drops it; here nothing is dropped); a flattened name an image already has
    (`{"a": {"b": 1}, "a.b": 2}`) keeps the first one in the object's order, the next one is `a.b#2`, ...
Then over all images: a column holds the union of the fields (None where an image lacks one). Its type: bool, int,
float (ints and floats together are floats) or string where every value has that type; anything else (values of
mixed types across images, lists, empty objects) is a string column: strings as they are, other values as JSON
text (`5`, `true`, `[1, 2]`)."""
from __future__ import annotations

import json
from typing import Any

KINDS = ("bool", "int", "float", "string")


def flatten(meta: Any, reserved: tuple[str, ...] = ()) -> dict[str, Any]:
    """One image's metadata as {column: value} (see the module's rules); {} for none."""
    if meta is None:
        return {}
    out: dict[str, Any] = {}

    def put(name: str, value: Any) -> None:
        name = f"meta.{name}" if name in reserved else name
        final, n = name, 1
        while final in out:
            n += 1
            final = f"{name}#{n}"
        out[final] = value

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                put(f"{prefix}{k}", v)

    if isinstance(meta, dict):
        walk(meta, "")
    else:
        put("meta", meta)
    return out


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    return "string" if isinstance(v, str) else "json"


class Columns:
    """The columns of a table of flattened metadata rows, in the order first seen, with the kinds of their values;
    `add` rows (or another Columns), then `types` says each column's type and `cast` makes a row of them."""

    def __init__(self) -> None:
        self.kinds: dict[str, set[str]] = {}

    def add(self, rows: list[dict[str, Any]]) -> Columns:
        for row in rows:
            for name, v in row.items():
                seen = self.kinds.setdefault(name, set())
                if v is not None:
                    seen.add(_kind(v))
        return self

    def merge(self, other: Columns) -> None:
        for name, kinds in other.kinds.items():
            self.kinds.setdefault(name, set()).update(kinds)

    def types(self) -> dict[str, str]:
        """Each column's type: bool | int | float | string (see the module's rules)."""
        out = {}
        for name, kinds in self.kinds.items():
            if kinds == {"int", "float"}:
                out[name] = "float"
            elif len(kinds) == 1 and next(iter(kinds)) in KINDS:
                out[name] = next(iter(kinds))
            else:
                out[name] = "string"  # none seen (all None), mixed, or JSON values
        return out

    def cast(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows with every column (None where a row lacks it), each value of its column's type."""
        types = self.types()
        return [{name: _as(row.get(name), t) for name, t in types.items()} for row in rows]

    def arrow_schema(self) -> Any:
        import pyarrow as pa

        arrow = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "string": pa.string()}
        return pa.schema([(name, arrow[t]) for name, t in self.types().items()])


def _as(v: Any, t: str) -> Any:
    if v is None:
        return None
    if t == "float":
        return float(v)
    if t == "string" and not isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    return v
