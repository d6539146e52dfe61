"""Video input (#18): videos made here with PyAV (H.264, VP9; constant and variable frame rate; rotated) whose
frames encode their index as a gray level. Frames are chosen by the rule of each mode, each frame's features are
those of the same decoded frame extracted as a PNG, a video is one entry (frames, tokens, channels) with its
timestamps, resume works mid-folder, and every bad video is one failure record that leaves the others alone."""
from __future__ import annotations

import fractions
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, MODEL, NO_TORCH, invoke_json, write_image
from s2cli import open_features
from s2cli.video import Sampling, choose, read_clip

av = pytest.importorskip("av", reason="PyAV is in the test extra: pip install -e '.[test]'")

STEP = 8  # gray level per frame index


def make_video(path: Path, n: int = 12, codec: str = "libx264", rate: int = 10, pts_ms: list[int] | None = None,
               rotation: int | None = None, hw: tuple[int, int] = (48, 64)) -> Path:
    """A video whose frame i is gray level STEP * i on its left half (right half black, top rows white, so a
    rotation shows), at `rate` fps or at the presentation times `pts_ms` (milliseconds: variable frame rate)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = hw
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.time_base = fractions.Fraction(1, 1000) if pts_ms else fractions.Fraction(1, rate)
        if codec == "libx264":
            s.codec_context.options = {"crf": "0"}
        if rotation is not None:
            s.set_display_rotation(rotation)
        for i in range(n):
            a = np.zeros((h, w, 3), np.uint8)
            a[:, : w // 2] = STEP * i
            a[: h // 4] = 255
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            f.pts = pts_ms[i] if pts_ms else i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def gray_index(im: Image.Image) -> int:
    """The frame index a decoded frame shows (its left half's gray level over STEP)."""
    a = np.asarray(im.convert("RGB"), np.float64)
    h, w = a.shape[:2]
    return int(round(a[h // 2:, : w // 4].mean() / STEP))


VFR_MS = [0, 100, 150, 400, 1000, 1033, 1066, 1500, 2000, 2100]


# ---- the sampling rules -----------------------------------------------------------------------------------------
def fps_rule(times: list[float], fps: float) -> list[int]:
    """The --fps rule spelled out by brute force: for t = k/F up to the last frame, the first frame at or after t."""
    out = []
    k = 0
    while k / fps <= times[-1] + 1e-9:
        i = min(j for j, t in enumerate(times) if t >= k / fps - 1e-9)
        if i not in out:
            out.append(i)
        k += 1
    return out


@pytest.mark.parametrize("n", [1, 2, 7, 30, 300])
@pytest.mark.parametrize("num", [1, 4, 8, 32])
def test_num_frames_is_llava_onevisions_linspace_with_repeats_for_short_videos(n, num):
    times = [i / 30 for i in range(n)]
    got = choose(times, Sampling(num_frames=num))
    assert got == [int(x) for x in np.linspace(0, n - 1, num)]
    assert len(got) == num and got[0] == 0 and got[-1] == (n - 1 if num > 1 else 0)


@pytest.mark.parametrize("fps", [0.5, 1, 2, 3.3, 10, 60])
def test_fps_takes_the_first_frame_at_or_after_each_tick_each_frame_once(fps):
    times = [ms / 1000 for ms in VFR_MS]
    assert choose(times, Sampling(fps=fps)) == fps_rule(times, fps)
    if fps >= 60:  # a rate above the video's: every frame, once
        assert choose(times, Sampling(fps=fps)) == list(range(len(times)))


def test_max_frames_caps_uniformly_and_alone_caps_every_frame():
    times = [i / 25 for i in range(100)]
    assert choose(times, Sampling(max_frames=5)) == [int(x) for x in np.linspace(0, 99, 5)]
    by_fps = fps_rule(times, 5)  # 20 frames
    assert choose(times, Sampling(fps=5, max_frames=4)) == [by_fps[int(j)] for j in np.linspace(0, 19, 4)]
    assert choose(times, Sampling(max_frames=500)) == list(range(100))
    assert choose([0.0], Sampling(fps=1)) == [0] and choose([0.0], Sampling(num_frames=3)) == [0, 0, 0]


# ---- decoding ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec,ext", [("libx264", "mp4"), ("libvpx-vp9", "webm"), ("mpeg4", "avi"), ("libx264", "mov")])
@pytest.mark.parametrize("sampling", [Sampling(num_frames=5), Sampling(fps=3), Sampling(max_frames=4)])
def test_decoded_frames_are_the_chosen_ones_at_their_timestamps(tmp_path, codec, ext, sampling):
    if codec not in av.codecs_available:
        pytest.fail(f"{codec} is not in this PyAV build")  # the test extra's wheels carry it; never skip silently
    v = make_video(tmp_path / f"v.{ext}", n=12, codec=codec)
    clip = read_clip(str(v), sampling)
    times = [i / 10 for i in range(12)]
    assert clip.indices == choose(times, sampling)
    assert clip.timestamps == pytest.approx([times[i] for i in clip.indices], abs=1e-6)
    assert [gray_index(f) for f in clip.frames] == clip.indices
    assert clip.total == 12


def test_variable_frame_rate_is_sampled_by_timestamps(tmp_path):
    v = make_video(tmp_path / "vfr.mkv", n=len(VFR_MS), pts_ms=VFR_MS)
    times = [ms / 1000 for ms in VFR_MS]
    for s in (Sampling(fps=2), Sampling(fps=1), Sampling(num_frames=4)):
        clip = read_clip(str(v), s)
        assert clip.indices == (fps_rule(times, s.fps) if s.fps else choose(times, s))
        assert clip.timestamps == pytest.approx([times[i] for i in clip.indices])
        assert [gray_index(f) for f in clip.frames] == clip.indices


def test_seeking_gives_the_frames_a_full_decode_gives(tmp_path):
    """A clip with a keyframe every 5 frames and B-frames (decode order is not presentation order): the frames
    reached by seeking to the keyframe before each equal the frames of a decode of everything in order."""
    v = tmp_path / "g.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(v), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.gop_size = 5
        s.codec_context.options = {"x264-params": "keyint=5:min-keyint=5:scenecut=0:bframes=2"}
        for i in range(40):
            f = av.VideoFrame.from_ndarray(rng.integers(0, 40, (48, 64, 3), dtype=np.uint8) + 5 * i, format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with av.open(str(v)) as c:
        packets = [p for p in c.demux(video=0) if p.size]
        assert sum(p.is_keyframe for p in packets) == 8 and any(p.pts != p.dts for p in packets)
    with av.open(str(v)) as c:
        every = [np.asarray(f.to_image()) for f in c.decode(video=0)]
    for sampling in (Sampling(num_frames=6), Sampling(fps=3), Sampling(max_frames=3), Sampling(num_frames=40)):
        clip = read_clip(str(v), sampling)
        assert clip.indices == choose([i / 10 for i in range(40)], sampling)
        for i, im in zip(clip.indices, clip.frames):
            np.testing.assert_array_equal(np.asarray(im), every[i])


def test_rotation_metadata_is_applied_as_ffmpeg_does(tmp_path):
    plain = read_clip(str(make_video(tmp_path / "p.mp4")), Sampling(num_frames=3))
    for rot in (90, 180, 270):
        clip = read_clip(str(make_video(tmp_path / f"r{rot}.mp4", rotation=rot)), Sampling(num_frames=3))
        assert clip.rotation == rot
        for a, b in zip(plain.frames, clip.frames):  # the display matrix turns the frame counterclockwise by `rot`
            np.testing.assert_array_equal(np.asarray(b), np.rot90(np.asarray(a), rot // 90))


# ---- extraction ---------------------------------------------------------------------------------------------------
@pytest.fixture
def clips(tmp_path) -> Path:
    d = tmp_path / "clips"
    make_video(d / "a.mp4", n=12)
    make_video(d / "b.webm", n=20, codec="libvpx-vp9")
    make_video(d / "sub" / "r.mp4", n=9, rotation=90)
    make_video(d / "v.mkv", n=len(VFR_MS), pts_ms=VFR_MS)
    write_image(d / "img.png", (40, 52), 7)
    return d


def frames_as_pngs(clips: Path, d: Path, sampling: Sampling) -> dict[str, list[str]]:
    """Every video's chosen frames, decoded as the run decodes them, saved as lossless PNGs: key -> PNG keys."""
    keys = {}
    for v in sorted(p for p in clips.rglob("*") if p.suffix in (".mp4", ".webm", ".mkv")):
        key = v.relative_to(clips).with_suffix("").as_posix()
        clip = read_clip(str(v), sampling)
        keys[key] = []
        for j, im in enumerate(clip.frames):
            name = f"{key.replace('/', '_')}_{j:03d}"
            im.save(d / f"{name}.png")
            keys[key].append(name)
    return keys


@pytest.mark.parametrize("extra", [[], ["--reduce", "avg:2"], ["--decode", "torch", "--format", "safetensors"]])
def test_each_frames_features_equal_the_same_frame_extracted_as_a_png(cli, clips, tmp_path, extra):
    out = tmp_path / "v.h5"
    invoke_json(cli, "extract", clips, *FAST, *extra, "--num-frames", "5", "-o", f"{tmp_path}/v/", "--json")
    out = tmp_path / "v"
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    keys = frames_as_pngs(clips, pngs, Sampling(num_frames=5))
    ref = tmp_path / "ref"
    invoke_json(cli, "extract", pngs, *FAST, *extra, "-o", f"{ref}/", "--json")
    with open_features(out) as ff, open_features(ref) as fr:
        assert sorted(ff) == sorted([*keys, "img"])  # one entry per video, the image one entry
        for key, names in keys.items():
            x = ff[key]
            assert x.shape == (5, *fr[names[0]].shape)
            for j, name in enumerate(names):
                np.testing.assert_array_equal(x[j], fr[name])
            m = ff.meta(key)
            assert m["frames"] == 5 and len(m["timestamps"]) == 5
            assert m["frame_indices"] == m["meta"]["video"]["frame_indices"]
        assert ff["img"].ndim == 2 and "timestamps" not in ff.meta("img")
        assert ff.meta("v")["timestamps"] == pytest.approx([VFR_MS[i] / 1000 for i in ff.meta("v")["frame_indices"]])


def test_frames_as_images_stores_each_distinct_frame_under_key_hash_index(cli, clips, tmp_path):
    whole = tmp_path / "whole.safetensors"
    invoke_json(cli, "extract", clips, *FAST, "--fps", "4", "-o", whole, "--json")
    per = f"{tmp_path}/per/"
    s = invoke_json(cli, "extract", clips, *FAST, "--fps", "4", "--frames-as-images", "-o", per, "--json")
    with open_features(whole) as fw, open_features(per) as fp:
        expected = ["img"]
        for key in fw:
            if key == "img":
                np.testing.assert_array_equal(fp["img"], fw["img"])
                continue
            m = fw.meta(key)
            for j, (idx, ts) in enumerate(zip(m["frame_indices"], m["timestamps"])):
                name = f"{key}#{idx:06d}"
                expected.append(name)
                np.testing.assert_array_equal(fp[name], fw[key][j])
                assert (fp.meta(name)["frame_index"], fp.meta(name)["timestamp"]) == (idx, ts)
        assert sorted(fp) == sorted(expected) and s["total_images"] == len(expected)
    r = cli("viz", "features", whole, "--key", "a", "-o", tmp_path / "f.png")
    assert r.exit_code == 2 and "--frames-as-images" in r.stderr
    assert len(invoke_json(cli, "viz", "features", per, "--key", "a#000000", "-o", tmp_path / "f.png", "--json")) == 4


def test_the_done_when_layout_eight_frames_at_three_scales(cli, clips, tmp_path):
    """`s2 extract clips/ --recipe llava-1.5-s2 --num-frames 8` with the tiny model at the recipe's three scales
    (1x, 2x, 3x the tile): every video is (8, tokens, channels), the tokens and channels of an image."""
    out = tmp_path / "o.h5"
    flags = [*FAST[:3], "--img-sizes", "64,128,192", "--max-split-size", "64", "-j", "0"]
    invoke_json(cli, "extract", clips, *flags, "--num-frames", "8", "-o", out, "--json")
    with open_features(out) as ff:
        t, c = ff["img"].shape
        for key in ("a", "b", "sub/r", "v"):
            assert ff[key].shape == (8, t, c)
            assert len(ff.meta(key)["timestamps"]) == 8
        assert ff.attrs["img_sizes"] == "[64, 128, 192]"
    shown = invoke_json(cli, "inspect", out, "--key", "a", "--json")
    assert shown["shape"] == [8, t, c] and shown["frame_indices"] == [int(x) for x in np.linspace(0, 11, 8)]
    assert invoke_json(cli, "inspect", out, "--json")["num_images"] == 5


def test_dry_run_plans_frames_tiles_and_bytes_per_video_from_the_header(cli, clips, tmp_path):
    plan = invoke_json(cli, "extract", clips, *FAST, "--num-frames", "4", "--dry-run", "--json", "-o", tmp_path / "x.h5")
    by = {i["key"]: i for i in plan["images"]}
    img = by["img"]
    for key, n, hw in (("a", 12, [48, 64]), ("b", 20, [48, 64]), ("sub/r", 9, [64, 48])):
        e = by[key]
        assert e["video"]["frames"] == n and e["video"]["hw"] == hw
        assert e["video"]["frame_indices"] == [int(x) for x in np.linspace(0, n - 1, 4)]
        assert e["tiles"] == 4 * img["tiles"] and e["bytes"] == 4 * img["bytes"]
        assert e["output_shape"] == [4, *img["output_shape"]]
    assert by["sub/r"]["video"]["rotation"] == 90
    assert plan["total_bytes"] == sum(i["bytes"] for i in plan["images"])


def test_resume_mid_folder_of_videos_extracts_what_a_clean_run_would(cli, clips, tmp_path):
    out, clean = tmp_path / "out", tmp_path / "clean"
    args = [*FAST, "--num-frames", "3", "--shard-size", "2", "--json"]
    invoke_json(cli, "extract", clips, *args, "-o", f"{clean}/")
    invoke_json(cli, "extract", clips, *args, "-o", f"{out}/")
    for m in out.glob("part-*.json"):  # killed after its first unit: the later shards never written
        if json.loads(m.read_text())["unit_index"] >= 1:
            m.unlink()
            m.with_suffix(".h5").unlink()
    (out / "manifest.json").unlink()
    r = cli("extract", clips, *[a if a != "3" else "4" for a in args], "-o", f"{out}/")
    assert r.exit_code == 2 and "num_frames" in r.stderr  # another sampling would mix two kinds of entries
    s = invoke_json(cli, "extract", clips, *args, "-o", f"{out}/")
    assert (s["resumed_images"], s["num_images"], s["complete"]) == (2, 3, True)
    with open_features(out) as fo, open_features(clean) as fc:
        assert list(fo) == list(fc)
        for k in fo:
            np.testing.assert_array_equal(fo[k], fc[k])
            assert fo.meta(k).get("timestamps") == fc.meta(k).get("timestamps")


def test_a_lists_videos_keep_its_columns_beside_their_frames_facts(cli, clips, tmp_path):
    lst = tmp_path / "l.csv"
    lst.write_text(f"path,key,caption\n{clips / 'v.mkv'},clip,a cat\n{clips / 'img.png'},still,a dog\n")
    out = tmp_path / "l.h5"
    invoke_json(cli, "extract", lst, *FAST, "--fps", "1", "-o", out, "--json")
    times = [ms / 1000 for ms in VFR_MS]
    with open_features(out) as ff:
        m = ff.meta("clip")
        assert m["meta"]["caption"] == "a cat" and m["frame_indices"] == fps_rule(times, 1)
        assert ff["clip"].shape[0] == len(fps_rule(times, 1)) and ff.meta("still")["meta"] == {"caption": "a dog"}


# ---- bad input ----------------------------------------------------------------------------------------------------
def audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("mp2", rate=16000)
        for i in range(4):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16", layout="mono")
            f.sample_rate, f.pts = 16000, i * 1152
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def test_each_bad_video_is_one_failure_record_and_the_good_ones_are_unaffected(cli, clips, tmp_path, monkeypatch):
    ref = tmp_path / "ref.h5"
    invoke_json(cli, "extract", clips, *FAST, "--num-frames", "4", "-o", ref, "--json")
    bad = {"zero": b"", "corrupt": b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8}
    webm = (clips / "b.webm").read_bytes()
    bad["truncated"] = webm[: int(len(webm) * 0.8)]
    bad["nocodec"] = (clips / "v.mkv").read_bytes().replace(b"V_MPEG4/ISO/AVC", b"V_XXXXX/ISO/AVC")
    for name, data in bad.items():
        (clips / f"{name}.{'webm' if name == 'truncated' else 'mkv' if name == 'nocodec' else 'mp4'}").write_bytes(data)
    audio_only(clips / "audio.mkv")
    make_video(clips / "huge.mp4", n=3, hw=(96, 128))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # the huge one's frames exceed it, the others' not
    out = tmp_path / "out"
    s = invoke_json(cli, "extract", clips, *FAST, "--num-frames", "4", "--shard-size", "3", "-o", f"{out}/", "--json")
    with open_features(out) as ff, open_features(ref) as fr:
        fails = {f["key"]: f for f in ff.failures}
        assert sorted(fails) == ["audio", "corrupt", "huge", "nocodec", "truncated", "zero"]
        assert "no video stream" in fails["audio"]["error"] and "decompression-bomb" in fails["huge"]["error"]
        assert "no decoder" in fails["nocodec"]["error"] and "truncated" in fails["truncated"]["error"]
        assert list(ff) == list(fr)  # no partial entry of any bad video
        for k in fr:
            np.testing.assert_array_equal(ff[k], fr[k])
    assert (s["total_images"], s["total_failed"]) == (5, 6)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["key"] for e in errors) == sorted(fails)


def test_a_frame_that_fails_in_the_model_fails_its_whole_video(cli, clips, tmp_path, monkeypatch):
    from s2cli.extractor import Extractor

    real = Extractor.submit

    def poisoned(self, images, sizes):  # the frame that shows index 3 (gray 24) breaks the model
        if any(abs(float(im[:, -8:, :8].float().mean()) - STEP * 3) < 2 for im in images):
            raise RuntimeError("poisoned frame")
        return real(self, images, sizes)

    monkeypatch.setattr(Extractor, "submit", poisoned)
    out = tmp_path / "o.h5"
    r = cli("extract", clips, *FAST, "--num-frames", "4", "-b", "3", "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    with open_features(out) as ff:
        fails = {f["key"]: f for f in ff.failures}
        # a (12 frames: 0, 3, 7, 11) and v (10: 0, 3, 6, 9) take index 3; b (20: 0, 6, 12, 19), r (9: 0, 2, 5, 8) not
        assert sorted(fails) == ["a", "v"] and "poisoned frame" in fails["a"]["error"]
        assert sorted(ff) == ["b", "img", "sub/r"] and ff["b"].shape[0] == 4


def test_video_options_are_checked_before_any_weights_load(cli, clips, tmp_path):
    cases = [([], "no frame sampling was given"), (["--fps", "1", "--num-frames", "8"], "--fps and --num-frames"),
             (["--num-frames", "0"], "--num-frames must be at least 1"), (["--fps", "-1"], "--fps must be positive"),
             (["--frames-as-images"], "no frame sampling was given"),
             (["--num-frames", "4", "--pool", "mean"], "--pool stores one vector per entry")]
    for extra, said in cases:
        r = cli("extract", clips, *FAST, *extra, "-o", tmp_path / "x.h5")
        assert r.exit_code == 2 and said in r.stderr, (extra, r.stderr)
        assert not (tmp_path / "x.h5").exists()


def test_video_options_on_images_only_change_nothing(cli, image_dir, tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    invoke_json(cli, "extract", image_dir, *FAST, "-o", a, "--json")
    invoke_json(cli, "extract", image_dir, *FAST, "--num-frames", "8", "-o", b, "--json")
    with open_features(a) as fa, open_features(b) as fb:
        assert list(fa) == list(fb)
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k])


def test_without_pyav_a_video_input_is_one_line_naming_the_extra(cli, clips, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    r = cli("extract", clips, *FAST, "--num-frames", "4", "-o", tmp_path / "x.h5")
    assert r.exit_code == 2
    assert "pip install 's2-features[video]'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---- WebDataset, viz ----------------------------------------------------------------------------------------------
def test_webdataset_video_members_are_entries_like_a_folders(cli, clips, tmp_path):
    tar = tmp_path / "s-000.tar"
    with tarfile.open(tar, "w") as t:
        for key, path in (("a", clips / "a.mp4"), ("img", clips / "img.png"), ("v", clips / "v.mkv")):
            data = path.read_bytes()
            info = tarfile.TarInfo(f"{key}{path.suffix}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    out, ref = tmp_path / "w.h5", tmp_path / "f.h5"
    invoke_json(cli, "extract", str(tar), *FAST, "--num-frames", "4", "-o", out, "--json")
    invoke_json(cli, "extract", clips, *FAST, "--num-frames", "4", "-o", ref, "--json")
    with open_features(out) as fw, open_features(ref) as ff:
        assert list(fw) == ["a", "img", "v"]
        for k in fw:
            np.testing.assert_array_equal(fw[k], ff[k])
            assert fw.meta(k).get("timestamps") == ff.meta(k).get("timestamps")


def test_viz_plan_shows_each_sampled_frame_with_its_timestamp(cli, clips, tmp_path):
    png = tmp_path / "p.png"
    panels = invoke_json(cli, "viz", "plan", clips / "v.mkv", *MODEL[:2], *MODEL[3:], "--fps", "1",
                         "-o", png, "--json")
    times = [ms / 1000 for ms in VFR_MS]
    want = fps_rule(times, 1)
    assert [p["label"] for p in panels] == [f"frame {i} t={times[i]:.3f}s" for i in want]
    assert Image.open(png).size[0] == panels[-1]["x"] + panels[-1]["size"][0] + 8


@pytest.mark.slow
def test_decode_workers_and_the_cli_process_give_the_in_process_features(cli, clips, tmp_path):
    """`s2 extract` in its own process with two decode workers (videos decoded in forked workers, frames sent back)
    writes what the in-process run with -j 0 writes."""
    import subprocess

    ref = tmp_path / "ref.h5"
    invoke_json(cli, "extract", clips, *FAST, "--num-frames", "4", "-o", ref, "--json")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "s2cli", "extract", str(clips), *MODEL, "-j", "2", "--num-frames", "4",
                        "-o", f"{out}/", "--json", "-q"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    with open_features(out) as fo, open_features(ref) as fr:
        assert list(fo) == list(fr)
        for k in fo:
            np.testing.assert_array_equal(fo[k], fr[k])


def test_a_video_is_told_by_its_content_not_its_name(cli, clips, tmp_path):
    from s2cli.video import looks_like_video

    d = tmp_path / "mixed"
    d.mkdir()
    (d / "clip.jpg").write_bytes((clips / "a.mp4").read_bytes())  # a video named like an image
    (d / "still.mp4").write_bytes((clips / "img.png").read_bytes())  # an image named like a video
    out, ref = tmp_path / "m.h5", tmp_path / "r.h5"
    invoke_json(cli, "extract", d, *FAST, "--num-frames", "3", "-o", out, "--json")
    invoke_json(cli, "extract", clips, *FAST, "--num-frames", "3", "-o", ref, "--json")
    with open_features(out) as fm, open_features(ref) as fr:
        np.testing.assert_array_equal(fm["clip"], fr["a"])
        np.testing.assert_array_equal(fm["still"], fr["img"])
    assert not looks_like_video(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00")  # an AVIF image is an image
    assert not looks_like_video(b"RIFF\x00\x00\x00\x00WEBPVP8 ")


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["extract", "{clips}", "--recipe", "llava-1.5-s2", "--random-init", "--num-frames", "8", "--dry-run", "--json"],
    ["viz", "plan", "{clips}/b.webm", "--recipe", "llava-1.5-s2", "--num-frames", "3", "-o", "{tmp}/p.png", "--json"],
])
def test_the_video_dry_run_and_viz_plan_import_no_torch(clips, tmp_path, argv):
    import subprocess

    args = [a.format(clips=clips, tmp=tmp_path) for a in argv]
    r = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    if isinstance(out, dict):  # the done-when plan: (8, 576, 3072) per video, 8 x 14 tiles
        assert {tuple(i["output_shape"]) for i in out["images"] if "video" in i} == {(8, 576, 3072)}
        assert {i["tiles"] for i in out["images"] if "video" in i} == {8 * 14}
    else:
        assert len(out) == 3
