"""torch, imported on first use: checking a command line (and refusing it in one line) does not wait the seconds
that importing torch takes. Modules of pure tensor math use these names exactly as they would the real modules."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    def __init__(self, name: str):
        super().__init__(name)
        self.__dict__["_real"] = None

    def __getattr__(self, attr: str) -> Any:
        real = self.__dict__["_real"]
        if real is None:
            real = self.__dict__["_real"] = importlib.import_module(self.__name__)
        return getattr(real, attr)


torch = LazyModule("torch")
nn = LazyModule("torch.nn")
F = LazyModule("torch.nn.functional")
