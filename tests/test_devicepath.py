"""The device side of the data path (issue #7): host<->device copies (pinned + side stream on CUDA, plain on the
CPU), channels_last, and `--decode torch` (JPEG decode + fit with torch, Pillow fallback recorded per image).
Oracles: the plain path's features, Pillow's pixels and orientation, and a `--decode pil` run of the fault battery.
The CUDA tests run where a GPU is."""
from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import CASES, MODEL, goods, invoke_json, write_image
from s2cli import multiscale_forward, open_features
from s2cli.backbones import load_backbone, resolve
from s2cli.bench import decode_compare, synthetic_jpegs
from s2cli.config import ExtractConfig, build_config, resolve_config
from s2cli.devicepath import Transfer, decode_batch, fit_tensor, orient
from s2cli.extractor import Extractor, use_channels_last
from s2cli.inputs.decode import Decoded, Fit, decode_sample, probe_jpeg
from s2cli.inputs.samples import Sample
from s2cli.pixels import fit_image, to_uint8_array
from s2cli.strategies import plan_image

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TINY_VIT = ("-m", "timm:test_vit", "--random-init")


def smooth(seed: int, hw: tuple[int, int]) -> np.ndarray:
    """A photo-like image (a bicubic-upsampled random field): JPEG and resizing behave as on photos."""
    rng = np.random.default_rng(seed)
    return np.array(Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((hw[1], hw[0]), Image.BICUBIC))


def jpeg(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=92, **save)
    return buf.getvalue()


def _res(tmp_path, model="timm:test_vit", **flags):
    cfg = build_config(str(tmp_path), str(tmp_path / "o.h5"), model=model, random_init=True, **flags)
    return resolve_config(cfg, resolve(cfg.model))


