"""Turn logits into tokens: penalties, temperature, top-k/top-p/min-p, seeded sampling, logprobs.

The batch is processed as tensors, with no per-row device work: the host reads each row's
parameters into lists and numpy arrays, moves them to the device in one copy, and reads one
tensor back (the sampled ids, with the logprobs when any row asks for them). On a GPU every
extra copy is a sync point that drains the queue, and every per-row op a kernel launch.

Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which draws exactly
from p with one noise value per token. Unseeded rows draw E from torch's global generator;
seeded rows from `sampling_noise`, a hash of (seed, sequence index, output position, token),
so a seeded request samples the same tokens whatever else is batched and wherever it runs.
On a CPU, unseeded rows invert their cumulative distribution at one uniform draw instead:
torch draws exponentials there at ~27 ns a token (42 ms for 32 rows of a 49k vocabulary,
against 2.6 ms for the inversion).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from tandem.engine import sampling_noise
from tandem.engine.kernels.argmax import argmax_rows
from tandem.engine.sampling_draws import inverse_cdf, top_k_top_p
from tandem.engine.sequence import Sequence
from tandem.protocol import SamplingParams, TokenLogprob


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32}


class _Upload:
    """Host arrays for one step, moved to the device together.

    On CUDA the arrays are packed into a reused pinned byte buffer and copied with one
    non-blocking transfer (a pageable copy would wait for the forward pass still queued).
    Before the buffer is refilled, an event makes sure the last copy out of it is done; each
    step reads its sampled ids back, so by then it always is. On a CPU the arrays are used
    in place.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._host: torch.Tensor | None = None
        self._dev: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def send(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        if self.device.type != "cuda":
            return [torch.from_numpy(a) for a in arrays]
        # int64 arrays first, so that every slice starts aligned for its dtype.
        order = sorted(range(len(arrays)), key=lambda i: -arrays[i].dtype.itemsize)
        sizes = [arrays[i].nbytes for i in order]
        total = sum(sizes)
        if self._copied is None:
            self._copied = torch.cuda.Event()
        self._copied.synchronize()
        if self._host is None or total > self._host.numel():
            size = max(total, 2 * (0 if self._host is None else self._host.numel()), 1 << 16)
            self._host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self._dev = torch.empty(size, dtype=torch.uint8, device=self.device)
        host = self._host.numpy()
        offset = 0
        for i, size in zip(order, sizes, strict=True):
            host[offset : offset + size] = arrays[i].reshape(-1).view(np.uint8)
            offset += size
        flat = self._dev[:total]
        flat.copy_(self._host[:total], non_blocking=True)
        self._copied.record()
        out: list[torch.Tensor] = [flat] * len(arrays)
        offset = 0
        for i, size in zip(order, sizes, strict=True):
            a = arrays[i]
            out[i] = flat[offset : offset + size].view(_TORCH_DTYPES[a.dtype]).view(a.shape)
            offset += size
        return out


def _index(rows: list[int], n: int) -> np.ndarray | None:
    """Rows as an index array, or None when they are all `n` rows in order (no gather)."""
    return None if len(rows) == n else np.asarray(rows, dtype=np.int64)


def _take(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Rows `index` of `t` (all when None). Advanced indexing: on a CPU it is several times
    faster than index_select for vocab-wide rows."""
    return t if index is None else t[index]


class _Staged:
    """The host arrays a step needs on the device, collected while planning it, then sent in
    one upload; plans keep slots, and read the device tensors by slot afterwards."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []
        self.dev: list[torch.Tensor] = []
        self.lp: int | None = None  # slot of the logprob rows' index

    def add(self, a: np.ndarray | None) -> int | None:
        if a is None:
            return None
        self.arrays.append(a)
        return len(self.arrays) - 1

    def send(self, upload: _Upload) -> None:
        self.dev = upload.send(self.arrays)

    def get(self, slot: int | None) -> torch.Tensor | None:
        return None if slot is None else self.dev[slot]

    def __getitem__(self, slot: int) -> torch.Tensor:
        return self.dev[slot]


class Sampler:
    def __init__(self, eos_token_ids: set[int]) -> None:
        self.eos_token_ids = eos_token_ids
        self._uploads: dict[torch.device, _Upload] = {}

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """`logits` [len(seqs), vocab] in float32; one row per sequence that samples. The
        tensor is not modified."""
        n = logits.shape[0]
        params = [s.sampling for s in seqs]
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        staged = _Staged()
        chosen = self.choose(logits, seqs, staged, lp_rows)
        if not lp_rows:
            return SampleResult(chosen.tolist(), [None] * n)
        lp_params = [params[i] for i in lp_rows]
        return self._with_logprobs(logits, chosen, lp_params, lp_rows, staged.get(staged.lp))

    def choose(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        staged: _Staged | None = None,
        lp_rows: list[int] = (),
    ) -> torch.Tensor:
        """The chosen token ids, left on the logits' device (no copy back): an engine that
        overlaps steps feeds them to the next step before reading them."""
        staged = staged or _Staged()
        n = logits.shape[0]
        samp_rows = [i for i, s in enumerate(seqs) if not s.sampling.greedy]
        adjust = self._plan_adjust(seqs, logits.shape[1], staged)
        if not (adjust or samp_rows or lp_rows):  # the common greedy batch: nothing to send
            return argmax_rows(logits)
        samp = _SamplePlan.build(seqs, samp_rows, staged) if samp_rows else None
        staged.lp = staged.add(_index(list(lp_rows), n))
        staged.send(self._upload(logits.device))
        work = self._adjust(logits, adjust, staged)
        if samp is None:
            return argmax_rows(work)
        sampled = samp.sample(_take(work, staged.get(samp.index)), staged)
        if samp.index is None:
            return sampled
        return argmax_rows(work).index_copy_(0, staged[samp.index], sampled)

    def adjusted_logits(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The logits after penalties and min_tokens blocking: what greedy rows take the
        argmax of and sampled rows start from (tests compare it with a reference)."""
        staged = _Staged()
        adjust = self._plan_adjust(seqs, logits.shape[1], staged)
        staged.send(self._upload(logits.device))
        return self._adjust(logits, adjust, staged)

    def _plan_adjust(
        self, seqs: list[Sequence], vocab: int, staged: _Staged
    ) -> tuple[_PenaltyPlan | None, int | None] | None:
        """Stage the penalties and min_tokens blocks; None when no row has either."""
        pen_rows = [i for i, s in enumerate(seqs) if penalised(s.sampling)]
        block_rows = [i for i, s in enumerate(seqs) if s.num_output_tokens < s.sampling.min_tokens]
        if not (pen_rows or block_rows):
            return None
        pen = _PenaltyPlan.build(seqs, pen_rows, vocab, staged) if pen_rows else None
        block = staged.add(self._block_pairs(seqs, block_rows, vocab)) if block_rows else None
        return pen, block

    @staticmethod
    def _adjust(
        logits: torch.Tensor,
        adjust: tuple[_PenaltyPlan | None, int | None] | None,
        staged: _Staged,
    ) -> torch.Tensor:
        if adjust is None:
            return logits
        pen, block = adjust
        work = logits.clone() if pen is None else pen.apply(logits, staged)
        if block is not None:
            rows, cols = staged[block]
            work.index_put_((rows, cols), torch.full((), float("-inf"), device=work.device))
        return work

    def _upload(self, device: torch.device) -> _Upload:
        if device not in self._uploads:
            self._uploads[device] = _Upload(device)
        return self._uploads[device]

    def _block_pairs(self, seqs: list[Sequence], rows: list[int], vocab: int) -> np.ndarray:
        """[2, pairs] (row, token) that must not be sampled yet: EOS and stop ids of the rows
        below their `min_tokens` (ids past the logits cannot be sampled anyway)."""
        pairs: list[tuple[int, int]] = []
        for i in rows:
            p = seqs[i].sampling
            stops = (
                set(p.stop_token_ids)
                if p.ignore_eos
                else self.eos_token_ids.union(p.stop_token_ids)
            )
            pairs += ((i, t) for t in stops if 0 <= t < vocab)
        return np.asarray(pairs, dtype=np.int64).reshape(-1, 2).T.copy()

    @staticmethod
    def _with_logprobs(
        logits: torch.Tensor,
        chosen: torch.Tensor,
        params: list[SamplingParams],
        rows: list[int],
        index: torch.Tensor | None,
    ) -> SampleResult:
        """Raw (pre-penalty, pre-temperature) log-softmax for the rows that ask: the sampled
        token's value and the top-k, all read back with the ids in one float64 copy (exact
        for ids below 2**53)."""
        n, m = chosen.shape[0], len(rows)
        raw = torch.log_softmax(_take(logits, index), dim=-1)
        picked = _take(chosen, index).unsqueeze(1)
        parts = [chosen.double(), raw.gather(1, picked).squeeze(1).double()]
        k_max = max(p.logprobs or 0 for p in params)
        if k_max:
            values, ids = raw.topk(k_max, dim=-1)
            parts += [values.double().reshape(-1), ids.double().reshape(-1)]
        flat = torch.cat(parts).tolist()
        token_ids = [int(t) for t in flat[:n]]
        own = flat[n : n + m]
        values_at, ids_at = n + m, n + m + m * k_max
        out: list[TokenLogprob | None] = [None] * n
        for j, (i, p) in enumerate(zip(rows, params, strict=True)):
            start = j * k_max
            k = p.logprobs or 0
            top_ids = flat[ids_at + start : ids_at + start + k]
            top_values = flat[values_at + start : values_at + start + k]
            top = [(int(t), v) for t, v in zip(top_ids, top_values, strict=True)]
            out[i] = TokenLogprob(token_ids[i], own[j], top)
        return SampleResult(token_ids, out)


def penalised(p: SamplingParams) -> bool:
    """Whether sampling reads the sequence's past tokens (so they must be on the host)."""
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)


@dataclass
class _PenaltyPlan:
    """Repetition (over prompt and output tokens), presence and frequency (over output tokens
    only) penalties, as vLLM and OpenAI define them, for the rows that have any.

    The host flattens the rows' tokens into flat indices of a [rows, vocab] table (no
    padding); the device turns them into output counts and a seen-anywhere mask with one
    index_add / index_put each, then applies the three penalties with per-row columns."""

    rows: int | None  # slot: the rows, or None for all
    params: int  # slot: [rows, 3] float32 repetition, presence, frequency
    outputs: int | None  # slot: flat indices of output tokens
    seen: int | None  # slot: flat indices of all tokens (only when a row has repetition)

    @staticmethod
    def build(seqs: list[Sequence], rows: list[int], vocab: int, staged: _Staged) -> _PenaltyPlan:
        ps = [seqs[i].sampling for i in rows]
        columns = [(p.repetition_penalty, p.presence_penalty, p.frequency_penalty) for p in ps]
        any_rep = any(p.repetition_penalty != 1.0 for p in ps)
        any_counts = any(p.presence_penalty or p.frequency_penalty for p in ps)
        base = np.arange(len(rows), dtype=np.int64) * vocab
        outputs = seen = None
        if any_counts:
            outs = [seqs[i].output_ids for i in rows]
            outputs = _flat(outs, base)
        if any_rep:
            seen = _flat([seqs[i].token_ids for i in rows], base)
        return _PenaltyPlan(
            rows=staged.add(_index(rows, len(seqs))),
            params=staged.add(np.asarray(columns, dtype=np.float32)),
            outputs=staged.add(outputs),
            seen=staged.add(seen),
        )

    def apply(self, logits: torch.Tensor, dev: _Staged) -> torch.Tensor:
        """A new tensor: `logits` with the penalised rows replaced."""
        index = None if self.rows is None else dev[self.rows]
        params = dev[self.params]
        rep, presence, frequency = params[:, 0:1], params[:, 1:2], params[:, 2:3]
        x = _take(logits, index)
        shape = (params.shape[0], logits.shape[1])
        device = logits.device
        # Every penalised row has a repetition or a count penalty, so x is new from here on.
        if self.seen is not None:
            seen = torch.zeros(shape, dtype=torch.bool, device=device)
            seen.view(-1).index_fill_(0, dev[self.seen], True)
            x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        if self.outputs is not None:
            counts = torch.zeros(shape, dtype=logits.dtype, device=device)
            flat = dev[self.outputs]
            counts.view(-1).index_add_(0, flat, torch.ones((), device=device).expand_as(flat))
            x = x - frequency * counts - presence * (counts > 0)
        return x if index is None else logits.index_copy(0, index, x)


def _flat(token_lists: list[list[int]], base: np.ndarray) -> np.ndarray:
    """Flat indices `row * vocab + token` of each row's tokens, from one host-side pass."""
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    tokens = np.fromiter(
        itertools.chain.from_iterable(token_lists), dtype=np.int64, count=int(lengths.sum())
    )
    return tokens + np.repeat(base, lengths)


@dataclass
class _SamplePlan:
    """The non-greedy rows: temperature, top-k/top-p/min-p and the exponential race."""

    index: int | None  # slot: the rows, or None for all
    floats: int  # slot: [rows, 3] float32 temperature, top_p, min_p
    top_k: int  # slot: [rows, 1] int64, vocab-wide where disabled
    seeded: int | None  # slot: positions among the sampled rows that have a seed
    keys: int | None  # slot: their noise keys
    all_seeded: bool
    cut: bool  # some row has top-k or top-p
    min_p: bool

    @staticmethod
    def build(seqs: list[Sequence], rows: list[int], staged: _Staged) -> _SamplePlan:
        ss = [seqs[i] for i in rows]
        ps = [s.sampling for s in ss]
        # top_p 1.0 keeps everything: a threshold above 1 stops float rounding in the
        # cumulative sum from cutting the far tail.
        floats = [(p.temperature, p.top_p if p.top_p < 1.0 else 2.0, p.min_p) for p in ps]
        top_k = [p.top_k if p.top_k > 0 else 1 << 62 for p in ps]
        seeded = [j for j, p in enumerate(ps) if p.seed is not None]
        keys = None
        if seeded:
            keys = sampling_noise.row_keys(
                [ps[j].seed for j in seeded],
                [ss[j].index for j in seeded],
                [ss[j].num_output_tokens for j in seeded],
            )
        return _SamplePlan(
            index=staged.add(_index(rows, len(seqs))),
            floats=staged.add(np.asarray(floats, dtype=np.float32)),
            top_k=staged.add(np.asarray(top_k, dtype=np.int64).reshape(-1, 1)),
            seeded=staged.add(_index(seeded, len(ss)) if seeded else None),
            keys=staged.add(keys),
            all_seeded=len(seeded) == len(ss),
            cut=any(p.top_k > 0 or p.top_p < 1.0 for p in ps),
            min_p=any(p.min_p for p in ps),
        )

    def sample(self, logits: torch.Tensor, dev: _Staged) -> torch.Tensor:
        floats = dev[self.floats]
        temperature, top_p, min_p = floats[:, 0:1], floats[:, 1:2], floats[:, 2:3]
        logits = logits / temperature
        if self.cut:
            logits = top_k_top_p(logits, dev[self.top_k], top_p)
        probs = torch.softmax(logits, dim=-1)
        if self.min_p:
            floor = probs.amax(dim=-1, keepdim=True) * min_p
            probs.masked_fill_(probs < floor, 0.0)
        vocab = probs.shape[1]
        if probs.device.type == "cpu" and not self.all_seeded:
            tokens = inverse_cdf(probs)
            if self.keys is not None:  # seeded rows keep their reproducible race
                rows = dev[self.seeded]
                noise = sampling_noise.exponential(dev[self.keys], vocab)
                tokens[rows] = argmax_rows(probs[rows].div_(noise))
            return tokens
        if self.keys is None:
            noise = torch.empty_like(probs).exponential_()
        elif self.all_seeded:
            noise = sampling_noise.exponential(dev[self.keys], vocab)
        else:
            noise = torch.empty_like(probs).exponential_()
            sampling_noise.exponential(dev[self.keys], vocab, out=noise, rows=dev[self.seeded])
        return argmax_rows(probs.div_(noise))
