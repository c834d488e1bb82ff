"""Model-family adapters (``spectralquant.adapters``): each knows where a family's attention K/V
live and how to install compression there. ``find_adapter(model)`` picks one."""

from .base import Adapter, WrapState, find_adapter, register_adapter, supported_families

try:  # the Hugging Face adapters need transformers (the [hf] extra)
    from . import hf_causal_lm  # noqa: F401  (registers itself)
except ImportError:  # pragma: no cover - exercised only without transformers
    pass

__all__ = ["Adapter", "WrapState", "find_adapter", "register_adapter", "supported_families"]
