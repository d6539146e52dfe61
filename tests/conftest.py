"""Shared fixtures: tiny images written in the test, a CLI runner, toy backbones."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from hubserver import HubServer, closed_port
from s2cli.cli import app

DATA = Path(__file__).parent / "data"
EXAMPLES = Path(__file__).parent.parent / "examples" / "images"


def write_image(path: Path, hw: tuple[int, int], seed: int, fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


@pytest.fixture(autouse=True)
def _no_real_hub(tmp_path_factory, monkeypatch):
    """No test reads the user's HF cache or reaches huggingface.co: every test has an empty HF_HOME of its own,
    and the hub endpoint is a local port where nothing listens (the `hub` fixture serves one)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")


@pytest.fixture
def hub(monkeypatch):
    """A loopback Hugging Face Hub (tests/hubserver.py) at HF_ENDPOINT; publish folders with `hub.add(repo, dir)`."""
    server = HubServer().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.stop()


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Four small images of different sizes and formats, one in a subfolder."""
    d = tmp_path / "imgs"
    write_image(d / "a.png", (40, 60), 1)
    write_image(d / "b.jpg", (64, 48), 2)
    write_image(d / "sub" / "c.PNG", (50, 50), 3)
    write_image(d / "d.webp", (30, 70), 4)
    return d


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def invoke_json(cli, *args):
    r = cli(*args)
    assert r.exit_code == 0, r.stderr + r.stdout
    return json.loads(r.stdout)


class ToyConv(torch.nn.Module):
    """The golden cases' toy backbone: conv2d with a stride, optional prefix tokens (mean, max)."""

    def __init__(self, weight, bias, stride=4, output_shape="bnc", num_prefix=0):
        super().__init__()
        self.weight, self.bias, self.stride = weight, bias, stride
        self.output_shape, self.num_prefix = output_shape, num_prefix
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        y = F.conv2d(x, self.weight, self.bias, stride=self.stride)
        if self.output_shape == "bchw":
            return y
        tok = y.flatten(2).transpose(1, 2)
        pre = [tok.mean(1, keepdim=True), tok.amax(1, keepdim=True)][: self.num_prefix]
        return torch.cat(pre + [tok], 1)


@pytest.fixture
def toy():
    g = torch.Generator().manual_seed(0)

    def make(output_shape="bnc", num_prefix=0, cin=3, cout=8, k=4, stride=4):
        return ToyConv(torch.randn(cout, cin, k, k, generator=g), torch.randn(cout, generator=g), stride,
                       output_shape, num_prefix)

    return make


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8)


@pytest.fixture
def clip_dir(tmp_path):
    """A tiny random-init CLIP vision tower saved with save_pretrained: (its folder, the model)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**TINY)).eval()
    model.save_pretrained(tmp_path / "clip")
    return tmp_path / "clip", model
