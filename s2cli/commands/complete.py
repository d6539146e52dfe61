"""Shell completion of the values the commands take, read from their registries: model aliases and the spec
prefixes of the backbone families (`timm:`, `hf:`, and any family registered later), recipe names. A command's
parameter named in `BY_NAME` completes so, whichever command declares it (commands.layout applies it)."""
from __future__ import annotations

from typing import Callable


def _starting(names: list[str], incomplete: str) -> list[str]:
    return [n for n in names if n.startswith(incomplete)]


def family_prefixes() -> list[str]:
    """`family:` for every registered backbone family (timm:, hf:, open_clip:, ...)."""
    from ..families import family_names

    return [f"{f}:" for f in family_names()]


def model_aliases() -> list[str]:
    from ..backbones import list_models

    return [m.name for m in list_models()]


def models(incomplete: str) -> list[str]:
    """--model / `s2 fetch MODELS`: the aliases and the family prefixes that start with `incomplete`."""
    return _starting(model_aliases() + family_prefixes(), incomplete)


def recipes(incomplete: str) -> list[str]:
    """--recipe / `s2 recipes show NAME`: the shipped recipes' names that start with `incomplete`."""
    from ..config import list_recipes

    return _starting(sorted(list_recipes()), incomplete)


# a parameter of this name completes with this function (unless it declares its own completion)
BY_NAME: dict[str, Callable[[str], list[str]]] = {"model": models, "models": models, "recipe": recipes}
