"""transformers 5.24 renamed the cache argument of models and ``generate`` (and the output field)
from ``past_key_values`` to ``cache``; earlier releases, the GPU image's 5.17 among them, know only
the old name. These helpers pass and read a cache under the name the installed model takes."""

from __future__ import annotations

import inspect
from typing import Any


def cache_argument(model) -> str:
    """``"cache"`` where ``model.forward`` takes it (transformers >= 5.24), else ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def with_cache(model, cache) -> dict[str, Any]:
    """Keyword arguments that hand ``cache`` to ``model`` or ``model.generate``."""
    return {cache_argument(model): cache}


def returned_cache(output) -> Any:
    """The cache a forward or ``generate`` output carries, under whichever field name it has."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
