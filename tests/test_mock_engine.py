"""The mock engine: performance models, and the real scheduler driven by modelled step times."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.engine.mock import PolynomialPerfModel, ProfilePerfModel, load_perf_model
from tandem.engine.mock.profile import run_profile
from tandem.protocol import GenerateRequest, KvStored, SamplingParams


def test_polynomial_model_matches_the_published_fit():
    m = PolynomialPerfModel()
    assert m.prefill_ms(1000) == pytest.approx(4.209989e-7 * 1e6 + 15.18344 + 16.50142)
    assert m.decode_ms(8, 4000, 0.0) == pytest.approx(5.74)
    assert m.decode_ms(8, 4000, 0.5) == pytest.approx(-25.74 / 4 + 27.005 + 5.74)
    assert m.decode_ms(8, 4000, 5.0) == 1.0  # clamped at 1 ms


def test_profile_interpolates_and_extrapolates():
    m = ProfilePerfModel(
        prefill=[[100, 10.0], [200, 30.0]],
        decode=[[1, 100, 5.0], [1, 300, 7.0], [4, 100, 9.0], [4, 300, 13.0]],
    )
    assert m.prefill_ms(150) == pytest.approx(20.0)
    assert m.prefill_ms(300) == pytest.approx(50.0)  # linear beyond the last point
    assert m.decode_ms(1, 200, 0.0) == pytest.approx(6.0)
    assert m.decode_ms(4, 4 * 200, 0.0) == pytest.approx(11.0)
    assert m.decode_ms(2, 2 * 100, 0.0) == pytest.approx(5.0 + 4.0 / 3)


def test_bad_profile_is_a_clear_error(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"prefill": []}))
    with pytest.raises(ValueError, match="cannot read performance profile"):
        load_perf_model(str(bad))


FIXED = {"prefill": [[1, 40.0], [4096, 40.0]], "decode": [[1, 1, 10.0], [256, 8192, 10.0]]}


@pytest.fixture
def mock_engine(tiny_llama, tmp_path):
    profile = tmp_path / "fixed.json"
    profile.write_text(json.dumps(FIXED))
    engine = AsyncEngine(
        EngineConfig(
            model=str(tiny_llama), engine="mock", perf_model=str(profile), num_gpu_blocks=64
        )
    )
    yield engine
    engine.shutdown()


def test_mock_steps_take_the_modelled_time(mock_engine):
    async def main():
        params = SamplingParams(max_tokens=11, ignore_eos=True)
        req = GenerateRequest(request_id="m", prompt_token_ids=list(range(5, 60)), sampling=params)
        start = time.perf_counter()
        stamps = [time.perf_counter() - start async for _ in mock_engine.generate(req)]
        return stamps

    stamps = asyncio.run(main())
    assert len(stamps) == 11
    ttft_ms = stamps[0] * 1000
    itl_ms = (stamps[-1] - stamps[0]) / 10 * 1000
    # Modelled: 40 ms prefill, 10 ms per decode step. Our own loop adds a little on top.
    assert 40 <= ttft_ms < 40 + 15
    assert 10 <= itl_ms < 10 + 5


def test_mock_uses_the_real_block_manager(mock_engine):
    async def main():
        prompt = list(range(5, 60))
        for rid in ("a", "b"):
            params = SamplingParams(max_tokens=2, ignore_eos=True)
            req = GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=params)
            outs = [o async for o in mock_engine.generate(req)]
        return outs[-1]

    last = asyncio.run(main())
    assert last.num_cached_tokens == 48  # three full 16-token blocks of the 55-token prompt
    assert any(isinstance(e, KvStored) for e in mock_engine.take_kv_events())


def test_profile_of_real_engine_feeds_the_mock(tiny_llama, tmp_path):
    out = tmp_path / "profile.json"
    run_profile(
        EngineConfig(model=str(tiny_llama), num_gpu_blocks=64),
        prefill_lengths=[16, 64],
        decode_batches=[1, 2],
        decode_contexts=[16, 32],
        decode_steps=2,
        output=out,
    )
    data = json.loads(out.read_text())
    assert [p[0] for p in data["prefill"]] == [16, 64]
    assert sorted((b, c) for b, c, _ in data["decode"]) == [(1, 16), (1, 32), (2, 16), (2, 32)]
    assert all(ms > 0 for *_, ms in data["decode"])
    model = load_perf_model(str(out))
    assert model.prefill_ms(32) > 0
