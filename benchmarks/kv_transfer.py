"""Disaggregated serving: what moving the KV cache costs.

One request's KV cache (1k / 8k / 32k-token prompts) moved between two processes of this
machine, the way a decode worker pulls it from a prefill worker. A child process (this
script with `--serve-exports`; only plain arguments go in, one JSON line comes out) holds K
and V caches of a real model's geometry (`--geometry`, default Llama-3.2-1B: 32 KiB per
token, 1 GiB at 32k tokens), serves `kv_pull` / `kv_touch` through `KvExportServer` on a
`TcpRequestServer` and, where NIXL is installed, registers its caches with a NIXL agent. The
parent pulls into the blocks of its own cache with the decode worker's sources: host/TCP
(`TcpKvSource`), NIXL (`NixlKvSource`: READs straight into the cache) and, with CUDA, CUDA
IPC (the child shares its GPU caches; the parent maps them and copies device to device, on
the last visible GPU, so across GPUs where there are several), host/TCP and NIXL (where its
UCX takes GPU memory) between GPU caches. Reported: p50 latency and GB/s (1 GB = 1e9 bytes)
from the start of the pull until the blocks are in the parent's cache, after one untimed
warm-up. Every size is verified first: the child prints an XXH3 checksum of each export's
bytes and the parent checks its cache against it; a size that fails gets an error instead of
figures.

Blocks sit at random places in both caches by default (`--blocks scattered`), as in a cache
that has served a while: each block of each layer is then a descriptor of its own for NIXL
(16 KiB at the default geometry). `--blocks contiguous` places them in one run on both sides,
which NIXL moves as one descriptor per layer.

What splitting prefill from decode buys is measured by benchmarks/disagg_goodput.py, which
takes the geometries from here.

Timings are printed and written to `--output` (default results/kv_transfer.json); nothing is
asserted.

    python benchmarks/kv_transfer.py                     # ~30 s on 2 cores
    python benchmarks/kv_transfer.py --geometry llama-3.1-8b --reps 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import torch
import xxhash

from tandem.bench.stats import percentile
from tandem.protocol import KvLayout, KvTransferParams
from tandem.protocol.transfer import CudaIpcCache, NixlCache
from tandem.runtime import TcpRequestClient, TcpRequestServer, event_loop
from tandem.transfer.blocks import DTYPES
from tandem.transfer.nixl import NixlAgent, NixlKvSource, nixl_api
from tandem.transfer.tcp import KvExportServer, TcpKvSource

BLOCK = 16
GB = 1e9
READY = "ready: "


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


def placement(how: str, total: int, n: int, seed: int) -> list[int]:
    """`n` block ids of a cache of `total`: at random places, or one run."""
    if how == "contiguous":
        return list(range(1 + seed % (total - n), 1 + seed % (total - n) + n))
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()[:n]


# -- the exporting process (child) -----------------------------------------------------------


class Ready(msgspec.Struct):
    """The child's one line on stdout: where to pull, what, and what the bytes must hash to."""

    address: str
    exports: dict[str, list[int]]  # request id -> block ids, in sequence order
    checksums: dict[str, list[str]]  # request id -> [XXH3 of K, XXH3 of V] of those blocks
    cuda_ipc: CudaIpcCache | None = None
    nixl: NixlCache | None = None


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
    exports = {f"kv-{n}": placement(args.blocks[0], total, blocks_for(n), args.seed)
               for n in args.sizes}  # fmt: skip
    sums = {rid: export_checksums(k, v, ids) for rid, ids in exports.items()}
    server = TcpRequestServer()
    KvExportServer(Exporter(k, v, layout, exports)).add_endpoints(server)
    await server.start()
    ipc = agent = None
    if k.is_cuda:
        from tandem.transfer.cuda_ipc import share_cache

        ipc = share_cache(k, v)
    if nixl_api() is not None:
        try:
            agent = NixlAgent(k, v, layout)
        except Exception as exc:  # a UCX without this memory type: the parent notes it
            print(f"NIXL cannot register these caches: {type(exc).__name__}: {exc}",
                  file=sys.stderr)  # fmt: skip
    ready = Ready(address=server.address, exports=exports, checksums=sums, cuda_ipc=ipc,
                  nixl=agent.cache if agent is not None else None)  # fmt: skip
    sys.stdout.write(READY + msgspec.json.encode(ready).decode() + "\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop()
    if k.is_cuda:
        torch.cuda.synchronize()


# -- the pulling process (parent) -----------------------------------------------------------


class ExportChild:
    """This script run with `--serve-exports` in a fresh interpreter: only plain arguments go
    in, only the `Ready` line comes out (no tensor crosses by pickle)."""

    def __init__(
        self, geometry: str, sizes: list[int], device: str, seed: int, blocks: str
    ) -> None:
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
            "--blocks",
            blocks,
            "--sizes",
            *map(str, sizes),
        ]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Ready:
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        while (line := self.proc.stdout.readline()) and not line.startswith(READY):
            print(f"  child: {line.rstrip()}")  # NIXL logs to stdout
        if not line:
            self.proc.wait(timeout=30)
            raise RuntimeError(f"the export process exited ({self.proc.returncode}) before serving")
        return msgspec.json.decode(line[len(READY) :], type=Ready)

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
        nixl=ready.nixl,
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
    source: Any, ready: Ready, caches: tuple, layout: KvLayout, args: argparse.Namespace, label: str
) -> list[dict]:
    """Per export size: `reps` pulls into `caches` (plus one untimed warm-up); verified against
    the child's checksums before anything is timed."""
    k_cache, v_cache = caches
    device = str(k_cache.device)
    rows = []
    for rid, ids in ready.exports.items():
        params = params_for(ready, rid, layout)
        indices = list(range(len(ids)))
        dst = placement(args.blocks, k_cache.shape[1], len(ids), args.seed + 1)
        row = {"method": label, "tokens": int(rid.split("-")[1]), "blocks": len(ids)}
        row["bytes"] = len(ids) * layout.block_bytes
        total_s = []
        try:
            for rep in range(args.reps + 1):
                sync(device)
                t0 = time.perf_counter()
                payload = await source.fetch(params, indices, dst)
                if payload is not None:  # CUDA IPC: a view of the child's cache
                    payload.write_into(k_cache, v_cache, dst)
                sync(device)
                total_s.append(time.perf_counter() - t0)
                if rep == 0:
                    verify(ready.checksums[rid], k_cache, v_cache, dst)
                    total_s.clear()
                del payload
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            print(f"  {label} {row['tokens']} tokens: FAILED: {row['error']}", flush=True)
            rows.append(row)
            continue
        row.update(timing(total_s, row["bytes"], "copy"))
        row["verified"] = True
        rows.append(row)
        print(f"  {label} {row['tokens']} tokens: {row['copy_gbps']:.2f} GB/s", flush=True)
    return rows


