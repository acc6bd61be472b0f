"""Row-wise operations on a batch of distributions, for the sampler: cutting each row's tail
(top-k, top-p) and drawing one token a row by inverting its cumulative distribution."""

from __future__ import annotations

import torch


def inverse_cdf(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row of (unnormalised) `probs`: the first token whose cumulative mass
    exceeds a uniform point below the row's total, so a token of zero mass is never drawn."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    below = torch.nextafter(total, torch.zeros_like(total))  # rounding must not reach total
    point = torch.minimum(torch.rand_like(total) * total, below)
    return torch.searchsorted(cdf, point, right=True).squeeze(1)


def top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf all but each row's top_k tokens and, of those, the smallest prefix whose
    mass reaches top_p (always at least one token). `top_k` [rows, 1], `top_p` [rows, 1]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    drop = ranks >= top_k
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1).sub_(probs)
    drop |= before >= top_p
    sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
