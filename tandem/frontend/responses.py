"""Response bodies and stream chunks in OpenAI's exact shapes, for chat and completions.

The routes hand `ChoiceDelta`s to a formatter; the formatter knows the endpoint's JSON shape
(chat `delta`/`message` vs completions `text`, and the two logprobs layouts). Kept apart from
the routes so the shapes can be checked against OpenAI's reference in one place.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from tandem.frontend.generation import ChoiceDelta
from tandem.protocol import TokenLogprob

_encoder = msgspec.json.Encoder()
SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + _encoder.encode(obj) + b"\n\n"


def json_bytes(obj: Any) -> bytes:
    return _encoder.encode(obj)


def error_event(status: int, message: str) -> dict[str, Any]:
    """The in-stream error the openai client turns into an APIError."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


class TokenTexts:
    """Text of single tokens for logprobs, cached: the same ids recur in every response."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
            self._cache[token_id] = text
        return text


class _Accumulated:
    """What a non-streaming response collects for one choice."""

    def __init__(self, prefix: str = "") -> None:
        self.parts = [prefix] if prefix else []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None

    def add(self, d: ChoiceDelta) -> None:
        if d.text:
            self.parts.append(d.text)
        self.logprobs.extend(d.logprobs)
        if d.finish_reason is not None:
            self.finish_reason = d.finish_reason


class _Formatter:
    """Shared envelope: id, created, model; and accumulation for non-streaming bodies."""

    chunk_object = ""
    body_object = ""

    def __init__(
        self,
        request_id: str,
        model: str,
        texts: TokenTexts,
        num_choices: int,
        *,
        want_logprobs: bool,
        include_usage: bool = False,
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.texts = texts
        self.num_choices = num_choices
        self.want_logprobs = want_logprobs
        self.include_usage = include_usage
        self._acc = [_Accumulated(self._prefix(i)) for i in range(num_choices)]

    def _prefix(self, index: int) -> str:
        return ""

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = self._envelope(self.chunk_object, choices)
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        body = self._envelope(self.chunk_object, [])
        body["usage"] = usage
        return body

    def add(self, d: ChoiceDelta) -> None:
        self._acc[d.index].add(d)

    def body(self, usage: dict[str, Any]) -> dict[str, Any]:
        choices = [self._final_choice(i, a) for i, a in enumerate(self._acc)]
        body = self._envelope(self.body_object, choices)
        body["usage"] = usage
        return body

    # Endpoint-specific parts.
    def opening(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def chunk_choice(self, d: ChoiceDelta) -> dict[str, Any]:
        raise NotImplementedError

    def _final_choice(self, index: int, acc: _Accumulated) -> dict[str, Any]:
        raise NotImplementedError


class ChatFormatter(_Formatter):
    chunk_object = "chat.completion.chunk"
    body_object = "chat.completion"

    def _logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None

        def one(token_id: int, logprob: float) -> dict[str, Any]:
            t = self.texts(token_id)
            return {"token": t, "logprob": logprob, "bytes": list(t.encode("utf-8"))}

        content = []
        for e in entries:
            item = one(e.token_id, e.logprob)
            item["top_logprobs"] = [one(tid, lp) for tid, lp in e.top]
            content.append(item)
        return {"content": content, "refusal": None}

    def opening(self) -> list[dict[str, Any]]:
        """First chunk of each choice announces the role, as OpenAI's stream does."""
        return [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(self.num_choices)
        ]

    def chunk_choice(self, d: ChoiceDelta) -> dict[str, Any]:
        return {
            "index": d.index,
            "delta": {"content": d.text} if d.text else {},
            "logprobs": self._logprobs(d.logprobs) if d.logprobs else None,
            "finish_reason": d.finish_reason,
        }

    def _final_choice(self, index: int, acc: _Accumulated) -> dict[str, Any]:
        return {
            "index": index,
            "message": {"role": "assistant", "content": "".join(acc.parts), "refusal": None},
            "logprobs": self._logprobs(acc.logprobs),
            "finish_reason": acc.finish_reason,
        }


class CompletionFormatter(_Formatter):
    chunk_object = "text_completion"
    body_object = "text_completion"

    def __init__(
        self, *args: Any, echo_texts: list[str] | None = None, n: int = 1, **kwargs: Any
    ) -> None:
        self._echo = echo_texts
        self._n = n
        super().__init__(*args, **kwargs)
        # Legacy logprobs carry each token's offset into the choice's text.
        self._offsets = [len(self._prefix(i)) for i in range(self.num_choices)]

    def _prefix(self, index: int) -> str:
        return self._echo[index // self._n] if self._echo else ""

    def _logprobs(self, index: int, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for e in entries:
            t = self.texts(e.token_id)
            tokens.append(t)
            token_logprobs.append(e.logprob)
            top = {self.texts(tid): lp for tid, lp in e.top}
            top.setdefault(t, e.logprob)
            tops.append(top)
            offsets.append(self._offsets[index])
            self._offsets[index] += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def opening(self) -> list[dict[str, Any]]:
        """With `echo`, the prompt text comes first; otherwise there is no opening chunk."""
        if not self._echo:
            return []
        return [
            {"index": i, "text": self._prefix(i), "logprobs": None, "finish_reason": None}
            for i in range(self.num_choices)
        ]

    def chunk_choice(self, d: ChoiceDelta) -> dict[str, Any]:
        return {
            "index": d.index,
            "text": d.text,
            "logprobs": self._logprobs(d.index, d.logprobs) if d.logprobs else None,
            "finish_reason": d.finish_reason,
        }

    def _final_choice(self, index: int, acc: _Accumulated) -> dict[str, Any]:
        return {
            "index": index,
            "text": "".join(acc.parts),
            "logprobs": self._logprobs(index, acc.logprobs),
            "finish_reason": acc.finish_reason,
        }
