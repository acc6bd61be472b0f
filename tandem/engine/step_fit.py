"""The marginal cost of a prompt token, fitted online to the engine's own step times.

A step's wall time is modelled as a + b·prompt_tokens + c·decode_seqs + d·context_tokens
(least squares over decayed sums, so memory stays constant and old steps fade). `b` is what
one more prompt token costs: the rate a router or the tiers should price a recompute at,
where tokens over the whole step time would also charge the step's fixed cost and its
decodes to the prompt. `StepTimes` feeds it, and keeps the planner's step log."""

from __future__ import annotations

import contextlib
import time
from collections import deque

import numpy as np

from tandem.engine.scheduler import StepWork
from tandem.kvbm.tiers import Rate
from tandem.protocol.observations import StepSample

FEATURES = 4  # 1, prompt tokens, decode sequences, context tokens
#: Each feature over its typical size, so that the sums stay well conditioned.
SCALE = np.array([1.0, 1024.0, 64.0, 65536.0])
#: Steps and seconds between two solves: the engine publishes the rate with its stats every
#: step, and a solve costs more than a fast step (~80 us; solved every step, it doubled the
#: host time of a batch-1 mock step); with a memory of ~200 steps (the decay) the answer
#: moves little in 64 of them.
SOLVE_EVERY = 64
SOLVE_EVERY_S = 0.05


class StepFit:
    def __init__(self, decay: float = 0.995) -> None:
        self.decay = decay
        self.xtx = np.zeros((FEATURES, FEATURES))
        self.xty = np.zeros(FEATURES)
        self.steps = 0
        self._pending: list[tuple[int, int, int, float]] = []  # added, not yet in the sums
        self._answer: float | None = None  # of the last solve, at `_solved_steps` steps
        self._solved_steps = -SOLVE_EVERY
        self._solved_at = float("-inf")  # time.monotonic()

    def add(self, prompt_tokens: int, decode_seqs: int, context: int, seconds: float) -> None:
        """Cheap: steps are kept as they come and folded into the sums in batches."""
        if seconds <= 0 or not (prompt_tokens or decode_seqs):
            return
        self._pending.append((prompt_tokens, decode_seqs, context, seconds))
        self.steps += 1
        if len(self._pending) >= 4 * SOLVE_EVERY:
            self._fold()

    def seconds_per_prompt_token(self) -> float | None:
        """b, when the steps seen vary enough in their prompt tokens to tell it from the rest
        (else None: e.g. every step a full chunk). Solved again after SOLVE_EVERY new steps
        and SOLVE_EVERY_S seconds."""
        now = time.monotonic()
        due = now - self._solved_at >= SOLVE_EVERY_S
        if due and self.steps - self._solved_steps >= SOLVE_EVERY:
            self._fold()
            self._answer, self._solved_steps, self._solved_at = self._solve(), self.steps, now
        return self._answer

    def _fold(self) -> None:
        """The pending steps into the decayed sums, as if added one by one."""
        if not self._pending:
            return
        data = np.array(self._pending, dtype=np.float64)
        self._pending.clear()
        n = len(data)
        x = np.column_stack([np.ones(n), data[:, :3]]) / SCALE
        weighted = x * (self.decay ** np.arange(n - 1, -1, -1))[:, None]  # the newest: 1
        self.xtx = self.xtx * self.decay**n + weighted.T @ x
        self.xty = self.xty * self.decay**n + weighted.T @ data[:, 3]

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


#: Steps kept for `StepTimes.take_samples` between two reports (the planner needs a sample).
STEP_LOG = 1024


class StepTimes:
    """What the engine learns from its step times: prompt tokens per second, the marginal
    cost (`StepFit`) and a log of recent steps for the planner. Each wall time is paired with
    the batch it timed: with async scheduling on a GPU a launch only queues its batch, so a
    step's time is its wait for the batch launched before it; on the CPU a launch computes
    its batch there and then."""

    def __init__(self, launch_queues: bool) -> None:
        self.prefill_rate = Rate()  # prompt tokens per second of step time
        self.fit = StepFit()
        self.log: deque[StepSample] = deque(maxlen=STEP_LOG)  # the oldest go
        self._launch_queues = launch_queues
        self._in_flight: StepWork | None = None  # the batch queued on the device

    def synchronous(self, work: StepWork | None, seconds: float) -> None:
        """A step that waited for the batch in flight, if any, then ran `work`."""
        timed, self._in_flight = _plus(self._in_flight, work), None
        self._record(timed, seconds)

    def overlapped(self, work: StepWork | None, seconds: float) -> None:
        """A step that launched `work` (None: nothing) and read the batch before it."""
        timed = work
        if self._launch_queues:
            timed, self._in_flight = self._in_flight, work
        self._record(timed, seconds)

    def prefill_tokens_per_s(self) -> float:
        """The marginal rate where the steps tell it, else prompt tokens over step time."""
        per_token = self.fit.seconds_per_prompt_token()
        return 1 / per_token if per_token else self.prefill_rate.value

    def take_samples(self) -> list[StepSample]:
        """The steps since the last call, oldest first (safe from another thread: the
        deque's appends and pops are atomic)."""
        taken = []
        with contextlib.suppress(IndexError):
            while True:
                taken.append(self.log.popleft())
        return taken

    def _record(self, work: StepWork | None, seconds: float) -> None:
        if work is not None:
            self.prefill_rate.add(work.prompt_tokens, seconds)
            self.fit.add(work.prompt_tokens, work.decodes, work.context, seconds)
            self.log.append(StepSample(*work, seconds))


def _plus(a: StepWork | None, b: StepWork | None) -> StepWork | None:
    """The work of two batches timed together."""
    if a is None or b is None:
        return a or b
    return StepWork(*(x + y for x, y in zip(a, b, strict=True)))
