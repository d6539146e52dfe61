"""Shared fixtures and helpers: tiny images written in the test, a CLI runner, toy backbones, the tiny model flags,
WebDataset/tar inputs, the S² golden cases and the hostile-input battery. Test modules take fixtures by name and
import helpers with `from conftest import ...`; no test module imports another."""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import typer.testing
from hubserver import HubServer, closed_port
from PIL import Image
from safetensors.torch import load_file
from typer.main import get_command as _get_command
from typer.testing import CliRunner

from s2cli.cli import app

# under pytest-xdist (`-n 2`, the README's test command) each worker has a core of its own: torch runs on one thread
# in it and in the interpreters its tests start (two workers of two threads each on two cores would contend)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

DATA = Path(__file__).parent / "data"
EXAMPLES = Path(__file__).parent.parent / "examples" / "images"

# the tiny random-init model most CLI tests extract with (2 scales, 64 px tiles); FAST also decodes in-process
MODEL = ["-m", "timm:test_resnet", "--random-init", "--img-sizes", "64,128", "--max-split-size", "64"]
FAST = [*MODEL, "-j", "0"]


# runs argv as `s2` in a fresh interpreter in which importing torch (or any torch.*) raises
NO_TORCH = """
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Blocked())
sys.argv = ["s2"] + sys.argv[1:]
from s2cli.cli import main
try:
    main()
finally:
    assert "torch" not in sys.modules
"""


def write_image(path: Path, hw: tuple[int, int], seed: int, fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


# ---- the environment: every variable the code under test reads is set by the test, never inherited -------------
# The caller's shell may export any of these (a cluster node exports HF_HUB_OFFLINE=1, a terminal COLUMNS, a CI
# runner FORCE_COLOR, torchrun RANK/WORLD_SIZE): each test starts with none of them, and sets the ones it needs.
ENV_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TIMM_", "TORCH_HOME", "XDG_CACHE_HOME", "S2CLI_", "SLURM_",
                "AWS_", "COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR", "PY_COLORS", "CLICOLOR", "TERM",
                "_S2_COMPLETE", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_", "CUDA_VISIBLE_DEVICES")
# what says how strict the suite is (conftest.cannot_run), not an input of the code under test
ENV_KEPT = ("S2CLI_REQUIRE_SLURM",)


def caller_env(environ=os.environ) -> list[str]:
    """The variables of `environ` that a test must not inherit (ENV_PREFIXES, less ENV_KEPT)."""
    return sorted(k for k in environ if k.startswith(ENV_PREFIXES) and k not in ENV_KEPT)


# cleared once at import too: huggingface_hub and transformers read HF_HUB_OFFLINE & co. once, when imported
for _var in caller_env():
    del os.environ[_var]


@pytest.fixture(autouse=True)
def _own_env(tmp_path_factory, monkeypatch):
    """Every test runs in an environment of its own: none of the caller's variables above (cleared per test, so a
    test that sets one leaks it to no other), an empty HF_HOME, and a hub endpoint on a local port where nothing
    listens (the `hub` fixture serves one): no test reads the user's HF cache or reaches huggingface.co."""
    for var in caller_env():
        monkeypatch.delenv(var)
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    _reset_hub_constants(monkeypatch)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist's default `--dist load` (the README's command is `-n 2`): tests go to the workers one by
    one, but the tests of a module with a module-scoped fixture (tiny models extracted once, a SLURM cluster) go
    together to one worker, which builds it once; the modules with the most tests first."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    shared = {p.name for p in Path(__file__).parent.glob("test_*.py")
              if re.search(r"@pytest\.fixture\(scope=\"module\"", p.read_text())}

    class SharedFixturesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return file if Path(file).name in shared else nodeid

    return SharedFixturesTogether(config, log)


