"""The CPU cost of our serving path per streamed token, per process, with a mock engine.

`tandem serve MODEL --engine mock` runs the real HTTP frontend (parsing, tokenizing, chat
template, routing, detokenisation, SSE), request plane, async engine loop, scheduler and
block manager, but no model. By default every step is modelled at 0 ms (a 0 ms profile: the
engine thread never sleeps, and all time spent is our own Python); `--mock-speedup X` uses
the mock's default (realistic) step-time model divided by X instead. `--workers N` runs the
distributed layout: a frontend process and N `tandem worker` processes over a local NATS.
`tandem.bench` (in this process) drives it with closed-loop concurrency over the levels,
streaming chat by default, 512 tokens in and 64 out (EOS ignored).

Per level: rates, TTFT / ITL / E2E, `ref` (ms of a fixed Python loop around the level: a
shared machine's speed varies, so compare figures taken at similar `ref`), and CPU time
(user + system, from /proc via psutil) per streamed token of each kind of thread and
process. Every server process loads a sitecustomize (SHIM) that names Python threads in
/proc, so that:
- `front`: the frontend's event loop thread and any unnamed thread (embedded: the serve
  process, where the worker's asyncio side shares that loop; else the frontend process);
- `tok`: the frontend's tokenizer pool (tokenizing, chat template);
- `engine`: the engine step loop threads (scheduler, block manager, mock runner, outputs),
  summed over workers; `wloop`: the rest of the worker processes (their event loop: request
  plane, NATS publishing); `nats`: nats-server; `sup`: the supervisor (the serve process of
  `--workers`); `server`: all of them; `client`: this process.
The JSON also sums them per process kind (`per_process`: frontend, workers).

Spread of token arrivals within a request (a burst is the defect of issue 14). `burst` is,
per request, the largest share of its output tokens that reached the client in one socket
read (chunks read together share their arrival time): 1/64 when each of 64 tokens arrives
on its own, 1.0 when the whole answer comes at once. It does not depend on how long the
request queued before its first token, which `span` does: (last token − first token) / E2E,
~1 when tokens stream over the request's life, ~0 for a burst or for a fast decode after a
long TTFT. The table shows medians over requests; the JSON also has p10/p90, `tail10` (share
of tokens in the last 10 % of E2E) and `last1ms` (share within 1 ms of the last token).
Tokens per chunk come from the server where it says, else they are spread as the bench
spreads ITL (the first chunk holds one token).

Before the server starts, the mock EngineCore is timed directly: host time of one decode
step at each `--step-batch` size (contexts of `--input-len` tokens, 0 ms modelled, so it is
all scheduler, block manager and output building), alone and with the stats and KV-event
collection AsyncEngine adds to every step.

The frontend's adaptive in-flight limit is switched off by SHIM (`--latency-limit` keeps
it): at near-zero step times TTFT grows with CPU load, the limit shrinks and refuses requests
with 503, and a level would no longer run at its concurrency.

    python benchmarks/serving_overhead.py [--model DIR] [--concurrency 1 32 128]
        [--api chat|completions] [--input-len 512] [--output-len 64] [--requests N]
        [--workers N] [--step-ms 0 | --mock-speedup X] [--step-batch 64 256]
        [--latency-limit] [--connection-close] [--output FILE]

MODEL needs only config.json and tokenizer files (default: the demo model, else a tiny random
one). The client keeps connections alive; `--connection-close` opens one per request.
Results go to results/serving_overhead.json. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import urllib.request
from pathlib import Path

import psutil

from tandem.bench.client import API_CHAT, ClientConfig, StreamClient, probe_server
from tandem.bench.records import RequestRecord
from tandem.bench.runner import Arrival, Bounds, run_load
from tandem.bench.stats import Slo, percentile, summarize
from tandem.bench.tokens import TokenSpace
from tandem.bench.workloads import LengthDist, SyntheticWorkload
from tandem.deploy.processes import free_port

KINDS = ("front", "tok", "engine", "wloop", "nats", "sup")


def cpu_reference_ms() -> float:
    """ms for 10 x sum(range(10**5)) on this machine now (best of 5): its speed varies."""
    return min(timeit.repeat("sum(range(100000))", number=10, repeat=5)) * 1e3


def model_folder(arg: str | None, tmp: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), Path(arg).name
    from tandem.engine.model_source import ModelSourceError, resolve_model

    try:
        return resolve_model(None, need_weights=False), "SmolLM2-135M-Instruct (demo)"
    except ModelSourceError as exc:
        from tandem.engine.testing import make_tiny_model

        print(f"demo model unavailable ({exc}); using a tiny random model", file=sys.stderr)
        return make_tiny_model(tmp / "tiny", "llama"), "tiny llama (random)"


#: The mock server's KV blocks (of 16 tokens) per worker.
NUM_GPU_BLOCKS = 16384


def zero_profile(tmp: Path, step_ms: float) -> Path:
    profile = tmp / "profile.json"
    profile.write_text(json.dumps({"prefill": [[1, step_ms]], "decode": [[1, 1, step_ms]]}))
    return profile


#: sitecustomize of the server's processes: each Python thread gives the OS its name (so
#: /proc tells the engine and tokenizer threads apart); without --latency-limit, once the
#: frontend imports its admission module, the adaptive limit stops adapting (it keeps its
#: initial 256 sequences in flight).
SHIM = """import ctypes, importlib.abc, importlib.util, os, sys, threading
_run = threading.Thread._bootstrap_inner
def _named(self):
    try:
        ctypes.CDLL(None).prctl(15, self.name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (AttributeError, OSError):
        pass
    _run(self)
threading.Thread._bootstrap_inner = _named
class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "tandem.frontend.admission":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.LatencyLimit.observe = lambda self, ttft_s: None
        spec.loader.exec_module = exec_module
        return spec
if os.environ.get("TANDEM_BENCH_NO_LATENCY_LIMIT"):
    sys.meta_path.insert(0, _Hook())
"""


def start_server(model: Path, args: argparse.Namespace, profile_dir: Path, profile: Path | None):
    port = free_port()
    cmd = [sys.executable, "-m", "tandem.cli.main", "serve", str(model), "--engine", "mock",
           "--port", str(port), "--num-gpu-blocks", str(NUM_GPU_BLOCKS), "--log-level", "warning",
           "--max-num-seqs", str(max(256, *args.concurrency)),
           "--max-waiting", str(max(256, 2 * max(args.concurrency)))]  # fmt: skip
    if profile is not None:
        cmd += ["--perf-model", str(profile)]
    if args.mock_speedup is not None:
        cmd += ["--mock-speedup", str(args.mock_speedup)]
    if args.workers > 1:
        cmd += ["--workers", str(args.workers)]
    if args.api_server_count > 1:
        cmd += ["--api-server-count", str(args.api_server_count)]
    env = dict(os.environ)
    (profile_dir / "shim").mkdir(exist_ok=True)
    (profile_dir / "shim" / "sitecustomize.py").write_text(SHIM)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(profile_dir / "shim"),
                                                      env.get("PYTHONPATH")]))  # fmt: skip
    if not args.latency_limit:
        env["TANDEM_BENCH_NO_LATENCY_LIMIT"] = "1"
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("tandem serve --engine mock did not start") from None
            time.sleep(0.3)


def server_processes(serve_pid: int, workers: int) -> dict[str, list[psutil.Process]]:
    """The serve process and its children, by role (from their command lines)."""
    serve = psutil.Process(serve_pid)
    roles: dict[str, list[psutil.Process]] = {"serve": [serve], "frontend": [], "worker": [],
                                              "nats": []}  # fmt: skip
    for child in serve.children(recursive=True):
        cmdline = " ".join(child.cmdline())
        if "tandem.deploy.child worker" in cmdline:
            roles["worker"].append(child)
        elif "tandem.deploy.child frontend" in cmdline:
            roles["frontend"].append(child)
        elif "nats-server" in cmdline:
            roles["nats"].append(child)
    if workers > 1 and (len(roles["worker"]) != workers or not roles["frontend"]):
        raise SystemExit(f"expected {workers} workers and a frontend under {serve_pid}: {roles}")
    return roles


def _cpu(p: psutil.Process, kind: str, out: dict[str, float]) -> None:
    """Add the CPU seconds of `p` to `out`: its engine and tokenizer threads (by the names
    SHIM gives them) apart, the rest (exited threads included) as `kind`."""
    t = p.cpu_times()
    rest = t.user + t.system
    for th in p.threads():
        try:
            name = Path(f"/proc/{p.pid}/task/{th.id}/comm").read_text().strip()
        except OSError:
            continue  # exited: its time stays in the process total
        k = "engine" if name == "tandem-engine" else "tok" if name.startswith("tandem-tok") else ""
        if k:
            out[k] += th.user_time + th.system_time
            rest -= th.user_time + th.system_time
    out[kind] += rest


def cpu_by_kind(roles: dict[str, list[psutil.Process]], embedded: bool) -> dict[str, float]:
    out = dict.fromkeys(KINDS, 0.0)
    _cpu(roles["serve"][0], "front" if embedded else "sup", out)
    for role, kind in (("frontend", "front"), ("worker", "wloop"), ("nats", "nats")):
        for p in roles[role]:
            _cpu(p, kind, out)
    return out


def token_weights(rec: RequestRecord) -> list[int]:
    """Tokens per output chunk: the server's counts, else spread as the client spreads ITL."""
    times = rec.chunk_times_s or []
    if rec.chunk_tokens is not None and len(rec.chunk_tokens) == len(times):
        return rec.chunk_tokens
    gaps = len(times) - 1
    if gaps < 1:
        return [max(rec.output_tokens, 1)] * len(times)
    rest = max(rec.output_tokens - 1, gaps)
    return [1] + [(i + 1) * rest // gaps - i * rest // gaps for i in range(gaps)]


def arrival_spread(records: list[RequestRecord]) -> dict:
    """burst, span, tail10 and last1ms per request (see the module docstring), summarised."""
    stats: dict[str, list[float]] = {"burst": [], "span": [], "tail10": [], "last1ms": []}
    for rec in records:
        times = rec.chunk_times_s
        if not rec.ok or not times or not rec.e2e_s:
            continue
        w = token_weights(rec)
        n, e2e = sum(w), rec.e2e_s
        reads: dict[float, int] = {}  # chunks read from the socket at once share their time
        for t, k in zip(times, w, strict=True):
            reads[t] = reads.get(t, 0) + k
        stats["burst"].append(max(reads.values()) / n)
        stats["span"].append((times[-1] - times[0]) / e2e)
        stats["tail10"].append(sum(k for t, k in zip(times, w, strict=True) if t >= 0.9 * e2e) / n)
        stats["last1ms"].append(
            sum(k for t, k in zip(times, w, strict=True) if times[-1] - t <= 1e-3) / n
        )
    out: dict = {
        name: {f"p{q}": percentile(sorted(xs), q) for q in (10, 50, 90)}
        for name, xs in stats.items()
    }
    out["chunks_per_request"] = (
        statistics.fmean(len(r.chunk_times_s or []) for r in records) if records else 0.0
    )
    return out


def run_level(url, model, space, roles, args, concurrency, requests, output_len, seed,
              duration_s=120.0) -> dict:  # fmt: skip
    workload = SyntheticWorkload(
        LengthDist.fixed(args.input_len), LengthDist.fixed(output_len), space, seed
    )
    arrival = Arrival("concurrency", concurrency)
    cfg = ClientConfig(url, model, api=args.api, max_connections=arrival.connections)

    async def go():
        async with StreamClient(cfg) as client:
            if args.connection_close:
                client._headers["Connection"] = "close"
            return await run_load(workload, client.send, arrival, Bounds(duration_s, requests))

    embedded = args.workers <= 1
    ref_ms = cpu_reference_ms()
    client0, server0 = time.process_time(), cpu_by_kind(roles, embedded)
    result = asyncio.run(go())
    client_cpu = time.process_time() - client0
    ref_ms = (ref_ms + cpu_reference_ms()) / 2
    server1 = cpu_by_kind(roles, embedded)
    cpu = {k: server1[k] - server0[k] for k in KINDS}
    cpu["server"] = sum(cpu.values())
    cpu["client"] = client_cpu
    fe = cpu["front"] + cpu["tok"]  # CPU us per token of each kind of process
    per_process = ({"frontend": fe + cpu["engine"]} if embedded else
                   {"frontend": fe, "workers": cpu["engine"] + cpu["wloop"]})  # fmt: skip
    s = summarize(result.records, result.elapsed_s, Slo())
    tokens = s["output_tokens"]
    keys = ("request_throughput", "output_token_throughput", "ttft_ms", "e2e_ms", "itl_ms")

    def per_token(d: dict[str, float]) -> dict[str, float | None]:
        return {k: v / tokens * 1e6 if tokens else None for k, v in d.items()}

    return {"concurrency": concurrency, "requests": s["requests"], "elapsed_s": result.elapsed_s,
            **{k: s[k] for k in keys}, "output_tokens": tokens, "cpu_s": cpu,
            "cpu_us_per_token": per_token(cpu), "per_process": per_token(per_process),
            "cores": {k: v / result.elapsed_s for k, v in cpu.items()}, "cpu_reference_ms": ref_ms,
            "arrival_spread": arrival_spread(result.records)}  # fmt: skip


def engine_step_host(model: Path, batch: int, context: int, steps: int, tmp: Path) -> dict:
    """Host time of one decode step of the mock EngineCore at `batch`, 0 ms modelled."""
    from tandem.engine.config import EngineConfig
    from tandem.engine.core import EngineCore
    from tandem.protocol import GenerateRequest, SamplingParams

    config = EngineConfig(model=str(model), engine="mock", perf_model=str(zero_profile(tmp, 0)),
                          num_gpu_blocks=16384, max_num_seqs=max(256, batch),
                          max_num_batched_tokens=max(2048, context))  # fmt: skip
    core = EngineCore(config)
    vocab = core.hf_config.vocab_size
    # Long enough that no sequence ends while the later prompts are still prefilling.
    max_tokens = core.max_model_len - context - 1
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = [100 + (i * 7919 + j * 31) % (vocab - 100) for j in range(context)]
        core.add_request(GenerateRequest(request_id=f"r{i}", prompt_token_ids=prompt,
                                         sampling=sampling))  # fmt: skip
    while core.scheduler.waiting or any(
        s.num_computed_tokens < s.num_prompt_tokens for s in core.running_sequences
    ):
        core.step()
    for _ in range(8):  # warm-up
        core.step()
    wall, cpu, loop, outputs = [], [], [], 0
    for _ in range(steps):
        w0, c0 = time.perf_counter(), time.thread_time()
        outputs += len(core.step())
        w1 = time.perf_counter()
        core.stats(), core.take_kv_events()  # what AsyncEngine's loop adds to every step
        loop.append(time.perf_counter() - w0)
        wall.append(w1 - w0)
        cpu.append(time.thread_time() - c0)
    return {"batch": batch, "context": context, "steps": steps, "outputs": outputs / steps,
            "wall_ms_p50": statistics.median(wall) * 1e3,
            "wall_ms_mean": statistics.fmean(wall) * 1e3,
            "loop_ms_p50": statistics.median(loop) * 1e3,
            "cpu_ms_mean": statistics.fmean(cpu) * 1e3}  # fmt: skip


HEAD = (
    f"{'conc':>4} {'done':>5} {'req/s':>6} {'tok/s':>6} {'TTFT':>6} {'ITL':>5} {'E2E':>6}"
    f" | {'front':>5} {'tok':>4} {'engine':>6} {'wloop':>5} {'nats':>4} {'sup':>4}"
    f" {'server':>6} {'client':>6} | {'burst':>5} {'span':>5} {'ref':>4}"
)
UNITS = (f"{'':>4} {'':>5} {'':>6} {'':>6} {'p50ms':>6} {'p50':>5} {'p50ms':>6}"
         f" | {'CPU us per streamed token':^51} | {'p50':>5} {'p50':>5} {'ms':>4}")  # fmt: skip


def modelled_decode_ms(args: argparse.Namespace, concurrency: int) -> float:
    """The default step model's pure decode step for one worker's share of the requests,
    halfway through their outputs: what ITL p50 should be when the serving path costs
    nothing (a quarter or so of steps also carry a prefill; they are above the median)."""
    from tandem.engine.mock.perf_model import PolynomialPerfModel

    batch = -(-concurrency // max(1, args.workers))
    context = batch * (args.input_len + args.output_len // 2)
    usage = context / (NUM_GPU_BLOCKS * 16)
    return PolynomialPerfModel().decode_ms(batch, context, usage) / args.mock_speedup


def print_row(r: dict) -> None:
    u, sp = r["cpu_us_per_token"], r["arrival_spread"]
    print(
        f"{r['concurrency']:>4} {r['requests']['completed']:>5} {r['request_throughput']:>6.1f}"
        f" {r['output_token_throughput']:>6.0f} {r['ttft_ms']['p50']:>6.1f}"
        f" {r['itl_ms']['p50']:>5.2f} {r['e2e_ms']['p50']:>6.1f} |"
        f" {u['front']:>5.0f} {u['tok']:>4.0f} {u['engine']:>6.0f} {u['wloop']:>5.0f}"
        f" {u['nats']:>4.0f} {u['sup']:>4.0f} {u['server']:>6.0f} {u['client']:>6.0f} |"
        f" {sp['burst']['p50']:>5.2f} {sp['span']['p50']:>5.2f} {r['cpu_reference_ms']:>4.1f}",
        flush=True,
    )


def main() -> None:
    # fmt: off
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF folder with config.json + tokenizer (default: demo)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--api", choices=["chat", "completions"], default=API_CHAT)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--requests", type=int,
                    help="requests per level (default: max(256, 10 x concurrency))")
    ap.add_argument("--workers", type=int, default=1, help="tandem serve --workers N (1: embedded)")
    ap.add_argument("--api-server-count", type=int, default=1,
                    help="tandem serve --api-server-count N (frontend processes; needs --workers)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--step-ms", type=float, default=None,
                      help="model every step at this many ms (default 0: no sleep at all)")
    mode.add_argument("--mock-speedup", type=float, default=None,
                      help="the mock's default step-time model divided by this instead")
    ap.add_argument("--step-batch", type=int, nargs="*", default=[64, 256],
                    help="decode batch sizes for the engine host-time measurement (none: skip)")
    ap.add_argument("--step-count", type=int, default=40, help="decode steps timed per batch")
    ap.add_argument("--latency-limit", action="store_true",
                    help="keep the frontend's adaptive in-flight limit (default: off)")
    ap.add_argument("--connection-close", action="store_true",
                    help="one connection per request instead of the client's keep-alive pool")
    ap.add_argument("--output", type=Path, default=Path("results/serving_overhead.json"))
    # fmt: on
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model, model_label = model_folder(args.model, tmp)
        steps = []
        for b in args.step_batch:
            steps.append(engine_step_host(model, b, args.input_len, args.step_count, tmp))
            st = steps[-1]
            print(
                f"mock EngineCore decode step, batch {b} ({st['outputs']:.0f} outputs)"
                f" x {args.input_len} ctx: {st['wall_ms_p50']:.2f} ms host p50"
                f" ({st['wall_ms_mean']:.2f} mean); + stats, KV events {st['loop_ms_p50']:.2f} ms",
                flush=True,
            )
        step_ms = args.step_ms if args.mock_speedup is None else None
        profile = zero_profile(tmp, step_ms or 0.0) if args.mock_speedup is None else None
        proc, url = start_server(model, args, tmp, profile)
        try:
            roles = server_processes(proc.pid, args.workers)
            info = asyncio.run(probe_server(url))
            space = TokenSpace.for_vocab(info.vocab_size or 32000)
            # Warm-up: one-off costs of a fresh server (imports, first requests).
            run_level(url, info.model, space, roles, args, 4, 16, 8, seed=10**6)
            steps_label = (f"{step_ms or 0:g} ms steps" if args.mock_speedup is None else
                           f"default step model / {args.mock_speedup:g}")  # fmt: skip
            layout = "embedded" if args.workers <= 1 else f"--workers {args.workers}"
            conn = "connection: close" if args.connection_close else "keep-alive"
            conn += "" if args.latency_limit else " · latency limit off"
            print(
                f"mock server, {layout}, {steps_label} · {args.api} · {conn} · {model_label}"
                f" · {args.input_len} tokens in, {args.output_len} out · {os.cpu_count()} CPUs"
            )
            print(HEAD)
            print(UNITS)
            rows = []
            for c in args.concurrency:
                n = args.requests or max(256, 10 * c)
                row = run_level(url, info.model, space, roles, args, c, n, args.output_len, c)
                rows.append(row)
                print_row(row)
                if args.mock_speedup is not None:
                    row["modelled_decode_ms"] = modelled_decode_ms(args, c)
                    ratio = row["itl_ms"]["p50"] / row["modelled_decode_ms"]
                    print(f"  ITL p50 = {ratio:.3f} x the modelled decode step"
                          f" ({row['modelled_decode_ms']:.2f} ms)")  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(),
               "python": platform.python_version()}  # fmt: skip
    out = {"benchmark": "serving_overhead", "model": model_label, "api": args.api,
           "input_len": args.input_len, "output_len": args.output_len, "workers": args.workers,
           "step_ms": step_ms, "mock_speedup": args.mock_speedup,
           "latency_limit": args.latency_limit, "connection_close": args.connection_close,
           "machine": machine, "engine_step_host": steps, "levels": rows}  # fmt: skip
    args.output.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
