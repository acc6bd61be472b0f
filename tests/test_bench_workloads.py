"""Workloads: length distributions, synthetic prompts, multi-turn sessions, request bodies."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from tandem.bench.client import ClientConfig, build_body
from tandem.bench.records import RequestRecord, RequestSpec
from tandem.bench.tokens import TokenSpace, tokens_to_text
from tandem.bench.workloads import LengthDist, SessionWorkload, SyntheticWorkload

SPACE = TokenSpace.for_vocab(1000)


def test_length_distributions_parse_and_stay_in_bounds() -> None:
    rng = random.Random(0)
    assert LengthDist.parse("128").sample(rng) == 128
    assert LengthDist.parse("fixed:7").sample(rng) == 7
    u = [LengthDist.parse("uniform:10:20").sample(rng) for _ in range(500)]
    assert min(u) == 10 and max(u) == 20
    n = [LengthDist.parse("normal:100:30:80:110").sample(rng) for _ in range(500)]
    assert min(n) == 80 and max(n) == 110
    assert 90 < sum(LengthDist.parse("normal:100:5").sample(rng) for _ in range(500)) / 500 < 110
    for bad in ("0", "x", "uniform:5", "uniform:9:3", "normal:10:-1", "fixed:0"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_synthetic_is_seeded_and_shares_only_the_prefix() -> None:
    def take(seed: int) -> list[RequestSpec]:
        wl = SyntheticWorkload(
            LengthDist.parse("uniform:20:40"),
            LengthDist.fixed(5),
            SPACE,
            seed=seed,
            shared_prefix_len=16,
        )
        return asyncio.run(_take(wl, 5))

    a, b, c = take(1), take(1), take(2)
    assert [s.segments for s in a] == [s.segments for s in b]
    assert [s.segments for s in a] != [s.segments for s in c]
    for s in a:
        toks = s.segments[0][1]
        assert s.input_tokens == len(toks) and 36 <= len(toks) <= 56
        assert toks[:16] == a[0].segments[0][1][:16]
        assert all(SPACE.lo <= t < SPACE.hi for t in toks)
    assert a[0].segments[0][1][16:24] != a[1].segments[0][1][16:24]


async def _take(wl: SyntheticWorkload, n: int) -> list[RequestSpec]:
    return [await wl.next_request() for _ in range(n)]


def _flat(spec: RequestSpec) -> list[int]:
    return [t for _, c in spec.segments for t in c]  # type: ignore[union-attr]


def test_sessions_grow_their_context_turn_by_turn() -> None:
    wl = SessionWorkload(
        users=2,
        system_prompt_len=50,
        turns=3,
        message_len=LengthDist.fixed(10),
        answer_len=LengthDist.fixed(4),
        space=SPACE,
        seed=1,
    )

    async def run() -> list[RequestSpec]:
        specs = []
        for _ in range(8):  # 2 users x 3 turns, then both start a new conversation
            spec = await wl.next_request()
            r = RequestRecord(0, output_tokens=spec.max_tokens)
            wl.complete(spec, r)
            specs.append(spec)
        return specs

    specs = asyncio.run(run())
    by_user: dict[int, list[RequestSpec]] = {0: [], 1: []}
    for s in specs:
        by_user[s.tags["user"]].append(s)
    system = specs[0].segments[0]
    for turns in by_user.values():
        assert [s.tags["turn"] for s in turns] == [0, 1, 2, 0]
        assert [s.tags["conversation"] for s in turns] == [0, 0, 0, 1]
        assert [s.input_tokens for s in turns] == [60, 74, 88, 60]
        for s in turns:
            assert s.segments[0] == system  # one system prompt for every user
            assert s.input_tokens == len(_flat(s))
        for prev, nxt in itertools.pairwise(turns[:3]):
            # The next turn is the previous prompt, its answer, and a new message.
            assert _flat(nxt)[: prev.input_tokens] == _flat(prev)
            assert [r for r, _ in nxt.segments[-2:]] == ["assistant", "user"]
            assert len(nxt.segments[-2][1]) == 4
        assert _flat(turns[3])[:50] == _flat(turns[0])[:50]
        assert turns[3].segments[1] != turns[0].segments[1]
    assert by_user[0][0].segments[1] != by_user[1][0].segments[1]


def test_session_turn_waits_for_the_previous_answer_and_uses_it() -> None:
    wl = SessionWorkload(
        users=1,
        system_prompt_len=8,
        turns=5,
        message_len=LengthDist.fixed(3),
        answer_len=LengthDist.fixed(2),
        space=SPACE,
        collect_text=True,
        max_context=40,
    )

    async def run() -> list[RequestSpec]:
        first = await wl.next_request()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(wl.next_request(), 0.05)  # answer not in yet
        wl.complete(first, RequestRecord(0, output_tokens=2, output_text=" real answer"))
        second = await wl.next_request()
        out = [first, second]
        for _ in range(4):
            wl.complete(out[-1], RequestRecord(0, output_tokens=20, output_text=" long"))
            out.append(await wl.next_request())
        return out

    specs = asyncio.run(run())
    assert specs[1].segments[-2] == ("assistant", " real answer")
    assert specs[1].input_tokens == 8 + 3 + 2 + 3
    # max_context 40: 16 + 20 (answer) + 3 + 2 > 40, so the third turn starts over; etc.
    assert [s.tags["conversation"] for s in specs] == [0, 0, 1, 1, 2, 2]
    assert [s.input_tokens for s in specs] == [11, 16, 11, 34, 11, 34]


def test_request_bodies_in_each_format() -> None:
    spec = RequestSpec([("system", [101, 102]), ("user", [103])], 3, 7)
    tok = build_body(ClientConfig("http://127.0.0.1:1", "m"), spec)
    assert tok["prompt"] == [101, 102, 103] and tok["max_tokens"] == 7
    assert tok["stream"] is True and tok["ignore_eos"] is True
    assert tok["stream_options"] == {"include_usage": True}
    txt = build_body(
        ClientConfig(
            "http://127.0.0.1:1",
            "m",
            prompt_format="text",
            ignore_eos=False,
            extra_body={"temperature": 0},
        ),
        spec,
    )
    assert txt["prompt"] == tokens_to_text([101, 102, 103]).lstrip()
    assert len(txt["prompt"].split()) == 3 and "ignore_eos" not in txt
    assert txt["temperature"] == 0
    chat = build_body(ClientConfig("http://127.0.0.1:1", "m", api="chat"), spec)
    assert [m["role"] for m in chat["messages"]] == ["system", "user"]
    assert chat["max_completion_tokens"] == 7
    # Equal token blocks give equal text blocks, so prefix sharing survives text mode.
    assert tokens_to_text([5, 6, 7]).startswith(tokens_to_text([5, 6]))
