"""The README's examples run as written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_python_api_example_runs_offline():
    r = subprocess.run([sys.executable, "examples/python_api.py", "--random-init"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "features (1, 197, 128)" in r.stdout


def test_example_images_are_real_photos_of_varied_shapes():
    from PIL import Image

    sizes = {p.stem: Image.open(p).size for p in (ROOT / "examples" / "images").iterdir()}
    assert {"astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "motorcycle_left", "page"} <= set(sizes)
    assert len({w / h for w, h in sizes.values()}) >= 4
