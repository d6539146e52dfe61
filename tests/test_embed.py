"""--pool embed: the model's projection head on each scale's tiles, stored per scale and combined (the mean of the
L2-normalised scale embeddings, normalised), for tiny random two-tower CLIP and SigLIP served from the loopback hub
and a tiny open_clip model; at scale 1 alone, the model's own get_image_features / encode_image. `s2 export`
writes the combined embedding, and `s2cli.embed_text` queries it: a text->image search returns the image whose
embedding is closest, computed independently with the models' own functions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import s2cli
from conftest import TINY, tiny_open_clip
from s2cli import ConfigError
from s2cli.export import export_embeddings
from s2cli.extractor import normalize_images

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
            max_position_embeddings=16)
WORDS = ["[PAD]", "[UNK]", "a", "photo", "of", "cat", "dog", "red", "blue", "car", "[EOS]"]


def word_tokenizer(folder):
    """A word-level tokenizer written in the test (no download), saved beside the model as AutoTokenizer reads it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", len(WORDS) - 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]",
                                   model_max_length=16)
    fast.save_pretrained(folder)
    return fast


def clip_repo(folder, seed=0):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(vision_config=TINY, text_config={**TEXT, "eos_token_id": len(WORDS) - 1},
                                 projection_dim=16)).eval()
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return model, word_tokenizer(folder)


def siglip_repo(folder, seed=0):
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(vision_config=TINY, text_config=TEXT)).eval()
    model.save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return model, word_tokenizer(folder)


def _pixels(path, spec, scales):
    cfg = s2cli.settings(str(path), "x.h5", model=spec, scales=scales).backbone
    view = torch.from_numpy(s2cli.views(path, model=spec, scales=scales)[0])[None]
    return normalize_images(view, torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1), torch.float32)


def _features(out):
    if hasattr(out, "pooler_output"):  # transformers 5 returns the model output; 4 the tensor
        return out.pooler_output
    return out


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_embed_at_scale_one_is_the_models_own_image_features(kind, hub, tmp_path, image_dir):
    model, tok = (clip_repo if kind == "clip" else siglip_repo)(tmp_path / kind)
    hub.add(f"org/tiny-{kind}", tmp_path / kind)
    spec = f"hf:org/tiny-{kind}"
    texts = ["a photo of a cat", "red car"]  # SigLIP was trained on text padded to its length, CLIP on the longest
    with torch.no_grad():
        own_text = _features(model.get_text_features(**tok(texts, padding="max_length" if kind == "siglip" else True,
                                                          return_tensors="pt")))
    torch.testing.assert_close(s2cli.embed_text(spec, texts), own_text, atol=1e-5, rtol=1e-5)
    s2cli.extract(str(image_dir), str(tmp_path / "o.h5"), model=spec, scales=(1,), pool="embed", workers=0)
    with s2cli.open_features(tmp_path / "o.h5") as ff:
        for key, name in [("a", "a.png"), ("b", "b.jpg")]:
            with torch.no_grad():
                own = _features(model.get_image_features(pixel_values=_pixels(image_dir / name, spec, (1,))))[0]
            got = torch.from_numpy(ff.pooled(key))
            assert got.shape == (2 * own.shape[0],)
            torch.testing.assert_close(got[own.shape[0]:], own, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[:own.shape[0]], F.normalize(own, dim=0), atol=1e-5, rtol=1e-5)


def test_embed_over_scales_is_the_documented_combination(hub, tmp_path, image_dir):
    """A scale's embedding is the mean of its tiles' own embeddings; the combined one the normalised mean of the
    normalised scale embeddings."""
    model, _ = clip_repo(tmp_path / "clip")
    hub.add("org/tiny-clip", tmp_path / "clip")
    spec = "hf:org/tiny-clip"
    s2cli.extract(str(image_dir), str(tmp_path / "o.h5"), model=spec, scales=(1, 2), pool="embed", workers=0)
    x = _pixels(image_dir / "b.jpg", spec, (1, 2))  # 64 x 64: scale 2 is its four 32 px tiles
    with torch.no_grad():
        one = _features(model.get_image_features(pixel_values=F.interpolate(x, size=(32, 32), mode="bicubic")))[0]
        tiles = torch.cat([x[..., r:r + 32, c:c + 32] for r in (0, 32) for c in (0, 32)])
        two = _features(model.get_image_features(pixel_values=tiles)).mean(0)
    combined = F.normalize((F.normalize(one, dim=0) + F.normalize(two, dim=0)) / 2, dim=0)
    with s2cli.open_features(tmp_path / "o.h5") as ff:
        got = torch.from_numpy(ff.pooled("b"))
    torch.testing.assert_close(got, torch.cat([combined, one, two]), atol=1e-5, rtol=1e-5)