def verify(want: list[str], k_cache, v_cache, dst: list[int]) -> None:
    """The blocks in the cache hash to what the child holds; anything else is a broken
    transfer."""
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


async def pull_with(kind: str, ready: Ready, layout: KvLayout, device: str, args) -> list[dict]:
    """Pulls through the decode worker's `kind` source ("tcp", "nixl" or "cuda_ipc") into a
    cache of this process on `device`."""
    caches = local_cache(ready, layout, device)
    client = TcpRequestClient()
    try:
        source: Any = TcpKvSource(client, layout, lambda: caches, timeout=300.0)
        if kind == "nixl":
            source = NixlKvSource(NixlAgent(*caches, layout), source)
        elif kind == "cuda_ipc":
            from tandem.transfer.cuda_ipc import CudaIpcKvSource

            source = CudaIpcKvSource(source)
        where = "gpu->gpu" if device.startswith("cuda") else "cpu->cpu"
        rows = await time_pulls(source, ready, caches, layout, args, f"{kind} {where}")
        moved = {"nixl": "nixl_fetches", "cuda_ipc": "ipc_fetches"}.get(kind)
        if moved is not None and getattr(source, moved) == 0:
            for row in rows:
                row["error"] = "every fetch fell back to host/TCP"
        if kind == "cuda_ipc":
            source.unmap()  # before the child frees its caches
            gc.collect()
            torch.cuda.synchronize()
        return rows
    finally:
        await client.close()


def local_device_of(ready: Ready) -> int | None:
    from tandem.transfer.cuda_ipc import local_device

    return local_device(ready.cuda_ipc) if ready.cuda_ipc is not None else None


