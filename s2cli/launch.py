"""Launch: where a run computes. Resolves `--device` and `--precision` to a torch device and dtype; later
this is also where ranks and per-rank devices are discovered."""
from __future__ import annotations

import torch

from .errors import ConfigError

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """auto (CUDA when present, else CPU) | cpu | cuda | cuda:K."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError("--device is not known", given=spec, expected="auto | cpu | cuda | cuda:K",
                          fix="pass --device auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device asks for CUDA but none is available", given=spec, fix="pass --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError("no such CUDA device", given=spec,
                              expected=f"cuda:0..cuda:{torch.cuda.device_count() - 1}", fix="pass --device cuda:0")
    elif dev.type != "cpu":
        raise ConfigError("--device is not supported", given=spec, expected="auto | cpu | cuda | cuda:K",
                          fix="pass --device auto")
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    dtype = PRECISION_DTYPES[precision]
    if dtype is torch.float16 and device.type == "cpu":
        raise ConfigError("fp16 compute is not supported on the CPU", given=precision, fix="pass --precision bf16 or fp32")
    return dtype
