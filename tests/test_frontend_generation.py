"""GenerationRun against scripted engine outputs: the cases a random model cannot be steered
into (one of n sequences hitting a stop string, an engine reporting an error).

The end-to-end behaviour with the real engine is in test_frontend_server.py; here the engine
is a script, so the exact interleaving of outputs is under the test's control.
"""

from __future__ import annotations

import asyncio

import pytest

from tandem.engine.testing import make_tokenizer
from tandem.frontend.admission import AdmissionControl
from tandem.frontend.generation import EngineStreamError, GenerationRun
from tandem.frontend.metrics import FrontendMetrics, RequestTimer
from tandem.frontend.preprocess import Prepared
from tandem.http.errors import APIError
from tandem.protocol import GenerateOutput, GenerateRequest, LoadStats, SamplingParams

IDLE = LoadStats(
    active_blocks=0,
    free_blocks=8,
    total_blocks=8,
    num_running=0,
    num_waiting=0,
    queued_prefill_tokens=0,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


class ScriptedEngine:
    """Plays back outputs (index, token ids, finish reason) for whatever request comes in."""

    max_model_len = 128
    max_logprobs = 20

    def __init__(self, script, raise_first: Exception | None = None) -> None:
        self.script = script
        self.raise_first = raise_first
        self.aborted: list[tuple[str, int]] = []  # (request id, outputs consumed by then)
        self.aborted_sequences: list[tuple[str, int]] = []  # (request id, sequence index)
        self.consumed = 0

    def stats(self) -> LoadStats:
        return IDLE

    def abort(self, request_id: str, index: int | None = None) -> None:
        if index is None:
            self.aborted.append((request_id, self.consumed))
        else:
            self.aborted_sequences.append((request_id, index))

    async def generate(self, request: GenerateRequest):
        if self.raise_first is not None:
            raise self.raise_first
        for index, ids, finish in self.script:
            await asyncio.sleep(0)
            self.consumed += 1
            yield GenerateOutput(
                request_id=request.request_id,
                index=index,
                token_ids=ids,
                finish_reason=finish,
                num_prompt_tokens=3,
                error="boom" if finish == "error" else None,
            )


def run_all(engine, tokenizer, n=1, stop=()):
    metrics = FrontendMetrics(engine.stats)
    prepared = Prepared([[5, 6, 7]], SamplingParams(max_tokens=20, n=n), list(stop))
    run = GenerationRun(
        engine,
        tokenizer,
        metrics,
        AdmissionControl(engine.stats, 8),
        "req",
        prepared,
        RequestTimer(metrics),
    )

    async def main():
        texts = [""] * n
        finishes = [None] * n
        try:
            await run.start()
            async for d in run.deltas():
                texts[d.index] += d.text
                finishes[d.index] = d.finish_reason or finishes[d.index]
        finally:
            await run.aclose()
        return texts, finishes, run.usage()

    return asyncio.run(main())


def test_stop_string_on_one_of_n_keeps_the_others_running(tokenizer):
    enc = tokenizer.encode
    script = [
        (0, enc("Paris"), None),
        (1, enc("Berlin"), None),
        (0, enc(" END"), None),  # index 0 stops here
        (1, enc(" is"), None),
        (0, enc(" junk"), None),  # the engine did not know: dropped, not counted
        (1, enc(" big"), "length"),
        (0, enc(" more"), "length"),
    ]
    engine = ScriptedEngine(script)
    texts, finishes, usage = run_all(engine, tokenizer, n=2, stop=["END"])
    assert texts == ["Paris ", "Berlin is big"]
    assert finishes == ["stop", "length"]
    counted_for_0 = len(enc("Paris")) + len(enc(" END"))  # up to the stop, not the junk after
    counted_for_1 = len(enc("Berlin")) + len(enc(" is")) + len(enc(" big"))
    assert usage["completion_tokens"] == counted_for_0 + counted_for_1
    # When index 0 stopped (3rd output) only its engine sequence was stopped; the request
    # as a whole is aborted once index 1 has finished too (6th output).
    assert engine.aborted_sequences == [("req", 0)]
    assert engine.aborted == [("req", 6)]


def test_stop_strings_ending_every_choice_abort_the_engine_request(tokenizer):
    enc = tokenizer.encode
    script = [
        (0, enc("a STOP"), None),
        (1, enc("b"), None),
        (1, enc(" STOP"), None),
        (0, enc(" never"), None),
        (1, enc(" never"), "length"),
    ]
    engine = ScriptedEngine(script)
    texts, finishes, _ = run_all(engine, tokenizer, n=2, stop=["STOP"])
    assert texts == ["a ", "b "]
    assert finishes == ["stop", "stop"]
    assert engine.aborted_sequences == [("req", 0)]  # the first choice to stop, alone
    assert engine.aborted == [("req", 3)]  # right when the last choice ended
    assert engine.consumed == 3


def test_engine_error_output_raises(tokenizer):
    engine = ScriptedEngine([(0, tokenizer.encode("ok"), None), (0, [], "error")])
    with pytest.raises(EngineStreamError, match="boom"):
        run_all(engine, tokenizer)


def test_engine_refusal_becomes_a_400(tokenizer):
    engine = ScriptedEngine([], raise_first=ValueError("prompt token ids must lie in [0, 9)"))
    with pytest.raises(APIError) as err:
        run_all(engine, tokenizer)
    assert err.value.status == 400 and "[0, 9)" in err.value.message
