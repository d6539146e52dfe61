"""The decoded-sample record and the per-image plan: what decoding hands the run is one typed `Decoded` record,
and the image's plan in it is made once, where the image's size is first known, then read by the engine, the
writer and `s2 viz` (never rebuilt)."""
from __future__ import annotations

import collections
import io
import json
import pickle
from multiprocessing.reduction import ForkingPickler  # the pickler a decode worker's results go through

import numpy as np
import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers the reductions that put tensors in shared memory)
from PIL import Image

import s2cli
from conftest import write_image
from s2cli import open_features, strategies, tiling
from s2cli.inputs.decode import Decoded, decode_sample
from s2cli.inputs.samples import Sample
from s2cli.plan import fit_of
from s2cli.strategies import ImagePlan, ViewImagePlan, plan_image, plan_strategy_image, strategy_of

# varied sizes: portrait, landscape, square, long; every one a different plan under --fit keep and the strategies
SIZES = {"a": (40, 60), "b": (64, 48), "c": (50, 50), "d": (30, 70), "e": (90, 36)}
S2 = {"model": "timm:test_resnet", "img_sizes": (48, 96), "max_split_size": 48, "fit": "keep"}
INTERNVL = {"model": "timm:test_vit", "strategy": "internvl", "max_tiles": 4}
ANYRES = {"model": "timm:test_vit", "strategy": "anyres"}


def _inputs(d, video: bool = False) -> dict[str, tuple[int, int]]:
    """The images of SIZES (and a video of 6 frames, 48x64) in `d`: key -> (h, w)."""
    for key, hw in SIZES.items():
        write_image(d / f"{key}.png", hw, seed=len(key) + hw[0])
    if not video:
        return dict(SIZES)
    from test_video import make_video

    make_video(d / "v.mp4", n=6, hw=(48, 64))
    return {**SIZES, "v": (48, 64)}


def _counting(monkeypatch, module, name: str) -> list[tuple[int, int]]:
    """Every call of `module.name` from now on: the (h, w) it was given."""
    calls: list[tuple[int, int]] = []
    real = getattr(module, name)

    def spy(*args, **kw):
        calls.append(tuple(args[1] if name in ("plan_image", "plan_strategy") else args[0]))
        return real(*args, **kw)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("video, output", [(False, "o.h5"), pytest.param(True, "o/", marks=pytest.mark.slow)],
                         ids=["images-file", "images+video-shards"])
def test_s2_plans_each_image_once_and_the_engine_and_writer_use_that_plan(tmp_path, monkeypatch, video, output):
    """An extract of N images of varied sizes (and a video, whose frames share its plan) calls `plan_image` once
    per image with its size, plus once per run for the shards' layout (a square image of the largest side, however
    many shards); every tile plan (`plan_multiscale`) is one of those: the engine and the pooled vectors take the
    image's."""
    sizes = _inputs(tmp_path / "in", video)
    images = _counting(monkeypatch, strategies, "plan_image")
    tiles = _counting(monkeypatch, strategies, "plan_multiscale")
    engine = _counting(monkeypatch, tiling, "plan_multiscale")
    opts = {**S2, **({"num_frames": 3, "shard_size": 2} if video else {})}
    s = s2cli.extract(str(tmp_path / "in"), str(tmp_path / output), random_init=True, workers=0, batch_size=3, **opts)
    assert s.num_images == len(sizes) and s.num_failed == 0
    side = max(S2["img_sizes"])
    assert collections.Counter(images) == collections.Counter([*sizes.values(), (side, side)])
    assert len(tiles) == len(images) and engine == []
    assert s.shards_written == (3 if video else None)  # (6 entries, 2 a shard)
    res = s2cli.settings(str(tmp_path / "in"), **opts)
    with open_features(tmp_path / output) as ff:  # what is stored is what a fresh plan of each image says
        for key, hw in sizes.items():
            m, want = ff.meta(key), plan_image(res, hw)
            assert tuple(m["orig_hw"]) == hw and tuple(m["grid_hw"]) == want.grid_hw
            assert ff[key].shape[-2:] == (want.tokens, want.channels)


@pytest.mark.parametrize("options", [INTERNVL, pytest.param(ANYRES, marks=pytest.mark.slow)], ids=["internvl", "anyres"])
def test_a_view_strategy_plans_each_image_once(tmp_path, monkeypatch, options):
    """The views strategies: `plan_strategy` is called exactly once per image (decode renders its views from the
    plan, the Extractor cuts and merges by it, the writer stores it), and the stored plan is a fresh plan's."""
    sizes = _inputs(tmp_path / "in", video=True)
    calls = _counting(monkeypatch, strategies, "plan_strategy")
    opts = {**options, "num_frames": 3}
    s = s2cli.extract(str(tmp_path / "in"), str(tmp_path / "o.h5"), random_init=True, workers=0, batch_size=3, **opts)
    assert s.num_images == len(sizes) and s.num_failed == 0
    assert collections.Counter(calls) == collections.Counter(sizes.values())
    res = s2cli.settings(str(tmp_path / "in"), **opts)
    with open_features(tmp_path / "o.h5") as ff:
        for key, hw in sizes.items():
            want = plan_strategy_image(res, hw)
            m = ff.meta(key)
            assert m["plan"]["grids"] == want.views.grids and m["plan"]["output"] == want.layout.to_dict()
            assert ff[key].shape[-2] == want.layout.tokens