def pytest_collection_modifyitems(items):
    """On an xdist worker the slow tests come first (every worker collects the same order, which the scheduler
    deals out): the long ones start early and short ones fill the end, so no worker is left alone with a long
    test at the end of the run."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# what a test may not start unless it is marked slow: another interpreter (Python, torchrun, s2) or a scheduler's
# command; each costs seconds (torch's import), which the inner loop (`-m "not slow"`) does without
SPAWNS = ("python", "torchrun", "s2", "srun", "sbatch", "scontrol", "pip")


def spawned_program(args) -> str | None:
    """The program a Popen(args) starts, if it is one of SPAWNS (else None: `ldconfig` that ctypes runs, say)."""
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    first = os.path.basename(os.fsdecode(argv[0]).split()[0]) if argv else ""
    return first if os.fsdecode(argv[0]) == sys.executable or first.startswith(SPAWNS) else None


@pytest.fixture(autouse=True)
def _inner_loop_starts_no_interpreter(request, monkeypatch):
    """A test not marked slow that starts a Python interpreter (a subprocess, `--devices` workers, torchrun) or a
    scheduler's command fails, naming what it started: mark it `@pytest.mark.slow`, or keep it in-process."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    started: list[str] = []
    init = subprocess.Popen.__init__

    def watched(self, args, *a, **k):
        init(self, args, *a, **k)  # a program that is not there (FileNotFoundError) started nothing
        if spawned_program(args) is not None:
            started.append(" ".join(map(os.fsdecode, [args] if isinstance(args, (str, bytes)) else args))[:200])

    monkeypatch.setattr(subprocess.Popen, "__init__", watched)
    yield
    if started:
        pytest.fail(f"a test of the inner loop started {len(started)} process(es) ({started[0]}): mark it "
                    "@pytest.mark.slow", pytrace=False)


def _reset_hub_constants(monkeypatch) -> None:
    """huggingface_hub's module constants, read from the environment at its import: the ones the tests depend on
    set as the test's environment says (offline off, progress bars on), whatever the process was started with."""
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        for name, value in (("HF_HUB_OFFLINE", False), ("HF_HUB_DISABLE_PROGRESS_BARS", None),
                            ("HF_HUB_ENABLE_HF_TRANSFER", False)):
            if hasattr(constants, name):
                monkeypatch.setattr(constants, name, value)


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


# typer's CliRunner builds the whole click command tree again (every command's parameters from its signature) at
# each invoke, ~16 ms of CPU, hundreds of times a run: built once per app here. A command still reads its options'
# registries (formats, families) when it runs, so a format registered by a test is seen as before.
@functools.cache
def _command_of(typer_app):
    return _get_command(typer_app)


if getattr(typer.testing, "_get_command", None) is _get_command:  # typer 0.26's CliRunner.invoke (a private name:
    typer.testing._get_command = _command_of  # where another typer names it otherwise, its runner is left as it is)


