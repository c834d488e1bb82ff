"""Per-layer sensitivity of a causal LM to KV compression: for every layer and kind (keys, values),
the mean KL divergence of next-token distributions when only that kind of that layer is compressed
(at a probe width) and the rest stays exact. It drives ``layer_budget="sensitivity"``.

One exact forward over a prefix captures every layer's K/V; each probe then fills a cache in which
only the probed layer is compressed, and runs just the suffix through it: ``2 * layers`` suffix
forwards in all.
"""

from __future__ import annotations

import torch
from spectralquant.adapters.hf_attention import capture_attention
from spectralquant.adapters.hf_cache_argument import with_cache
from spectralquant.adapters.hf_causal_lm import HFCausalLMAdapter
from tqdm.auto import tqdm
from transformers import DynamicCache

from spectralquant.calibration import Calibration
from spectralquant.codec import build_codecs
from spectralquant.config import CompressionConfig, resolve_config
from spectralquant.metrics import kl_divergence

from .hf_cache import SpectralQuantCache

PROBE_BASE = "standard"  # the preset whose cache settings (fp16 window, sinks) the probes run with
# The probes quantize with plain water-filling and MSE levels (the presets before unbiased levels and
# their 1-bit value floor), a fixed reference, so calibrations and the budgets measured with them do
# not move when a preset's decode options change. Probing with the presets' own values instead was
# measured on SmolLM2 (2.25 bits, both with the floor): 4/5 passkeys at 4k (log-prob -1.20) for +0.86%
# perplexity, against 5/5 (-1.11) and +0.79%; KL mixed (0.0083 against 0.0081; 0.0057 against 0.0059 at 2.5).
PROBE_DIALS = {"value_min_bits": 0, "unbiased": False}


@torch.inference_mode()
def measure_sensitivity(
    adapter: HFCausalLMAdapter,
    calibration: Calibration,
    token_ids: torch.Tensor,
    prefix: int,
    probe_bits: float = 2.0,
    base: CompressionConfig | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """``[L, 2]`` KL (nats per token) of compressing each layer's keys / values alone at
    ``probe_bits`` (the other kind of that layer at 8 bits), measured on the tokens after
    ``prefix`` in each row of ``token_ids [N, T]``."""
    model = adapter.model
    n_layers = calibration.signature.num_layers
    if not 0 < prefix < token_ids.shape[1]:
        raise ValueError(f"prefix must be inside the {token_ids.shape[1]}-token rows, got {prefix}")
    base = base or resolve_config(PROBE_BASE, **PROBE_DIALS)
    windows, ropes = adapter.sliding_windows(), adapter.rope_tables()
    device = next(model.parameters()).device
    total = torch.zeros(n_layers, 2)
    bar = tqdm(total=2 * n_layers * token_ids.shape[0], desc="layer sensitivity", disable=not progress)
    for row in token_ids:
        ids = row[None].to(device)
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def keep(module, query, key, value, mask, options, captured=captured):
            captured[module.layer_idx] = (key, value)

        exact = DynamicCache(config=model.config)
        with capture_attention(model, keep):
            model(input_ids=ids[:, :prefix], use_cache=True, **with_cache(model, exact))
        reference = model(input_ids=ids[:, prefix:], use_cache=True, **with_cache(model, exact)).logits
        for layer in range(n_layers):
            for kind in range(2):
                bits = [(8.0, 8.0)] * n_layers
                bits[layer] = (probe_bits, 8.0) if kind == 0 else (8.0, probe_bits)
                others = tuple(i for i in range(n_layers) if i != layer)
                config = resolve_config(base, layer_budget="uniform", layer_bits=tuple(bits), fp16_layers=others)
                cache = SpectralQuantCache(build_codecs(calibration, config), config, windows, ropes=ropes)
                for i in range(n_layers):
                    cache.update(*captured[i], i)
                logits = model(input_ids=ids[:, prefix:], use_cache=True, **with_cache(model, cache)).logits
                total[layer, kind] += float(kl_divergence(reference, logits).mean().clamp_min(0))
                bar.update()
    bar.close()
    return total / token_ids.shape[0]
