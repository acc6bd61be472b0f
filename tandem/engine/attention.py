"""Attention over the paged KV cache.

The cache of one layer is a flat tensor of `num_blocks * block_size` slots, each holding one
token's keys (or values) for every KV head. A step's tokens from many sequences are packed
into one flat batch; `AttentionMetadata` says where each token's K/V goes (`slot_mapping`)
and which slots each sequence attends over. Backends share this metadata, so a GPU backend
(a later issue) slots in behind the same `AttentionBackend.forward`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    """One sequence computing `query_len` tokens on top of `context_len - query_len` cached ones."""

    query_start: int
    query_len: int
    context_len: int
    slots: torch.Tensor  # [context_len] cache slots of the whole context, in order
    mask: torch.Tensor | None  # [query_len, context_len] bool, None when plain causal


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] slot for each new token's K/V
    prefills: list[PrefillSpan]
    decode_rows: torch.Tensor | None  # [num_decodes] rows of the flat batch that decode
    decode_slots: torch.Tensor | None  # [num_decodes, max_context] padded with slot 0
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_context] bool, True = attend


class AttentionBackend(Protocol):
    def forward(
        self,
        layer: int,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor: ...  # [num_tokens, num_heads, head_dim]


class TorchAttention:
    """Attention with torch's scaled_dot_product_attention: runs on any device, made for CPU.

    Decodes are batched into one padded SDPA call; each prefill chunk gets its own call,
    with an offset causal mask when part of its context came from the prefix cache.
    """

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> None:
        # [num_layers, num_slots, num_kv_heads, head_dim]
        self.k_cache = k_cache
        self.v_cache = v_cache
        self.scale = scale

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        k_cache[meta.slot_mapping] = k
        v_cache[meta.slot_mapping] = v
        out = torch.empty_like(q)
        for span in meta.prefills:
            rows = slice(span.query_start, span.query_start + span.query_len)
            qs = q[rows].transpose(0, 1)  # [heads, q_len, dim]
            ks = k_cache[span.slots].transpose(0, 1)
            vs = v_cache[span.slots].transpose(0, 1)
            o = F.scaled_dot_product_attention(
                qs,
                ks,
                vs,
                attn_mask=span.mask,
                is_causal=span.mask is None,
                scale=self.scale,
                enable_gqa=True,
            )
            out[rows] = o.transpose(0, 1)
        if meta.decode_rows is not None:
            qd = q[meta.decode_rows].unsqueeze(2)  # [n, heads, 1, dim]
            kd = k_cache[meta.decode_slots].transpose(1, 2)  # [n, kv_heads, ctx, dim]
            vd = v_cache[meta.decode_slots].transpose(1, 2)
            o = F.scaled_dot_product_attention(
                qd, kd, vd, attn_mask=meta.decode_mask, scale=self.scale, enable_gqa=True
            )
            out[meta.decode_rows] = o.squeeze(2)
        return out
