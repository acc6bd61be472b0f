"""One request to an in-process engine → one `RequestRecord`, with no HTTP in between.

Benchmarks that study the layers below the API (routing, disaggregation) drive a
`RemoteEngine` or an `AsyncEngine` directly; this measures their streams the way
`StreamClient` measures an HTTP server's: TTFT up to the first output, then one
ITL value per later output that carries tokens.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Callable

from tandem.bench.records import ERROR_STREAM, RequestRecord, RequestSpec
from tandem.bench.runner import SendFn
from tandem.protocol import GenerateOutput, GenerateRequest, SamplingParams

GenerateFn = Callable[[GenerateRequest], AsyncIterator[GenerateOutput]]


def engine_sender(generate: GenerateFn) -> SendFn:
    """A `send` for `run_load` that streams each spec's prompt token ids through `generate`.

    Prompts are sent as token ids and answered for exactly `spec.max_tokens` tokens
    (`ignore_eos`), so that lengths are the workload's, not the model's.
    """

    async def send(spec: RequestSpec, rec: RequestRecord) -> None:
        tokens = [t for _, segment in spec.segments for t in segment]
        request = GenerateRequest(
            request_id=f"r{rec.index}-{random.getrandbits(32)}",
            prompt_token_ids=tokens,
            sampling=SamplingParams(max_tokens=spec.max_tokens, ignore_eos=True),
        )
        rec.input_tokens = len(tokens)
        start = last = time.perf_counter()
        ids: list[int] = []
        try:
            async for out in generate(request):
                now = time.perf_counter()
                if rec.ttft_s is None:
                    rec.ttft_s = now - start
                    rec.cached_tokens = out.num_cached_tokens
                elif out.token_ids:
                    rec.itl_s.append(now - last)
                last = now
                ids += out.token_ids
                rec.finish_reason = out.finish_reason or rec.finish_reason
        except Exception as exc:
            rec.error, rec.error_detail = ERROR_STREAM, f"{type(exc).__name__}: {exc}"[:500]
        rec.e2e_s = time.perf_counter() - start
        rec.output_tokens = len(ids)
        rec.output_token_ids = ids

    return send
