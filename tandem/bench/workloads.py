"""Workloads: what to send, independent of when (runner) and how (client).

A workload hands out `RequestSpec`s through `await next_request()` and hears
back about each finished request through `complete()`; that feedback is what
lets multi-turn sessions append the previous answer before the next turn.
"""

from __future__ import annotations

import asyncio
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from tandem.bench.records import Content, RequestRecord, RequestSpec
from tandem.bench.tokens import TokenSpace, keyed_tokens, random_tokens
from tandem.bench.trace import MOONCAKE_BLOCK_SIZE, Trace


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A token-length distribution, parsed from the CLI.

    `N` or `fixed:N`; `uniform:LO:HI` (inclusive); `normal:MEAN:STD[:LO:HI]`
    (resampled by clipping to [LO, HI], default MEAN ± 3·STD, never below 1).
    """

    kind: str
    a: float
    b: float = 0.0
    lo: int = 1
    hi: int = 1

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        kind, _, rest = text.strip().lower().partition(":")
        try:
            if kind.isdigit() and not rest:
                return cls.fixed(int(kind))
            nums = [float(p) for p in rest.split(":")]
            if kind == "fixed" and len(nums) == 1:
                return cls.fixed(int(nums[0]))
            if kind == "uniform" and len(nums) == 2 and 1 <= nums[0] <= nums[1]:
                return cls("uniform", nums[0], nums[1], int(nums[0]), int(nums[1]))
            if kind == "normal" and len(nums) in (2, 4) and nums[1] >= 0:
                mean, std = nums[0], nums[1]
                lo, hi = (nums[2], nums[3]) if len(nums) == 4 else (mean - 3 * std, mean + 3 * std)
                lo, hi = max(1, int(lo)), int(hi)
                if lo <= hi:
                    return cls("normal", mean, std, lo, hi)
        except ValueError:
            pass
        raise ValueError(
            f"bad length {text!r}: use N, uniform:LO:HI or normal:MEAN:STD[:LO:HI] (tokens >= 1)"
        )

    @classmethod
    def fixed(cls, n: int) -> LengthDist:
        if n < 1:
            raise ValueError("length must be >= 1")
        return cls("fixed", n, 0, n, n)

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(self.lo, self.hi)
        return min(self.hi, max(self.lo, round(rng.gauss(self.a, self.b))))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.a))
        if self.kind == "uniform":
            return f"uniform:{self.lo}:{self.hi}"
        return f"normal:{self.a:g}:{self.b:g}:{self.lo}:{self.hi}"


class Workload(ABC):
    """Source of requests. `next_request` returns None once the workload is exhausted."""

    name: str = "workload"

    @abstractmethod
    async def next_request(self) -> RequestSpec | None: ...

    def complete(self, spec: RequestSpec, record: RequestRecord) -> None:  # noqa: B027
        """Called once per sent request when it ends (success, error or cancel)."""

    def describe(self) -> dict:
        """Parameters for the JSON report."""
        return {"name": self.name}


class SyntheticWorkload(Workload):
    """Independent requests with random prompts of sampled lengths.

    Each prompt is unique random tokens (no prefix-cache hits) after an optional
    prefix shared by all requests.
    """

    name = "synthetic"

    def __init__(
        self,
        input_len: LengthDist,
        output_len: LengthDist,
        space: TokenSpace,
        seed: int = 0,
        shared_prefix_len: int = 0,
    ) -> None:
        self.input_len, self.output_len, self.space = input_len, output_len, space
        self.shared_prefix_len, self.seed = shared_prefix_len, seed
        self._rng = random.Random(seed)
        self._prefix = keyed_tokens(f"{seed}:prefix", shared_prefix_len, space)
        self._i = 0

    async def next_request(self) -> RequestSpec:
        n_in = self.input_len.sample(self._rng)
        n_out = self.output_len.sample(self._rng)
        tokens = self._prefix + random_tokens(self._rng, n_in, self.space)
        spec = RequestSpec([("user", tokens)], len(tokens), n_out, tags={"i": self._i})
        self._i += 1
        return spec

    def describe(self) -> dict:
        return {
            "name": self.name,
            "input_len": str(self.input_len),
            "output_len": str(self.output_len),
            "shared_prefix_len": self.shared_prefix_len,
            "seed": self.seed,
        }


@dataclass(slots=True)
class _Session:
    user: int
    started: bool = False
    conversation: int = 0
    turn: int = 0
    segments: list[tuple[str, Content]] = field(default_factory=list)
    length: int = 0  # tokens in segments (text segments counted by their token estimate)


class SessionWorkload(Workload):
    """N users sharing one system prompt, each holding a multi-turn conversation.

    A user's turn k+1 is sent only after turn k's answer arrived (plus an
    optional think time): its prompt is the system prompt, every earlier user
    message and answer, and a new user message, so the context grows each turn
    and everything but the newest message is a prefix the server has seen.
    After `turns` turns, or when the next turn would exceed `max_context`
    tokens, the user starts a new conversation (same system prompt).

    The previous answer is appended as the server's own token ids when it
    returned them (vLLM `return_token_ids`), as its text when `collect_text` is
    set (text and chat prompts), and otherwise as synthetic tokens of the
    answer's length: the context grows by the right amount, but the server's
    cache of its own generated tokens cannot match them.
    """

    name = "sessions"

    def __init__(
        self,
        users: int,
        system_prompt_len: int,
        turns: int,
        message_len: LengthDist,
        answer_len: LengthDist,
        space: TokenSpace,
        seed: int = 0,
        think_time_s: float = 0.0,
        max_context: int | None = None,
        collect_text: bool = False,
    ) -> None:
        if users < 1 or turns < 1:
            raise ValueError("sessions need users >= 1 and turns >= 1")
        self.users, self.turns, self.system_prompt_len = users, turns, system_prompt_len
        self.message_len, self.answer_len, self.space = message_len, answer_len, space
        self.seed, self.think_time_s, self.max_context = seed, think_time_s, max_context
        self.collect_text = collect_text
        self._rng = random.Random(seed)
        self._system = keyed_tokens(f"{seed}:system", system_prompt_len, space)
        self._sessions = [_Session(u) for u in range(users)]
        # Users whose next turn may be sent; a user is out of it while its turn is in flight.
        self._ready: asyncio.Queue[_Session] = asyncio.Queue()
        for s in self._sessions:
            self._ready.put_nowait(s)

    def _reset(self, s: _Session) -> None:
        if s.started:
            s.conversation += 1
        s.started = True
        s.turn = 0
        s.segments = [("system", self._system)] if self._system else []
        s.length = len(self._system)

    async def next_request(self) -> RequestSpec:
        s = await self._ready.get()
        n_msg = self.message_len.sample(self._rng)
        n_out = self.answer_len.sample(self._rng)
        if (
            not s.started
            or s.turn >= self.turns
            or (self.max_context is not None and s.length + n_msg + n_out > self.max_context)
        ):
            self._reset(s)
        msg = random_tokens(self._rng, n_msg, self.space)
        s.segments.append(("user", msg))
        s.length += n_msg
        tags = {"user": s.user, "conversation": s.conversation, "turn": s.turn}
        return RequestSpec(
            list(s.segments), s.length, n_out, tags=tags, collect_text=self.collect_text
        )

    def complete(self, spec: RequestSpec, record: RequestRecord) -> None:
        s = self._sessions[spec.tags["user"]]
        answer: Content
        if record.output_token_ids:
            answer, n = record.output_token_ids, len(record.output_token_ids)
        elif record.output_text and self.collect_text:
            answer, n = record.output_text, record.output_tokens or spec.max_tokens
        else:
            n = record.output_tokens or spec.max_tokens
            key = f"{self.seed}:answer:{s.user}:{s.conversation}:{s.turn}"
            answer = keyed_tokens(key, n, self.space)
        s.segments.append(("assistant", answer))
        s.length += n
        s.turn += 1
        if self.think_time_s > 0:
            asyncio.get_running_loop().call_later(self.think_time_s, self._make_ready, s)
        else:
            self._make_ready(s)

    def _make_ready(self, s: _Session) -> None:
        self._ready.put_nowait(s)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "users": self.users,
            "system_prompt_len": self.system_prompt_len,
            "turns": self.turns,
            "message_len": str(self.message_len),
            "answer_len": str(self.answer_len),
            "think_time_s": self.think_time_s,
            "max_context": self.max_context,
            "seed": self.seed,
        }


class TraceWorkload(Workload):
    """Replays a Mooncake trace: lengths, block-level prefix sharing and timing.

    Block `h` of every request is `keyed_tokens(f"{seed}:block:{h}", block_size)`,
    so requests that share hash ids share identical token blocks; the last block
    is cut to the request's `input_length`. If a line has fewer hash ids than its
    length needs, the rest is filled with tokens unique to that line. Arrival
    times are the trace timestamps (relative to the first) times `time_scale`
    (0.5 replays twice as fast).
    """

    name = "trace"

    def __init__(
        self,
        trace: Trace,
        space: TokenSpace,
        seed: int = 0,
        time_scale: float = 1.0,
        block_size: int = MOONCAKE_BLOCK_SIZE,
        source: str = "",
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time scale must be > 0")
        self.trace, self.space, self.seed = trace, space, seed
        self.time_scale, self.block_size, self.source = time_scale, block_size, source
        self._t0 = trace.entries[0].timestamp_ms if trace.entries else 0.0
        self._i = 0

    def tokens_for(self, entry_index: int) -> list[int]:
        e = self.trace.entries[entry_index]
        bs, tokens = self.block_size, []
        for h in e.hash_ids:
            need = e.input_length - len(tokens)
            if need <= 0:
                break
            tokens += keyed_tokens(f"{self.seed}:block:{h}", bs, self.space)[:need]
        if len(tokens) < e.input_length:
            pad_key = f"{self.seed}:pad:{e.line_no}"
            tokens += keyed_tokens(pad_key, e.input_length - len(tokens), self.space)
        return tokens

    async def next_request(self) -> RequestSpec | None:
        if self._i >= len(self.trace.entries):
            return None
        e = self.trace.entries[self._i]
        tokens = self.tokens_for(self._i)
        self._i += 1
        arrival = (e.timestamp_ms - self._t0) / 1000.0 * self.time_scale
        return RequestSpec(
            [("user", tokens)],
            len(tokens),
            e.output_length,
            arrival_s=arrival,
            tags={"line": e.line_no},
        )

    def describe(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "entries": len(self.trace.entries),
            "malformed_lines": [n for n, _ in self.trace.malformed],
            "time_scale": self.time_scale,
            "block_size": self.block_size,
            "seed": self.seed,
        }
