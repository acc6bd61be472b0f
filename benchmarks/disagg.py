"""Disaggregated serving: what moving the KV cache costs, and what splitting prefill from decode
buys, measured side by side.

Two parts, each selectable with `--parts`:

* `transfer` - one request's KV cache (1k / 8k / 32k-token prompts) moved between two processes
  of this machine, the way a decode worker pulls it from a prefill worker. A child process
  (this script with `--serve-exports`; only plain arguments go in, one JSON line comes out)
  holds K and V caches of a real model's geometry (`--geometry`, default Llama-3.2-1B: 32 KiB
  per token, 1 GiB at 32k tokens) and serves `kv_pull` through `KvExportServer` on a
  `TcpRequestServer`; the parent pulls with `TcpKvSource.fetch` and copies into its own cache
  with `HostBlocks.write_into`. Reported: p50 latency and GB/s (1 GB = 1e9 bytes) of the pull
  alone and of pull + copy, after one untimed warm-up. Every size is verified first: the child
  prints an XXH3 checksum of each export's bytes, and the parent checks the pulled blocks and
  its own cache against it; a size that fails gets an error instead of figures. With CUDA,
  two more rows per size: host/TCP between GPU caches, and CUDA IPC (the child shares its GPU
  caches, the parent maps them through `CudaIpcKvSource` and copies device to device, on the
  last visible GPU, so across GPUs where there are several). Without CUDA they are skipped
  with a note.
* `goodput` - two GPUs' worth of mock workers (`engine="mock"`: the real scheduler and block
  manager, step times from the polynomial performance model, KV transfers modelled as
  1 ms + bytes / `--transfer-gbps`) served either as 2 aggregated workers or as 1 prefill +
  1 decode worker, behind the frontend's `RemoteEngine` on a real TCP request plane (only
  HTTP is left out; every request goes through the prefill worker unless `--local-prefill`).
  The mock model has Llama-3.1-8B's KV geometry (128 KiB per token), so a transfer is as
  large as for that model. Open-loop Poisson arrivals at a sweep of rates, the same arrivals
  and prompts for both fleets; two workloads of random token ids, no shared prefixes: `long`
  (8,000-token prompts, 50-token answers) and `chat` (uniform 500-2,500-token prompts,
  uniform 100-300-token answers). Per rate: TTFT p50/p99, ITL p50/p99 (every gap pooled),
  TPOT p50 (a request's mean ITL), output tokens/s, the fraction of requests that met both
  SLOs (TTFT <= `--ttft-slo-ms`, the request's ITL statistic `--itl-slo-stat` (mean) <=
  `--itl-slo-ms`; failed and cancelled requests miss), goodput = offered rate x that fraction,
  and the disaggregated / aggregated goodput ratio; then one line per workload saying where
  disaggregation wins and loses, and which SLO the losing side missed. `--mock-speedup`
  divides every modelled time so that the sweep finishes sooner; latencies and rates are
  reported in model time (wall time x speedup), as the modelled GPUs would see them. This
  machine's Python overhead is multiplied by the speedup too (about +5% on latencies at 2
  against 1), so keep it low.

Timings are printed and written to `--output` (default results/disagg.json); nothing is asserted.

    python benchmarks/disagg.py                          # both parts, ~4-5 min on 2 cores
    python benchmarks/disagg.py --parts transfer --geometry llama-3.1-8b --reps 5
    python benchmarks/disagg.py --parts goodput --workloads chat --chat-rates 4 8 16 \\
        --requests 100 --mock-speedup 1 --ttft-slo-ms 500 --itl-slo-ms 25 --itl-slo-stat p90
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import torch
import xxhash

from tandem.bench.engine_client import engine_sender
from tandem.bench.runner import Arrival, Bounds, RunResult, run_load
from tandem.bench.stats import ITL_STATS, Slo, goodput, itl_stat, percentile, summarize
from tandem.bench.tokens import TokenSpace
from tandem.bench.workloads import LengthDist, SyntheticWorkload
from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.protocol import KvLayout, KvTransferParams
from tandem.protocol.transfer import CudaIpcCache
from tandem.runtime import TcpRequestClient, TcpRequestServer
from tandem.transfer.blocks import DTYPES, HostBlocks
from tandem.transfer.tcp import KvExportServer, TcpKvSource

BLOCK = 16
GB = 1e9
VOCAB = 128256  # the mock model's (Llama 3's)


class Geometry(NamedTuple):
    """A model's KV cache shape: what a transfer moves per token."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"

    def layout(self) -> KvLayout:
        return KvLayout(
            num_layers=self.layers,
            block_size=BLOCK,
            num_kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
        )