@pytest.mark.parametrize("options", [S2, ANYRES], ids=["s2", "anyres"])
def test_the_decoded_record_carries_the_plan_and_pickles_with_its_tensors(tmp_path, options):
    """`decode_sample` gives a `Decoded` whose plan is the strategy's plan of its size; with its arrays as torch
    tensors (as a decode worker sends them, through shared memory) it pickles and comes back field for field."""
    path = write_image(tmp_path / "x.png", (40, 60), 3)
    res = s2cli.settings(str(tmp_path), **options)
    rec = decode_sample(Sample("x", str(path)), fit_of(res))
    assert isinstance(rec, Decoded) and rec.error is None and rec.orig_hw == (40, 60)
    assert rec.plan == strategy_of(res).plan(res, (40, 60))
    assert isinstance(rec.plan, ImagePlan if options is S2 else ViewImagePlan)
    rec.map_arrays(torch.from_numpy)
    back = pickle.loads(ForkingPickler.dumps(rec))
    assert (back.key, back.source, back.meta, back.orig_hw, back.plan) == (rec.key, rec.source, rec.meta,
                                                                         rec.orig_hw, rec.plan)
    pixels = back.pixels if isinstance(back.pixels, list) else [back.pixels]
    want = rec.pixels if isinstance(rec.pixels, list) else [rec.pixels]
    assert len(pixels) == len(want) and all(torch.equal(a, b) for a, b in zip(pixels, want))


def test_a_failed_sample_is_a_record_with_its_failure_and_decode_notes_go_through_meta(tmp_path):
    """A sample that cannot be read is a `Decoded` with `error` (no pixels, no plan); what decoding did to an
    image (alpha composited) is merged into the sample's own metadata, which is kept."""
    res = s2cli.settings(str(tmp_path), **S2)
    bad = decode_sample(Sample("bad", str(tmp_path / "missing.png")), fit_of(res))
    assert bad.error is not None and bad.error["key"] == "bad" and bad.error["stage"] == "read"
    assert bad.pixels is None and bad.plan is None
    buf = io.BytesIO()
    Image.new("RGBA", (20, 30), (10, 20, 30, 128)).save(buf, format="PNG")
    rec = decode_sample(Sample("rgba", "<m>", data=buf.getvalue(), meta='{"txt": "hi"}'), fit_of(res))
    assert json.loads(rec.meta) == {"txt": "hi", "decode": {"mode": "RGBA", "alpha": "composited on white"}}
    assert rec.plan == plan_image(res, (30, 20)) and np.asarray(rec.pixels).dtype == np.uint8


class _Decoding(torch.utils.data.Dataset):
    """Samples decoded in a DataLoader worker, the record's arrays as torch tensors (shared memory)."""

    def __init__(self, samples, fit):
        self.samples, self.fit = samples, fit

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return decode_sample(self.samples[i], self.fit).map_arrays(torch.from_numpy)


def test_the_record_passes_through_a_torch_dataloader_worker(tmp_path):
    """What torch's DataLoader does with a worker's item (`default_convert`, the worker's pickler) leaves a
    `Decoded` whole: its plan, its metadata and its pixels come back as an in-process decode gives them."""
    sizes = _inputs(tmp_path)
    res = s2cli.settings(str(tmp_path), **INTERNVL)
    fit = fit_of(res)
    samples = [Sample(k, str(tmp_path / f"{k}.png")) for k in sizes]
    loader = torch.utils.data.DataLoader(_Decoding(samples, fit), batch_size=None, num_workers=1)
    got = list(loader)
    assert [r.key for r in got] == list(sizes) and all(isinstance(r, Decoded) for r in got)
    for r, s in zip(got, samples):
        want = decode_sample(s, fit)
        assert r.plan == want.plan and r.orig_hw == want.orig_hw == sizes[s.key] and r.meta == want.meta
        assert len(r.pixels) == len(want.pixels) and all(torch.equal(a, torch.from_numpy(b))
                                                         for a, b in zip(r.pixels, want.pixels))


def test_the_engine_takes_the_plan_made_for_its_input_and_refuses_another(toy):
    """`multiscale_forward(..., plan=)` runs the tiles planned by the caller (a run's per-image plan): the same
    output as planning there; a plan made for another input size is refused in one ConfigError."""
    from s2cli.errors import ConfigError

    model, kw = toy(), {"img_sizes": [(32, 48), (64, 96)], "max_split_size": 16}
    x = torch.randn(2, 3, 32, 48)
    plan = tiling.plan_multiscale((32, 48), **kw)
    assert torch.equal(tiling.multiscale_forward(model, x, **kw, plan=plan), tiling.multiscale_forward(model, x, **kw))
    with pytest.raises(ConfigError, match="not the input's"):
        tiling.multiscale_forward(model, x[..., :40], **kw, plan=plan)
