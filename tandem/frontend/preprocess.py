"""From an API request to what the engine takes: prompt token ids and SamplingParams.

Everything a request can get wrong is checked here, before the engine sees it, so each
problem becomes a 400 that names the field and the numbers involved (the engine's own checks
stay as a backstop for other clients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import Environment, TemplateError, meta

from tandem.frontend.bpe_encoder import bpe_encoder
from tandem.frontend.openai_types import ChatCompletionRequest, CompletionRequest, TextPart
from tandem.http.errors import APIError, bad_request
from tandem.protocol import SamplingParams

# Completions default to 16 tokens like OpenAI's; chat defaults to "as many as fit".
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

# Stop strings are matched against every delta of every choice: their number and length
# bound that work (OpenAI allows 4; vLLM has no bound).
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024

# `chat_template_kwargs` reach the server's chat template, so a client may set only plain
# flags: these (harmless where a template ignores them), and variables the template itself
# reads. Never what replaces the template, adds inputs, or changes what rendering returns.
CHAT_TEMPLATE_FLAGS = frozenset({"enable_thinking", "thinking", "reasoning_effort"})
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "chat_template",
        "tools",
        "documents",
        "messages",
        "conversation",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "return_dict",
        "return_tensors",
        "return_assistant_tokens_mask",
        "padding",
        "truncation",
        "max_length",
        "tokenizer_kwargs",
        "processor_kwargs",
        "raise_exception",
        "strftime_now",
    }
)
MAX_TEMPLATE_KWARG_CHARS = 256
# A template may use a number as a loop bound or a repeat count.
MAX_TEMPLATE_KWARG_NUMBER = 65536


def template_variables(template: Any) -> frozenset[str]:
    """The variables a chat template reads that a client may set (not special tokens)."""
    if not isinstance(template, str):
        return frozenset()
    try:
        env = Environment(extensions=["jinja2.ext.loopcontrols"])
        names = meta.find_undeclared_variables(env.parse(template))
    except TemplateError:
        return frozenset()
    special = ("_token", "_tokens")
    return frozenset(
        n for n in names if n not in RESERVED_TEMPLATE_KWARGS and not n.endswith(special)
    )


@dataclass
class Prepared:
    """A validated request: one token-id list per prompt, shared sampling and stop strings."""

    prompts: list[list[int]]
    sampling: SamplingParams
    stop: list[str]
    skip_special_tokens: bool = True
    echo_texts: list[str] | None = None


class Preprocessor:
    def __init__(self, tokenizer: Any, max_model_len: int, max_logprobs: int = 20) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs
        self.vocab_size = len(tokenizer)
        self.encode = bpe_encoder(tokenizer) or (
            lambda text, special=True: tokenizer.encode(text, add_special_tokens=special)
        )
        self.template_kwargs = CHAT_TEMPLATE_FLAGS | template_variables(
            getattr(tokenizer, "chat_template", None)
        )

    # -- prompts ---------------------------------------------------------------------

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if not req.messages:
            raise bad_request("'messages' must contain at least one message.", param="messages")
        if self.tokenizer.chat_template is None:
            raise bad_request(
                "This model's tokenizer has no chat template; use /v1/completions instead.",
                param="messages",
            )
        if req.tools:
            raise bad_request("'tools' are not supported by this server yet.", param="tools")
        if req.add_generation_prompt and req.continue_final_message:
            raise bad_request(
                "'add_generation_prompt' and 'continue_final_message' cannot both be true.",
                param="continue_final_message",
            )
        messages = [self._message(i, m) for i, m in enumerate(req.messages)]
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                **self._template_kwargs(req.chat_template_kwargs),
            )
        except (TemplateError, ValueError, TypeError) as exc:
            raise bad_request(
                f"Could not apply the chat template: {exc}", param="messages"
            ) from exc
        # The template already wrote BOS and friends; adding them again would double them.
        return self.encode(text, False)

    def _template_kwargs(self, kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """Only allowed keys with JSON scalar values: a client must not bring its own template
        (unbounded Jinja on the event loop), tools, or rendering options."""
        for key, value in (kwargs or {}).items():
            where = f"chat_template_kwargs.{key}"
            if key not in self.template_kwargs:
                hint = (
                    f" Use the top-level '{key}' field instead."
                    if key in ("add_generation_prompt", "continue_final_message", "tools")
                    else ""
                )
                raise bad_request(
                    f"Unsupported key '{key}' in 'chat_template_kwargs'; allowed keys are: "
                    f"{', '.join(sorted(self.template_kwargs))}.{hint}",
                    param=where,
                )
            if isinstance(value, str):
                ok = len(value) <= MAX_TEMPLATE_KWARG_CHARS
            elif isinstance(value, bool) or value is None:
                ok = True
            elif isinstance(value, (int, float)):
                ok = abs(value) <= MAX_TEMPLATE_KWARG_NUMBER
            else:
                ok = False
            if not ok:
                raise bad_request(
                    f"Invalid value for '{where}': it must be a boolean, null, a number of at "
                    f"most {MAX_TEMPLATE_KWARG_NUMBER} in magnitude or a string of at most "
                    f"{MAX_TEMPLATE_KWARG_CHARS} characters.",
                    param=where,
                )
        return dict(kwargs or {})

    @staticmethod
    def _message(i: int, m: Any) -> dict[str, str]:
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, TextPart):
                    raise bad_request(
                        f"Content parts of type '{part.type}' are not supported; only 'text'.",
                        param=f"messages.{i}.content.{j}.type",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        # Most chat templates know only system/user/assistant; "developer" is OpenAI's newer
        # name for the system role.
        role = "system" if m.role == "developer" else m.role
        message = {"role": role, "content": content or ""}
        if m.name is not None:
            message["name"] = m.name
        return message

    def completion_prompts(self, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        """Token ids and text of each prompt (text is needed for `echo`)."""
        p = req.prompt
        if isinstance(p, str):
            raw: list[str | list[int]] = [p]
        elif p and all(isinstance(x, int) for x in p):
            raw = [p]  # one prompt as token ids
        else:
            raw = list(p)
        if not raw:
            raise bad_request("'prompt' must not be empty.", param="prompt")
        prompts, texts = [], []
        for i, item in enumerate(raw):
            where = "prompt" if len(raw) == 1 else f"prompt.{i}"
            if isinstance(item, str):
                if not item:
                    raise bad_request("'prompt' must not be empty.", param=where)
                ids = self.encode(item)
                texts.append(item)
            else:
                if not item:
                    raise bad_request("'prompt' must not be empty.", param=where)
                bad = [t for t in item if t < 0 or t >= self.vocab_size]
                if bad:
                    raise bad_request(
                        f"Token id {bad[0]} in '{where}' is out of range: ids must lie in "
                        f"[0, {self.vocab_size}).",
                        param=where,
                    )
                ids = list(item)
                texts.append(self.tokenizer.decode(ids))
            prompts.append(ids)
        return prompts, texts

    # -- sampling --------------------------------------------------------------------

    def check_length(
        self,
        prompts: list[list[int]],
        max_tokens: int | None,
        where: str,
        max_tokens_param: str = "max_tokens",
    ) -> int:
        """Check every prompt fits; return max_tokens (defaulted to what fits if None)."""
        longest = max(len(p) for p in prompts)
        limit = self.max_model_len
        if longest >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens, but the prompt has "
                f"{longest} tokens (at least one token must be left for the completion). "
                "Please shorten the prompt.",
                param=where,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return limit - longest
        if max_tokens < 1:
            raise bad_request(
                f"'{max_tokens_param}' must be at least 1, got {max_tokens}.",
                param=max_tokens_param,
            )
        if longest + max_tokens > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the "
                f"completion). Please reduce the prompt or '{max_tokens_param}'.",
                param=max_tokens_param,
                code="context_length_exceeded",
            )
        return max_tokens

    def sampling(
        self, req: ChatCompletionRequest | CompletionRequest, max_tokens: int, logprobs: int | None
    ) -> tuple[SamplingParams, list[str]]:
        if req.logit_bias:
            raise bad_request("'logit_bias' is not supported by this server.", param="logit_bias")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logprobs=logprobs,
            n=req.n,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
        )
        try:
            params.validate(self.max_logprobs, self.vocab_size)
        except ValueError as exc:
            message = str(exc)
            field = message.split(" ", 1)[0]
            param = {
                "logprobs": "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"
            }.get(field, field)
            raise bad_request(f"Invalid value for '{param}': {message}.", param=param) from exc
        self._check_stop(stop)
        return params, stop

    @staticmethod
    def _check_stop(stop: list[str]) -> None:
        if len(stop) > MAX_STOP_STRINGS:
            raise bad_request(
                f"'stop' may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}.",
                param="stop",
            )
        for i, s in enumerate(stop):
            if len(s) > MAX_STOP_STRING_CHARS:
                raise bad_request(
                    f"Stop strings may have at most {MAX_STOP_STRING_CHARS} characters; "
                    f"'stop.{i}' has {len(s)}.",
                    param="stop",
                )

    # -- whole requests --------------------------------------------------------------

    def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise bad_request(
                "Only 'text' response_format is supported by this server.",
                param="response_format",
            )
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request(
                "'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs"
            )
        prompt = self.chat_prompt(req)
        requested, name = req.max_completion_tokens, "max_completion_tokens"
        if requested is None:
            requested, name = req.max_tokens, "max_tokens"
        max_tokens = self.check_length([prompt], requested, "messages", name)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params, stop = self.sampling(req, max_tokens, logprobs)
        return Prepared([prompt], params, stop, req.skip_special_tokens)

    def prepare_completion(self, req: CompletionRequest) -> Prepared:
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("'best_of' other than 'n' is not supported.", param="best_of")
        if req.suffix:
            raise bad_request("'suffix' is not supported by this server.", param="suffix")
        if req.echo and req.logprobs is not None:
            raise bad_request(
                "'echo' together with 'logprobs' is not supported (no prompt logprobs).",
                param="echo",
            )
        prompts, texts = self.completion_prompts(req)
        requested = req.max_tokens
        if requested is None:
            longest = max(len(p) for p in prompts)
            requested = max(1, min(COMPLETIONS_DEFAULT_MAX_TOKENS, self.max_model_len - longest))
        max_tokens = self.check_length(prompts, requested, "prompt")
        params, stop = self.sampling(req, max_tokens, req.logprobs)
        return Prepared(prompts, params, stop, req.skip_special_tokens, texts if req.echo else None)


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(
            404,
            f"The model `{requested}` does not exist.",
            param="model",
            code="model_not_found",
        )
