"""Measure a real engine's step times and write them as a profile for the mock engine.

Prefill: one request of each prompt length, timed over its prefill step(s).
Decode: `batch` requests of `context` tokens each, timed over several decode steps once
their prompts are in the cache. The mock interpolates between the points measured here.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.protocol import GenerateRequest, SamplingParams

log = logging.getLogger(__name__)


def _prompt(length: int, salt: int, vocab: int) -> list[int]:
    # Distinct per salt so the prefix cache never shortens a measurement.
    return [100 + (salt * 7919 + i * 31) % (vocab - 100) for i in range(length)]


def _add(core: EngineCore, rid: str, prompt: list[int], max_tokens: int) -> None:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    core.add_request(GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling))


def _drain(core: EngineCore) -> None:
    while core.has_work():
        core.step()


def profile_prefill(core: EngineCore, lengths: list[int], salt: int) -> list[list[float]]:
    vocab = core.hf_config.vocab_size
    points = []
    for length in lengths:
        _add(core, f"p{length}-{salt}", _prompt(length, salt + length, vocab), 1)
        start = time.perf_counter()
        _drain(core)
        points.append([length, (time.perf_counter() - start) * 1000])
    return points


def profile_decode(
    core: EngineCore, batch: int, context: int, steps: int, salt: int
) -> list[float]:
    vocab = core.hf_config.vocab_size
    for i in range(batch):
        _add(core, f"d{batch}-{context}-{i}-{salt}", _prompt(context, salt + i, vocab), steps + 1)
    # Prefill everything (this also samples each sequence's first token)...
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in core.running_sequences) or (
        core.scheduler.waiting
    ):
        core.step()
    start = time.perf_counter()
    for _ in range(steps):
        core.step()
    elapsed = (time.perf_counter() - start) * 1000 / steps
    _drain(core)
    return [batch, context, elapsed]


def run_profile(
    config: EngineConfig,
    prefill_lengths: list[int],
    decode_batches: list[int],
    decode_contexts: list[int],
    decode_steps: int = 8,
    output: Path | None = None,
) -> dict:
    core = EngineCore(config)
    limit = core.max_model_len - decode_steps - 2
    prefill_lengths = [n for n in prefill_lengths if n <= limit]
    decode_contexts = [c for c in decode_contexts if c <= limit]
    capacity = core.block_manager.num_blocks * config.block_size
    profile_prefill(core, [min(prefill_lengths)], salt=10**6)  # warm-up, not recorded
    prefill = profile_prefill(core, prefill_lengths, salt=0)
    for tokens, ms in prefill:
        print(f"prefill {tokens:>6} tokens: {ms:8.2f} ms", file=sys.stderr, flush=True)
    decode = []
    for batch in decode_batches:
        for context in decode_contexts:
            if batch * (context + decode_steps + 1) > capacity or batch > config.max_num_seqs:
                continue
            point = profile_decode(core, batch, context, decode_steps, salt=batch * 1000 + context)
            decode.append(point)
            print(
                f"decode batch {batch:>4} x {context:>6} ctx: {point[2]:8.2f} ms/step",
                file=sys.stderr,
                flush=True,
            )
    result = {
        "model": config.model,
        "device": config.device,
        "block_size": config.block_size,
        "prefill": prefill,
        "decode": decode,
    }
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2))
    return result