def test_open_clip_embed_at_scale_one_is_encode_image(hub, tmp_path, image_dir):
    import open_clip

    folder = tiny_open_clip(tmp_path / "oc", seed=2)
    hub.add("org/tiny-openclip", folder)
    spec = "open_clip:hf-hub:org/tiny-openclip"
    s2cli.extract(str(image_dir), str(tmp_path / "o.h5"), model=spec, scales=(1,), pool="embed", workers=0)
    model = open_clip.create_model(f"local-dir:{folder}").eval()
    with s2cli.open_features(tmp_path / "o.h5") as ff, torch.no_grad():
        own = model.encode_image(_pixels(image_dir / "a.png", spec, (1,)))[0]
        torch.testing.assert_close(torch.from_numpy(ff.pooled("a"))[16:], own, atol=1e-5, rtol=1e-5)
    assert s2cli.embed_text(spec, ["a photo of a cat"]).shape == (1, 16)


def test_text_to_image_search_over_an_export_finds_the_closest_image(hub, tmp_path, image_dir):
    model, tok = clip_repo(tmp_path / "clip", seed=5)
    hub.add("org/tiny-clip", tmp_path / "clip")
    spec = "hf:org/tiny-clip"
    s2cli.extract(str(image_dir), str(tmp_path / "o.h5"), model=spec, scales=(1,), pool="embed", workers=0)
    with s2cli.open_features(tmp_path / "o.h5") as ff:
        export_embeddings(ff, tmp_path / "export")
    import pyarrow.parquet as pq

    vecs = np.load(tmp_path / "export" / "img_emb" / "img_emb_0.npy").astype(np.float32)
    paths = pq.read_table(tmp_path / "export" / "metadata" / "metadata_0.parquet").column("image_path").to_pylist()
    queries = ["a photo of a cat", "a red car", "blue dog"]
    text = F.normalize(s2cli.embed_text(spec, queries), dim=-1).numpy()
    found = [paths[i] for i in (text @ vecs.T).argmax(1)]
    # independently: the models' own image and text features of the same pixels and words
    names = {"a": "a.png", "b": "b.jpg", "sub/c": "sub/c.PNG", "d": "d.webp"}
    with torch.no_grad():
        own = {k: F.normalize(_features(model.get_image_features(pixel_values=_pixels(image_dir / f, spec, (1,))))[0], dim=0)
               for k, f in names.items()}
        want_text = F.normalize(_features(model.get_text_features(**tok(queries, padding=True, return_tensors="pt"))), dim=-1)
    np.testing.assert_allclose(text, want_text.numpy(), atol=1e-5)
    best = [max(own, key=lambda k: float(own[k] @ q)) for q in want_text]
    assert [p.endswith(names[k]) for p, k in zip(found, best)] == [True] * len(queries)


def test_embed_needs_a_projection_head_before_any_weights_load(image_dir, tmp_path):
    with pytest.raises(ConfigError, match="projection head"):
        s2cli.extract(str(image_dir), str(tmp_path / "o.h5"), model="efficientnet-lite0", pool="embed")
    with pytest.raises(ConfigError, match="S² engine"):
        s2cli.settings(str(image_dir), "o.h5", model="clip-vit-l-336", pool="embed", strategy="anyres")


@pytest.mark.slow
def test_text_search_example_runs_offline():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    r = subprocess.run([sys.executable, "examples/text_search.py", "--tiny", "a photo of a cat", "a rocket"], cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    photos = {p.name for p in (root / "examples" / "images").iterdir()}
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("'a photo of a cat': ")
    assert all(line.split(": ")[1].split(" (cosine")[0] in photos for line in lines)