def run_cli(*args):
    """`s2 ARGS` run in this process (typer's CliRunner): the result's exit_code, stdout, stderr. Where a test is
    not about processes (a clean reference run, a resume, `s2 status`), this spares it an interpreter that imports
    torch (seconds of CPU each)."""
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def cli():
    return run_cli


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` for the block: a run in this process then sums as a subprocess started
    with OMP_NUM_THREADS=n does (same sums, same bits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


# ---- the S² reference's golden cases (tests/data/GOLDEN.md), run on ToyConv
GOLDEN = json.loads((DATA / "s2_reference.json").read_text())
TENSORS = load_file(str(DATA / "s2_reference.safetensors"))


def golden_kwargs(case):
    kw = dict(case["kwargs"])
    if "img_sizes" in kw:
        kw["img_sizes"] = [tuple(s) if isinstance(s, list) else s for s in kw["img_sizes"]]
    return kw


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8)


@pytest.fixture
def clip_dir(tmp_path):
    """A tiny random-init CLIP vision tower saved with save_pretrained: (its folder, the model)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**TINY)).eval()
    model.save_pretrained(tmp_path / "clip")
    return tmp_path / "clip", model


# ---- WebDataset and plain tar inputs, written in the test
def jpeg_bytes(seed: int, hw=(40, 56)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def plain_tar(path: Path, members: list[tuple[str, bytes]], cut: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    if cut is not None:
        data = path.read_bytes()
        path.write_bytes(data[:cut])
    return path


@pytest.fixture
def shards(tmp_path) -> Path:
    """shards/000000.tar and 000001.tar by webdataset.ShardWriter (3 samples each, with json/txt), and
    shards/000002.tar by plain tar (2 samples + a sample with no image)."""
    import webdataset as wds

    d = tmp_path / "shards"
    d.mkdir()
    with wds.ShardWriter(str(d / "%06d.tar"), maxcount=3, verbose=0) as sink:
        for i in range(6):
            sink.write({"__key__": f"s{i:03d}", "jpg": jpeg_bytes(i), "json": {"caption": f"image {i}", "i": i},
                        "txt": f"caption {i}"})
    plain_tar(d / "000002.tar", [("p000.png", _png(10)), ("p000.json", b'{"caption": "plain"}'),
                                 ("p001.jpg", jpeg_bytes(11)), ("junk.txt", b"no image here")])
    return d


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_shards(d: Path, n_tars: int, per_tar: int) -> Path:
    """WebDataset shards 000000.tar… of small JPEGs with a json caption each (webdataset.ShardWriter)."""
    import webdataset as wds

    d.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(d / "%06d.tar"), maxcount=per_tar, verbose=0) as sink:
        for i in range(n_tars * per_tar):
            arr = np.random.default_rng(i).integers(0, 256, (36 + i % 5, 48, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=95)
            sink.write({"__key__": f"k{i:03d}", "jpg": buf.getvalue(), "json": {"i": i}})
    return d


# ---- the hostile-input battery (tests/test_faults.py, tests/test_devicepath.py)
def goods(d: Path) -> None:
    write_image(d / "good1.png", (40, 52), 1)
    write_image(d / "good2.png", (48, 36), 2)


def rng_rgb(seed: int, hw=(48, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*hw, 3), dtype=np.uint8)


def save_png(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path, format="PNG")


def bomb_png(w: int, h: int) -> bytes:
    """A valid PNG header claiming w x h pixels, with a few bytes of data: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ---- the input battery: each case writes its files into `d` (with two good images) and the equivalent plain RGB
# PNGs into `ref`; it returns the failures expected {key: (stage, error_class)}, the images that must be extracted
# {key in d: key in ref}, and metadata they must carry {key: {...}}.
def c_truncated_jpeg(d, ref):
    data = jpeg_bytes(5, (64, 64))
    (d / "trunc.jpg").write_bytes(data[: len(data) // 2])
    return {"trunc": ("decode", "OSError")}, {}, {}


def c_zero_byte(d, ref):
    (d / "empty.jpg").write_bytes(b"")
    return {"empty": ("decode", "UnidentifiedImageError")}, {}, {}


def c_text_named_jpg(d, ref):
    (d / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    return {"notes": ("decode", "UnidentifiedImageError")}, {}, {}


def c_decompression_bomb(d, ref):
    (d / "bomb.png").write_bytes(bomb_png(40_000, 40_000))  # 1.6 G pixels, 4.8 GB decoded, 100 bytes on disk
    return {"bomb": ("decode", "DecompressionBombError")}, {}, {}


def c_symlink_loop(d, ref):
    os.symlink("loop.jpg", d / "loop.jpg")  # a link to itself
    os.symlink(".", d / "cycle")  # a folder link to its parent: not followed, so no endless walk
    return {"loop": ("read", "OSError")}, {}, {}


def c_cmyk_jpeg(d, ref):
    Image.fromarray(rng_rgb(6)).convert("CMYK").save(d / "cmyk.jpg", format="JPEG", quality=95)
    with Image.open(d / "cmyk.jpg") as im:  # Pillow's CMYK -> RGB of the decoded pixels
        assert im.mode == "CMYK"
        save_png(ref / "cmyk.png", np.asarray(im.convert("RGB")))
    return {}, {"cmyk": "cmyk"}, {"cmyk": {"mode": "CMYK"}}


def _gray16(seed):
    return np.random.default_rng(seed).integers(0, 65536, size=(44, 50), dtype=np.uint16)


def _gray16_ref(a):
    g = np.round(a / 257.0).astype(np.uint8)  # 16 bits scaled to 8, not clipped
    return np.repeat(g[:, :, None], 3, axis=2)


def c_png_16bit(d, ref):
    a = _gray16(7)
    Image.fromarray(a).save(d / "deep.png")
    save_png(ref / "deep.png", _gray16_ref(a))
    return {}, {"deep": "deep"}, {"deep": {"mode": "I;16"}}


def c_tiff_16bit_gray(d, ref):
    a = _gray16(8)
    Image.fromarray(a).save(d / "deep.tif")
    save_png(ref / "deep.png", _gray16_ref(a))
    return {}, {"deep": "deep"}, {"deep": {"mode": "I;16"}}


def c_grayscale(d, ref):
    g = rng_rgb(9)[:, :, 0]
    Image.fromarray(g, "L").save(d / "gray.png")
    save_png(ref / "gray.png", np.repeat(g[:, :, None], 3, axis=2))
    return {}, {"gray": "gray"}, {}


def c_rgba(d, ref):
    rgb = rng_rgb(10)
    alpha = np.where(np.arange(rgb.shape[1])[None, :] < 20, 0, 255).astype(np.uint8).repeat(rgb.shape[0], 0)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(d / "alpha.png")
    expect = np.where(alpha[:, :, None] == 0, 255, rgb).astype(np.uint8)  # transparent -> white, as HF does
    save_png(ref / "alpha.png", expect)
    return {}, {"alpha": "alpha"}, {"alpha": {"mode": "RGBA", "alpha": "composited on white"}}


def c_palette(d, ref):
    idx = np.random.default_rng(11).integers(0, 16, size=(40, 46), dtype=np.uint8)
    palette = np.random.default_rng(12).integers(0, 256, size=(256, 3), dtype=np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(palette.tobytes())
    im.save(d / "pal.png")
    save_png(ref / "pal.png", palette[idx])
    return {}, {"pal": "pal"}, {"pal": {"mode": "P"}}


def c_exif_rotated(d, ref):
    stored = rng_rgb(13, (40, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(stored).save(d / "rot.jpg", format="JPEG", quality=95, exif=exif.tobytes())
    with Image.open(d / "rot.jpg") as im:
        decoded = np.asarray(im.convert("RGB"))  # the pixels as stored, orientation ignored
    save_png(ref / "rot.png", np.rot90(decoded, k=-1))  # the same pixels, pre-rotated
    return {}, {"rot": "rot"}, {}


def c_one_pixel(d, ref):
    save_png(d / "dot.png", np.array([[[200, 30, 90]]], dtype=np.uint8))
    save_png(ref / "dot.png", np.array([[[200, 30, 90]]], dtype=np.uint8))
    return {}, {"dot": "dot"}, {}


def c_animated_gif(d, ref):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (30, 40), c) for c in colors]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    save_png(ref / "anim.png", np.full((40, 30, 3), colors[0], dtype=np.uint8))
    return {}, {"anim": "anim"}, {"anim": {"frames": 3, "frame_used": 0}}


def c_odd_file_names(d, ref):
    arrs = [rng_rgb(s) for s in (14, 15, 16)]
    save_png(d / "with space.png", arrs[0])
    save_png(d / "ünïcödé 写真.png", arrs[1])
    fd = os.open(os.fsencode(str(d)) + b"/caf\xe9.png", os.O_WRONLY | os.O_CREAT, 0o644)  # not UTF-8
    with os.fdopen(fd, "wb") as fh:
        buf = io.BytesIO()
        Image.fromarray(arrs[2]).save(buf, format="PNG")
        fh.write(buf.getvalue())
    for name, a in zip(("space", "unicode", "bytes"), arrs):
        save_png(ref / f"{name}.png", a)
    return {}, {"with space": "space", "ünïcödé 写真": "unicode", "caf\\xe9": "bytes"}, {}


CASES = {f.__name__[2:]: f for f in (
    c_truncated_jpeg, c_zero_byte, c_text_named_jpg, c_decompression_bomb, c_symlink_loop, c_cmyk_jpeg,
    c_png_16bit, c_tiff_16bit_gray, c_grayscale, c_rgba, c_palette, c_exif_rotated, c_one_pixel, c_animated_gif,
    c_odd_file_names)}


# ---- a `s2` subprocess whose every batch is slowed (signals and kills land mid-run, deterministically)
SLOWED = """
import sys, time
import s2cli.extractor as extractor
from s2cli.cli import app

delay = float(sys.argv[1])
submit = extractor.Extractor.submit
def slow(*a, **k):
    time.sleep(delay)
    return submit(*a, **k)
extractor.Extractor.submit = slow
app(sys.argv[2:], prog_name="s2")
"""


def slowed_s2(delay: float, *args, **popen) -> subprocess.Popen:
    """`s2 ARGS` in a new process group (signal it as a scheduler does, with os.killpg), each batch `delay` s slower;
    stdout and stderr piped."""
    return subprocess.Popen([sys.executable, "-c", SLOWED, str(delay), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


# CI (`.ci/run` sets CI=true and S2CLI_REQUIRE_SLURM=1): every test must run, none is skipped for what the machine lacks
IN_CI = os.environ.get("CI") == "true" or os.environ.get("S2CLI_REQUIRE_SLURM") == "1"


def unless_possible(why_not: str | None) -> pytest.MarkDecorator:
    """The mark of a test this machine may be unable to run (no SLURM, no root, no mount, no page cache):
    `why_not` says what is missing (None: nothing). On a developer's box such a test is skipped, saying why; in CI
    it is not skipped, it runs, and `cannot_run` fails it."""
    return pytest.mark.skipif(why_not is not None and not IN_CI, reason=str(why_not))


def cannot_run(why: str) -> None:
    """A test that must run but cannot (its `unless_possible` mark let it run: CI, or a probe that was wrong)."""
    pytest.fail(f"this test must run but cannot: {why}")


# 91 tiles an image, one image a batch and a shard: about 5 images/s a rank on a quiet 2-core box (2026-12-06), so
# DEVICES_IMAGES keep each of two ranks busy ~25 s quiet, far longer than one rank starts after the other
DEVICES_SLOW = ["-m", "timm:test_vit", "--random-init", "--scales", "1,2,3,4,5,6", "-j", "0", "-b", "1",
                "--shard-size", "1"]
DEVICES_IMAGES = 240


def devices_s2(d: Path, out: Path) -> tuple[subprocess.Popen, list[Path]]:
    """`s2 extract d -o out/ --devices cpu,cpu` slowed so that over DEVICES_IMAGES images neither worker can
    simply finish while a test signals them, in a new process group, stderr piped; and the two workers' heartbeat files."""
    p = subprocess.Popen([sys.executable, "-m", "s2cli", "extract", str(d), "-o", f"{out}/", *DEVICES_SLOW, "--devices",
                          "cpu,cpu", "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    return p, [out / "rank-00000.json", out / "rank-00001.json"]


def dead_pid() -> int:
    """A process id that no process has: the kernel's pid_max (ids stay below it), so a test needs no process of
    its own to die (starting one is a subprocess the inner loop does without)."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):  # not Linux: a process that has ended
        p = subprocess.Popen([sys.executable, "-c", "pass"])
        p.wait()
        return p.pid


def wait_until(cond, what: str, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---- object stores: a real S3 API on loopback (moto's server) ----------------------------------------------------
@pytest.fixture(scope="session")
def _moto_server():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(_moto_server, monkeypatch):
    """A fresh bucket on moto's S3 server (loopback), with AWS_ENDPOINT_URL and test credentials set for the test
    and its subprocesses, and s3fs's cached instances and listings cleared around it. Yields the s3fs file
    system; the bucket's name is `s3.bucket`."""
    import uuid

    import s3fs

    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", _moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.bucket = f"b-{uuid.uuid4().hex[:12]}"
    fs.mkdir(fs.bucket)
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_folder():
    """Serve a local folder over HTTP on loopback: `serve(path) -> base URL`; stopped after the test."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    servers = []

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    def serve(path: Path) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(path)))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


# ---- a tiny open_clip model, as open_clip.push_to_hf_hub lays its repo out
OPEN_CLIP_MEAN, OPEN_CLIP_STD = (0.5, 0.45, 0.4), (0.25, 0.26, 0.27)


def tiny_open_clip(folder: Path, resize_mode: str = "shortest", seed: int = 0) -> Path:
    """A repo folder of a tiny open_clip ViT (64 px, patch 16, 3 blocks of width 32), random-init from `seed`."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 64, "layers": 3, "width": 32, "head_width": 16, "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    pre = {"size": 64, "mean": list(OPEN_CLIP_MEAN), "std": list(OPEN_CLIP_STD), "interpolation": "bicubic",
           "resize_mode": resize_mode}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre}))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder
