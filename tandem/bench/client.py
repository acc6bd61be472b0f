"""One streamed request → one `RequestRecord`, over a shared aiohttp session.

aiohttp rather than httpx: its C HTTP parser costs ~5 µs of client CPU per SSE
chunk against ~25 µs for httpx (measured on this project's 2-core CI box), and
the client must stay far below the server's per-token cost to measure it.
Each SSE line is decoded with a msgspec struct that names only the fields we
read, so the rest of the chunk is skipped without building Python objects.

Definitions (all times from `time.perf_counter()` on the client):

- TTFT: from just before the request is written to the arrival of the first
  SSE chunk that carries output (non-empty text/content, or token ids).
  Role-only or empty chunks do not count.
- ITL (inter-token latency): for every output chunk after the first, with k
  tokens arriving Δ after the previous output chunk, k values of Δ/k. k is
  exact when the server says how many tokens each chunk holds (per-chunk
  `token_ids`, or cumulative `usage.completion_tokens` with vLLM's
  `continuous_usage_stats`); otherwise the N-1 tokens after the first
  (N = final `usage.completion_tokens`) are spread as evenly as possible over
  the later chunks. Tokens in the first chunk belong to TTFT. So a request's
  ITL values sum to (last chunk − first chunk) and their mean is its TPOT.
- E2E: from the request being written to the end of the stream.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from tandem.bench.records import (
    ERROR_CONNECTION,
    ERROR_HTTP,
    ERROR_STREAM,
    ERROR_TIMEOUT,
    RequestRecord,
    RequestSpec,
)
from tandem.bench.tokens import tokens_to_text

API_COMPLETIONS = "completions"
API_CHAT = "chat"
FORMAT_TOKENS = "tokens"
FORMAT_TEXT = "text"


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None
    delta: _Delta | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: msgspec.Raw | None = None
    object: str | None = None
    message: str | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_encode = msgspec.json.Encoder().encode


class _StreamError(Exception):
    pass


def inter_token_latencies(
    times: list[float], total_tokens: int, counts: list[int] | None = None
) -> list[float]:
    """ITL values from output-chunk arrival times (see the module docstring).

    `counts[i]` is the number of tokens in chunk i when the server reported it.
    """
    gaps = len(times) - 1
    if gaps < 1:
        return []
    if counts is not None and len(counts) == len(times) and min(counts[1:]) >= 1:
        ks = counts[1:]
    else:
        rest = max(total_tokens - 1, gaps)
        ks = [(i + 1) * rest // gaps - i * rest // gaps for i in range(gaps)]
    out: list[float] = []
    for i, k in enumerate(ks):
        gap = (times[i + 1] - times[i]) / k
        if k == 1:
            out.append(gap)
        else:
            out.extend([gap] * k)
    return out


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """How requests are shaped; the same workload can go out in any of these forms."""

    base_url: str
    model: str
    api: str = API_COMPLETIONS
    prompt_format: str = FORMAT_TOKENS
    ignore_eos: bool = True
    request_timeout_s: float = 300.0
    max_connections: int = 0
    """Connection pool size; 0 means unbounded (open-loop arrival must not queue here)."""
    api_key: str | None = None
    extra_body: dict[str, Any] | None = None
    continuous_usage: bool = False
    return_token_ids: bool = False

    @property
    def url(self) -> str:
        path = "/v1/chat/completions" if self.api == API_CHAT else "/v1/completions"
        return self.base_url.rstrip("/") + path


def _segment_text(content: list[int] | str) -> str:
    return content if isinstance(content, str) else tokens_to_text(content)


def build_body(cfg: ClientConfig, spec: RequestSpec) -> dict[str, Any]:
    """The JSON body for `spec`; token ids go out verbatim only for token completions."""
    body: dict[str, Any] = {"model": cfg.model}
    if cfg.api == API_CHAT:
        body["messages"] = [
            {"role": role, "content": _segment_text(c).lstrip()} for role, c in spec.segments
        ]
        body["max_completion_tokens"] = spec.max_tokens
    else:
        if cfg.prompt_format == FORMAT_TOKENS:
            prompt: list[int] | str = []
            for _, c in spec.segments:
                if isinstance(c, str):
                    raise ValueError("token-id prompts cannot carry text segments")
                prompt += c
        else:
            prompt = "".join(_segment_text(c) for _, c in spec.segments).lstrip()
        body["prompt"] = prompt
    body["max_tokens"] = spec.max_tokens
    body["stream"] = True
    options: dict[str, Any] = {"include_usage": True}
    if cfg.continuous_usage:
        options["continuous_usage_stats"] = True
    body["stream_options"] = options
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.return_token_ids:
        body["return_token_ids"] = True
    if cfg.extra_body:
        body.update(cfg.extra_body)
    return body


class StreamClient:
    """Sends `RequestSpec`s as streamed requests and fills `RequestRecord`s.

    Use as an async context manager; one instance (one connection pool) per run.
    `record.start_s` is left as an absolute `perf_counter()` time: the runner,
    which owns the run's zero, makes it relative.
    """

    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self._session: aiohttp.ClientSession | None = None
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if cfg.api_key:
            self._headers["Authorization"] = f"Bearer {cfg.api_key}"

    async def __aenter__(self) -> StreamClient:
        connector = aiohttp.TCPConnector(
            limit=self.cfg.max_connections, limit_per_host=0, ttl_dns_cache=300
        )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.request_timeout_s)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, spec: RequestSpec, rec: RequestRecord) -> None:
        """Send `spec`, streaming the answer into `rec`. Never raises except on cancel."""
        assert self._session is not None, "use StreamClient as an async context manager"
        body = _encode(build_body(self.cfg, spec))
        rec.input_tokens = spec.input_tokens
        got_headers = False
        start = time.perf_counter()
        rec.start_s = start
        try:
            async with asyncio.timeout(self.cfg.request_timeout_s):
                async with self._session.post(
                    self.cfg.url, data=body, headers=self._headers
                ) as resp:
                    got_headers = True
                    if resp.status != 200:
                        rec.error, rec.http_status = ERROR_HTTP, resp.status
                        rec.error_detail = (await resp.text(errors="replace"))[:500]
                        rec.e2e_s = time.perf_counter() - start
                        return
                    await self._read_stream(resp, spec, rec, start)
        except TimeoutError:
            rec.error = ERROR_TIMEOUT
            rec.error_detail = f"no complete answer within {self.cfg.request_timeout_s:g} s"
        except _StreamError as e:
            rec.error, rec.error_detail = ERROR_STREAM, str(e)[:500]
        except (aiohttp.ClientError, OSError) as e:
            rec.error = ERROR_STREAM if got_headers else ERROR_CONNECTION
            rec.error_detail = f"{type(e).__name__}: {e}"[:500]
        if rec.error is not None and rec.e2e_s is None:
            rec.e2e_s = time.perf_counter() - start

    async def _read_stream(
        self, resp: aiohttp.ClientResponse, spec: RequestSpec, rec: RequestRecord, start: float
    ) -> None:
        times: list[float] = []
        counts: list[int] | None = []  # tokens per output chunk, while the server says
        counted = 0
        parts: list[str] | None = [] if spec.collect_text else None
        ids: list[int] = []
        usage: _Usage | None = None
        done = False
        buf = b""
        decode = _decode_chunk
        async for data in resp.content.iter_any():
            now = time.perf_counter()
            if buf:
                data = buf + data
            lines = data.split(b"\n")
            buf = lines.pop()
            for line in lines:
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, `event:` lines
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    continue
                try:
                    chunk = decode(payload)
                except msgspec.DecodeError as e:
                    raise _StreamError(f"bad SSE data ({e}): {payload[:200]!r}") from None
                if chunk.error is not None or chunk.object == "error":
                    detail = chunk.message or bytes(chunk.error or b"").decode(errors="replace")
                    raise _StreamError(f"error event: {detail}")
                n_ids = 0
                content = False
                for c in chunk.choices or ():
                    text = c.text
                    if text is None and c.delta is not None:
                        d = c.delta
                        text = d.content or d.reasoning_content or d.reasoning
                    if c.token_ids:
                        n_ids += len(c.token_ids)
                        ids += c.token_ids
                    if text or c.token_ids:
                        content = True
                        if parts is not None and text:
                            parts.append(text)
                    if c.finish_reason:
                        rec.finish_reason = c.finish_reason
                u = chunk.usage
                if content:
                    if not times:
                        rec.ttft_s = now - start
                    times.append(now)
                    if counts is not None:
                        if n_ids:
                            counts.append(n_ids)
                            counted += n_ids
                        elif u is not None and u.completion_tokens is not None:
                            counts.append(u.completion_tokens - counted)
                            counted = u.completion_tokens
                        else:
                            counts = None
                if u is not None:
                    usage = u
        rec.e2e_s = time.perf_counter() - start
        rec.chunks = len(times)
        if usage is not None:
            if usage.prompt_tokens is not None:
                rec.input_tokens = usage.prompt_tokens
            details = usage.prompt_tokens_details
            if details is not None and details.cached_tokens is not None:
                rec.cached_tokens = details.cached_tokens
        if usage is not None and usage.completion_tokens is not None:
            rec.output_tokens = usage.completion_tokens
        else:
            rec.output_tokens = sum(counts) if counts else len(times)
        rec.itl_s = inter_token_latencies(times, rec.output_tokens, counts)
        rec.chunk_times_s = [t - start for t in times]
        if counts is not None and len(counts) == len(times):
            rec.chunk_tokens = counts
        if parts is not None:
            rec.output_text = "".join(parts)
        if ids:
            rec.output_token_ids = ids
        if not times:
            raise _StreamError("stream ended without any output token")
        if not done and rec.finish_reason is None:
            raise _StreamError("stream ended before [DONE] and without a finish_reason")


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What `/v1/models` told us (fields absent from the answer stay None)."""

    model: str | None
    vocab_size: int | None = None
    max_model_len: int | None = None


async def probe_server(
    base_url: str, api_key: str | None = None, timeout_s: float = 10.0
) -> ServerInfo:
    """Ask `/v1/models` for the served model, and its vocabulary size if it says.

    vLLM reports `max_model_len`; a `vocab_size` field (ours) lets the bench keep
    synthetic token ids inside the vocabulary without a local tokenizer.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/models"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s,
        s.get(url, headers=headers) as r,
    ):
        r.raise_for_status()
        data = await r.json()
    models = data.get("data") or []
    if not models:
        return ServerInfo(None)
    m = models[0]

    def _int(*keys: str) -> int | None:
        for k in keys:
            v = m.get(k)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        return None

    return ServerInfo(m.get("id"), _int("vocab_size"), _int("max_model_len", "context_length"))
