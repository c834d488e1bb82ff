"""Quality on the real code path (DESIGN.md section 4): text goes through the model in chunks with
a cache, so every chunk attends to the cache's (compressed) history
exactly as generation would. The FP16 reference runs the same chunks with transformers' own
DynamicCache; KL divergence and top-1 agreement compare the two next-token distributions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from spectralquant.adapters.hf_cache_argument import returned_cache, with_cache
from transformers import DynamicCache

from spectralquant.metrics import kl_divergence, token_nll, top1_agreement


@dataclass
class QualityReport:
    tokens: int
    ppl_reference: float
    ppl: float
    kl: float
    top1: float
    seconds: float

    @property
    def ppl_change(self) -> float:
        """Relative perplexity change, e.g. 0.01 for +1%."""
        return self.ppl / self.ppl_reference - 1.0

    def as_dict(self) -> dict:
        return {**asdict(self), "ppl_change": self.ppl_change}


def chunked_logits(model, input_ids: torch.Tensor, cache, chunk: int) -> Iterator[torch.Tensor]:
    """Logits ``[B, c, V]`` of successive chunks of ``input_ids [B, T]`` fed through ``cache``."""
    device = next(model.parameters()).device
    for start in range(0, input_ids.shape[1], chunk):
        ids = input_ids[:, start : start + chunk].to(device)
        out = model(input_ids=ids, use_cache=True, **with_cache(model, cache))
        cache = returned_cache(out)
        yield out.logits


@torch.inference_mode()
def compare_to_reference(
    model,
    input_ids: torch.Tensor,
    make_cache: Callable[[], object],
    chunk: int = 256,
    reference_logits: list[torch.Tensor] | None = None,
) -> QualityReport:
    """Perplexity of ``input_ids [1, T]`` with caches from ``make_cache`` against the uncompressed
    reference (computed here unless ``reference_logits`` from :func:`reference_chunks` is given)."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, T] with T >= 2, got {tuple(input_ids.shape)}")
    ref_iter = (
        iter(reference_logits)
        if reference_logits is not None
        else chunked_logits(model, input_ids, DynamicCache(config=model.config), chunk)
    )
    targets = input_ids[:, 1:]
    nll_ref = nll = kl = top1 = 0.0
    n = 0
    t0 = time.perf_counter()
    for start, logits in zip(
        range(0, input_ids.shape[1], chunk), chunked_logits(model, input_ids, make_cache(), chunk)
    ):
        ref = next(ref_iter).to(logits.device)
        # Position i predicts token i + 1; the last position of the text has no target.
        c = min(logits.shape[1], targets.shape[1] - start)
        tgt = targets[:, start : start + c].to(logits.device)
        lg, rf = logits[:, :c], ref[:, :c]
        nll += float(token_nll(lg, tgt).sum())
        nll_ref += float(token_nll(rf, tgt).sum())
        kl += float(kl_divergence(rf, lg).sum())
        top1 += float(top1_agreement(rf, lg).sum())
        n += tgt.numel()
    return QualityReport(
        tokens=n,
        ppl_reference=math.exp(nll_ref / n),
        ppl=math.exp(nll / n),
        kl=kl / n,
        top1=top1 / n,
        seconds=time.perf_counter() - t0,
    )


@torch.inference_mode()
def reference_chunks(model, input_ids: torch.Tensor, chunk: int = 256) -> list[torch.Tensor]:
    """The uncompressed chunked logits once (CPU, float16 to save memory), for reuse across configs."""
    return [
        lg.to("cpu", torch.float16) for lg in chunked_logits(model, input_ids, DynamicCache(config=model.config), chunk)
    ]
