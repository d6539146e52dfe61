"""S² features from Python: wrap any backbone as a function and call `multiscale_forward`.

Runs offline. With a local CLIP checkpoint (a save_pretrained dir or the HF cache):
    python examples/python_api.py --model-dir /path/to/clip-vit-large-patch14-336
Without weights (a small random-init CLIP, to see the shapes):
    python examples/python_api.py --random-init
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel

from s2cli import multiscale_forward

ap = argparse.ArgumentParser()
ap.add_argument("--model-dir", help="local CLIPVisionModel/CLIPModel directory")
ap.add_argument("--random-init", action="store_true", help="a small random CLIP (224 px, patch 16), no weights")
ap.add_argument("--image", default=str(Path(__file__).parent / "images" / "chelsea.jpg"))
args = ap.parse_args()

if not args.model_dir and not args.random_init:
    sys.exit("no weights given: pass --model-dir DIR (a local CLIP checkpoint), or --random-init to see the shapes "
             "with a small random CLIP")
if args.model_dir:
    clip = CLIPVisionModel.from_pretrained(args.model_dir, local_files_only=True)
else:
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=224, patch_size=16))
clip.eval()
side = clip.config.image_size


def backbone(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, side, side) -> (B, 1 + N, C): the CLS token first, then the patch tokens."""
    return clip(pixel_values=x).last_hidden_state


# the image at the backbone's size; scale 2 is a bicubic upsampling cut into 2x2 tiles of `side`
mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
im = Image.open(args.image).convert("RGB").resize((side, side), Image.BICUBIC)
x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(side, side, 3).permute(2, 0, 1)[None]
x = (x.float() / 255 - mean) / std

with torch.inference_mode():
    feats = multiscale_forward(backbone, x, scales=[1, 2], num_prefix_token=1)
grid = side // clip.config.patch_size
print(f"features {tuple(feats.shape)}: 1 CLS (mean over tiles, per scale) + {grid}x{grid} tokens, "
      f"{clip.config.hidden_size} channels x 2 scales")
