"""Hostile requests: each gets a 4xx naming its field, and the engine keeps serving.

Issue 12's defects: ids beyond the vocabulary, seeds and top_k beyond 64 bits, a client's
own chat template, deep or broken JSON, thousands of stop strings. Over real HTTP to a
uvicorn server on the tiny random Llama (the fixtures of `test_frontend_server`), then the
same bad values straight at the engine's boundary, which must refuse them too: whatever
passes there runs inside the step loop, where one request's failure is every request's.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from test_frontend_server import CHAT, MODEL, engine, model_dir, serve  # noqa: F401

from tandem.frontend import build_app
from tandem.protocol import GenerateRequest, KvTransferParams, SamplingParams


@pytest.fixture(scope="module")
def base_url(engine, model_dir):  # noqa: F811
    with serve(build_app(engine, model_dir, MODEL)) as url:
        yield url


def chat(**overrides):
    return (
        "/v1/chat/completions",
        {"model": MODEL, "messages": CHAT, "max_tokens": 3, **overrides},
    )


def completion(**overrides):
    return ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3, **overrides})


BASE_CHAT = '{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]'

HOSTILE = [
    # (id, (path, body), param the error must name, a word its message must contain)
    ("stop-id-past-vocab", chat(stop_token_ids=[10_000_000], min_tokens=2), "stop_token_ids", ""),
    ("stop-id-past-int64", chat(stop_token_ids=[2**70]), "stop_token_ids", ""),
    ("stop-id-negative", chat(stop_token_ids=[-1]), "stop_token_ids", ""),
    ("stop-ids-too-many", chat(stop_token_ids=[1] * 5000), "stop_token_ids", "at most"),
    ("seed-2**64", chat(seed=2**64), "seed", "2**64"),
    ("seed-below-int64", chat(seed=-(2**63) - 1), "seed", "2**63"),
    ("seed-huge-completion", completion(seed=10**40), "seed", ""),
    ("top_k-2**63", completion(top_k=2**63), "top_k", ""),
    ("top_k-past-vocab", chat(top_k=10**6), "top_k", "vocabulary"),
    ("top_k-below-minus-one", chat(top_k=-(2**70)), "top_k", ""),
    ("n-huge", chat(n=10**20), "n", ""),
    ("max_tokens-huge", chat(max_tokens=10**30), "max_tokens", ""),
    ("min_tokens-huge", chat(min_tokens=10**30), "min_tokens", ""),
    ("logprobs-huge", completion(logprobs=10**30), "logprobs", ""),
    ("top_logprobs-huge", chat(logprobs=True, top_logprobs=10**30), "top_logprobs", ""),
    (
        "temperature-nan",
        ("/v1/chat/completions", BASE_CHAT + ', "temperature": NaN}'),
        "temperature",
        "",
    ),
    (
        "penalty-inf",
        ("/v1/chat/completions", BASE_CHAT + ', "presence_penalty": 1e400}'),
        "presence_penalty",
        "",
    ),
    ("prompt-id-past-int64", completion(prompt=[1, 2**70]), "prompt", "out of range"),
    ("stop-strings-10000", completion(stop=["x"] * 10_000), "stop", "at most"),
    ("stop-string-long", completion(stop=["y" * 100_000]), "stop", "characters"),
    (
        "template-own-chat-template",
        chat(chat_template_kwargs={"chat_template": "{% for i in range(10**9) %}x{% endfor %}"}),
        "chat_template_kwargs.chat_template",
        "chat_template",
    ),
    (
        "template-tools",
        chat(chat_template_kwargs={"tools": [{"type": "function"}]}),
        "chat_template_kwargs.tools",
        "tools",
    ),
    (
        "template-tokenize",
        chat(chat_template_kwargs={"tokenize": True}),
        "chat_template_kwargs.tokenize",
        "tokenize",
    ),
    (
        "template-value-not-scalar",
        chat(chat_template_kwargs={"enable_thinking": {"deep": [1, 2]}}),
        "chat_template_kwargs.enable_thinking",
        "boolean",
    ),
    (
        "template-value-huge-number",
        chat(chat_template_kwargs={"enable_thinking": 10**12}),
        "chat_template_kwargs.enable_thinking",
        "",
    ),
    (
        "deep-json",
        ("/v1/chat/completions", '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        None,
        "JSON",
    ),
    (
        "deep-json-in-template-kwargs",
        (
            "/v1/chat/completions",
            BASE_CHAT + ', "chat_template_kwargs": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}",
        ),
        None,
        "JSON",
    ),
    (
        "invalid-utf8",
        ("/v1/completions", b'{"model": "tiny-llama", "prompt": "\xff\xfe"}'),
        None,
        "JSON",
    ),
    ("lone-surrogate", ("/v1/completions", '{"prompt": "\\ud800", "max_tokens": 2}'), None, "JSON"),
    ("seed-bool", chat(seed=True), "seed", ""),
    ("stop-token-ids-strings", chat(stop_token_ids=["1"]), "stop_token_ids.0", ""),
]


def _post(base_url: str, path: str, body) -> httpx.Response:
    if isinstance(body, (str, bytes)):
        headers = {"Content-Type": "application/json"}
        return httpx.post(base_url + path, content=body, headers=headers, timeout=10)
    return httpx.post(base_url + path, json=body, timeout=10)


@pytest.mark.parametrize(
    ("case", "request_", "param", "word"), HOSTILE, ids=[h[0] for h in HOSTILE]
)
def test_hostile_request_gets_4xx_naming_the_field(base_url, engine, case, request_, param, word):  # noqa: F811
    path, body = request_
    r = _post(base_url, path, body)
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    if param is not None:
        assert param.split(".")[-1] in error["message"], error
    assert word in error["message"], error
    for leak in ("Traceback", "too large to convert", "OverflowError", "int too big"):
        assert leak not in error["message"], error
    assert engine.error is None


def test_server_still_serves_after_every_hostile_request(base_url, engine):  # noqa: F811
    for _, (path, body), _, _ in HOSTILE:
        _post(base_url, path, body)
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)
    assert reply.usage.completion_tokens == 3
    assert engine.error is None
    assert httpx.get(f"{base_url}/health").status_code == 200


def test_allowed_template_flags_and_extreme_valid_values_are_served(base_url, engine):  # noqa: F811
    """The bounds are inclusive where the sampler allows: the largest seed, top_k = vocab,
    the last id of the vocabulary as a stop token, allowed template flags."""
    vocab = engine.core.hf_config.vocab_size
    for path, body in [
        chat(chat_template_kwargs={"enable_thinking": False, "reasoning_effort": "low"}),
        chat(seed=2**64 - 1, top_k=vocab, stop_token_ids=[vocab - 1], min_tokens=2),
        chat(seed=-(2**63), top_k=-1),
        completion(stop=["z" * 1024] * 64),
    ]:
        r = _post(base_url, path, body)
        assert r.status_code == 200, r.text
    assert engine.error is None


# -- the engine's own boundary: requests that do not come through the frontend ----------------


def _generate(engine, request: GenerateRequest) -> list:  # noqa: F811
    async def run():
        return [out async for out in engine.generate(request)]

    return asyncio.run(run())


def _ok(rid: str, **sampling) -> GenerateRequest:
    sampling = {"max_tokens": 2, "temperature": 0.0, "ignore_eos": True, **sampling}
    params = SamplingParams(**sampling)
    return GenerateRequest(request_id=rid, prompt_token_ids=[1, 2, 3], sampling=params)


def _import_params(engine, **overrides) -> KvTransferParams:  # noqa: F811
    fields = dict(
        request_id="imp",
        block_ids=[0],
        num_tokens=3,
        layout=engine.core.kv_layout,
        token_ids=[5],
    )
    return KvTransferParams(**{**fields, **overrides})


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        ({"stop_token_ids": [10_000_000], "min_tokens": 1}, "stop_token_ids"),
        ({"stop_token_ids": [0] * 2000}, "stop_token_ids"),
        ({"stop_token_ids": ["7"]}, "stop_token_ids"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"top_k": 2**63}, "top_k"),
        ({"top_k": 10**6}, "top_k"),
        ({"max_tokens": 2**70}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_engine_refuses_bad_sampling_with_a_value_error(engine, sampling, field):  # noqa: F811
    with pytest.raises(ValueError, match=field):
        _generate(engine, _ok(f"bad-{field}", **sampling))
    assert engine.error is None


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"token_ids": [10_000_000]}, "token_ids"),
        ({"token_ids": ["x"]}, "token_ids"),
        ({"token_ids": [5, 6, 7]}, "token_ids"),  # no room left under max_tokens=2
        ({"block_ids": [-1]}, "block_ids"),
        ({"block_ids": [2**70]}, "block_ids"),
        ({"block_ids": ["0"]}, "block_ids"),
        ({"block_ids": [0, 1, 2]}, "blocks for 3 tokens"),
        ({"rng_state": b"x" * 100_000}, "rng_state"),
        ({"rng_state": "not bytes"}, "rng_state"),
        ({"num_tokens": 99}, "cover the prompt"),
    ],
)
def test_engine_refuses_malformed_kv_import(engine, overrides, words):  # noqa: F811
    request = _ok("imp")
    request.kv_import = _import_params(engine, **overrides)
    with pytest.raises(ValueError, match=words):
        engine.core.validate(request)
    assert engine.error is None


def test_engine_refuses_malformed_prompts(engine):  # noqa: F811
    for prompt in (["1"], [True], [1, -5], [2**70], "123"):
        request = GenerateRequest(request_id="p", prompt_token_ids=prompt)
        with pytest.raises(ValueError, match="prompt"):
            engine.core.validate(request)


def test_a_failure_while_adding_a_request_fails_only_that_request(engine, monkeypatch):  # noqa: F811
    """Any exception from add_request (not only ValueError) goes to that request's stream;
    the loop lives on and serves the next request."""
    real_add = engine.core.add_request

    def add(request: GenerateRequest) -> None:
        if request.request_id == "doomed":
            real_add(request)  # half added: it must be taken out again
            raise OverflowError("Python int too large to convert to C long")
        real_add(request)

    monkeypatch.setattr(engine.core, "add_request", add)
    with pytest.raises(OverflowError):
        _generate(engine, _ok("doomed"))
    assert engine.error is None
    assert "doomed" not in engine.core.requests
    outs = _generate(engine, _ok("after-doomed"))
    assert sum(len(o.token_ids) for o in outs) == 2
    assert engine.stats().num_waiting == 0


# -- body size -------------------------------------------------------------------------------


def test_huge_body_is_refused_with_413_before_parsing(engine, model_dir):  # noqa: F811
    """Over the limit by Content-Length or, when the body is chunked, by what arrives."""
    with serve(build_app(engine, model_dir, MODEL, max_request_bytes=64 * 1024)) as url:
        big = {"model": MODEL, "prompt": "fox " * 40_000, "max_tokens": 2}
        r = httpx.post(f"{url}/v1/completions", json=big, timeout=10)
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["code"] == "request_too_large" and "65536" in error["message"]

        def chunks():
            for _ in range(100):
                yield b"x" * 1024

        r = httpx.post(f"{url}/v1/completions", content=chunks(), timeout=10)
        assert r.status_code == 413, r.text
        ok = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=ok, timeout=10).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'tandem_requests_total{endpoint="/v1/completions",status="413"} 2.0' in metrics
