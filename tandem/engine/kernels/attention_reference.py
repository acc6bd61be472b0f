"""`paged_attention` in plain torch: the oracle the kernel tests compare against."""

from __future__ import annotations

import torch


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    *,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_query_len: int,
    num_splits: int = 1,
    num_decodes: int = 0,
) -> torch.Tensor:
    """`paged_attention` in plain torch, float32, one sequence at a time: the tests' oracle."""
    del max_query_len, num_splits, num_decodes  # shape hints for the kernel only
    starts = query_start_loc.tolist()
    group = q.shape[1] // k_cache.shape[2]
    block_size = k_cache.shape[1]
    for i, seq_len in enumerate(seq_lens.tolist()):
        a, b = starts[i], starts[i + 1]
        if b == a:
            continue
        if seq_len == 0:
            out[a:b] = 0
            continue
        blocks = block_tables[i, : -(-seq_len // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, 1)
        v = v_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", q[a:b].float(), k) * scale
        pos = torch.arange(seq_len - (b - a), seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= pos[:, None]
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
        p = torch.where(mask.any(-1, keepdim=True), p, 0.0)  # rows with no keys: zeros
        out[a:b] = torch.einsum("hqk,khd->qhd", p, v).to(out.dtype)
    return out
