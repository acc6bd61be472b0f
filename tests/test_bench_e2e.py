"""End to end: `tandem.bench` client + runner against a real HTTP server on 127.0.0.1.

The server (defined below, run in a subprocess so its timing does not share a
GIL with the client) streams OpenAI-shaped SSE chunks: the first token
`TTFT_S` after the request arrives, then one token every `ITL_S`, on an
absolute schedule (token j is due at TTFT_S + j·ITL_S), and a final usage
chunk. Tolerances, stated once: measured TTFT lies in [TTFT_S, TTFT_S + 20 ms]
(it cannot be earlier; the slack is loopback, HTTP and scheduling) and ITL
mean and median lie within ±2 ms of ITL_S.

The `server` fixture is the swappable part: any fixture returning a
`ServerUnderTest` with the delays it promises (e.g. the mock engine with a
fixed step time) can replace it for the timing test. Tests that inject errors
need this server's `x_*` request extensions and say so.

Run this file as a script to serve by hand: `python tests/test_bench_e2e.py --port 8123`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tandem.bench.cli import main as bench_main
from tandem.bench.client import API_CHAT, ClientConfig, StreamClient
from tandem.bench.records import ERROR_CANCELLED
from tandem.bench.report import compare, load_results
from tandem.bench.runner import Arrival, Bounds, RunResult, run_load
from tandem.bench.stats import Slo, summarize
from tandem.bench.tokens import TokenSpace
from tandem.bench.workloads import LengthDist, SessionWorkload, SyntheticWorkload, Workload

TTFT_S = 0.080
ITL_S = 0.015
# Generous: this machine is shared; the bounds still tell a mis-measured TTFT or ITL.
TTFT_SLACK_S = 0.2
ITL_TOL_S = 0.006
VOCAB = 1000
CACHE_BLOCK = 16


# --------------------------------------------------------------------------- server


def make_app(ttft_s: float, itl_s: float) -> FastAPI:
    """OpenAI-shaped streaming server with fixed delays and a toy prefix cache.

    Test-only request fields: `x_fail_status` (answer with that HTTP status),
    `x_tokens_per_chunk` (tokens per chunk after the first), `x_break_after`
    (drop the connection after that many tokens).
    """
    app = FastAPI()
    seen_blocks: set[int] = set()

    def cached_prefix(tokens: list[int]) -> int:
        """Tokens of full 16-token blocks whose whole prefix was seen before (chained hashes)."""
        cached, hit, h = 0, True, 0
        for end in range(CACHE_BLOCK, len(tokens) + 1, CACHE_BLOCK):
            h = hash((h, tuple(tokens[end - CACHE_BLOCK : end])))
            if hit and h in seen_blocks:
                cached = end
            else:
                hit = False
            seen_blocks.add(h)
        return cached

    @app.get("/v1/models")
    async def models() -> dict:
        model = {"id": "fixed-delay", "object": "model", "vocab_size": VOCAB}
        return {"object": "list", "data": [model]}

    async def stream(body: dict, chat: bool) -> Response:
        if status := body.get("x_fail_status"):
            return JSONResponse({"error": {"message": "injected failure"}}, status_code=status)
        if chat:
            text = " ".join(m["content"] for m in body["messages"])
            n_prompt, cached = len(text.split()), 0
        elif isinstance(body["prompt"], list):
            n_prompt, cached = len(body["prompt"]), cached_prefix(body["prompt"])
        else:
            n_prompt, cached = len(body["prompt"].split()), 0
        n_out = int(body.get("max_completion_tokens") or body["max_tokens"])
        per_chunk = int(body.get("x_tokens_per_chunk", 1))
        break_after = body.get("x_break_after")
        continuous = (body.get("stream_options") or {}).get("continuous_usage_stats", False)
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict, usage: dict | None = None) -> str:
            data = {
                "id": "x",
                "object": kind,
                "created": 0,
                "model": "fixed-delay",
                "choices": [choice] if choice else [],
                "usage": usage,
            }
            return f"data: {json.dumps(data)}\n\n"

        def choice(text: str, finish: str | None) -> dict:
            if chat:
                return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        async def gen() -> AsyncIterator[str]:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            if chat:  # role-only first chunk, as OpenAI sends: must not count as a token
                yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}})
            sent = 0
            while sent < n_out:
                k = 1 if sent == 0 else min(per_chunk, n_out - sent)
                due = t0 + ttft_s + (sent + k - 1) * itl_s
                await asyncio.sleep(max(0.0, due - loop.time()))
                if break_after is not None and sent >= break_after:
                    raise RuntimeError("injected stream break")
                sent += k
                usage = {"prompt_tokens": n_prompt, "completion_tokens": sent}
                finish = "length" if sent == n_out else None
                yield chunk(choice(" tok" * k, finish), usage if continuous else None)
            usage = {
                "prompt_tokens": n_prompt,
                "completion_tokens": n_out,
                "total_tokens": n_prompt + n_out,
                "prompt_tokens_details": {"cached_tokens": cached},
            }
            yield chunk({}, usage)
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await stream(await request.json(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await stream(await request.json(), chat=True)

    return app


def serve(sock: socket.socket, ttft_s: float, itl_s: float) -> None:
    import uvicorn

    config = uvicorn.Config(make_app(ttft_s, itl_s), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


@contextlib.contextmanager
def fixed_delay_server(ttft_s: float, itl_s: float) -> Iterator[str]:
    """Start the server in a subprocess on a free 127.0.0.1 port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--fd",
            str(sock.fileno()),
            "--ttft",
            str(ttft_s),
            "--itl",
            str(itl_s),
        ],
        pass_fds=(sock.fileno(),),
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    sock.close()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("test server did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class ServerUnderTest:
    base_url: str
    model: str
    ttft_s: float
    """First token arrives this long after the request (lower bound)."""
    itl_s: float
    """Then one token every this long."""


@pytest.fixture(scope="module")
def server() -> Iterator[ServerUnderTest]:
    with fixed_delay_server(TTFT_S, ITL_S) as url:
        handle = ServerUnderTest(url, "fixed-delay", TTFT_S, ITL_S)
        # A fresh server's first requests pay one-off costs (imports, route setup): not
        # what the timing tests measure.
        drive(handle, synthetic(n_out=2), Arrival("concurrency", 4), Bounds(30, 8))
        yield handle


# --------------------------------------------------------------------------- helpers


def drive(
    server: ServerUnderTest,
    workload: Workload,
    arrival: Arrival,
    bounds: Bounds,
    **client_kw: object,
) -> RunResult:
    cfg = ClientConfig(
        server.base_url, server.model, max_connections=arrival.connections, **client_kw
    )  # type: ignore[arg-type]

    async def go() -> RunResult:
        async with StreamClient(cfg) as client:
            return await run_load(workload, client.send, arrival, bounds)

    return asyncio.run(go())


def synthetic(n_in: int = 64, n_out: int = 20) -> SyntheticWorkload:
    return SyntheticWorkload(
        LengthDist.fixed(n_in), LengthDist.fixed(n_out), TokenSpace.for_vocab(VOCAB), seed=1
    )


def assert_timing(summary: dict, server: ServerUnderTest) -> None:
    ttft, itl = summary["ttft_ms"], summary["itl_ms"]
    lo, hi = server.ttft_s * 1e3, (server.ttft_s + TTFT_SLACK_S) * 1e3
    assert lo <= ttft["mean"] <= hi, ttft
    assert lo <= ttft["p50"] <= hi, ttft
    for stat in ("mean", "p50"):
        assert abs(itl[stat] - server.itl_s * 1e3) <= ITL_TOL_S * 1e3, itl


# --------------------------------------------------------------------------- tests


def test_ttft_and_itl_match_server_delays(server: ServerUnderTest) -> None:
    n_out = 20
    result = drive(server, synthetic(n_out=n_out), Arrival("concurrency", 4), Bounds(30, 12))
    summary = summarize(result.records, result.elapsed_s, Slo())
    assert summary["requests"]["completed"] == 12, summary["requests"]
    assert_timing(summary, server)
    for rec in result.records:
        assert rec.output_tokens == n_out
        assert rec.input_tokens == 64
        assert len(rec.itl_s) == n_out - 1
        assert rec.e2e_s >= rec.ttft_s + sum(rec.itl_s) - 1e-6
    # Concurrency 4, 12 requests of ~TTFT + 19·ITL each: three waves.
    one = server.ttft_s + (n_out - 1) * server.itl_s
    assert 3 * one <= result.elapsed_s <= 3 * one + 3.0


def test_multi_token_chunks_are_spread_over_their_gap(server: ServerUnderTest) -> None:
    """4 tokens per chunk after the first: each 4·ITL gap gives four ITL values of ITL."""
    result = drive(
        server,
        synthetic(n_out=21),
        Arrival("concurrency", 2),
        Bounds(30, 4),
        extra_body={"x_tokens_per_chunk": 4},
    )
    for rec in result.records:
        assert rec.ok and rec.chunks == 6 and len(rec.itl_s) == 20
    assert_timing(summarize(result.records, result.elapsed_s, Slo()), server)


def test_continuous_usage_gives_exact_chunk_sizes(server: ServerUnderTest) -> None:
    result = drive(
        server,
        synthetic(n_out=9),
        Arrival("concurrency", 2),
        Bounds(30, 2),
        extra_body={"x_tokens_per_chunk": 3},
        continuous_usage=True,
    )
    for rec in result.records:
        assert rec.ok and rec.chunks == 4 and len(rec.itl_s) == 8
        # Spread over its chunk each value is near ITL; unspread ones would be 0 or 3 ITL.
        assert max(abs(x - server.itl_s) for x in rec.itl_s) < 0.9 * server.itl_s


def test_chat_api_skips_role_only_chunk(server: ServerUnderTest) -> None:
    result = drive(
        server, synthetic(n_out=10), Arrival("concurrency", 2), Bounds(30, 4), api=API_CHAT
    )
    assert all(r.ok and r.output_tokens == 10 for r in result.records)
    assert_timing(summarize(result.records, result.elapsed_s, Slo()), server)


def test_sessions_hit_the_servers_prefix_cache(server: ServerUnderTest) -> None:
    wl = SessionWorkload(
        users=2,
        system_prompt_len=64,
        turns=3,
        message_len=LengthDist.fixed(32),
        answer_len=LengthDist.fixed(8),
        space=TokenSpace.for_vocab(VOCAB),
        seed=7,
    )
    result = drive(server, wl, Arrival("concurrency", 2), Bounds(30, 6))
    assert all(r.ok for r in result.records)
    by_turn = sorted(result.records, key=lambda r: (r.tags["user"], r.tags["turn"]))
    for r in by_turn:
        # Turn k repeats turn k-1's prompt: at least that much (rounded to blocks) is cached.
        prev = 64 + r.tags["turn"] * 32 + (r.tags["turn"] - 1) * 8
        if r.tags["turn"] > 0:
            assert r.cached_tokens >= prev // CACHE_BLOCK * CACHE_BLOCK
        assert r.input_tokens == 64 + 32 * (r.tags["turn"] + 1) + 8 * r.tags["turn"]


def test_errors_are_classified_by_kind(server: ServerUnderTest) -> None:
    """Needs this server's x_fail_status / x_break_after extensions."""

    async def go() -> dict[str, object]:
        spec = await synthetic(n_out=20).next_request()
        out = {}
        cases = {
            "http": (server.base_url, {"x_fail_status": 503}, 30.0),
            "stream": (server.base_url, {"x_break_after": 3}, 30.0),
            "timeout": (server.base_url, None, 0.03),
            "connection": (f"http://127.0.0.1:{_closed_port()}", None, 30.0),
        }
        for name, (url, extra, timeout) in cases.items():
            cfg = ClientConfig(url, server.model, extra_body=extra, request_timeout_s=timeout)
            async with StreamClient(cfg) as client:
                from tandem.bench.records import RequestRecord

                rec = RequestRecord(0)
                await client.send(spec, rec)
                out[name] = rec
        return out

    recs = asyncio.run(go())
    assert recs["http"].error == "http" and recs["http"].http_status == 503
    assert "injected" in recs["http"].error_detail
    assert recs["stream"].error == "stream" and recs["stream"].ttft_s is not None
    assert recs["timeout"].error == "timeout"
    assert recs["connection"].error == "connection"
    summary = summarize(list(recs.values()), 1.0, Slo(ttft_s=10.0))
    assert summary["requests"]["errors"] == {
        "http 503": 1,
        "stream": 1,
        "timeout": 1,
        "connection": 1,
    }
    assert summary["goodput"]["good_requests"] == 0


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_time_bound_cancels_in_flight_requests(server: ServerUnderTest) -> None:
    t = time.perf_counter()
    result = drive(server, synthetic(n_out=20), Arrival("concurrency", 3), Bounds(0.2, 100))
    assert time.perf_counter() - t < 5.0  # a liveness bound: no hang
    assert result.hit_time_bound
    summary = summarize(result.records, result.elapsed_s, Slo())
    assert summary["requests"] == {
        "sent": 3,
        "completed": 0,
        "failed": 0,
        "cancelled": 3,
        "errors": {},
    }
    assert all(r.error == ERROR_CANCELLED and r.ttft_s is not None for r in result.records)


def test_cli_run_writes_json_and_plots_and_compare_reads_them(
    server: ServerUnderTest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outs = []
    for label, conc in (("c2", "2"), ("c4", "4")):
        out = tmp_path / f"{label}.json"
        rc = bench_main(
            [
                "--base-url",
                server.base_url,
                "--input-len",
                "uniform:16:48",
                "--output-len",
                "8",
                "--concurrency",
                conc,
                "--num-requests",
                "8",
                "--duration",
                "30",
                "--ttft-slo",
                "500",
                "--itl-slo",
                "50",
                "--output",
                str(out),
                "--label",
                label,
                "--quiet",
            ]
        )
        assert rc == 0
        outs.append(out)
    printed = capsys.readouterr().out
    assert "TTFT (ms)" in printed and "goodput" in printed
    data = load_results(outs[0])
    assert data["summary"]["requests"]["completed"] == 8
    assert len(data["records"]) == 8 and data["config"]["model"] == "fixed-delay"
    assert data["config"]["token_range"] == [100, VOCAB]
    assert (tmp_path / "c2_cdf.png").stat().st_size > 1000
    assert (tmp_path / "c2_throughput.png").stat().st_size > 1000
    table = compare(*outs)
    assert "c2" in table and "c4" in table and "B/A" in table


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="fixed-delay OpenAI-shaped SSE server")
    ap.add_argument("--fd", type=int, help="listening socket inherited from the parent")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--ttft", type=float, default=TTFT_S)
    ap.add_argument("--itl", type=float, default=ITL_S)
    a = ap.parse_args()
    if a.fd is not None:
        listener = socket.socket(fileno=a.fd)
    else:
        listener = socket.create_server(("127.0.0.1", a.port))
    serve(listener, a.ttft, a.itl)
