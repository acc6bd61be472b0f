"""Disaggregation through an engine's own KV connector (vLLM's, e.g. NIXL): the frontend and
the workers pass the connector's parameters from the prefill worker to the decode worker
unread, and Tandem's transfer stays out of the way. vLLM's connectors hand KV over on GPUs
only, so the engine here stands in for it (the GPU run is `tests/test_vllm_disagg.py`): its
prefill side returns parameters instead of its token, its decode side records them and
computes the prompt itself, as vLLM's connector does when a pull fails."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
import pytest

from tandem.deploy import LocalCluster
from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.frontend.disagg import DisaggConfig
from tandem.protocol import GenerateOutput, GenerateRequest, KvTransferParams, SamplingParams
from tandem.protocol.worker import ModelCard


class ConnectorEngine:
    """An engine whose connector moves KV (stands in for a vLLM worker)."""

    kv_connector = "TestConnector"
    kv_layout = None

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.handed_over: list[dict[str, Any]] = []
        self.imported: list[dict[str, Any]] = []
        self.refuse = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    async def generate(self, request: GenerateRequest, kv_source: Any = None):
        assert kv_source is None, "Tandem's transfer must stay out of the connector's way"
        if request.kv_export:
            one = msgspec.structs.replace(request.sampling, max_tokens=1)
            local = msgspec.structs.replace(request, kv_export=False, sampling=one)
            async for _ in self.engine.generate(local):
                pass
            params = {"remote_request_id": request.request_id, "remote_block_ids": [3, 1, 4]}
            self.handed_over.append(params)
            yield GenerateOutput(
                request_id=request.request_id,
                num_prompt_tokens=len(request.prompt_token_ids),
                kv_transfer=KvTransferParams(
                    request_id=request.request_id, block_ids=[],
                    num_tokens=len(request.prompt_token_ids), connector=params,
                ),
            )  # fmt: skip
            return
        if request.kv_import is not None:
            if self.refuse:
                raise ValueError("this decode worker refuses the hand-over")
            self.imported.append(request.kv_import.connector)
            request = msgspec.structs.replace(request, kv_import=None)
        async for out in self.engine.generate(request):
            yield out


@pytest.fixture
def engines(tiny_llama):
    made = [AsyncEngine(EngineConfig(model=str(tiny_llama), num_gpu_blocks=64)) for _ in "abc"]
    yield made
    for engine in made:
        engine.shutdown()


def request(rid: str, n: int, max_tokens: int = 8) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerateRequest(request_id=rid, prompt_token_ids=[5 + i % 300 for i in range(n)],
                           sampling=sampling)  # fmt: skip


def test_the_connector_parameters_reach_the_decode_worker_unread(engines, caplog) -> None:
    aggregated, prefill_engine, decode_engine = engines
    prefill, decode = ConnectorEngine(prefill_engine), ConnectorEngine(decode_engine)

    async def main() -> None:
        cluster = LocalCluster([prefill, decode], ["prefill", "decode"], served="tiny",
                               transport="tcp", publish_interval=0.02,
                               disagg=DisaggConfig(max_local_prefill_length=0))  # fmt: skip
        async with cluster as c:
            for i, n in enumerate([17, 70]):
                want = [t async for o in aggregated.generate(request(f"a{i}", n))
                        for t in o.token_ids]  # fmt: skip
                outs = [o async for o in c.remote.generate(request(f"d{i}", n))]
                # every token from the decode worker: the hand-over itself sends none
                assert all(o.token_ids for o in outs[:-1]) and outs[0].kv_transfer is None
                assert [t for o in outs for t in o.token_ids] == want
                assert outs[-1].num_prompt_tokens == n
            assert c.remote.planner.counts["remote"] == 2
            # a hand-over no decode worker took is left to the connector's own deadline
            decode.refuse = True
            with pytest.raises(Exception, match="refuses the hand-over"):
                async for _ in c.remote.generate(request("refused", 40)):
                    pass
        assert decode.imported == prefill.handed_over[:2] and len(prefill.handed_over) == 3

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert "releasing its KV" not in caplog.text


def test_an_engine_connector_pairs_only_with_the_same_connector() -> None:
    card = ModelCard(model="m", model_path="/m", tokenizer="/m", block_size=16,
                     total_blocks=8, max_model_len=64, max_logprobs=0, role="prefill",
                     kv_connector="NixlConnector")  # fmt: skip
    decode = msgspec.structs.replace(card, role="decode")
    assert card.kv_mismatch(decode) is None
    tandem = msgspec.structs.replace(decode, kv_connector="")
    assert card.kv_mismatch(tandem) == "KV moves through Tandem's KV transfer, not NixlConnector"
    other = msgspec.structs.replace(decode, kv_connector="MooncakeConnector")
    assert "MooncakeConnector" in card.kv_mismatch(other)


def test_tandems_engine_refuses_a_connector_hand_over(engines) -> None:
    params = KvTransferParams(request_id="r", block_ids=[], num_tokens=3,
                              connector={"remote_block_ids": [1]})  # fmt: skip
    bad = msgspec.structs.replace(request("r", 3), kv_import=params)

    async def main() -> None:
        with pytest.raises(ValueError, match=r"kv_import\.connector"):
            async for _ in engines[0].generate(bad):
                pass

    asyncio.run(main())
