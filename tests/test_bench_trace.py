"""Mooncake trace replay: token synthesis from hash ids, and malformed-line reporting."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from tandem.bench.cli import main as bench_main
from tandem.bench.tokens import TokenSpace
from tandem.bench.trace import TraceError, load_trace
from tandem.bench.workloads import TraceWorkload

SPACE = TokenSpace.for_vocab(50_000)
SHARED_TRACES = Path(os.environ.get("TANDEM_SHARED", "/work/shared")) / "traces"


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n",
        encoding="utf-8",
    )
    return path


def entry(ts: float, inp: int, out: int, hashes: list[int]) -> dict:
    return {"timestamp": ts, "input_length": inp, "output_length": out, "hash_ids": hashes}


def test_equal_hash_ids_give_identical_blocks_and_lengths_are_exact(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "t.jsonl",
        [
            entry(0, 1200, 10, [1, 2, 3]),  # last block cut to 176 tokens
            entry(0, 1536, 10, [1, 2, 4]),  # shares blocks 1 and 2
            entry(10, 600, 5, [4, 9]),  # block 4 again, now first
            entry(20, 100, 5, [3]),  # block 3 cut to 100 tokens
        ],
    )
    wl = TraceWorkload(load_trace(path), SPACE, seed=3)
    toks = [wl.tokens_for(i) for i in range(4)]
    assert [len(t) for t in toks] == [1200, 1536, 600, 100]
    assert toks[0][:1024] == toks[1][:1024]
    assert toks[0][1024:1200] != toks[1][1024:1200]
    assert toks[1][1024:1536] == toks[2][:512]
    assert toks[3] == toks[0][1024:1124]
    assert all(SPACE.lo <= t < SPACE.hi for t in toks[1])
    # Another seed gives other tokens, the same seed the same ones.
    assert TraceWorkload(load_trace(path), SPACE, seed=4).tokens_for(0) != toks[0]
    assert TraceWorkload(load_trace(path), SPACE, seed=3).tokens_for(0) == toks[0]


def test_missing_hash_ids_are_padded_with_unique_tokens(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "t.jsonl", [entry(0, 700, 1, [5]), entry(0, 700, 1, [5])])
    wl = TraceWorkload(load_trace(path), SPACE)
    a, b = wl.tokens_for(0), wl.tokens_for(1)
    assert len(a) == len(b) == 700
    assert a[:512] == b[:512] and a[512:] != b[512:]


def test_specs_carry_scaled_arrival_times(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "t.jsonl",
        [
            entry(5000, 10, 3, [1]),
            entry(1000, 10, 2, [1]),
            entry(3000, 10, 1, [1]),
        ],
    )
    wl = TraceWorkload(load_trace(path), SPACE, time_scale=0.5)

    async def take() -> list:
        return [await wl.next_request() for _ in range(4)]

    specs = asyncio.run(take())
    assert specs[3] is None
    assert [s.arrival_s for s in specs[:3]] == [0.0, 1.0, 2.0]  # sorted, relative, halved
    assert [s.max_tokens for s in specs[:3]] == [2, 1, 3]
    assert [s.tags["line"] for s in specs[:3]] == [2, 3, 1]


MALFORMED = [
    entry(0, 10, 2, [1]),
    "{not json",
    entry(1, 10, 2, [1]),
    {"timestamp": 2, "output_length": 2, "hash_ids": [1]},  # no input_length
    entry(-1, 10, 2, [1]),
    "[1, 2, 3]",
    "",
    entry(3, 10, 0, [1]),
    entry(4, 10, 2, ["a"]),
    entry(5, 10.5, 2, [1]),
    entry(6, 10, 2, [1]),
]


def test_malformed_lines_are_reported_with_line_numbers(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.jsonl", MALFORMED)
    trace = load_trace(path)
    assert [e.line_no for e in trace.entries] == [1, 3, 11]
    assert [n for n, _ in trace.malformed] == [2, 4, 5, 6, 8, 9, 10]
    reasons = dict(trace.malformed)
    assert "invalid JSON" in reasons[2]
    assert "input_length" in reasons[4]
    assert "timestamp" in reasons[5]
    assert "object" in reasons[6]
    assert "output_length" in reasons[8]
    assert "hash_ids" in reasons[9]
    with pytest.raises(TraceError) as err:
        load_trace(path, strict=True)
    for n in (2, 4, 5, 6, 8, 9, 10):
        assert f"line {n}:" in str(err.value)


def _closed_port_url() -> str:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def test_cli_reports_malformed_lines_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_lines(tmp_path / "bad.jsonl", MALFORMED)
    common = [
        "run",
        "--base-url",
        _closed_port_url(),
        "--model",
        "m",
        "--vocab-size",
        "1000",
        "--trace",
        str(path),
        "--quiet",
        "--no-plots",
    ]
    assert bench_main([*common, "--strict-trace"]) == 2
    err = capsys.readouterr().err
    assert "7 malformed line(s)" in err and "line 2:" in err and "line 10:" in err
    assert "Traceback" not in err
    # Lenient: warns with line numbers and goes on (here into a closed port, so rc 1).
    rc = bench_main(
        [*common, "--num-requests", "1", "--duration", "5", "--output", str(tmp_path / "r.json")]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "skipped 7 malformed line(s)" in err and "line 2:" in err
    assert "Traceback" not in err


@pytest.mark.skipif(
    not (SHARED_TRACES / "conversation_trace.jsonl").exists(), reason="shared traces not present"
)
def test_shared_conversation_trace_replays_consistently() -> None:
    trace = load_trace(SHARED_TRACES / "conversation_trace.jsonl", limit=300)
    assert not trace.malformed and len(trace.entries) == 300
    wl = TraceWorkload(trace, SPACE)
    seen: dict[int, list[int]] = {}
    for i, e in enumerate(trace.entries[:100]):
        toks = wl.tokens_for(i)
        assert len(toks) == e.input_length
        for j, h in enumerate(e.hash_ids):
            block = toks[j * 512 : (j + 1) * 512]
            ref = seen.setdefault(h, block)
            n = min(len(block), len(ref))
            assert block[:n] == ref[:n]
