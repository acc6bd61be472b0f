"""A migrated request (`output_token_ids`) goes on exactly where its lost worker stopped.

The frontend resends the prompt with the tokens already streamed; the engine recomputes their
KV and continues. Greedy, seeded and penalised sampling must give the tokens the uninterrupted
run gives next: seeded noise and penalties count the resumed tokens as output. The request
path around it (worker killed mid-stream, migration on and off) is in test_distributed_serve.
"""

from __future__ import annotations

import msgspec
import pytest
from test_async_scheduling import drive, engine
from test_engine_vs_hf import prompts

from tandem.protocol import GenerateRequest, SamplingParams

SAMPLINGS = {
    "greedy": SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True),
    "penalised": SamplingParams(
        max_tokens=24, temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5,
        repetition_penalty=1.3, ignore_eos=True, min_tokens=20,
    ),
}


@pytest.mark.parametrize("name", SAMPLINGS)
@pytest.mark.parametrize("cut", [1, 9, 23])
def test_resumed_request_continues_the_uninterrupted_one(tiny_llama, name, cut):
    prompt = prompts([13], seed=3)[0]
    sampling = SAMPLINGS[name]
    full, _ = drive(engine(tiny_llama, False), [GenerateRequest(request_id="a",
                    prompt_token_ids=prompt, sampling=sampling)])  # fmt: skip
    tokens = full["a"]
    assert len(tokens) == 24
    resumed = GenerateRequest(request_id="a", prompt_token_ids=prompt, sampling=sampling,
                              output_token_ids=tokens[:cut])  # fmt: skip
    # Through the wire format, as the frontend sends it.
    resumed = msgspec.msgpack.decode(msgspec.msgpack.encode(resumed), type=GenerateRequest)
    rest, reasons = drive(engine(tiny_llama, False), [resumed])
    assert rest["a"] == tokens[cut:]
    assert reasons["a"] == "length"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(output_token_ids=[1] * 8), "no room left"),  # max_tokens 8
        (dict(output_token_ids=[10**6]), "output_token_ids must lie in"),
        (dict(output_token_ids="abc"), "output_token_ids must be a list"),
        (dict(output_token_ids=[1], sampling=SamplingParams(max_tokens=8, n=2)), "n == 1"),
        (dict(output_token_ids=[1], kv_export=True), "no KV transfer"),
        (dict(sequence_index=-1), "sequence_index must be an integer"),
        (dict(sequence_index=2**31), "sequence_index must be an integer"),
        (dict(sequence_index=1, sampling=SamplingParams(max_tokens=8, n=2)), "needs n == 1"),
    ],
)
def test_bad_resumed_requests_are_refused(tiny_llama, change, message):
    core = engine(tiny_llama, False)
    fields = dict(request_id="b", prompt_token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match=message):
        core.add_request(GenerateRequest(**{**fields, **change}))
    assert not core.has_work()