GEOMETRIES = {
    "llama-3.2-1b": Geometry(layers=16, kv_heads=8, head_dim=64),  # 32 KiB per token
    "llama-3.1-8b": Geometry(layers=32, kv_heads=8, head_dim=128),  # 128 KiB per token
}


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK)


# -- the exporting process (child) -----------------------------------------------------------


class Ready(msgspec.Struct):
    """The child's one line on stdout: where to pull, what, and what the bytes must hash to."""

    address: str
    exports: dict[str, list[int]]  # request id -> block ids, in sequence order
    checksums: dict[str, list[str]]  # request id -> [XXH3 of K, XXH3 of V] of those blocks
    cuda_ipc: CudaIpcCache | None = None


class Exporter:
    """Stands in for a prefill engine: caches plus fixed exports that are never freed, so that
    every repetition pulls the same blocks."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, layout: KvLayout, exports: dict) -> None:
        self.k, self.v, self.kv_layout, self.exports = k, v, layout, exports

    def kv_caches(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k, self.v

    async def touch_export(self, request_id: str) -> list[int]:
        return self.exports[request_id]

    async def release_export(self, request_id: str) -> int:
        return len(self.exports.get(request_id, ()))


def fill_caches(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int) -> tuple:
    """K and V whose bytes differ in every (layer, block): one random layer of bytes, shifted
    by 2*layer (K) or 2*layer+1 (V). Random bytes for a whole 1 GiB cache take ~7 s on this
    machine; this takes a fraction of that and still catches any misplaced block or layer."""
    gen = torch.Generator(device=device).manual_seed(seed)
    k = torch.empty(shape, dtype=dtype, device=device)
    v = torch.empty(shape, dtype=dtype, device=device)
    k_bytes, v_bytes = k.view(torch.uint8), v.view(torch.uint8)
    base = torch.randint(0, 256, k_bytes.shape[1:], dtype=torch.uint8, device=device, generator=gen)
    for layer in range(shape[0]):
        torch.add(base, 2 * layer, out=k_bytes[layer])
        torch.add(base, 2 * layer + 1, out=v_bytes[layer])
    return k, v


def checksum(t: torch.Tensor) -> str:
    """XXH3-64 of a tensor's bytes (copied to host if it lives on a GPU)."""
    data = t.contiguous().view(torch.uint8).reshape(-1).cpu().numpy()
    return xxhash.xxh3_64(memoryview(data)).hexdigest()


def export_checksums(k: torch.Tensor, v: torch.Tensor, ids: list[int]) -> list[str]:
    index = torch.tensor(ids, device=k.device)
    return [checksum(k.index_select(1, index)), checksum(v.index_select(1, index))]


