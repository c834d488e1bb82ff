"""Pure-PyTorch reference for attention over a :class:`CompressedKV` (the fused kernels' spec).

Decode/speculative attention: a few query tokens per sequence attend to the whole cache
(compressed history, sinks, window) in one softmax; GQA query heads share their KV head.
"""

from __future__ import annotations

import torch

from ..compressed_kv import CompressedKV


def compressed_attention_reference(
    query: torch.Tensor,
    kv: CompressedKV,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of ``query [B, Hq, Lq, D]`` over ``kv``; ``mask [B, Lq, Tc + W]`` is True where a
    query may attend (None: everything). Scores are ``q.k * scaling`` (default ``D**-0.5``), then
    ``softcap * tanh(score / softcap)`` if given. Returns ``[B, Hq, Lq, D]`` in ``query``'s dtype;
    a query row with nothing to attend to gives zeros.
    """
    b, hq, lq, d = query.shape
    k, v = kv.materialize(torch.float32)
    h = k.shape[1]
    if hq % h:
        raise ValueError(f"{hq} query heads cannot share {h} KV heads")
    q = query.float().reshape(b, h, hq // h, lq, d)
    scores = torch.einsum("bhgld,bhtd->bhglt", q, k) * (d**-0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhglt,bhtd->bhgld", probs, v)
    return out.reshape(b, hq, lq, d).to(query.dtype)
