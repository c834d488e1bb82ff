"""SpectralQuant: calibrated spectral compression of transformer key/value caches.

    import spectralquant as sq
    calib = sq.calibrate(model, tokenizer)
    sq.wrap(model, calib, preset="standard")
    ...
    sq.unwrap(model)
"""

from .api import calibrate, compression_stats, is_wrapped, unwrap, wrap
from .calibration import Calibration, ModelSignature, merge_key_domains
from .config import PRESETS, CompressionConfig, describe_presets, resolve_config
from .quantizer import Quantizer, QuantizerConfig

__version__ = "0.1.0"


def __getattr__(name):
    # The engine needs transformers; import it only when asked for.
    if name == "SpectralQuant":
        from .integrations.engine import SpectralQuant

        return SpectralQuant
    raise AttributeError(f"module 'spectralquant' has no attribute {name!r}")


__all__ = [
    "Calibration",
    "CompressionConfig",
    "ModelSignature",
    "PRESETS",
    "Quantizer",
    "QuantizerConfig",
    "SpectralQuant",
    "calibrate",
    "compression_stats",
    "describe_presets",
    "is_wrapped",
    "merge_key_domains",
    "resolve_config",
    "unwrap",
    "wrap",
]