async def serve_exports(args: argparse.Namespace) -> None:
    """Build the caches and exports, print `Ready` as one JSON line, serve until stdin closes."""
    layout = GEOMETRIES[args.geometry].layout()
    total = blocks_for(max(args.sizes)) + BLOCK
    shape = (layout.num_layers, total, BLOCK, layout.num_kv_heads, layout.head_dim)
    k, v = fill_caches(shape, DTYPES[layout.dtype], args.device, args.seed)
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(args.seed)).tolist()
    exports = {f"kv-{n}": perm[: blocks_for(n)] for n in args.sizes}
    sums = {rid: export_checksums(k, v, ids) for rid, ids in exports.items()}
    server = TcpRequestServer()
    KvExportServer(Exporter(k, v, layout, exports)).add_endpoints(server)
    await server.start()
    ipc = None
    if k.is_cuda:
        from tandem.transfer.cuda_ipc import share_cache

        ipc = share_cache(k, v)
    ready = Ready(address=server.address, exports=exports, checksums=sums, cuda_ipc=ipc)
    sys.stdout.write(msgspec.json.encode(ready).decode() + "\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop()
    if k.is_cuda:
        torch.cuda.synchronize()


# -- the pulling process (parent) -----------------------------------------------------------


class ExportChild:
    """This script run with `--serve-exports` in a fresh interpreter: only plain arguments go
    in, only the `Ready` line comes out (no tensor crosses by pickle)."""

    def __init__(self, geometry: str, sizes: list[int], device: str, seed: int) -> None:
        self.argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve-exports",
            "--geometry",
            geometry,
            "--device",
            device,
            "--seed",
            str(seed),
            "--sizes",
            *map(str, sizes),
        ]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Ready:
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise RuntimeError(f"the export process exited ({self.proc.returncode}) before serving")
        return msgspec.json.decode(line, type=Ready)

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def params_for(ready: Ready, rid: str, layout: KvLayout) -> KvTransferParams:
    ids = ready.exports[rid]
    return KvTransferParams(
        request_id=rid,
        block_ids=ids,
        num_tokens=len(ids) * BLOCK,
        layout=layout,
        address=ready.address,
        worker_id="export-child",
        cuda_ipc=ready.cuda_ipc,
    )


def local_cache(ready: Ready, layout: KvLayout, device: str) -> tuple[torch.Tensor, ...]:
    """The puller's own cache, as large as the child's, zeroed."""
    total = max(max(ids) for ids in ready.exports.values()) + 1 + BLOCK
    shape = (layout.num_layers, total, BLOCK, layout.num_kv_heads, layout.head_dim)
    dtype = DTYPES[layout.dtype]
    return tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(2))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


async def time_pulls(
    source: Any, ready: Ready, layout: KvLayout, device: str, reps: int, label: str
) -> list[dict]:
    """Per export size: `reps` pulls (plus one untimed warm-up), each followed by the copy into
    this process's cache; verified against the child's checksums before anything is timed."""
    k_cache, v_cache = local_cache(ready, layout, device)
    rng = torch.Generator().manual_seed(1)
    rows = []
    for rid, ids in ready.exports.items():
        params = params_for(ready, rid, layout)
        indices = list(range(len(ids)))
        dst = torch.randperm(k_cache.shape[1], generator=rng)[: len(ids)].tolist()
        row = {"method": label, "tokens": int(rid.split("-")[1]), "blocks": len(ids)}
        row["bytes"] = len(ids) * layout.block_bytes
        pull_s, total_s, staged = [], [], True
        try:
            for rep in range(reps + 1):
                sync(device)
                t0 = time.perf_counter()
                payload = await source.fetch(params, indices)
                t1 = time.perf_counter()
                payload.write_into(k_cache, v_cache, dst)
                sync(device)
                t2 = time.perf_counter()
                staged = isinstance(payload, HostBlocks)
                if rep == 0:
                    verify(ready.checksums[rid], payload, k_cache, v_cache, dst)
                else:
                    pull_s.append(t1 - t0)
                    total_s.append(t2 - t0)
                del payload  # before the next pull: never two staged copies at once
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            print(f"  {label} {row['tokens']} tokens: FAILED: {row['error']}", flush=True)
            rows.append(row)
            continue
        row.update(timing(total_s, row["bytes"], "copy"))
        if staged:  # a CUDA IPC fetch moves nothing by itself: no pull figures
            row.update(timing(pull_s, row["bytes"], "pull"))
        row["verified"] = True
        rows.append(row)
        print(f"  {label} {row['tokens']} tokens: {row['copy_gbps']:.2f} GB/s", flush=True)
    return rows


