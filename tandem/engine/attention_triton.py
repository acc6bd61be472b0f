"""The GPU attention backend: Tandem's Triton kernels reading the paged KV cache in place.

One kernel launch per layer serves a whole step, decodes and prefill chunks alike, each
query attending through its sequence's block table; a small batch of long decodes splits
every context over several programs (split-K) so the GPU is not left mostly idle. The
backend also owns the static metadata that CUDA graphs capture (`graph_metadata`) and the
copies that refill it before a replay (`load_graph_step`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from tandem.engine.kernels.attention import choose_num_splits, paged_attention
from tandem.engine.kernels.kv_store import NewKV, rope_store_kv, store_kv
from tandem.engine.step_inputs import DeviceStep, StepInputs


@dataclass
class TritonMetadata:
    slot_mapping: torch.Tensor  # [T] int32
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, W] int32
    max_query_len: int
    num_splits: int
    num_decodes: int = 0  # leading one-token sequences, given decode tiles of their own


class TritonAttention:
    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> None:
        self.k_cache = k_cache
        self.v_cache = v_cache
        self.scale = scale
        self.num_kv_heads = k_cache.shape[3]
        device = k_cache.device
        self.num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else 1
        )
        self._graph: TritonMetadata | None = None

    def prepare(self, step: StepInputs, dev: DeviceStep) -> TritonMetadata:
        splits = 1
        if step.max_query_len == 1:
            splits = choose_num_splits(
                step.num_seqs, self.num_kv_heads, step.max_seq_len, self.num_sms
            )
        return TritonMetadata(
            dev.slot_mapping,
            dev.query_start_loc,
            dev.seq_lens,
            dev.block_tables,
            step.max_query_len,
            splits,
            step.num_decodes,
        )

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: TritonMetadata,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """With `rope` (positions, cos/sin table), q and k are rotated here, in the launch
        that stores K and V (in a decode step, the attention launch itself); without, they
        come rotated."""
        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        new_kv = None
        if rope is None:
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        elif meta.max_query_len == 1:  # the attention launch rotates and stores too
            new_kv = NewKV(k, v, meta.slot_mapping, *rope)
        else:
            rope_store_kv(q, k, v, k_cache, v_cache, meta.slot_mapping, *rope)
        return paged_attention(
            q,
            k_cache,
            v_cache,
            out,
            query_start_loc=meta.query_start_loc,
            seq_lens=meta.seq_lens,
            block_tables=meta.block_tables,
            scale=self.scale,
            max_query_len=meta.max_query_len,
            num_splits=meta.num_splits,
            num_decodes=meta.num_decodes,
            new_kv=new_kv,
        )

    def warm_up(self, num_heads: int, max_query_len: int) -> None:
        """Compile every kernel variant a step can need before serving starts, where a first
        compile costs a second of a live stream: one per prefill tile shape (which follows
        the longest query) and per split-K factor (decodes with and without their KV store
        fused in), on an empty batch."""
        kv_heads, head_dim = self.num_kv_heads, self.k_cache.shape[-1]
        dev, rows = self.k_cache.device, 16
        fused = torch.zeros(rows, (num_heads + 2 * kv_heads) * head_dim, dtype=self.k_cache.dtype,
                            device=dev)  # fmt: skip
        q = fused[:, : num_heads * head_dim].view(rows, num_heads, head_dim)  # as qkv's view
        out = torch.empty(q.shape, dtype=q.dtype, device=dev)
        zeros = torch.zeros(3, dtype=torch.int32, device=dev)
        tables = torch.zeros((2, 1), dtype=torch.int32, device=dev)
        group = num_heads // kv_heads
        tiles = {triton.next_power_of_2(m * group): m for m in range(max_query_len, 1, -1)}
        shapes = [(m, 1) for m in sorted(tiles.values())] + [(1, s) for s in (1, 2, 4, 8, 16)]
        kv = fused[:, num_heads * head_dim :].view(rows, 2 * kv_heads, head_dim)
        table = torch.zeros((1, head_dim), dtype=torch.float32, device=dev)
        new_kv = NewKV(kv[:, :kv_heads], kv[:, kv_heads:], zeros, zeros, table)
        # Decodes store their KV inside attention, so only mixed steps use the KV store.
        slots = torch.full((rows,), -1, dtype=torch.int32, device=dev)
        positions = torch.zeros(rows, dtype=torch.int32, device=dev)
        rope_store_kv(q, new_kv.k, new_kv.v, self.k_cache[0], self.v_cache[0], slots,
                      positions, table)  # fmt: skip
        for query_len, splits in shapes:
            for fresh in (None, new_kv) if query_len == 1 else (None,):
                paged_attention(q, self.k_cache[0], self.v_cache[0], out, query_start_loc=zeros,
                                seq_lens=zeros[:2], block_tables=tables, scale=self.scale,
                                max_query_len=query_len, num_splits=splits,
                                new_kv=fresh)  # fmt: skip
        torch.cuda.synchronize(dev)

    # -- CUDA graphs: decode steps of up to `max_seqs` sequences --------------------------

    def init_graphs(self, max_seqs: int, max_blocks_per_seq: int) -> None:
        """Static buffers every captured decode graph reads; refilled before each replay."""
        device = self.k_cache.device
        self._graph = TritonMetadata(
            slot_mapping=torch.full((max_seqs,), -1, dtype=torch.int32, device=device),
            query_start_loc=torch.arange(max_seqs + 1, dtype=torch.int32, device=device),
            seq_lens=torch.zeros(max_seqs, dtype=torch.int32, device=device),
            block_tables=torch.zeros(
                (max_seqs, max_blocks_per_seq), dtype=torch.int32, device=device
            ),
            max_query_len=1,
            num_splits=1,
        )

    def graph_splits(self, batch_size: int, max_seq_len: int) -> int:
        """The split-K factor a padded decode step of `batch_size` runs with: one graph is
        captured per factor, so short contexts skip the split and its combine kernel."""
        return choose_num_splits(batch_size, self.num_kv_heads, max_seq_len, self.num_sms)

    def graph_split_factors(self, batch_size: int, max_model_len: int) -> list[int]:
        """Every factor `graph_splits` can return up to `max_model_len` (it changes only at
        multiples of 512 tokens)."""
        lengths = [1, *range(512, max_model_len, 512), max_model_len]
        return sorted({self.graph_splits(batch_size, n) for n in lengths})

    def graph_metadata(self, batch_size: int, num_splits: int) -> TritonMetadata:
        """The metadata a graph of `batch_size` decodes is captured with (views of the
        static buffers)."""
        g = self._graph
        return TritonMetadata(
            g.slot_mapping[:batch_size],
            g.query_start_loc[: batch_size + 1],
            g.seq_lens[:batch_size],
            g.block_tables[:batch_size],
            1,
            num_splits,
        )

    def load_graph_step(self, dev: DeviceStep, batch_size: int) -> None:
        """Copy a decode step into the static buffers; rows past the step are padding
        (slot -1: nothing stored; context 0: nothing read)."""
        g = self._graph
        n = dev.seq_lens.shape[0]
        g.slot_mapping[:n].copy_(dev.slot_mapping)
        g.slot_mapping[n:batch_size].fill_(-1)
        g.seq_lens[:n].copy_(dev.seq_lens)
        g.seq_lens[n:batch_size].fill_(0)
        width = dev.block_tables.shape[1]
        g.block_tables[:n, :width].copy_(dev.block_tables)
