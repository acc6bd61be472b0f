"""Attention over the paged KV cache.

The cache of one layer is `[num_blocks, block_size, num_kv_heads, head_dim]`; slot
`block * block_size + offset` holds one token's keys (or values) for every KV head. A step's
tokens from many sequences are packed into one flat batch (`StepInputs`). Each backend turns
that step into metadata of its own in `prepare` (once per step, shared by every layer) and
reads it in `forward`: `TorchAttention` here (CPU, and the reference), `TritonAttention` on
GPUs (`attention_triton`), which also owns the static buffers that CUDA graphs replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from tandem.engine import cpu_kernels
from tandem.engine.step_inputs import DeviceStep, StepInputs


@dataclass
class PrefillSpan:
    """One sequence computing `query_len` tokens on top of `context_len - query_len` cached ones."""

    query_start: int
    query_len: int
    context_len: int
    block_ids: torch.Tensor  # [ceil(context_len / block_size)] the context's blocks, in order
    mask: torch.Tensor | None  # [query_len, context_len] bool; None: no cached prefix


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] slot for each new token's K/V
    prefills: list[PrefillSpan]
    decode_rows: torch.Tensor | None  # [num_decodes] int32 rows of the flat batch that decode
    decode_blocks: torch.Tensor | None  # [num_decodes, max_blocks] int32, padded with block 0
    decode_lens: torch.Tensor | None  # [num_decodes] int32 context lengths
    decode_context: int  # max_context: the padded context length of the decode batch
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_context] bool, True = attend;
    # built by the first layer that takes the padded path (the C kernel needs none)


class AttentionBackend(Protocol):
    k_cache: torch.Tensor  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor

    def prepare(self, step: StepInputs, dev: DeviceStep) -> Any: ...

    def forward(
        self,
        layer: int,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        meta: Any,
        rope: Any = None,  # for backends that rotate q and k where they store the KV
    ) -> torch.Tensor: ...  # [num_tokens, num_heads, head_dim]


class TorchAttention:
    """Attention with torch's scaled_dot_product_attention: runs on any device, made for CPU.

    On CPU, decodes go through `cpu_kernels`' C kernel, which reads the paged cache in
    place; elsewhere (and where it cannot be built) they are batched into one padded SDPA
    call. Each prefill chunk gets its own call. A prefill with no cached prefix attends over
    its own K/V directly; one that continues a cached prefix gathers the context block by
    block (whole blocks copy far faster than token-by-token gathers) under an offset causal
    mask.
    """

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> None:
        self.k_cache = k_cache
        self.v_cache = v_cache
        self.scale = scale
        self.kernel = cpu_kernels.load() if k_cache.device.type == "cpu" else None

    def prepare(self, step: StepInputs, dev: DeviceStep) -> AttentionMetadata:
        device = self.k_cache.device
        block_size = self.k_cache.shape[2]
        meta = AttentionMetadata(dev.slot_mapping.long(), [], None, None, None, 0, None)
        decodes = []
        qsl, lens = step.query_start_loc.tolist(), step.seq_lens.tolist()
        for i, context in enumerate(lens):
            start, n = qsl[i], qsl[i + 1] - qsl[i]
            if n == 1:
                decodes.append(i)
                continue
            mask = None
            if context > n:
                q_pos = torch.arange(context - n, context, device=device).unsqueeze(1)
                mask = torch.arange(context, device=device).unsqueeze(0) <= q_pos
            blocks = dev.block_tables[i, : -(-context // block_size)]
            meta.prefills.append(PrefillSpan(start, n, context, blocks, mask))
        if decodes:
            i32 = torch.int32
            meta.decode_rows = torch.tensor([qsl[i] for i in decodes], dtype=i32, device=device)
            meta.decode_lens = torch.tensor([lens[i] for i in decodes], dtype=i32, device=device)
            meta.decode_context = max(lens[i] for i in decodes)
            width = -(-meta.decode_context // block_size)
            meta.decode_blocks = dev.block_tables[decodes, :width].to(i32).contiguous()
        return meta

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        rope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """With `rope` (the tokens' rows of the RoPE table; only where `self.kernel` loaded),
        q and k are rotated in place by the C kernel that stores k and v."""
        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        if rope is not None:  # the tokens' rows of the RoPE table: rotate, then store
            cpu_kernels.rope_store(self.kernel, q, k, v, rope, k_cache, v_cache,
                                   meta.slot_mapping)  # fmt: skip
        else:
            k_cache.flatten(0, 1).index_copy_(0, meta.slot_mapping, k)
            v_cache.flatten(0, 1).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        for span in meta.prefills:
            rows = slice(span.query_start, span.query_start + span.query_len)
            if span.mask is None:
                ks, vs = k[rows], v[rows]
            else:
                ks = _gather(k_cache, span.block_ids, span.context_len)
                vs = _gather(v_cache, span.block_ids, span.context_len)
            o = _sdpa(
                q[rows].transpose(0, 1),
                ks.transpose(0, 1),
                vs.transpose(0, 1),
                attn_mask=span.mask,
                is_causal=span.mask is None,
                scale=self.scale,
                enable_gqa=True,
            )
            out[rows] = o.transpose(0, 1)
        if meta.decode_rows is None:
            return out
        if cpu_kernels.supports(self.kernel, q, k_cache):
            cpu_kernels.decode_attention(self.kernel, q, k_cache, v_cache, out,
                                           meta.decode_rows, meta.decode_blocks,
                                           meta.decode_lens, self.scale)  # fmt: skip
        else:
            self.padded_decode(q, k_cache, v_cache, out, meta)
        return out

    def padded_decode(self, q, k_cache, v_cache, out, meta: AttentionMetadata) -> None:
        """Decodes as one SDPA call over their contexts gathered, padded and masked."""
        if meta.decode_mask is None:
            positions = torch.arange(meta.decode_context, device=q.device).unsqueeze(0)
            meta.decode_mask = (positions < meta.decode_lens.unsqueeze(1))[:, None, None, :]
        n = meta.decode_rows.shape[0]
        shape = (n, -1, *k_cache.shape[2:])
        blocks = meta.decode_blocks.flatten().long()
        ctx = meta.decode_context
        kd = k_cache.index_select(0, blocks).view(shape)[:, :ctx].transpose(1, 2)
        vd = v_cache.index_select(0, blocks).view(shape)[:, :ctx].transpose(1, 2)
        o = _sdpa(
            q[meta.decode_rows].unsqueeze(2),
            kd,
            vd,
            attn_mask=meta.decode_mask,
            scale=self.scale,
            enable_gqa=True,
        )
        out[meta.decode_rows] = o.squeeze(2)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """SDPA over [heads, tokens, dim] (or batched) inputs; on CPU in float32, whose kernel is
    faster than the half ones, and always with a batch dimension: given 3-D inputs torch's
    CPU dispatch takes its unfused math path (one 128-token prefill layer 0.94 ms against
    0.58 batched, 2,048 tokens 410 against 74 ms, the same error against float64)."""
    if q.dim() == 3:
        return _sdpa(q[None], k[None], v[None], **kwargs)[0]
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    return o.to(q.dtype)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens held in `block_ids`: [length, num_kv_heads, head_dim]."""
    return cache.index_select(0, block_ids).flatten(0, 1)[:length]