def verify(want: list[str], payload: Any, k_cache, v_cache, dst: list[int]) -> None:
    """The pulled bytes (when staged on the host) and the copy in the cache both hash to what
    the child holds; anything else is a broken transfer."""
    if isinstance(payload, HostBlocks):
        got = [checksum(payload.k), checksum(payload.v)]
        if got != want:
            raise RuntimeError(f"pulled blocks differ from the source: {got} != {want}")
    got = export_checksums(k_cache, v_cache, dst)
    if got != want:
        raise RuntimeError(f"blocks copied into the cache differ from the source: {got} != {want}")


def timing(seconds: list[float], nbytes: int, name: str) -> dict:
    xs = sorted(seconds)
    p50 = percentile(xs, 50)
    return {
        f"{name}_p50_ms": p50 * 1e3,
        f"{name}_min_ms": xs[0] * 1e3,
        f"{name}_max_ms": xs[-1] * 1e3,
        f"{name}_gbps": nbytes / p50 / GB,
    }


async def pull_over_tcp(ready: Ready, layout: KvLayout, device: str, reps: int, label: str):
    client = TcpRequestClient()
    try:
        source = TcpKvSource(client, layout, timeout=300.0)
        return await time_pulls(source, ready, layout, device, reps, label)
    finally:
        await client.close()


async def pull_over_ipc(ready: Ready, layout: KvLayout, device: str, reps: int) -> list[dict]:
    """CUDA IPC through the decode worker's own source: the first fetch maps the child's
    caches (untimed warm-up), then each one copies device to device."""
    from tandem.transfer.cuda_ipc import CudaIpcKvSource, local_device

    if ready.cuda_ipc is None or local_device(ready.cuda_ipc) is None:
        print("  cuda_ipc: the child's GPU is not visible here as the same node; skipped")
        return []
    client = TcpRequestClient()
    try:
        source = CudaIpcKvSource(TcpKvSource(client, layout, timeout=300.0))
        rows = await time_pulls(source, ready, layout, device, reps, "cuda_ipc gpu->gpu")
        if source.ipc_fetches == 0:
            for row in rows:
                row["error"] = "every fetch fell back to host/TCP"
        source.unmap()  # before the child frees its caches
        gc.collect()
        torch.cuda.synchronize()
        return rows
    finally:
        await client.close()


def transfer_part(args: argparse.Namespace) -> dict:
    geometry = GEOMETRIES[args.geometry]
    layout = geometry.layout()
    per_token = layout.block_bytes // BLOCK
    print(
        f"\nKV transfer: {args.geometry} geometry ({geometry.layers} layers, {geometry.kv_heads}"
        f" KV heads, head_dim {geometry.head_dim}, {geometry.dtype}: {per_token // 1024} KiB per"
        f" token), p50 of {args.reps} repetitions",
        flush=True,
    )
    rows = []
    with ExportChild(args.geometry, args.sizes, "cpu", args.seed) as ready:
        rows += asyncio.run(pull_over_tcp(ready, layout, "cpu", args.reps, "tcp cpu->cpu"))
    notes = []
    if torch.cuda.is_available():
        gpu = f"cuda:{torch.cuda.device_count() - 1}"  # another GPU than the child's, if any
        with ExportChild(args.geometry, args.sizes, "cuda:0", args.seed) as ready:
            rows += asyncio.run(pull_over_tcp(ready, layout, gpu, args.reps, "tcp gpu->gpu"))
            rows += asyncio.run(pull_over_ipc(ready, layout, gpu, args.reps))
        notes.append(f"child caches on cuda:0 ({torch.cuda.get_device_name(0)}), parent on {gpu}")
    else:
        notes.append("no CUDA here: the GPU rows (host/TCP from GPU caches, CUDA IPC) skipped")
    for note in notes:
        print(f"  note: {note}")
    transfer_table(rows)
    return {"geometry": args.geometry, "bytes_per_token": per_token, "rows": rows, "notes": notes}


