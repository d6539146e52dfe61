"""The README's examples run as written (examples/python_api.py: tests/test_face.py runs it from another folder)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_example_images_are_real_photos_of_varied_shapes():
    from PIL import Image

    sizes = {p.stem: Image.open(p).size for p in (ROOT / "examples" / "images").iterdir()}
    assert {"astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "motorcycle_left", "page"} <= set(sizes)
    assert len({w / h for w, h in sizes.values()}) >= 4
