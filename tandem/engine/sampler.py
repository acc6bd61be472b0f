"""Turn logits into tokens: penalties, temperature, top-k/top-p/min-p, seeded sampling, logprobs.

Rows are processed together as tensors; the only per-row work is drawing noise for rows with
their own seed, so that a seeded request samples the same tokens whatever else is batched.
Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which draws exactly
from p with one noise value per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.engine.sequence import Sequence
from tandem.protocol import TokenLogprob


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


class Sampler:
    def __init__(self, eos_token_ids: set[int]) -> None:
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """`logits` [len(seqs), vocab] in float32; one row per sequence that samples."""
        params = [s.sampling for s in seqs]
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        logits = self._penalise(logits, seqs)
        logits = self._block_early_stop(logits, seqs)
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        chosen = logits.argmax(dim=-1) if bool(greedy.all()) else self._sample(logits, seqs, greedy)
        token_ids = chosen.tolist()
        return SampleResult(token_ids, self._logprobs(raw_logprobs, token_ids, seqs))

    def _penalise(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [
            i
            for i, s in enumerate(seqs)
            if s.sampling.presence_penalty
            or s.sampling.frequency_penalty
            or s.sampling.repetition_penalty != 1.0
        ]
        if not rows:
            return logits
        logits = logits.clone()
        vocab = logits.shape[1]
        for i in rows:
            p = seqs[i].sampling
            out = torch.tensor(seqs[i].output_ids, dtype=torch.long, device=logits.device)
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
                seen[torch.tensor(seqs[i].token_ids, dtype=torch.long, device=logits.device)] = True
                penalised = torch.where(
                    row > 0, row / p.repetition_penalty, row * p.repetition_penalty
                )
                row = torch.where(seen, penalised, row)
            if out.numel() and (p.presence_penalty or p.frequency_penalty):
                counts = torch.bincount(out, minlength=vocab).to(row.dtype)
                row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
            logits[i] = row
        return logits

    def _block_early_stop(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Forbid EOS and stop tokens until a sequence has its `min_tokens`."""
        rows = [i for i, s in enumerate(seqs) if s.num_output_tokens < s.sampling.min_tokens]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            stops = set(seqs[i].sampling.stop_token_ids)
            if not seqs[i].sampling.ignore_eos:
                stops |= self.eos_token_ids
            logits[i, list(stops)] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy: torch.Tensor):
        params = [s.sampling for s in seqs]
        device = logits.device
        argmax = logits.argmax(dim=-1)
        temps = _column([p.temperature if not p.greedy else 1.0 for p in params], device)
        logits = logits / temps
        top_k = [p.top_k if p.top_k > 0 else 0 for p in params]
        top_p = [p.top_p for p in params]
        if any(top_k) or any(p < 1.0 for p in top_p):
            logits = self._top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        min_p = [p.min_p for p in params]
        if any(min_p):
            floor = probs.amax(dim=-1, keepdim=True) * _column(min_p, device)
            probs = probs.masked_fill(probs < floor, 0.0)
        noise = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
        if unseeded:
            noise[unseeded] = torch.empty(
                len(unseeded), probs.shape[1], device=device
            ).exponential_()
        for i, s in enumerate(seqs):
            if s.generator is not None:
                row = torch.empty(probs.shape[1]).exponential_(generator=s.generator)
                noise[i] = row.to(device)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, argmax, sampled)

    @staticmethod
    def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[1]
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        k = torch.tensor([k or vocab for k in top_k], device=logits.device).unsqueeze(1)
        drop = ranks >= k
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        before = probs.cumsum(dim=-1) - probs
        drop |= before >= _column(top_p, logits.device)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)

    @staticmethod
    def _logprobs(
        raw: torch.Tensor | None, token_ids: list[int], seqs: list[Sequence]
    ) -> list[TokenLogprob | None]:
        if raw is None:
            return [None] * len(seqs)
        out: list[TokenLogprob | None] = []
        for i, s in enumerate(seqs):
            k = s.sampling.logprobs
            if k is None:
                out.append(None)
                continue
            top: list[tuple[int, float]] = []
            if k > 0:
                values, ids = raw[i].topk(k)
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
            out.append(TokenLogprob(token_ids[i], float(raw[i, token_ids[i]]), top))
        return out
