"""Train a LLaVA-style projector (Linear -> GELU -> Linear, as LLaVA-1.5's `mlp2x_gelu`) on stored features.

The features come from `s2 extract` (a file or an output folder); `s2cli.FeatureDataset` reads them in DataLoader
workers and `s2cli.collate_features` pads ragged token counts and gives the mask. In LLaVA the projector's outputs
are the image tokens put in front of the text and the loss is the language model's next-token loss; here, with no
language model, each image is pulled towards a fixed stand-in "caption embedding" so that the loop has something
to learn. Swap that loss for your LLM's and keep the rest.

    python examples/train_projector.py feats/ --steps 100 --workers 4
    python examples/train_projector.py            # extracts examples/images first (tiny random-init model, CPU)
"""
from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import torch
from torch import nn

import s2cli

ROOT = Path(__file__).parent.parent


class Projector(nn.Module):
    """LLaVA-1.5's mlp2x_gelu: vision channels -> LLM hidden size."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def caption_embedding(key: str, dim: int) -> torch.Tensor:
    """A stand-in for the text side: a fixed random vector per image key."""
    seed = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


def train(path: str, steps: int, workers: int, batch_size: int, llm_dim: int, context: str | None) -> list[float]:
    ds = s2cli.FeatureDataset(path)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                     collate_fn=s2cli.collate_features, multiprocessing_context=context if workers else None,
                                     persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    proj = Projector(ds.feature_shape[-1], llm_dim)
    opt = torch.optim.AdamW(proj.parameters(), lr=3e-3)
    losses: list[float] = []
    while len(losses) < steps:
        for batch in dl:
            tokens = proj(batch["features"])  # (B, T, llm_dim): the image tokens the LLM would read
            m = batch["mask"].unsqueeze(-1).to(tokens.dtype)
            mean = (tokens * m).sum(1) / m.sum(1)  # padding left out
            target = torch.stack([caption_embedding(k, llm_dim) for k in batch["key"]])
            loss = nn.functional.mse_loss(mean, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            print(f"step {len(losses)} loss {losses[-1]:.4f}", flush=True)
            if len(losses) >= steps:
                break
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("features", nargs="?", help="a file or folder written by `s2 extract` (default: extract examples/images)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--llm-dim", type=int, default=64, help="the LLM's hidden size (4096 for Vicuna-7B)")
    ap.add_argument("--context", default=None, help="DataLoader worker start method: fork | spawn | forkserver")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.features
        if path is None:  # a tiny random-init ConvNet, fit=keep: ragged token counts, as many recipes give
            path = str(Path(tmp) / "feats/")
            s2cli.extract(str(ROOT / "examples" / "images"), path, model="timm:test_resnet", random_init=True,
                          img_sizes=(64, 128), max_split_size=64, fit="keep", workers=0, shard_size=4)
        losses = train(path, args.steps, args.workers, args.batch_size, args.llm_dim, args.context)
    print(f"first loss {losses[0]:.4f} last loss {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
