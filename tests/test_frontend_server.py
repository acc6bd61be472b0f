"""End to end: a real uvicorn server on loopback, our engine on a tiny random-weight Llama.

The official `openai` client drives chat and completions (streaming and not); httpx sends
every malformed request and checks both the status and that the message names the problem.
Engines are wrapped (not faked) where a test needs to watch aborts or inject a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
import uvicorn
from transformers import AutoTokenizer

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.engine.testing import make_tiny_model
from tandem.frontend import EngineClient, build_app
from tandem.frontend.admission import AdmissionControl
from tandem.http.errors import APIError
from tandem.protocol import GenerateOutput, GenerateRequest, LoadStats, SamplingParams

MODEL = "tiny-llama"
MAX_MODEL_LEN = 512
CHAT = [{"role": "user", "content": "Paris is the capital of France. What is Berlin?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny"), "llama"))


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = AsyncEngine(EngineConfig(model=model_dir, num_gpu_blocks=96, max_model_len=MAX_MODEL_LEN))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """Run `app` under uvicorn in a thread, on a socket we bound to 127.0.0.1 ourselves."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def base_url(engine, model_dir):
    with serve(build_app(engine, model_dir, MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def wait_until_idle(engine, timeout=5.0) -> LoadStats:
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        idle = stats.active_blocks == 0 and stats.num_running == 0 and not engine.core.requests
        if idle or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


def poll(condition, timeout=1.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def greedy_ids(engine, prompt_ids, max_tokens) -> list[int]:
    async def run():
        out = []
        req = GenerateRequest(
            request_id=f"probe-{time.monotonic_ns()}",
            prompt_token_ids=prompt_ids,
            sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        )
        async for o in engine.generate(req):
            out.extend(o.token_ids)
        return out

    return asyncio.run(run())


# -- the openai client: chat ---------------------------------------------------------


def test_chat_non_streaming_with_exact_usage(client, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=7, temperature=0)
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == prompt_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_matches_non_streaming(client):
    kwargs = dict(
        model=MODEL, messages=CHAT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    full = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text == full.choices[0].message.content
    assert finishes[-1] == "length" and not any(finishes[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 12
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_n_and_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=5,
        n=3,
        temperature=1.0,
        seed=7,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 15
    for c in r.choices:
        content = c.logprobs.content
        assert len(content) == 5
        for entry in content:
            assert entry.logprob <= 0.0
            assert len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_chat_streaming_n_gives_every_index_a_finish(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=4,
            n=2,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    finished = {
        c.choices[0].index: c.choices[0].finish_reason
        for c in chunks
        if c.choices and c.choices[0].finish_reason
    }
    assert finished == {0: "length", 1: "length"}


def test_prefix_cache_hits_are_reported_as_cached_tokens(client):
    messages = [{"role": "system", "content": "You are terse. " * 12}, *CHAT]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert r.usage.prompt_tokens > 32
    assert r.usage.prompt_tokens_details.cached_tokens >= 32


# -- the openai client: completions ---------------------------------------------------


def test_completions_text_and_token_prompts(client, tokenizer):
    ids = tokenizer.encode("The quick brown fox")
    by_text = client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0
    )
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_text.object == "text_completion" and by_text.id.startswith("cmpl-")
    assert by_text.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(ids)
    assert by_text.choices[0].text == by_ids.choices[0].text


def test_completions_streaming_matches_and_counts_usage(client):
    kwargs = dict(
        model=MODEL,
        prompt="Serving large language models",
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    full = client.completions.create(**kwargs)
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 10 == full.usage.completion_tokens


def test_continuous_usage_counts_tokens_chunk_by_chunk(client):
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Serving large language models",
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            extra_body={"ignore_eos": True},
        )
    )
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == sorted(counts) and counts[-1] == 10
    assert all(c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for c in chunks)


def test_completions_several_prompts_n_and_logprobs(client):
    r = client.completions.create(
        model=MODEL,
        prompt=["Paris is", "Berlin is"],
        n=2,
        max_tokens=3,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 12
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 3
        # The top 2 plus the sampled token when it is not among them (as vLLM does); the
        # legacy format keys them by text, so byte-level tokens may share one key.
        assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
        assert all(tok in top for tok, top in zip(lp.tokens, lp.top_logprobs, strict=True))


def test_completions_echo(client):
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, echo=True)
    assert r.choices[0].text.startswith("Hello there")


def test_stop_string_truncates_and_never_leaks(client):
    kwargs = dict(
        model=MODEL,
        prompt="Tokens stream to many users.",
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    text = client.completions.create(**kwargs, max_tokens=24).choices[0].text
    visible = text.replace("\ufffd", "")
    assert len(visible) >= 8, text
    start = text.index(visible[4])
    stop = text[start : start + 4]  # spans several tokens of this small vocabulary
    expected = text[: text.index(stop)]

    r = client.completions.create(**kwargs, max_tokens=24, stop=[stop, "never-appears"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == expected
    assert r.usage.completion_tokens < 24

    streamed = ""
    for chunk in client.completions.create(**kwargs, max_tokens=24, stop=stop, stream=True):
        if chunk.choices:
            streamed += chunk.choices[0].text
            assert expected.startswith(streamed)  # nothing past the cut, ever
            last = chunk.choices[0].finish_reason
    assert streamed == expected and last == "stop"


def test_stop_token_ids_end_without_their_text(client, engine, tokenizer):
    ids = tokenizer.encode("Prefill is compute bound")
    out = greedy_ids(engine, ids, 6)
    stop_at = next(i for i, t in enumerate(out) if i >= 2 and t not in out[:i])
    r = client.completions.create(
        model=MODEL,
        prompt=ids,
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True, "stop_token_ids": [out[stop_at]]},
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == stop_at + 1
    assert r.choices[0].text == tokenizer.decode(out[:stop_at], skip_special_tokens=True)


def test_models_and_health(client, base_url):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{base_url}/v1/models/{MODEL}").json()["max_model_len"] == MAX_MODEL_LEN
    assert httpx.get(f"{base_url}/health").status_code == 200


# -- bad input: status and a message that names the problem ------------------------------


def chat_body(**overrides):
    return {"model": MODEL, "messages": CHAT, "max_tokens": 4, **overrides}


BAD_REQUESTS = [
    # (path, body, status, words the message must contain, param)
    ("/v1/chat/completions", '{"model": "tiny-llama", "messages": [', 400, ["JSON"], None),
    ("/v1/chat/completions", "[1, 2]", 400, ["object"], None),
    ("/v1/chat/completions", "", 400, ["empty"], None),
    ("/v1/chat/completions", chat_body(model="gpt-9"), 404, ["`gpt-9`", "does not exist"], "model"),
    (
        "/v1/chat/completions",
        chat_body(max_tokens="ten"),
        400,
        ["max_tokens", "integer"],
        "max_tokens",
    ),
    ("/v1/chat/completions", chat_body(messages="hi"), 400, ["messages"], "messages"),
    ("/v1/chat/completions", chat_body(temperature="hot"), 400, ["temperature"], "temperature"),
    ("/v1/chat/completions", {"model": MODEL}, 400, ["messages", "Missing"], "messages"),
    ("/v1/chat/completions", chat_body(messages=[]), 400, ["messages", "at least one"], "messages"),
    (
        "/v1/chat/completions",
        chat_body(messages=[{"role": "robot", "content": "x"}]),
        400,
        ["messages.0.role"],
        "messages.0.role",
    ),
    (
        "/v1/chat/completions",
        chat_body(max_tokens=0),
        400,
        ["max_tokens", "at least 1"],
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        chat_body(max_completion_tokens=-3),
        400,
        ["max_completion_tokens", "-3"],
        "max_completion_tokens",
    ),
    (
        "/v1/chat/completions",
        chat_body(max_tokens=MAX_MODEL_LEN),
        400,
        [str(MAX_MODEL_LEN), "maximum context length"],
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        chat_body(messages=[{"role": "user", "content": "fox " * 600}]),
        400,
        [str(MAX_MODEL_LEN), "prompt has"],
        "messages",
    ),
    (
        "/v1/chat/completions",
        chat_body(temperature=3.5),
        400,
        ["temperature", "between 0 and 2"],
        "temperature",
    ),
    ("/v1/chat/completions", chat_body(top_p=0), 400, ["top_p"], "top_p"),
    ("/v1/chat/completions", chat_body(n=0), 400, ["n must be"], "n"),
    (
        "/v1/chat/completions",
        chat_body(presence_penalty=9),
        400,
        ["presence_penalty"],
        "presence_penalty",
    ),
    (
        "/v1/chat/completions",
        chat_body(logprobs=True, top_logprobs=99),
        400,
        ["top_logprobs"],
        "top_logprobs",
    ),
    ("/v1/chat/completions", chat_body(top_logprobs=2), 400, ["logprobs"], "top_logprobs"),
    ("/v1/chat/completions", chat_body(min_tokens=9), 400, ["min_tokens"], "min_tokens"),
    (
        "/v1/chat/completions",
        chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
        ["image_url"],
        "messages.0.content.0.type",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, ["prompt", "empty"], "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, ["prompt", "empty"], "prompt"),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": [5] * 600},
        400,
        ["600", str(MAX_MODEL_LEN)],
        "prompt",
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": [5] * 500, "max_tokens": 20},
        400,
        ["520", "500", str(MAX_MODEL_LEN)],
        "max_tokens",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 10**9]}, 400, ["out of range"], "prompt"),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "logprobs": -1},
        400,
        ["logprobs"],
        "logprobs",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": 5}, 400, ["stop"], "stop"),
    ("/v1/completions", {"model": "x", "prompt": "hi"}, 404, ["`x` does not exist"], "model"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "words", "param"),
    BAD_REQUESTS,
    ids=[f"{i}-{b[0].rsplit('/', 1)[1]}-{b[2]}" for i, b in enumerate(BAD_REQUESTS)],
)
def test_bad_requests_get_openai_errors(base_url, path, body, status, words, param):
    if isinstance(body, str):
        r = httpx.post(base_url + path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = httpx.post(base_url + path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error
    assert error["param"] == param
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_unknown_route_is_openai_shaped(base_url):
    r = httpx.get(f"{base_url}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_openai_client_raises_on_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=7)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=CHAT)


# -- authentication and overload -----------------------------------------------------------


def test_api_key_required_on_the_api_but_not_health(engine, model_dir):
    with serve(build_app(engine, model_dir, MODEL, api_key="s3cret")) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=chat_body())
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        r = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/v1/workers").status_code == 401  # the detailed list
        good_key = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{url}/v1/workers", headers=good_key).json()["object"] == "list"
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2).choices
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_overload_is_refused_with_retry_after(engine, model_dir):
    with serve(build_app(engine, model_dir, MODEL, max_waiting=0)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=chat_body())
        assert r.status_code == 503
        assert r.headers["Retry-After"] == "1"
        assert "overloaded" in r.json()["error"]["message"]
        metrics = httpx.get(f"{url}/metrics").text
        assert 'tandem_requests_total{endpoint="/v1/chat/completions",status="503"} 1.0' in metrics
        assert 'tandem_requests_rejected_total{reason="overloaded"} 1.0' in metrics


def test_admission_counts_requests_the_engine_has_not_reported_yet():
    stats = LoadStats(
        active_blocks=0,
        free_blocks=1,
        total_blocks=1,
        num_running=0,
        num_waiting=1,
        queued_prefill_tokens=0,
    )
    control = AdmissionControl(lambda: stats, max_waiting=2)
    control.admit("a")
    control.admit("b")
    with pytest.raises(APIError) as refused:  # engine says 1, but we handed it 2 already
        control.admit("c")
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
    control.started("a")
    control.admit("c")


def test_latency_limit_shrinks_when_ttft_grows_and_grows_back_when_it_is_low():
    from tandem.frontend.admission import LatencyLimit

    now = [0.0]
    limit = LatencyLimit(20, floor=4, window=4, min_window_s=0.0, clock=lambda: now[0])

    def window(ttft: float, reached: bool) -> float:
        for _ in range(4):
            now[0] += 0.1
            if reached:
                limit.note_inflight(int(limit.limit))
            limit.observe(ttft)
        return limit.limit

    assert window(0.05, reached=False) == 20  # the baseline; not at the limit: no growth
    assert window(0.05, reached=True) == 22  # fast at the limit: room to grow
    assert window(0.08, reached=True) == 22  # under 2x the baseline: holds
    assert window(0.20, reached=True) == pytest.approx(19.8)  # 4x the baseline: shrink
    for _ in range(20):
        window(0.20, reached=True)
    assert limit.limit == 4  # never below the floor
    assert window(0.05, reached=True) == pytest.approx(5.2)
    assert limit.allows(4, 2) is False and limit.allows(0, 10) is True  # alone, any size


def test_admission_refuses_past_the_in_flight_limit_and_frees_on_end():
    from tandem.frontend.admission import LatencyLimit

    stats = LoadStats(active_blocks=0, free_blocks=1, total_blocks=1, num_running=0,
                      num_waiting=0, queued_prefill_tokens=0)  # fmt: skip
    control = AdmissionControl(lambda: stats, max_waiting=100, limit=LatencyLimit(4, floor=1))
    control.admit("a", 2)
    control.admit("b", 2)
    control.started("a")  # a first token does not free the slots: the sequences still run
    with pytest.raises(APIError, match="4 sequences are in flight") as refused:
        control.admit("c")
    assert refused.value.status == 503
    control.ended("a")
    control.ended("a")  # idempotent
    control.admit("c")
    assert control.inflight == 3


def test_a_client_over_its_rate_gets_429(engine, model_dir):
    with serve(build_app(engine, model_dir, MODEL, max_client_rate=0.5)) as url:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 1}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 429 and r.headers["Retry-After"] == "2", r.text
        assert r.json()["error"]["code"] == "rate_limited"
        assert httpx.get(f"{url}/health").status_code == 200  # only generation counts
        metrics = httpx.get(f"{url}/metrics").text
        assert 'tandem_requests_rejected_total{reason="rate_limited"} 1.0' in metrics
        assert 'reason="overloaded"' not in metrics


def test_client_rate_refills_and_keeps_a_bounded_table():
    from tandem.frontend.admission import ClientRate

    now = [0.0]
    rate = ClientRate(2.0, max_clients=3, clock=lambda: now[0])
    rate.check("a")
    rate.check("a")  # a burst of two
    with pytest.raises(APIError) as refused:
        rate.check("a")
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}
    now[0] = 0.5  # one token back
    rate.check("a")
    for client in "bcde":
        rate.check(client)
    assert len(rate._buckets) == 3 and "a" not in rate._buckets  # the oldest left


def test_admission_counts_every_engine_sequence(engine, model_dir):
    """Two prompts times n=2 are four engine sequences: over a limit of three."""
    with serve(build_app(engine, model_dir, MODEL, max_waiting=3)) as url:
        body = {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 2, "n": 2}
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 503 and "adds 4" in r.json()["error"]["message"], r.text
        r = httpx.post(f"{url}/v1/completions", json={**body, "n": 1})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_tokenizing_runs_off_the_event_loop(engine, model_dir, monkeypatch):
    from tandem.frontend.preprocess import Preprocessor

    where, prepare = [], Preprocessor.prepare_completion

    def spy(self, req):
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:
            where.append(threading.current_thread().name)
        return prepare(self, req)

    monkeypatch.setattr(Preprocessor, "prepare_completion", spy)
    with serve(build_app(engine, model_dir, MODEL)) as url:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
    assert len(where) == 1 and where[0].startswith("tandem-tokenize"), where


def test_an_overloaded_server_refuses_before_reading_the_body(engine, model_dir, monkeypatch):
    from tandem.frontend.preprocess import Preprocessor

    def never(self, req):
        raise AssertionError("tokenized a request that admission refuses")

    monkeypatch.setattr(Preprocessor, "prepare_completion", never)
    with serve(build_app(engine, model_dir, MODEL, max_waiting=0)) as url:
        body = {"model": MODEL, "prompt": "x" * 100_000, "max_tokens": 2}
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        # Refused before the body is read: a body that is not even JSON gets the 503 too.
        r = httpx.post(f"{url}/v1/completions", content=b"{not json",
                       headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"


# -- metrics ------------------------------------------------------------------------------


def test_metrics_report_requests_latencies_tokens_and_engine_load(client, base_url):
    client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)
    httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(temperature=9))
    text = httpx.get(f"{base_url}/metrics").text
    for needle in [
        'tandem_requests_total{endpoint="/v1/chat/completions",status="200"}',
        'tandem_requests_total{endpoint="/v1/chat/completions",status="400"}',
        "tandem_time_to_first_token_seconds_count",
        "tandem_inter_token_latency_seconds_count",
        "tandem_e2e_request_latency_seconds_count",
        "tandem_prompt_tokens_total",
        "tandem_generation_tokens_total",
        "tandem_num_requests_running",
        "tandem_num_requests_waiting",
        "tandem_kv_cache_usage_ratio",
        "tandem_prefix_cache_hit_rate",
        'tandem_request_finished_total{finish_reason="length"}',
    ]:
        assert needle in text, needle

    def value(name):
        line = next(x for x in text.splitlines() if x.startswith(name + " "))
        return float(line.split()[1])

    assert value("tandem_time_to_first_token_seconds_count") >= 1
    assert value("tandem_generation_tokens_total") >= 3


# -- disconnects and engine failures ------------------------------------------------------


class Watched:
    """The real engine, with its aborts and abandoned streams recorded."""

    def __init__(self, engine: AsyncEngine, fail_after: int | None = None) -> None:
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self.max_logprobs = engine.max_logprobs
        self.fail_after = fail_after
        self.aborted: list[str] = []
        self.abandoned: list[str] = []

    def stats(self) -> LoadStats:
        return self.engine.stats()

    def abort(self, request_id: str, index: int | None = None) -> None:
        self.aborted.append(request_id)
        self.engine.abort(request_id, index)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        finished = 0
        try:
            async for i, out in _enumerate(self.engine.generate(request)):
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("GPU fell off the bus")
                finished += out.finish_reason is not None
                yield out
        finally:
            if finished < request.sampling.n:
                self.abandoned.append(request.request_id)


async def _enumerate(it):
    i = 0
    async for x in it:
        yield i, x
        i += 1


def test_watched_engine_is_an_engine_client(engine):
    assert isinstance(Watched(engine), EngineClient)


LONG = {"model": MODEL, "prompt": "Prefill is compute bound", "max_tokens": 480, "ignore_eos": True}


def test_streaming_disconnect_aborts_and_frees_blocks(engine, model_dir):
    watched = Watched(engine)
    assert wait_until_idle(engine).active_blocks == 0
    with serve(build_app(watched, model_dir, MODEL)) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            # It is generating now (stats are published just after each step's outputs).
            assert poll(lambda: engine.stats().active_blocks > 0)
        # Leaving the block closed the connection mid-stream.
        stats = wait_until_idle(engine)
        assert stats.active_blocks == 0 and stats.num_running == 0
        assert len(watched.abandoned) == 1
        assert watched.aborted == watched.abandoned


def test_non_streaming_disconnect_aborts_and_frees_blocks(engine, model_dir):
    watched = Watched(engine)
    assert wait_until_idle(engine).active_blocks == 0
    with serve(build_app(watched, model_dir, MODEL)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=LONG, timeout=0.15)
        stats = wait_until_idle(engine)
        assert stats.active_blocks == 0 and stats.num_running == 0
        assert len(watched.abandoned) == 1
        assert watched.aborted == watched.abandoned
        metrics = httpx.get(f"{url}/metrics").text
        assert 'tandem_requests_total{endpoint="/v1/completions",status="499"} 1.0' in metrics


def test_engine_failure_mid_stream_is_an_error_event(engine, model_dir):
    watched = Watched(engine, fail_after=3)
    with serve(build_app(watched, model_dir, MODEL)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        got = []
        with pytest.raises(openai.APIError, match="GPU fell off the bus"):
            for chunk in client.chat.completions.create(
                model=MODEL,
                messages=CHAT,
                max_tokens=50,
                stream=True,
                extra_body={"ignore_eos": True},
            ):
                got.append(chunk)
        assert got[0].choices[0].delta.role == "assistant"  # the stream had begun (200)
        with pytest.raises(openai.InternalServerError, match="GPU fell off the bus"):
            client.completions.create(
                model=MODEL, prompt="hello", max_tokens=50, extra_body={"ignore_eos": True}
            )
    assert wait_until_idle(engine).active_blocks == 0


def test_concurrent_requests_all_complete(base_url, engine):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0)

        async def one(i: int) -> int:
            kwargs = dict(
                model=MODEL,
                max_tokens=5 + i % 3,
                extra_body={"ignore_eos": True},
                messages=[{"role": "user", "content": f"Question number {i}?"}],
            )
            if i % 2:
                r = await client.chat.completions.create(**kwargs)
                return r.usage.completion_tokens
            stream = await client.chat.completions.create(
                **kwargs, stream=True, stream_options={"include_usage": True}
            )
            usage = None
            async for chunk in stream:
                usage = chunk.usage or usage
            return usage.completion_tokens

        counts = await asyncio.gather(*(one(i) for i in range(12)))
        await client.close()
        return counts

    assert asyncio.run(main()) == [5 + i % 3 for i in range(12)]
    assert wait_until_idle(engine).active_blocks == 0