def transfer_table(rows: list[dict]) -> None:
    print(
        f"\n{'method':>18} {'tokens':>7} {'MiB':>6} {'pull p50 ms':>12} {'pull GB/s':>10}"
        f" {'pull+copy p50 ms':>17} {'pull+copy GB/s':>15}"
    )
    for r in rows:
        head = f"{r['method']:>18} {r['tokens']:>7} {r['bytes'] / 2**20:>6.0f}"
        if "error" in r:
            print(f"{head}  FAILED: {r['error']}")
            continue
        pull = f"{r['pull_p50_ms']:>12.1f} {r['pull_gbps']:>10.2f}" if "pull_gbps" in r else ""
        print(f"{head} {pull:>23} {r['copy_p50_ms']:>17.1f} {r['copy_gbps']:>15.2f}")


# -- goodput: aggregated vs disaggregated mock workers ------------------------------------


def write_mock_model(path: Path, geometry: Geometry, max_len: int) -> Path:
    """A config.json of a Llama with `geometry`'s KV shape (no weights: the mock needs none)."""
    path.mkdir(parents=True, exist_ok=True)
    heads = 32
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": heads * geometry.head_dim,
        "intermediate_size": 14336,
        "num_hidden_layers": geometry.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": geometry.kv_heads,
        "head_dim": geometry.head_dim,
        "vocab_size": VOCAB,
        "max_position_embeddings": max_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": geometry.dtype,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


class Fleet:
    """Two mock workers, each with its own engine and TCP request server, and the frontend's
    RemoteEngine over them: `aggregated` (two aggregated workers, KV-aware routing) or
    `disaggregated` (one prefill and one decode worker; every request is prefilled on the
    prefill worker and its KV pulled over TCP by the decode worker)."""

    def __init__(self, model: Path, mode: str, args: argparse.Namespace) -> None:
        # Imported here: tandem.frontend pulls in FastAPI, which the transfer part and its
        # child process do without (a GPU box may run that part alone).
        from tandem.deploy import LocalCluster
        from tandem.frontend.disagg import DisaggConfig

        roles = ["aggregated"] * 2 if mode == "aggregated" else ["prefill", "decode"]
        self.engines = [self._engine(model, args) for _ in roles]
        planner = DisaggConfig(max_local_prefill_length=0, max_prefill_queue_tokens=1 << 60)
        if args.local_prefill:
            planner = DisaggConfig()
        self.cluster = LocalCluster(self.engines, roles, served="mock", transport="tcp",
                                    lease_ttl=10.0, publish_interval=0.05 / args.mock_speedup,
                                    policy="kv", disagg=planner)  # fmt: skip
        self.remote = self.cluster.remote

    @staticmethod
    def _engine(model: Path, args: argparse.Namespace) -> AsyncEngine:
        return AsyncEngine(
            EngineConfig(
                model=str(model),
                engine="mock",
                dtype="bfloat16",  # "auto" would pick float32 on most CPUs: twice the bytes
                num_gpu_blocks=args.blocks,
                max_num_seqs=args.max_num_seqs,
                block_size=BLOCK,
                mock_speedup=args.mock_speedup,
                mock_transfer_gbps=args.transfer_gbps,
            )
        )

    async def __aenter__(self) -> Fleet:
        await self.cluster.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cluster.stop(grace=1.0)
        for engine in self.engines:
            engine.shutdown()

    def counters(self) -> dict:
        stats = [e.stats() for e in self.engines]
        return {
            "paths": dict(self.remote.planner.counts),
            "kv_imports": sum(s.kv_imports for s in stats),
            "kv_import_fallbacks": sum(s.kv_import_fallbacks for s in stats),
            "kv_exports_expired": sum(s.kv_exports_expired for s in stats),
            "busy_s": sum(e.core.runner.busy_s for e in self.engines),
        }


