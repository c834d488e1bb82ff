"""Quality measures on logits and tensors: negative log-likelihood, KL divergence to a reference
distribution, top-1 agreement, cosine similarity."""

from __future__ import annotations

import torch


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood: ``logits [..., V]``, ``targets [...]`` -> ``[...]`` (float32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -torch.gather(logp, -1, targets[..., None]).squeeze(-1)


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-token ``KL(p_ref || p)`` from logits ``[..., V]`` -> ``[...]`` (float32, nats)."""
    ref = torch.log_softmax(ref_logits.float(), dim=-1)
    test = torch.log_softmax(logits.float(), dim=-1)
    return (ref.exp() * (ref - test)).sum(-1)


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-token agreement (1.0 or 0.0) of the argmax tokens, ``[...]``."""
    return (ref_logits.argmax(-1) == logits.argmax(-1)).float()


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dimension (float32)."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
