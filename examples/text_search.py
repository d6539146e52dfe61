"""Text -> image search over an export of joint-space embeddings (`--pool embed`), as clip-retrieval users do.

    python examples/text_search.py --tiny                       # offline: a tiny random CLIP, meaningless matches
    python examples/text_search.py --model clip-vit-b-16 "a cat" "a rocket"   # a real CLIP from the hub (cached)

It extracts the example photos with `--pool embed` at scales 1 and 2, exports the combined embeddings
(`s2 export`'s layout: img_emb/*.npy and metadata/*.parquet), embeds the queries with `s2cli.embed_text` and prints
each query's closest photo by cosine similarity.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

import s2cli
from s2cli.export import export_embeddings

IMAGES = Path(__file__).parent / "images"
WORDS = ["[PAD]", "[UNK]", "a", "an", "the", "photo", "of", "cat", "rocket", "coffee", "cup", "page", "text",
         "astronaut", "motorcycle", "galaxy", "eye", "[EOS]"]


def tiny_clip(folder: Path) -> str:
    """A tiny random-init CLIP (both towers, 224 px, patch 32) with a word-level tokenizer, saved in `folder`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                  patch_size=32)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=len(WORDS), max_position_embeddings=16, eos_token_id=len(WORDS) - 1)
    CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=32)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", len(WORDS) - 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]",
                            model_max_length=16).save_pretrained(folder)
    return f"hf:{folder}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("queries", nargs="*", default=["a photo of a cat", "a rocket", "a coffee cup"])
    ap.add_argument("--model", help="a model with a projection head: clip-vit-b-16, hf:org/name, open_clip:...")
    ap.add_argument("--tiny", action="store_true", help="a tiny random CLIP written here (offline; matches are noise)")
    args = ap.parse_args()
    if not args.model and not args.tiny:
        sys.exit("pass --model MODEL (a CLIP, SigLIP or open_clip model), or --tiny for a tiny random CLIP offline")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_clip(Path(tmp) / "tiny-clip")
        feats = Path(tmp) / "photos.h5"
        s2cli.extract(str(IMAGES), str(feats), model=model, scales=(1, 2), pool="embed", pool_only=True, workers=0)
        with s2cli.open_features(feats) as ff:
            export_embeddings(ff, Path(tmp) / "export")
        import pyarrow.parquet as pq

        vecs = np.concatenate([np.load(p) for p in sorted((Path(tmp) / "export" / "img_emb").glob("*.npy"))])
        paths = [p for f in sorted((Path(tmp) / "export" / "metadata").glob("*.parquet"))
                 for p in pq.read_table(f).column("image_path").to_pylist()]
        text = s2cli.embed_text(model, args.queries).numpy()
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        scores = text @ vecs.astype(np.float32).T
        for query, row in zip(args.queries, scores):
            best = int(row.argmax())
            print(f"{query!r}: {Path(paths[best]).name} (cosine {row[best]:.3f})")


if __name__ == "__main__":
    main()