class Workload(NamedTuple):
    name: str
    input_len: str
    output_len: str
    rates: list[float]  # requests/s in model time


async def run_point(
    model: Path, mode: str, workload: Workload, rate: float, args: argparse.Namespace
) -> dict:
    """One fresh fleet, `--requests` Poisson arrivals at `rate` (model time)."""
    load = SyntheticWorkload(
        LengthDist.parse(workload.input_len),
        LengthDist.parse(workload.output_len),
        TokenSpace.for_vocab(VOCAB),
        seed=args.seed,
    )
    # The same seeds in both modes: the same prompts arrive at the same moments.
    arrival = Arrival("poisson", rate=rate * args.mock_speedup, seed=args.seed)
    bounds = Bounds(duration_s=args.max_seconds, num_requests=args.requests)
    async with Fleet(model, mode, args) as fleet:
        before = fleet.counters()
        result = await run_load(load, engine_sender(fleet.remote.generate), arrival, bounds)
        after = fleet.counters()
    row = {"workload": workload.name, "mode": mode, "rate": rate}
    row.update(measured(result, args))
    row["busy_fraction"] = (after["busy_s"] - before["busy_s"]) / (result.elapsed_s * 2)
    row["paths"] = {k: v - before["paths"].get(k, 0) for k, v in after["paths"].items()}
    for key in ("kv_imports", "kv_import_fallbacks", "kv_exports_expired"):
        row[key] = after[key] - before[key]
    row["goodput"] = rate * row["good_fraction"]
    return row


def measured(result: RunResult, args: argparse.Namespace) -> dict:
    """Latencies (ms) and rates (per s) of a run, in model time, and who met the SLOs.

    The good fraction counts every request sent (cancelled at the time bound: missed); goodput
    is the offered rate times it. Good requests over the run's wall time (also kept) would
    mostly measure how long the last requests took to drain, in runs this short."""
    speed = args.mock_speedup
    slo = Slo(
        ttft_s=args.ttft_slo_ms / 1e3 / speed,
        itl_s=args.itl_slo_ms / 1e3 / speed,
        itl_stat=args.itl_slo_stat,
    )
    records = result.records
    summary = summarize(records, result.elapsed_s, slo)
    good, _ = goodput(records, slo, result.elapsed_s)
    ok = [r for r in records if r.ok and r.ttft_s is not None]
    itls = [itl_stat(r, slo.itl_stat) for r in ok]

    def ms(stats: dict, key: str) -> float:
        return stats.get(key, math.nan) * speed

    return {
        "completed": summary["requests"]["completed"],
        "failed": summary["requests"]["failed"],
        "cancelled": summary["requests"]["cancelled"],
        "errors": summary["requests"]["errors"],
        "first_error": next((r.error_detail for r in records if r.error), None),
        "elapsed_s": result.elapsed_s * speed,
        "ttft_p50_ms": ms(summary["ttft_ms"], "p50"),
        "ttft_p99_ms": ms(summary["ttft_ms"], "p99"),
        "itl_p50_ms": ms(summary["itl_ms"], "p50"),
        "itl_p99_ms": ms(summary["itl_ms"], "p99"),
        "tpot_p50_ms": ms(summary["tpot_ms"], "p50"),
        "request_throughput": summary["request_throughput"] / speed,
        "output_tok_s": summary["output_token_throughput"] / speed,
        "good_fraction": good / len(records),
        "goodput_over_wall": summary["goodput"]["requests_per_s"] / speed,
        "missed_ttft": sum(r.ttft_s > slo.ttft_s for r in ok),
        "missed_itl": sum(x is not None and x > slo.itl_s for x in itls),
    }


