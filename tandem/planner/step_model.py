"""A worker pool's step times, learned online from the steps its workers report.

Two least-squares fits over a bounded window of recent steps: prefill time against the
prompt tokens a step computes and the (query, key) pairs of their attention (a + b·n + c·pairs;
a lone prompt of n tokens has n(n+1)/2), and decode time against the batch and the KV tokens
it reads (d + e·batch + f·context). A step that did both (chunked prefill beside decodes)
trains each fit on its time less the other's marginal cost, once the other can tell it. A fit
needs a few distinct points, from the steps or from a seed (`tandem profile` output, the
format the mock engine reads, whose points the window forgets as real steps arrive); until
then it cannot predict (None), and the planner holds the pools as they are rather than guess.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import numpy as np

from tandem.protocol.observations import StepSample

#: Steps kept per fit: enough to span load changes, bounded whatever the traffic.
WINDOW = 2048
#: Distinct values of the main feature (tokens, batch) a fit needs before it is trusted.
MIN_POINTS = 3


class _Fit:
    """Least squares of seconds on features, refitted lazily when asked after new points."""

    def __init__(self, features: int, window: int) -> None:
        self.rows: deque[tuple[float, ...]] = deque(maxlen=window)
        self.features = features
        self._coef: np.ndarray | None = None
        self._stale = True

    def add(self, row: tuple[float, ...]) -> None:
        self.rows.append(row)
        self._stale = True

    def coef(self) -> np.ndarray | None:
        if self._stale:
            self._stale = False
            data = np.array(self.rows, dtype=np.float64) if self.rows else None
            distinct = 0 if data is None else len(np.unique(data[:, 1]))
            # Too few: keep the last fit (a quiet spell at one batch size teaches nothing new).
            if distinct >= MIN_POINTS:
                x, y = data[:, : self.features], data[:, self.features]
                self._coef = np.linalg.lstsq(x, y, rcond=None)[0]
        return self._coef


class StepModel:
    def __init__(self, window: int = WINDOW) -> None:
        self._prefill = _Fit(3, window)  # [1, n, pairs] -> seconds
        self._decode = _Fit(3, window)  # [1, batch, context] -> seconds

    @classmethod
    def from_profile(cls, path: str | Path, window: int = WINDOW) -> StepModel:
        """Seeded by a `tandem profile` file: {"prefill": [[tokens, ms]], "decode": [[batch,
        context_per_seq, ms]]}."""
        model = cls(window)
        try:
            data = json.loads(Path(path).read_text())
            for tokens, ms in data["prefill"]:
                model.add_prefill(int(tokens), ms / 1e3)
            for batch, context, ms in data["decode"]:
                model.add_decode(int(batch), int(batch * context), ms / 1e3)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read performance profile {path}: {exc}") from exc
        return model

    def add_prefill(self, tokens: int, seconds: float, pairs: int | None = None) -> None:
        """A step that computed `tokens` prompt tokens (and no decodes) in `seconds`;
        `pairs`: their attention's (query, key) pairs, by default those of one fresh prompt."""
        if tokens > 0 and seconds > 0:
            pairs = _fresh_pairs(tokens) if pairs is None else pairs
            self._prefill.add((1.0, float(tokens), float(pairs), seconds))

    def add_decode(self, batch: int, context_tokens: int, seconds: float) -> None:
        """A step that decoded `batch` sequences reading `context_tokens` KV tokens in all."""
        if batch > 0 and seconds > 0:
            self._decode.add((1.0, float(batch), float(context_tokens), seconds))

    def add_step(self, step: StepSample) -> None:
        """A step as a worker reports it: prefill, decode, or both."""
        if not step.decodes:
            self.add_prefill(step.prompt_tokens, step.seconds, step.prompt_pairs)
        elif not step.prompt_tokens:
            self.add_decode(step.decodes, step.context_tokens, step.seconds)
        else:
            decode, prefill = self._decode.coef(), self._prefill.coef()
            if decode is not None:
                cost = decode[1:] @ [step.decodes, step.context_tokens]
                self.add_prefill(step.prompt_tokens, step.seconds - cost, step.prompt_pairs)
            if prefill is not None:
                cost = prefill[1:] @ [step.prompt_tokens, step.prompt_pairs]
                self.add_decode(step.decodes, step.context_tokens, step.seconds - cost)

    def prefill_s(self, tokens: float) -> float | None:
        """Seconds of a step computing one fresh prompt of `tokens` tokens; None: not enough
        known."""
        coef = self._prefill.coef()
        features = [1.0, tokens, _fresh_pairs(tokens)]
        return None if coef is None else max(0.0, float(coef @ features))

    def decode_s(self, batch: float, context_tokens: float) -> float | None:
        """Seconds of a decode step of `batch` sequences over `context_tokens` KV tokens."""
        coef = self._decode.coef()
        return None if coef is None else max(0.0, float(coef @ [1.0, batch, context_tokens]))


def _fresh_pairs(tokens: float) -> float:
    return tokens * (tokens + 1) / 2