def placement_pass(args: argparse.Namespace, notes: list[str]) -> list[dict]:
    """Every transport at every size with the blocks placed `args.blocks` in both caches."""
    layout = GEOMETRIES[args.geometry].layout()
    rows = []
    with ExportChild(args.geometry, args.sizes, "cpu", args.seed, args.blocks) as ready:
        rows += event_loop.run(pull_with("tcp", ready, layout, "cpu", args))
        if ready.nixl is not None:
            rows += event_loop.run(pull_with("nixl", ready, layout, "cpu", args))
        elif nixl_api() is not None:
            notes.append("NIXL could not register host memory here: no nixl rows")
        else:
            notes.append("NIXL is not installed here (pip install -e '.[nixl]'): no nixl rows")
    if torch.cuda.is_available():
        gpu = f"cuda:{torch.cuda.device_count() - 1}"  # another GPU than the child's, if any
        with ExportChild(args.geometry, args.sizes, "cuda:0", args.seed, args.blocks) as ready:
            rows += event_loop.run(pull_with("tcp", ready, layout, gpu, args))
            if local_device_of(ready) is None:
                notes.append("cuda_ipc: the child's GPU is not visible here as the same node")
            else:
                rows += event_loop.run(pull_with("cuda_ipc", ready, layout, gpu, args))
            if ready.nixl is not None:
                rows += event_loop.run(pull_with("nixl", ready, layout, gpu, args))
            elif nixl_api() is not None:
                notes.append("NIXL could not register GPU memory here: no GPU nixl rows")
        notes.append(f"child caches on cuda:0 ({torch.cuda.get_device_name(0)}), parent on {gpu}")
    else:
        notes.append("no CUDA here: the GPU rows (host/TCP from GPU caches, CUDA IPC) skipped")
    for row in rows:
        row["placement"] = args.blocks
    return rows


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
    rows, notes = [], []
    for blocks in args.blocks:
        rows += placement_pass(argparse.Namespace(**{**vars(args), "blocks": blocks}), notes)
    notes = list(dict.fromkeys(notes))  # each pass notes the same things
    for note in notes:
        print(f"  note: {note}")
    transfer_table(rows)
    return {"geometry": args.geometry, "bytes_per_token": per_token, "rows": rows, "notes": notes}


def transfer_table(rows: list[dict]) -> None:
    print(f"\n{'blocks':>10} {'method':>18} {'tokens':>7} {'MiB':>6} {'p50 ms':>8} {'GB/s':>7}"
          f" {'x tcp':>6}")  # fmt: skip
    tcp = {(r["placement"], r["tokens"], r["method"].split()[1]): r.get("copy_gbps")
           for r in rows if r["method"].startswith("tcp ")}  # fmt: skip
    for r in rows:
        head = f"{r['placement']:>10} {r['method']:>18} {r['tokens']:>7} {r['bytes'] / 2**20:>6.0f}"
        if "error" in r:
            print(f"{head}  FAILED: {r['error']}")
            continue
        base = tcp.get((r["placement"], r["tokens"], r["method"].split()[1]))
        r["vs_tcp"] = r["copy_gbps"] / base if base else None
        ratio = f"{r['vs_tcp']:>5.2f}x" if r["vs_tcp"] else ""
        print(f"{head} {r['copy_p50_ms']:>8.1f} {r['copy_gbps']:>7.2f} {ratio:>6}")


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("results/kv_transfer.json"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="llama-3.2-1b")
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[1024, 8192, 32768], help="prompt tokens"
    )
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per size")
    p.add_argument(
        "--blocks",
        choices=("scattered", "contiguous"),
        nargs="+",
        default=["scattered", "contiguous"],
        help="where an export's blocks sit in both caches; each placement is a pass"
        " (%(default)s)",
    )
    p.add_argument("--serve-exports", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)  # the child's caches
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.serve_exports:
        event_loop.run(serve_exports(args))
        return
    started = time.perf_counter()
    result: dict = {"args": vars(args), "transfer": transfer_part(args)}
    result["runtime_s"] = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str))
    print(f"\ntotal {result['runtime_s']:.0f} s; wrote {args.output}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