# ---- host <-> device ---------------------------------------------------------------------------------------------
def test_transfer_on_the_cpu_is_a_plain_stack_and_copy():
    t = Transfer(torch.device("cpu"))
    imgs = [torch.randint(0, 256, (3, 8, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    x = t.to_device(imgs)
    assert torch.equal(x, torch.stack(imgs)) and t.copy_stream is None
    assert t.to_device(x) is x
    p = t.to_host(x.float(), None)
    assert p.event is None and torch.equal(p.result()[0], x.float()) and p.result()[1] is None


def test_cpu_batches_are_stacked_into_reused_buffers_overwritten_two_batches_later():
    """The CPU's stand-in for pinned memory: a batch of a shape seen before lands in a buffer already mapped (no
    fresh allocation, no page faults); the one before it stays intact for one more batch."""
    t = Transfer(torch.device("cpu"))
    batch = lambda k: [torch.full((3, 4, 5), 10 * k + i, dtype=torch.uint8) for i in range(2)]  # noqa: E731
    a, b = t.to_device(batch(1)), t.to_device(batch(2))
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, torch.stack(batch(1))) and torch.equal(b, torch.stack(batch(2)))
    c = t.to_device(batch(3))
    assert c.data_ptr() == a.data_ptr() and torch.equal(c, torch.stack(batch(3))) and torch.equal(b, torch.stack(batch(2)))
    odd = t.to_device([torch.zeros((3, 2, 2), dtype=torch.uint8)])  # another shape: its own buffers
    assert odd.shape == (1, 3, 2, 2) and torch.equal(t.to_device(batch(4)), torch.stack(batch(4)))


def test_submit_then_result_equals_the_plain_engine(tmp_path):
    """Extractor.submit (stage, normalize, engine, copy back; deferred in the pipeline) gives exactly what the
    engine gives when called directly on the normalized batch."""
    res = _res(tmp_path, pool="mean")
    bb = load_backbone(res.backbone, random_init=True)
    ex = Extractor(res, bb, torch.device("cpu"), torch.float32)
    imgs = [torch.from_numpy(to_uint8_array(Image.fromarray(smooth(i, (320, 320))))) for i in range(3)]
    plan = plan_image(res, (320, 320))
    sizes = plan.engine_sizes
    pending = ex.submit(imgs, plan)
    feats, pooled = pending.result()
    x = (torch.stack(imgs).float() / 255 - ex.mean) / ex.std
    with torch.inference_mode():
        want = multiscale_forward(bb, x, img_sizes=sizes, max_split_size=res.max_split_size, num_prefix_token=1,
                                  output_shape="bnc")
    assert torch.equal(feats, want) and torch.equal(pooled, want[:, 1:].mean(1))
    f2, _ = ex.features(torch.stack(imgs), plan)  # a stacked batch too
    assert torch.equal(f2, want)


def test_one_batch_in_flight_keeps_keys_features_and_failures(cli, tmp_path):
    """The pipeline writes a batch after submitting the next: with a broken image mid-input and several batches
    and shards, keys, failures and features equal those of -b 1 (no two batches ever overlap there)."""
    d = tmp_path / "in"
    for i in range(7):
        write_image(d / f"i{i}.png", (30 + 3 * i, 40), i)
    (d / "i3.png").write_bytes(b"junk")
    a = invoke_json(cli, "extract", d, *MODEL, "-o", f"{tmp_path}/a/", "-b", 3, "-j", 0, "--shard-size", 4, "--json", "-q")
    b = invoke_json(cli, "extract", d, *MODEL, "-o", f"{tmp_path}/b/", "-b", 1, "-j", 0, "--shard-size", 4, "--json", "-q")
    assert a["num_images"] == b["num_images"] == 6 and a["num_failed"] == b["num_failed"] == 1
    with open_features(tmp_path / "a") as fa, open_features(tmp_path / "b") as fb:
        assert list(fa) == list(fb) == [f"i{i}" for i in range(7) if i != 3]
        assert [f["key"] for f in fa.failures] == ["i3"]
        for k in fa:
            np.testing.assert_allclose(fa[k], fb[k], rtol=1e-5, atol=1e-5)


# ---- channels_last -----------------------------------------------------------------------------------------------
def test_channels_last_gives_the_same_features_and_defaults_on_for_convnets(tmp_path):
    res = _res(tmp_path, model="efficientnet-lite0")
    assert use_channels_last(res) and not use_channels_last(_res(tmp_path))  # bchw on, ViT off
    assert not use_channels_last(_res(tmp_path, model="efficientnet-lite0", channels_last=False))
    x = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    plain = load_backbone(res.backbone, random_init=True, seed=3)
    nhwc = load_backbone(res.backbone, random_init=True, seed=3).channels_last()
    with torch.inference_mode():
        a = multiscale_forward(plain, x, img_sizes=[224, 448], max_split_size=224, output_shape="bchw")
        b = multiscale_forward(nhwc, x, img_sizes=[224, 448], max_split_size=224, output_shape="bchw")
    assert nhwc.nhwc and not plain.nhwc
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())
    assert '"channels_last": null' in res.to_json()


def test_channels_last_flag_reaches_the_run(cli, tmp_path, image_dir):
    a = invoke_json(cli, "extract", image_dir, *MODEL, "-o", tmp_path / "a.h5", "-j", 0, "--no-channels-last", "--json", "-q")
    b = invoke_json(cli, "extract", image_dir, *MODEL, "-o", tmp_path / "b.h5", "-j", 0, "--json", "-q")
    assert a["num_images"] == b["num_images"] == 4
    with open_features(tmp_path / "a.h5") as fa, open_features(tmp_path / "b.h5") as fb:
        assert fa.config["channels_last"] is False and fb.config["channels_last"] is None
        for k in fa:
            np.testing.assert_allclose(fa[k], fb[k], rtol=1e-5, atol=1e-5 * float(np.abs(fa[k]).max()))


# ---- decode and fit on the device --------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pillow_exif_transpose(orientation):
    arr = np.random.default_rng(orientation).integers(0, 256, (5, 9, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "PNG", exif=exif.tobytes())
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    got = orient(torch.from_numpy(arr).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fit", ["crop", "squash", "pad", "keep"])
@pytest.mark.parametrize("hw,side", [((60, 90), 48), ((90, 60), 128), ((50, 50), 50)])
def test_fit_tensor_matches_pillow_within_rounding(fit, hw, side):
    """The same geometry as pixels.fit_image; torch's bicubic antialias resize is Pillow's filter in float, so
    the pixels differ by rounding only (at most 2 of 255, on a few percent of values)."""
    arr = smooth(1, hw)
    mean = (0.48, 0.46, 0.41)
    want = to_uint8_array(fit_image(Image.fromarray(arr), fit, side, mean)).astype(int)
    got = fit_tensor(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), fit, side, mean).numpy().astype(int)
    assert got.shape == want.shape
    diff = np.abs(got - want)
    assert diff.max() <= 2 and (diff > 0).mean() < 0.1


def test_probe_jpeg_takes_what_the_device_decoder_can_and_says_why_not():
    arr = smooth(2, (40, 56))
    exif = Image.Exif()
    exif[0x0112] = 6
    ok, _ = probe_jpeg(jpeg(arr, exif=exif.tobytes()))
    assert ok == {"stored_hw": (40, 56), "orientation": 6, "mode": "RGB"}
    assert probe_jpeg(jpeg(arr, progressive=True))[0]["mode"] == "RGB"
    assert probe_jpeg(jpeg(arr[:, :, 0]))[0]["mode"] == "L"
    cmyk = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(cmyk, "JPEG")
    png = io.BytesIO()
    Image.fromarray(arr).save(png, "PNG")
    data = jpeg(arr)
    for raw, reason in ((cmyk.getvalue(), "JPEG in mode CMYK"), (png.getvalue(), "PNG image, not a JPEG"),
                        (data[: len(data) // 2], "no JPEG end-of-image marker"), (b"junk", "header not readable")):
        info, why = probe_jpeg(raw)
        assert info is None and why.startswith(reason)


def test_decode_batch_matches_pillow_and_orients(tmp_path):
    """Worker side (read + probe) then decode_batch on the CPU: orig_hw upright, pixels within rounding of the
    Pillow path (libjpeg-turbo decodes both), EXIF rotation applied like exif_transpose."""
    arr = smooth(3, (60, 96))
    exif = Image.Exif()
    exif[0x0112] = 8
    samples = [Sample("plain", "<m>", data=jpeg(arr)), Sample("rot", "<m>", data=jpeg(arr, exif=exif.tobytes())),
               Sample("gray", "<m>", data=jpeg(arr[:, :, 1])), Sample("prog", "<m>", data=jpeg(arr, progressive=True))]
    fit = Fit("crop", 48, (0.5, 0.5, 0.5), None, "torch")
    recs = [decode_sample(s, fit) for s in samples]
    assert all(r.jpeg is not None and r.pixels is None for r in recs)
    decode_batch(recs, fit, torch.device("cpu"))
    pil = [decode_sample(s, Fit("crop", 48, (0.5, 0.5, 0.5))) for s in samples]
    for r, p in zip(recs, pil):
        assert r.error is None and r.jpeg is None and r.orig_hw == p.orig_hw and r.meta == p.meta
        assert np.abs(r.pixels.numpy().astype(int) - p.pixels.astype(int)).max() <= 2
    assert recs[1].orig_hw == (96, 60) and json.loads(recs[2].meta)["decode"] == {"mode": "L"}


def test_device_decoder_failure_falls_back_to_pillow_per_image(monkeypatch):
    """When the device decoder refuses one image of the batch, the batch is decoded image by image and that
    image is decoded with Pillow, recorded as meta.decode.path "pil-fallback" with the decoder's error."""
    import torchvision.io

    real = torchvision.io.decode_jpeg
    bad = jpeg(smooth(5, (30, 40)))

    def picky(data, **kw):
        if isinstance(data, list) or bytes(data.numpy()) == bad:
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    fit = Fit("squash", 32, (0.5, 0.5, 0.5), None, "torch")
    recs = [decode_sample(Sample(k, "<m>", data=d, meta=m), fit)
            for k, d, m in (("a", jpeg(smooth(4, (30, 40))), None), ("b", bad, '{"txt": "hi"}'))]
    decode_batch(recs, fit, torch.device("cpu"))
    assert recs[0].meta is None and recs[0].pixels.shape == (3, 32, 32)
    meta = json.loads(recs[1].meta)
    assert meta["txt"] == "hi" and meta["decode"]["path"] == "pil-fallback" and "nvjpeg: unsupported" in meta["decode"]["reason"]
    want = decode_sample(Sample("b", "<m>", data=bad), Fit("squash", 32, (0.5, 0.5, 0.5))).pixels
    np.testing.assert_array_equal(recs[1].pixels.numpy(), want)


def test_decode_torch_on_the_fault_battery_equals_pil_but_for_rounding(cli, tmp_path):
    """Every hostile input of the fault battery (CASES in tests/conftest.py) in one folder, `--decode torch` against
    `--decode pil`: the same keys and failure records (stage, class), Pillow-fallback images bit-identical with the
    reason in their meta, JPEGs decoded by torch within rounding of Pillow's features."""
    d, ref = tmp_path / "in", tmp_path / "ref"
    d.mkdir()
    ref.mkdir()
    goods(d)
    for name, case in CASES.items():  # one subfolder each (two cases share a key)
        (d / name).mkdir()
        (ref / name).mkdir()
        case(d / name, ref / name)
    (d / "photo.jpg").write_bytes(jpeg(smooth(7, (70, 90))))
    (d / "photo_prog.jpg").write_bytes(jpeg(smooth(8, (90, 70)), progressive=True))
    a = invoke_json(cli, "extract", d, *MODEL, "-o", tmp_path / "pil.h5", "-j", 1, "-b", 4, "--json", "-q")
    b = invoke_json(cli, "extract", d, *MODEL, "-o", tmp_path / "torch.h5", "-j", 1, "-b", 4, "--decode", "torch",
                    "--json", "-q")
    assert (a["num_images"], a["num_failed"]) == (b["num_images"], b["num_failed"])
    on_device = {"exif_rotated/rot", "photo", "photo_prog"}
    with open_features(tmp_path / "pil.h5") as fp, open_features(tmp_path / "torch.h5") as ft:
        assert list(fp) == list(ft) and on_device <= set(ft)
        assert [(f["key"], f["stage"], f["error_class"]) for f in fp.failures] == \
               [(f["key"], f["stage"], f["error_class"]) for f in ft.failures]
        assert ft.config["decode"] == "torch" and "decode" not in fp.config
        for k in fp:
            mp, mt = fp.meta(k), ft.meta(k)
            assert mp["orig_hw"] == mt["orig_hw"]
            dec = (mt["meta"] or {}).get("decode", {})
            if k in on_device:
                assert "path" not in dec
                np.testing.assert_allclose(ft[k], fp[k], atol=0.05 * float(np.abs(fp[k]).max()))
            else:
                assert dec["path"] == "pil-fallback" and dec["reason"]
                assert {n: v for n, v in dec.items() if n not in ("path", "reason")} == (mp["meta"] or {}).get("decode", {})
                np.testing.assert_array_equal(ft[k], fp[k])


def test_decode_torch_with_a_strategy_is_refused(cli, image_dir, tmp_path):
    r = cli("extract", image_dir, "--recipe", "llava-next-anyres", "--random-init", "--decode", "torch", "-o", tmp_path / "o.h5")
    assert r.exit_code == 2 and "--decode torch" in r.stderr and "Fix:" in r.stderr
    r = cli("extract", image_dir, *TINY_VIT, "--decode", "nvjpeg", "-o", tmp_path / "o.h5")
    assert r.exit_code == 2 and "pil | torch" in r.stderr


def test_decode_compare_reports_speed_and_pixel_difference():
    r = decode_compare(synthetic_jpegs(3, (48, 64)), Fit("crop", 40, (0.5, 0.5, 0.5)), torch.device("cpu"))
    assert r["compared"] == 3 and r["fallback"] == 0 and 0 <= r["max_abs_diff"] <= 2
    assert 0 <= r["frac_differing"] < 0.1 and r["pil_ms_per_image"] > 0 and r["torch_ms_per_image"] > 0


# ---- CUDA ----------------------------------------------------------------------------------------------------------
@cuda
def test_cuda_features_equal_cpu_features_through_pinned_async_copies(tmp_path):
    res = _res(tmp_path, pool="mean")
    imgs = [torch.from_numpy(to_uint8_array(Image.fromarray(smooth(i, (320, 320))))) for i in range(4)]
    plan = plan_image(res, (320, 320))
    cpu = Extractor(res, load_backbone(res.backbone, random_init=True), torch.device("cpu"), torch.float32)
    want = cpu.features(imgs, plan)
    gpu = Extractor(res, load_backbone(res.backbone, random_init=True), torch.device("cuda"), torch.float32)
    pendings = [gpu.submit(imgs, plan) for _ in range(3)]  # several in flight
    for p in pendings:
        assert p.event is not None
        feats, pooled = p.result()
        assert feats.is_pinned() and feats.device.type == "cpu"
        torch.testing.assert_close(feats, want[0], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(pooled, want[1], rtol=1e-3, atol=1e-3)


@cuda
def test_cuda_transfer_round_trip_is_exact():
    t = Transfer(torch.device("cuda"))
    imgs = [torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8) for _ in range(5)]
    x = t.to_device(imgs)
    assert x.device.type == "cuda" and torch.equal(x.cpu(), torch.stack(imgs))
    (back,) = t.to_host(x.float() * 2).result()
    assert back.is_pinned() and torch.equal(back, torch.stack(imgs).float() * 2)


@cuda
def test_cuda_decode_batch_is_close_to_the_cpu_decoder():
    samples = synthetic_jpegs(4, (120, 160))
    fit = Fit("crop", 96, (0.5, 0.5, 0.5), None, "torch")
    cpu = decode_batch([decode_sample(s, fit) for s in samples], fit, torch.device("cpu"))
    gpu = decode_batch([decode_sample(s, fit) for s in samples], fit, torch.device("cuda"))
    for c, g in zip(cpu, gpu):
        assert g.pixels.device.type == "cuda" and g.meta is None
        diff = (g.pixels.cpu().int() - c.pixels.int()).abs()
        assert diff.max() <= 8 and diff.float().mean() < 1.0  # nvJPEG's IDCT is not libjpeg-turbo's


@cuda
def test_cuda_channels_last_matches(tmp_path):
    res = _res(tmp_path, model="efficientnet-lite0")
    x = torch.randn(2, 3, 448, 448, device="cuda")
    plain = load_backbone(res.backbone, random_init=True, seed=3).to("cuda")
    nhwc = load_backbone(res.backbone, random_init=True, seed=3).to("cuda").channels_last()
    with torch.inference_mode():
        a = multiscale_forward(plain, x, img_sizes=[224, 448], max_split_size=224, output_shape="bchw")
        b = multiscale_forward(nhwc, x, img_sizes=[224, 448], max_split_size=224, output_shape="bchw")
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(a.abs().max()))


def test_normalize_makes_one_float_copy_and_the_same_values():
    """Extractor.normalize: the values of (x / 255 - mean) / std computed out of place, and at most the uint8
    input plus one float copy alive at once (LiveTensorBytes), for a batch and for a single image."""
    from s2cli.bench import peak_memory
    from s2cli.extractor import Extractor

    res = resolve_config(ExtractConfig(input="x", output="o.h5", model="timm:test_vit", random_init=True),
                         resolve("timm:test_vit"))
    ex = Extractor(res, load_backbone(res.backbone, random_init=True), torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    for shape in ((4, 3, 96, 80), (3, 64, 48)):
        u8 = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        want = (u8.float() / 255 - ex.mean) / ex.std
        assert torch.equal(ex.normalize(u8), want)
        mem = peak_memory(lambda: ex.normalize(u8), held=[u8])
        assert mem["working"] == u8.numel() * 4, mem  # one float32 copy (the result), nothing beside it
    f = torch.rand(1, 3, 8, 8) * 255
    before = f.clone()
    ex.normalize(f)
    assert torch.equal(f, before)  # a float input is not modified in place


def test_finite_check_uses_the_batch_sums_and_finds_only_the_bad_images(tmp_path):
    """One reduction per batch (`finite_sums`, made with the features): images whose sum is finite are kept without
    an element-wise look; a NaN or Inf makes its image's sum non-finite and only that image is recorded; finite
    float32 values whose sum overflows are looked at closer and kept."""
    from s2cli.extractor import all_finite, finite_sums

    res = _res(tmp_path, pool="mean")
    ex = Extractor(res, load_backbone(res.backbone, random_init=True), torch.device("cpu"), torch.float32)
    feats = torch.ones(4, 5, 6)
    feats[1, 2, 3] = float("nan")
    feats[2, 0, 0] = float("-inf")
    feats[3] = 3e38  # finite, but the sum overflows float32
    pooled = torch.zeros(4, 6)
    sums = finite_sums(feats, pooled)
    assert sums[0].shape == (4,) and torch.isfinite(sums[0]).tolist() == [True, False, False, False]
    recs = [Decoded(f"k{i}", f"s{i}") for i in range(4)]
    failed: list[dict] = []
    kept = ex.finite([(r, feats[i], pooled[i]) for i, r in enumerate(recs)], failed.append, sums=tuple(sums))
    assert [r.key for r, _, _ in kept] == ["k0", "k3"]
    assert [(f["key"], f["error_class"]) for f in failed] == [("k1", "NonFiniteFeatures"), ("k2", "NonFiniteFeatures")]
    assert "1 NaN and 0 Inf" in failed[0]["error"] and "0 NaN and 1 Inf" in failed[1]["error"]
    assert all_finite(feats[3]) and not all_finite(feats[1]) and all_finite(feats[0], torch.tensor(30.0))


def test_submit_brings_the_finite_sums_back_beside_the_result(tmp_path):
    res = _res(tmp_path, pool="mean")
    ex = Extractor(res, load_backbone(res.backbone, random_init=True), torch.device("cpu"), torch.float32)
    imgs = [torch.from_numpy(to_uint8_array(Image.fromarray(smooth(i, (320, 320))))) for i in range(2)]
    pending = ex.submit(imgs, plan_image(res, (320, 320)))
    feats, pooled = pending.result()
    fs, ps = pending.aside()
    assert torch.equal(fs, feats.flatten(1).sum(1, dtype=torch.float32)) and torch.equal(ps, pooled.sum(1))
    no_check = Extractor(dataclasses.replace(res, check_finite=False), ex.backbone, torch.device("cpu"), torch.float32)
    assert no_check.submit(imgs, plan_image(res, (320, 320))).aside() == (None, None)
