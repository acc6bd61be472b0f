"""The engine's boundary: every field of a request checked for type and range before it is
admitted, whoever built it (frontend, worker, another process's `kv_import`), so that nothing
that passes can fail inside a step, where one bad request would take every other one down
with the loop."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

from tandem.protocol import GenerateRequest, KvLayout, KvTransferParams, SamplingParams

#: `kv_import.rng_state` is ignored (seeded noise follows from the tokens), but still bounded.
MAX_RNG_STATE_BYTES = 4096


def _all_ids_below(ids: list, end: int) -> bool:
    """Every item is an integer (numpy's too, not a bool) in [0, end). A list of plain ints,
    what every prompt is, takes C-speed builtins (512 ids: 23 us here, 43 item by item)."""
    if set(map(type, ids)) == {int}:
        return min(ids) >= 0 and max(ids) < end
    return all(
        (type(t) is int or (isinstance(t, Integral) and not isinstance(t, bool))) and 0 <= t < end
        for t in ids
    )


@dataclass(frozen=True)
class RequestLimits:
    """What an engine can serve, as the checks need it."""

    vocab_size: int
    max_model_len: int
    max_logprobs: int
    block_size: int
    kv_layout: KvLayout


def check_request(request: GenerateRequest, limits: RequestLimits) -> None:
    """Raise ValueError, naming the field, if the request can never be served."""
    if not isinstance(request.request_id, str) or not request.request_id:
        raise ValueError("request_id must be a non-empty string")
    if request.lora_name is not None and not isinstance(request.lora_name, str):
        raise ValueError("lora_name must be a string")
    prompt = request.prompt_token_ids
    if not isinstance(prompt, list):
        raise ValueError("prompt_token_ids must be a list of token ids")
    n = len(prompt)
    if n == 0:
        raise ValueError("the prompt is empty")
    if n >= limits.max_model_len:
        raise ValueError(
            f"the prompt has {n} tokens, but max_model_len is {limits.max_model_len} "
            "(prompt plus at least one generated token must fit)"
        )
    vocab = limits.vocab_size
    if not _all_ids_below(prompt, vocab):
        raise ValueError(f"prompt token ids must lie in [0, {vocab})")
    if not isinstance(request.sampling, SamplingParams):
        raise ValueError("sampling must be SamplingParams")
    request.sampling.validate(limits.max_logprobs, vocab)
    if (request.kv_export or request.kv_import) and request.sampling.n != 1:
        raise ValueError("disaggregated prefill serves n == 1 only")
    _check_outputs(request, n, limits)
    params = request.kv_import
    if params is not None:
        if request.kv_export:
            raise ValueError("a request cannot both export and import its KV cache")
        _check_kv_import(params, n, request.sampling, limits)


def _check_outputs(request: GenerateRequest, n: int, limits: RequestLimits) -> None:
    index = request.sequence_index
    if not isinstance(index, int) or not 0 <= index < 2**31:
        raise ValueError("sequence_index must be an integer in [0, 2**31)")
    if index and request.sampling.n != 1:
        raise ValueError("sequence_index needs n == 1 (one sequence of a split request)")
    outputs = request.output_token_ids
    if not isinstance(outputs, list):
        raise ValueError("output_token_ids must be a list of token ids")
    if not outputs:
        return
    if request.sampling.n != 1 or request.kv_export or request.kv_import is not None:
        raise ValueError("output_token_ids (migration) needs n == 1 and no KV transfer")
    vocab = limits.vocab_size
    if not _all_ids_below(outputs, vocab):
        raise ValueError(f"output_token_ids must lie in [0, {vocab})")
    if len(outputs) >= request.sampling.max_tokens or n + len(outputs) >= limits.max_model_len:
        raise ValueError(
            f"output_token_ids has {len(outputs)} tokens: no room left to generate "
            f"(max_tokens {request.sampling.max_tokens}, max_model_len {limits.max_model_len})"
        )


def _check_kv_import(params: KvTransferParams, n: int, sampling, limits: RequestLimits) -> None:
    """A `kv_import` comes from another process: check each field it is read for."""
    if not isinstance(params, KvTransferParams):
        raise ValueError("kv_import must be KvTransferParams")
    if params.connector is not None:
        raise ValueError(
            "kv_import.connector: this KV is held by another engine's connector"
            " (a vLLM worker's); Tandem's engine pulls only Tandem's exports"
        )
    if params.num_tokens != n or not isinstance(params.token_ids, list) or not params.token_ids:
        raise ValueError("kv_import must cover the prompt and carry the sampled token")
    vocab = limits.vocab_size
    if not _all_ids_below(params.token_ids, vocab):
        raise ValueError(f"kv_import.token_ids must lie in [0, {vocab})")
    sampled = len(params.token_ids)
    if sampled >= sampling.max_tokens or n + sampled >= limits.max_model_len:
        raise ValueError(
            f"kv_import.token_ids has {sampled} tokens: no room left to generate "
            f"(max_tokens {sampling.max_tokens}, max_model_len {limits.max_model_len})"
        )
    if not isinstance(params.block_ids, list) or not _all_ids_below(params.block_ids, 2**31):
        raise ValueError("kv_import.block_ids must be a list of block ids in [0, 2**31)")
    if -(-n // limits.block_size) != len(params.block_ids):
        raise ValueError(f"kv_import lists {len(params.block_ids)} blocks for {n} tokens")
    rng = params.rng_state
    if rng is not None and (not isinstance(rng, bytes) or len(rng) > MAX_RNG_STATE_BYTES):
        raise ValueError(f"kv_import.rng_state must be at most {MAX_RNG_STATE_BYTES} bytes")
    if not isinstance(params.layout, KvLayout):
        raise ValueError("kv_import.layout must be a KvLayout")
    reason = limits.kv_layout.mismatch(params.layout)
    if reason is not None:
        raise ValueError(f"cannot import this KV cache: {reason}")
