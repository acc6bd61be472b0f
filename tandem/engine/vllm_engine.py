"""vLLM as a worker engine: its v1 `AsyncLLM` behind the contract of Tandem's `AsyncEngine`
(generate / abort / stats / KV events / snapshot), so a `tandem worker --engine vllm` joins
the same router, frontends and migration as Tandem's own engine.

The frontend tokenizes and sends token ids; each sampling field maps to vLLM's of the same
meaning, and what vLLM cannot do here (LoRA names) is refused before anything runs. KV
events come from vLLM's publisher over a private ZeroMQ socket and are re-hashed with
Tandem's chain (`vllm_events`); load comes from vLLM's scheduler stats through a stat logger
that vLLM calls after each step. vLLM is imported only when this engine is built (`pip
install -e '.[vllm]'`).

Disaggregated, a prefill worker runs the prompt with vLLM's connector told to hold its KV
(`do_remote_decode`, one token, which is not sent on) and returns the connector's
`kv_transfer_params`; the decode worker gets them back unread and vLLM's connector pulls the
blocks (NIXL by default, as llm-d and Dynamo do), then generates from the first token on.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import socket
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, get_args

from tandem.engine.config import EngineConfig
from tandem.engine.kv_event_buffer import KvEventBuffer
from tandem.engine.vllm_events import VllmEventTranslator
from tandem.engine.vllm_plugin import WORKER_PID
from tandem.protocol import (
    FinishReason,
    GenerateOutput,
    GenerateRequest,
    KvEvent,
    KvSnapshot,
    KvTransferParams,
    LoadStats,
    TokenLogprob,
)

log = logging.getLogger(__name__)

#: vLLM's finish reasons that Tandem's protocol has (others end the stream without one).
FINISH = frozenset(get_args(FinishReason))
#: How prefill and decode vLLM workers hand KV over unless `--vllm-arg
#: kv_transfer_config=...` says otherwise: vLLM's NIXL connector, the role's direction.
DEFAULT_KV_TRANSFER = {
    "kv_connector": "NixlConnector",
    "kv_load_failure_policy": "recompute",  # a failed pull prefills locally, as Tandem does
}
KV_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer"}


class VllmEngine:
    """One vLLM engine (its core runs in vLLM's own process) with Tandem's engine face."""

    def __init__(self, config: EngineConfig, role: str = "aggregated") -> None:
        from vllm.config import KVEventsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model_path = Path(config.model)
        self.max_logprobs = config.max_logprobs
        self.kv_layout = None  # KV moves through vLLM's own connector, not Tandem's
        self._tasks: set[asyncio.Task] = set()  # aborts under way
        os.environ[WORKER_PID] = str(os.getpid())  # vLLM's processes die with this one
        self._folder = tempfile.TemporaryDirectory(prefix="tandem-vllm-")
        endpoint = f"ipc://{self._folder.name}/kv-events"
        events = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                endpoint=endpoint, topic="kv")  # fmt: skip
        transfer = kv_transfer_config(config.vllm_args.get("kv_transfer_config"), role,
                                      config.device)  # fmt: skip
        #: The card's: KV hands over through this connector (prefill and decode roles).
        self.kv_connector = ""
        if transfer is not None and role != "aggregated":
            self.kv_connector = transfer.kv_connector or ""
        args = AsyncEngineArgs(**{
            "model": config.model, "dtype": config.dtype, "seed": config.seed,
            # 16 is --block-size's default: then vLLM picks its own (its CPU attention needs
            # multiples of 32); the card advertises whatever vLLM uses.
            "block_size": None if config.block_size == 16 else config.block_size,
            "max_model_len": config.max_model_len,
            "max_num_seqs": config.max_num_seqs,
            "max_num_batched_tokens": config.max_num_batched_tokens,
            "enable_prefix_caching": config.enable_prefix_caching,
            "enforce_eager": config.enforce_eager, "max_logprobs": config.max_logprobs,
            "kv_events_config": events, **_memory(config), **config.vllm_args,
            "kv_transfer_config": transfer,
        })  # fmt: skip
        self._scheduler: Any = None  # the latest SchedulerStats
        self._prefix = [0, 0]  # prefix-cache queries and hits (tokens), summed since start
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[self._stat_logger()])
        vllm_config = self.llm.vllm_config
        self.block_size = vllm_config.cache_config.block_size
        self.max_model_len = vllm_config.model_config.max_model_len
        self.total_blocks = vllm_config.cache_config.num_gpu_blocks or 0
        self._translator = VllmEventTranslator(self.block_size)
        self._events = KvEventBuffer()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._subscriber = threading.Thread(target=self._listen, args=(endpoint,),
                                            name="vllm-kv-events", daemon=True)  # fmt: skip
        self._subscriber.start()

    # -- the engine contract -----------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Stream deltas of each of the request's sequences; ValueError (a 400) before
        anything runs for what vLLM cannot do here."""
        if self.error is not None:
            raise RuntimeError(f"the vLLM engine is dead: {self.error}")
        params, prompt = vllm_request(request, self.kv_connector)
        handover = (params.extra_args or {}).get("kv_transfer_params", {})
        exporting = handover.get("do_remote_decode", False)
        rid = request.request_id
        done = False
        try:
            async for out in self.llm.generate({"prompt_token_ids": prompt}, params, rid):
                for c in out.outputs:
                    if exporting and c.finish_reason == "length":  # the one-token cap
                        yield self._handover(request, out)
                    else:
                        yield self._output(request, out, c)
            done = True
        finally:
            if not done:
                await self.llm.abort(rid)

    @property
    def error(self) -> BaseException | None:
        """Why vLLM's engine died, or None: the worker polls it and leaves discovery."""
        return self.llm.dead_error if self.llm.errored else None

    def abort(self, request_id: str, index: int | None = None) -> None:
        task = asyncio.get_running_loop().create_task(self.llm.abort(request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stats(self) -> LoadStats:
        s = self._scheduler
        usage = s.kv_cache_usage if s is not None else 0.0
        active = round(usage * self.total_blocks)
        return LoadStats(
            active_blocks=active, free_blocks=self.total_blocks - active,
            total_blocks=self.total_blocks, num_running=s.num_running_reqs if s else 0,
            num_waiting=s.num_waiting_reqs if s else 0, queued_prefill_tokens=0,
            prefix_cache_queries=self._prefix[0] // self.block_size,
            prefix_cache_hits=self._prefix[1] // self.block_size,
        )  # fmt: skip

    def take_kv_events(self) -> list[KvEvent]:
        return self._events.take()

    async def kv_snapshot(self) -> KvSnapshot:
        with self._lock:
            return self._translator.snapshot()

    def shutdown(self) -> None:
        self._stop.set()
        self.llm.shutdown()
        self._subscriber.join(timeout=2)
        self._folder.cleanup()

    # -- translation -------------------------------------------------------------------

    def _handover(self, request: GenerateRequest, out: Any) -> GenerateOutput:
        """A prefill's end: the connector's parameters, not the token (the decode worker
        samples it again from the same KV, so that every sampler's stream stays its own)."""
        if not out.kv_transfer_params:
            raise RuntimeError(f"vLLM's {self.kv_connector} handed no KV over")
        return GenerateOutput(
            request_id=request.request_id, index=request.sequence_index,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_tokens=out.num_cached_tokens or 0,
            kv_transfer=KvTransferParams(
                request_id=request.request_id, block_ids=[],
                num_tokens=len(request.prompt_token_ids),
                connector=dict(out.kv_transfer_params),
            ),
        )  # fmt: skip

    def _output(self, request: GenerateRequest, out: Any, c: Any) -> GenerateOutput:
        finish = c.finish_reason if c.finish_reason in FINISH else None
        stop = c.stop_reason if isinstance(c.stop_reason, int) else None
        if finish == "stop" and stop is None and c.token_ids:
            stop = c.token_ids[-1]  # the end-of-sequence token
        return GenerateOutput(
            request_id=request.request_id, index=c.index + request.sequence_index,
            token_ids=list(c.token_ids), logprobs=_logprobs(c), finish_reason=finish,
            stop_token_id=stop if finish == "stop" else None,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_tokens=out.num_cached_tokens or 0,
        )  # fmt: skip

    # -- vLLM's side channels ----------------------------------------------------------

    def _listen(self, endpoint: str) -> None:
        """KV event batches from vLLM's publisher, translated as they come."""
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        socket = zmq.Context.instance().socket(zmq.SUB)
        socket.setsockopt(zmq.SUBSCRIBE, b"kv")
        socket.setsockopt(zmq.RCVTIMEO, 200)
        socket.connect(endpoint)
        try:
            while not self._stop.is_set():
                try:
                    _, _, payload = socket.recv_multipart()
                except zmq.Again:
                    continue
                batch = decoder.decode(payload)
                with self._lock:  # the translator's state, which snapshots read
                    self._events.put(self._translator.translate(batch.events))
        except Exception as exc:  # the events stop: the router falls back on snapshots
            log.exception("vLLM KV events: the subscriber stopped: %s", exc)
        finally:
            socket.close(linger=0)

    def _stat_logger(self) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class Latest(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                       engine_idx=0) -> None:  # fmt: skip
                if scheduler_stats is not None:
                    engine._scheduler = scheduler_stats
                    prefix = scheduler_stats.prefix_cache_stats
                    engine._prefix[0] += prefix.queries
                    engine._prefix[1] += prefix.hits

            def log_engine_initialized(self) -> None:
                pass

        return Latest


def vllm_request(request: GenerateRequest, kv_connector: str = "") -> tuple[Any, list[int]]:
    """vLLM's sampling parameters and prompt for a Tandem request; ValueError (a 400) for
    what a vLLM worker does not serve. A migrated request goes on after its tokens.
    `kv_connector`: the worker's (prefill and decode roles), which a KV hand-over needs."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    if request.lora_name is not None:
        raise ValueError("lora_name: LoRA adapters are not served by this vLLM worker")
    s = request.sampling
    done = request.output_token_ids  # migration: the tokens a lost worker produced
    max_tokens, min_tokens = s.max_tokens - len(done), max(0, s.min_tokens - len(done))
    handover = _handover_params(request, kv_connector)
    if handover is not None and handover.get("do_remote_decode"):
        if max_tokens > 1:  # else the prefill worker's one token is the whole answer
            max_tokens, min_tokens = 1, 0
        else:
            handover = None
    try:
        params = SamplingParams(
            n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
            seed=s.seed, presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty, repetition_penalty=s.repetition_penalty,
            max_tokens=max_tokens, min_tokens=min_tokens,
            logprobs=s.logprobs, stop_token_ids=list(s.stop_token_ids),
            ignore_eos=s.ignore_eos, output_kind=RequestOutputKind.DELTA,
            extra_args=None if handover is None else {"kv_transfer_params": handover},
        )  # fmt: skip
    except (ValueError, TypeError) as exc:
        raise ValueError(f"vLLM refuses the sampling parameters: {exc}") from None
    return params, [*request.prompt_token_ids, *done]


def kv_transfer_config(given: Any, role: str, device: str) -> Any:
    """vLLM's `KVTransferConfig` for a worker of `role` (None: an aggregated worker without
    one): `given` (a dict or a config, from `--vllm-arg kv_transfer_config`), else NIXL."""
    from vllm.config import KVTransferConfig

    if given is None and role == "aggregated":
        return None
    if given is None:
        given = {**DEFAULT_KV_TRANSFER, "kv_role": KV_ROLES[role]}
        _check_nixl(device)
    if isinstance(given, dict):
        given = KVTransferConfig(**given)
    if not isinstance(given, KVTransferConfig):
        raise ValueError("--vllm-arg kv_transfer_config must be a JSON object")
    if given.kv_connector == "NixlConnector":
        # vLLM's default port would collide between two workers on one host.
        os.environ.setdefault("VLLM_NIXL_SIDE_CHANNEL_PORT", str(_free_port()))
    return given


def _handover_params(request: GenerateRequest, kv_connector: str) -> dict[str, Any] | None:
    """vLLM's `kv_transfer_params` for a request that exports or imports KV, else None."""
    imported = request.kv_import
    if not (request.kv_export or imported is not None):
        return None
    if not kv_connector:
        raise ValueError("this vLLM worker has no KV connector (its role is aggregated):"
                         " it neither exports nor imports KV")  # fmt: skip
    if request.kv_export:
        return {"do_remote_decode": True}
    if imported.connector is None or imported.token_ids:
        raise ValueError("kv_import: a vLLM worker imports only what a vLLM prefill worker's"
                         f" connector ({kv_connector}) handed over")  # fmt: skip
    return dict(imported.connector)


def _check_nixl(device: str) -> None:
    """Refuse at once what vLLM's NIXL connector would fail on after a minute of start-up."""
    if device != "cuda":
        raise ValueError("prefill and decode vLLM workers hand KV over through vLLM's NIXL"
                         " connector, which needs GPUs (vLLM's CPU build has no NIXL device);"
                         " on a CPU run vLLM workers aggregated, or name a connector that runs"
                         " here with --vllm-arg kv_transfer_config='{...}'")  # fmt: skip
    if importlib.util.find_spec("nixl") is None:
        raise ValueError("prefill and decode vLLM workers need NIXL for vLLM's connector:"
                         " pip install nixl (vLLM imports the `nixl` package)")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory(config: EngineConfig) -> dict[str, Any]:
    """The KV cache's size in vLLM's terms. On a CPU vLLM reads `gpu_memory_utilization` as
    the share of host memory to reserve (0.9 of it by default, which a second engine on the
    machine cannot get): there the cache is given in bytes, Tandem's CPU default of 1 GiB
    unless `--kv-cache-memory` says otherwise, and the share kept small."""
    gib = config.kv_cache_memory_gb
    if config.device == "cpu":
        return {"kv_cache_memory_bytes": int((gib or 1.0) * 2**30), "gpu_memory_utilization": 0.1}
    sized = {"kv_cache_memory_bytes": int(gib * 2**30)} if gib else {}
    return {"gpu_memory_utilization": config.gpu_memory_utilization, **sized}


def _logprobs(c: Any) -> list[TokenLogprob] | None:
    if c.logprobs is None:
        return None
    out = []
    for token, alternatives in zip(c.token_ids, c.logprobs, strict=False):
        chosen = alternatives[token].logprob
        top = sorted(((t, lp.logprob) for t, lp in alternatives.items() if lp.rank is not None),
                     key=lambda pair: -pair[1])  # fmt: skip
        out.append(TokenLogprob(token, chosen, top))
    return out
