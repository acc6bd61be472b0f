"""Runs one scheduled batch through the model: pack inputs, build attention metadata, sample."""

from __future__ import annotations

import logging

import torch
from transformers import PretrainedConfig

from tandem.engine.attention import AttentionMetadata, PrefillSpan, TorchAttention
from tandem.engine.config import EngineConfig
from tandem.engine.loader import iter_safetensors, resolve_dtype
from tandem.engine.models import LlamaForCausalLM
from tandem.engine.models.llama import head_dim_of
from tandem.engine.sampler import Sampler, SampleResult
from tandem.engine.scheduler import ScheduledBatch
from tandem.engine.sequence import Sequence

log = logging.getLogger(__name__)


def kv_bytes_per_block(hf: PretrainedConfig, block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * hf.num_hidden_layers * hf.num_key_value_heads * head_dim_of(hf)
    return per_token * block_size * dtype.itemsize


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        hf: PretrainedConfig,
        num_blocks: int,
        max_model_len: int,
        eos_token_ids: set[int],
    ) -> None:
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)  # the noise of requests that bring no seed of their own
        self.dtype = resolve_dtype(config.dtype, hf, config.device)
        self.block_size = config.block_size
        shape = (
            hf.num_hidden_layers,
            num_blocks,
            config.block_size,
            hf.num_key_value_heads,
            head_dim_of(hf),
        )
        k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.attention = TorchAttention(k_cache, v_cache, scale=head_dim_of(hf) ** -0.5)
        with torch.device("meta"):
            model = LlamaForCausalLM(hf, self.attention, max_model_len)
        model = model.to_empty(device=self.device).to(self.dtype)
        model.init_rope()
        model.load_weights(iter_safetensors(config.model))
        self.model = model.eval()
        self.sampler = Sampler(eos_token_ids)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], SampleResult | None]:
        """Compute the batch's tokens; sample for the sequences whose last token was computed."""
        input_ids, positions, slots = [], [], []
        prefills: list[PrefillSpan] = []
        decode_rows, decode_seqs = [], []
        sample_rows, sample_seqs = [], []
        b = self.block_size
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            start = seq.num_computed_tokens
            row = len(input_ids)
            input_ids += seq.token_ids[start : start + n]
            pos = range(start, start + n)
            positions += pos
            table = seq.block_table
            slots += [table[p // b] * b + p % b for p in pos]
            if n == 1:
                decode_rows.append(row)
                decode_seqs.append(seq)
            else:
                prefills.append(self._prefill_span(seq, row, start, n))
            if start + n == seq.num_tokens:
                sample_rows.append(row + n - 1)
                sample_seqs.append(seq)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            prefills=prefills,
            decode_rows=None,
            decode_blocks=None,
            decode_context=0,
            decode_mask=None,
        )
        if decode_seqs:
            self._add_decodes(meta, decode_rows, decode_seqs)
        hidden = self.model(self._tensor(input_ids), self._tensor(positions), meta)
        if not sample_seqs:
            return [], None
        logits = self.model.compute_logits(hidden[self._tensor(sample_rows)])
        return sample_seqs, self.sampler(logits, sample_seqs)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _prefill_span(self, seq: Sequence, row: int, start: int, n: int) -> PrefillSpan:
        context = start + n
        mask = None
        if start:
            q_pos = torch.arange(start, context, device=self.device).unsqueeze(1)
            mask = torch.arange(context, device=self.device).unsqueeze(0) <= q_pos
        block_ids = self._tensor(seq.block_table[: -(-context // self.block_size)])
        return PrefillSpan(row, n, context, block_ids, mask)

    def _add_decodes(self, meta: AttentionMetadata, rows: list[int], seqs: list[Sequence]) -> None:
        contexts = [s.num_computed_tokens + 1 for s in seqs]
        max_ctx = max(contexts)
        max_blocks = -(-max_ctx // self.block_size)
        tables = [s.block_table[:max_blocks] for s in seqs]
        meta.decode_rows = self._tensor(rows)
        meta.decode_blocks = self._tensor([t + [0] * (max_blocks - len(t)) for t in tables])
        meta.decode_context = max_ctx
        positions = torch.arange(max_ctx, device=self.device).unsqueeze(0)
        meta.decode_mask = (positions < self._tensor(contexts).unsqueeze(1))[:, None, None, :]
