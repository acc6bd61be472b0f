"""What a caller asks of an engine and what the engine streams back."""

from __future__ import annotations

from typing import Literal

import msgspec

from tandem.protocol.transfer import KvTransferParams

FinishReason = Literal["stop", "length", "abort", "error"]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Seeds are used modulo 2**64 (`sampling_noise`); this range is what msgpack can carry.
SEED_MIN, SEED_END = -(2**63), 2**64
MAX_N = 16
MAX_STOP_TOKEN_IDS = 1024
_INT_FIELDS = ("max_tokens", "min_tokens", "top_k", "n")
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class SamplingParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Sampling knobs with OpenAI/vLLM semantics. Validation happens in `validate()`.

    `logprobs=None` asks for none; `logprobs=0` asks for the sampled token's logprob only;
    `logprobs=k` adds the k most likely alternatives. Stop strings live in the frontend,
    which detokenises; the engine stops on token ids.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    n: int = 1
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False

    def validate(self, max_logprobs: int = 20, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first bad field (the message starts with its name).

        Every field is checked for type and range, not only the ones the sampler reads
        first: a value that passes here must not fail later inside an engine step or on
        the wire (msgpack carries 64-bit integers only). `vocab_size`, where known, bounds
        `top_k` and `stop_token_ids`.
        """
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not _is_int(value) or not INT64_MIN <= value <= INT64_MAX:
                raise ValueError(f"{name} must be an integer of at most 64 bits, got {value!r}")
        for name in _FLOAT_FIELDS:
            if not _is_number(getattr(self, name)):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}")
        if self.seed is not None and not (_is_int(self.seed) and SEED_MIN <= self.seed < SEED_END):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if self.logprobs is not None and not _is_int(self.logprobs):
            raise ValueError(f"logprobs must be an integer, got {self.logprobs!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        top_k_max = INT64_MAX if vocab_size is None else vocab_size
        checks = [
            (self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.min_tokens >= 0, "min_tokens must be non-negative"),
            (self.min_tokens <= self.max_tokens, "min_tokens must not exceed max_tokens"),
            (0.0 <= self.temperature <= 2.0, "temperature must be between 0 and 2"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k must be -1, 0 (disabled) or positive"),
            (
                self.top_k <= top_k_max,
                f"top_k must not exceed the vocabulary size ({top_k_max}), got {self.top_k}",
            ),
            (0.0 <= self.min_p <= 1.0, "min_p must be between 0 and 1"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be between -2 and 2"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be between -2 and 2"),
            (0.0 < self.repetition_penalty <= 2.0, "repetition_penalty must be in (0, 2]"),
            (
                self.logprobs is None or 0 <= self.logprobs <= max_logprobs,
                f"logprobs must be between 0 and {max_logprobs}",
            ),
            (1 <= self.n <= MAX_N, f"n must be between 1 and {MAX_N}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self._validate_stop_token_ids(vocab_size)

    def _validate_stop_token_ids(self, vocab_size: int | None) -> None:
        ids = self.stop_token_ids
        if not isinstance(ids, list):
            raise ValueError(f"stop_token_ids must be a list, got {type(ids).__name__}")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(
                f"stop_token_ids must have at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}"
            )
        end = INT64_MAX + 1 if vocab_size is None else vocab_size
        for t in ids:
            if not _is_int(t) or not 0 <= t < end:
                raise ValueError(f"stop_token_ids must lie in [0, {end}), got {t!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class GenerateRequest(msgspec.Struct, kw_only=True):
    """`kv_export`: prefill only (disaggregated serving): sample the first token, then hold the
    prompt's KV blocks for a decode worker and describe them in the output's `kv_transfer`.
    `kv_import`: continue a request prefilled elsewhere, pulling its blocks first; outputs
    then start after the tokens in `kv_import.token_ids`. `output_token_ids`: tokens this
    request already generated on a worker that was lost (migration): the sequence goes on
    after them, which count as output (max/min_tokens, penalties, seeded noise) and are not
    sent again. `sequence_index` (with n == 1): the index this sequence had in a request of
    n that migration split; its outputs carry it and its seeded noise follows it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    lora_name: str | None = None
    kv_export: bool = False
    kv_import: KvTransferParams | None = None
    output_token_ids: list[int] = msgspec.field(default_factory=list)
    sequence_index: int = 0


class TokenLogprob(msgspec.Struct, array_like=True):
    """Logprob of the sampled token and the top alternatives as (token_id, logprob) pairs."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = msgspec.field(default_factory=list)


class GenerateOutput(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One streamed delta for one of the request's `n` sequences (`index`).

    `token_ids` holds only the tokens new since the previous output for that index.
    `finish_reason` is set on the last output of that index; `error` explains "error".
    `kv_transfer` ends the stream of a `kv_export` request whose generation goes on elsewhere.
    """

    request_id: str
    index: int = 0
    token_ids: list[int] = msgspec.field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    kv_transfer: KvTransferParams | None = None


def merge_output(into: GenerateOutput, out: GenerateOutput) -> bool:
    """Append `out` to `into` when it continues the same sequence and `into` is not its last
    output; False (nothing changed) otherwise. A consumer that fell behind takes the tokens
    already queued as one output: one frame, one SSE chunk, instead of one per token."""
    if (
        out.index != into.index
        or out.request_id != into.request_id
        or into.finish_reason is not None
        or into.kv_transfer is not None
        or into.error is not None
    ):
        return False
    into.token_ids += out.token_ids
    if out.logprobs:
        into.logprobs = (into.logprobs or []) + out.logprobs
    into.finish_reason = out.finish_reason
    into.stop_token_id = out.stop_token_id
    into.num_cached_tokens = max(into.num_cached_tokens, out.num_cached_tokens)
    into.error = out.error
    into.kv_transfer = out.kv_transfer
    return True


def coalesce(outputs: list[GenerateOutput]) -> list[GenerateOutput]:
    """`outputs` (one stream's, in order) with each merged into the previous output of its
    sequence where `merge_output` allows; sequences of n stay apart, each in order."""
    merged: list[GenerateOutput] = []
    last: dict[int, GenerateOutput] = {}
    for out in outputs:
        previous = last.get(out.index)
        if previous is None or not merge_output(previous, out):
            merged.append(out)
            last[out.index] = out
    return merged