def workloads(args: argparse.Namespace) -> list[Workload]:
    return [
        Workload("long", args.long_input, args.long_output, args.long_rates),
        Workload("chat", args.chat_input, args.chat_output, args.chat_rates),
    ]


async def goodput_async(args: argparse.Namespace, model: Path) -> list[dict]:
    rows = []
    for workload in workloads(args):
        if workload.name not in args.workloads:
            continue
        for rate in workload.rates:
            for mode in ("aggregated", "disaggregated"):
                row = await run_point(model, mode, workload, rate, args)
                rows.append(row)
                print(
                    f"  {workload.name} {rate:g} req/s {mode}: {row['completed']} done,"
                    f" goodput {row['goodput']:.2f} req/s",
                    flush=True,
                )
    return rows


def goodput_part(args: argparse.Namespace) -> dict:
    geometry = GEOMETRIES[args.mock_geometry]
    print(
        f"\nGoodput: 2 aggregated vs 1 prefill + 1 decode mock workers, {args.mock_geometry}"
        f" KV geometry ({geometry.layout().block_bytes // BLOCK // 1024} KiB/token), transfer"
        f" link {args.transfer_gbps:g} GB/s, {args.blocks} KV blocks per worker,"
        f" mock speedup {args.mock_speedup:g}, {args.requests} requests per point;"
        f" SLOs: TTFT <= {args.ttft_slo_ms:g} ms, ITL {args.itl_slo_stat} <="
        f" {args.itl_slo_ms:g} ms",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = write_mock_model(Path(tmp) / "mock", geometry, args.max_model_len)
        rows = asyncio.run(goodput_async(args, model))
    verdicts = []
    for workload in workloads(args):
        mine = [r for r in rows if r["workload"] == workload.name]
        if mine:
            goodput_table(workload, mine)
            verdicts.append(verdict(workload, mine))
            print(verdicts[-1])
    return {"rows": rows, "verdicts": verdicts}


def pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(aggregated, disaggregated) rows of each rate."""
    by = {(r["rate"], r["mode"]): r for r in rows}
    rates = sorted({r["rate"] for r in rows})
    return [(by[(x, "aggregated")], by[(x, "disaggregated")]) for x in rates]


def ratio(a: float, b: float) -> float:
    return b / a if a > 0 else (math.inf if b > 0 else math.nan)


def goodput_table(workload: Workload, rows: list[dict]) -> None:
    print(
        f"\n{workload.name}: prompts {workload.input_len} tokens, answers {workload.output_len}"
        " tokens (latencies and rates in model time)"
    )
    print(
        f"{'req/s':>5} {'mode':>13} {'done':>5} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8}"
        f" {'ITL p99':>8} {'TPOT p50':>8} {'out tok/s':>9} {'busy':>5} {'SLO met':>7}"
        f" {'goodput':>8} {'disagg/agg':>10}"
    )
    for agg, dis in pairs(rows):
        for r in (agg, dis):
            last = f"{ratio(agg['goodput'], dis['goodput']):>9.2f}x" if r is dis else ""
            print(
                f"{r['rate']:>5g} {r['mode']:>13} {r['completed']:>5} {r['ttft_p50_ms']:>9.0f}"
                f" {r['ttft_p99_ms']:>9.0f} {r['itl_p50_ms']:>8.1f} {r['itl_p99_ms']:>8.1f}"
                f" {r['tpot_p50_ms']:>8.1f} {r['output_tok_s']:>9.0f} {r['busy_fraction']:>5.0%}"
                f" {r['good_fraction']:>7.0%} {r['goodput']:>8.2f} {last:>10}"
            )


def verdict(workload: Workload, rows: list[dict]) -> str:
    """Where disaggregation wins and where it loses, from the measured goodputs (a 5% band
    counts as a tie), with the SLO misses of the side that lost each point."""
    wins, losses, ties = [], [], []
    for agg, dis in pairs(rows):
        r = ratio(agg["goodput"], dis["goodput"])
        if r > 1.05:
            wins.append(f"{agg['rate']:g} req/s ({r:.2f}x: aggregated {misses(agg)})")
        elif r < 1 / 1.05:
            losses.append(f"{agg['rate']:g} req/s ({r:.2f}x: disaggregated {misses(dis)})")
        else:
            ties.append(f"{agg['rate']:g}")
    text = (
        f"{workload.name}: disaggregation wins at {', '.join(wins) or 'no rate'};"
        f" loses at {', '.join(losses) or 'no rate'}"
    )
    return text + (f"; ties (within 5%) at {', '.join(ties)} req/s" if ties else "")


def misses(row: dict) -> str:
    failed = row["failed"] + row["cancelled"]
    text = f"missed TTFT {row['missed_ttft']}x, ITL {row['missed_itl']}x"
    return text + (f", {failed} failed" if failed else "")


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--parts", nargs="+", choices=["transfer", "goodput"], default=["transfer", "goodput"]
    )
    p.add_argument("--output", type=Path, default=Path("results/disagg.json"))
    p.add_argument("--seed", type=int, default=0)
    t = p.add_argument_group("transfer")
    t.add_argument("--geometry", choices=sorted(GEOMETRIES), default="llama-3.2-1b")
    t.add_argument(
        "--sizes", type=int, nargs="+", default=[1024, 8192, 32768], help="prompt tokens"
    )
    t.add_argument("--reps", type=int, default=5, help="timed repetitions per size")
    t.add_argument("--serve-exports", action="store_true", help=argparse.SUPPRESS)
    t.add_argument("--device", default="cpu", help=argparse.SUPPRESS)  # the child's caches
    g = p.add_argument_group("goodput")
    g.add_argument("--workloads", nargs="+", choices=["long", "chat"], default=["long", "chat"])
    g.add_argument("--long-input", default="8000")
    g.add_argument("--long-output", default="50")
    g.add_argument("--long-rates", type=float, nargs="+", default=[2.0, 3.5, 5.0, 6.0])
    g.add_argument("--chat-input", default="uniform:500:2500")
    g.add_argument("--chat-output", default="uniform:100:300")
    g.add_argument("--chat-rates", type=float, nargs="+", default=[8.0, 16.0, 24.0, 32.0])
    g.add_argument("--requests", type=int, default=100, help="requests per (workload, rate, mode)")
    g.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    g.add_argument("--itl-slo-ms", type=float, default=20.0, help="on each request's ITL stat")
    g.add_argument(
        "--itl-slo-stat",
        choices=ITL_STATS,
        default="mean",
        help="which of a request's ITLs the SLO checks (mean: TPOT, as DistServe)",
    )
    g.add_argument("--mock-speedup", type=float, default=2.0)
    g.add_argument("--mock-geometry", choices=sorted(GEOMETRIES), default="llama-3.1-8b")
    g.add_argument("--transfer-gbps", type=float, default=25.0)
    g.add_argument(
        "--blocks",
        type=int,
        default=24576,
        help="KV blocks (16 tokens) per worker; 24576 at 8B geometry: 48 GiB, what an 80 GB GPU"
        " holds beside the weights",
    )
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-model-len", type=int, default=32768)
    g.add_argument(
        "--local-prefill",
        action="store_true",
        help="tandem's default planner (short prompts and a saturated prefill pool are"
        " prefilled on the decode worker) instead of every request through the prefill worker",
    )
    g.add_argument("--max-seconds", type=float, default=240.0, help="wall bound of each point")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.serve_exports:
        asyncio.run(serve_exports(args))
        return
    started = time.perf_counter()
    result: dict = {"args": vars(args)}
    if "transfer" in args.parts:
        result["transfer"] = transfer_part(args)
    if "goodput" in args.parts:
        result["goodput"] = goodput_part(args)
    result["runtime_s"] = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str))
    print(f"\ntotal {result['runtime_s']:.0f} s; wrote {args.output}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
