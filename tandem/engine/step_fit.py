"""The marginal cost of a prompt token, fitted online to the engine's own step times.

A step's wall time is modelled as a + b·prompt_tokens + c·decode_seqs + d·context_tokens
(least squares over decayed sums, so memory stays constant and old steps fade). `b` is what
one more prompt token costs: the rate a router or the tiers should price a recompute at,
where tokens over the whole step time would also charge the step's fixed cost and its
decodes to the prompt."""

from __future__ import annotations

import numpy as np

FEATURES = 4  # 1, prompt tokens, decode sequences, context tokens
#: Each feature over its typical size, so that the sums stay well conditioned.
SCALE = np.array([1.0, 1024.0, 64.0, 65536.0])


class StepFit:
    def __init__(self, decay: float = 0.995) -> None:
        self.decay = decay
        self.xtx = np.zeros((FEATURES, FEATURES))
        self.xty = np.zeros(FEATURES)
        self.steps = 0
        self._solved: tuple[int, float | None] = (-1, None)  # (steps, answer) last solved

    def add(self, prompt_tokens: int, decode_seqs: int, context: int, seconds: float) -> None:
        if seconds <= 0 or not (prompt_tokens or decode_seqs):
            return
        x = np.array([1.0, prompt_tokens, decode_seqs, context]) / SCALE
        self.xtx = self.xtx * self.decay + np.outer(x, x)
        self.xty = self.xty * self.decay + x * seconds
        self.steps += 1

    def seconds_per_prompt_token(self) -> float | None:
        """b, when the steps seen vary enough in their prompt tokens to tell it from the rest
        (else None: e.g. every step a full chunk). Solved once per new step: the tiers ask
        for every block they load."""
        if self._solved[0] != self.steps:
            self._solved = (self.steps, self._solve())
        return self._solved[1]

    def _solve(self) -> float | None:
        if self.steps < 8:
            return None
        active = [i for i in range(FEATURES) if self.xtx[i, i] > 0]
        if 1 not in active:
            return None
        coef, _, rank, _ = np.linalg.lstsq(
            self.xtx[np.ix_(active, active)], self.xty[active], rcond=1e-10
        )
        if rank < len(active):
            return None
        b = float(coef[active.index(1)] / SCALE[1])
        return b if b > 0 else None
