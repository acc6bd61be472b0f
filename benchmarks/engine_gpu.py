"""The engine on one GPU against the GPU's own ceilings, with Hugging Face `generate` beside it.

One run measures, on random weights of the Llama-3.1-8B shape (bf16, no files needed: the
engine loads with `load_format="dummy"`, transformers builds the model `from_config`):

1. the GPU's ceilings: device-to-device copy bandwidth (a >= 4 GiB bf16 tensor, bytes read +
   written per second, best of several) and the bf16 matmul peak (8192^3, mean of 10);
2. Hugging Face `generate` (greedy, never stopping early) at batch 1 (128 in, 256 out) and
   batch 64 (128 in, 128 out), then frees it;
3. the engine (`EngineCore`, stepped directly; prefix caching off; random, distinct prompts),
   each workload warmed up once at full size, then timed `--repeats` times (medians):
   - 1 request, 128 in / 256 out: decode tok/s = (output tokens - 1) / (last token time -
     first token time), against the ceiling copy bandwidth / weight bytes;
   - 64 concurrent, 128 / 128: output tok/s = all output tokens / (last token time - submit
     time); and the mean wall time of a step() once all 64 decode;
   - 256 concurrent, 128 / 64: decode tok/s = tokens returned by the steps that start after
     every request has its first token / wall time from the start of the first such step to
     the end of the last (the decode phase: no prompt token is computed in it);
   - one 8192-token prompt: time to first token (submit to first output), against its matmul
     lower bound (2 x matmul parameters x tokens + causal attention FLOPs) / measured peak;
4. `tandem serve --load-format dummy` in a subprocess, driven by `tandem bench run` at
   concurrency 64 (128 / 128, EOS ignored, `--serve-rounds` rounds of requests): output tok/s
   against the engine-only figure at 64 concurrent.

It prints every figure with its target (the targets are for Llama-3.1-8B on one H200) and
writes all of it to `--output` (default results/engine_gpu.json).

    python benchmarks/engine_gpu.py                                 # on a GPU, ~5 minutes
    python benchmarks/engine_gpu.py --skip-hf --no-serve            # the engine only
    python benchmarks/engine_gpu.py --device cpu --model-shape tiny --batch1 32 16 \\
        --concurrent 4 32 16 --high-concurrent 8 32 8 --long-prompt 512 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

# isort: off
import tandem  # noqa: F401 - first: its import sets OMP_WAIT_POLICY before torch loads
import torch

# isort: on
from tandem.bench.dummy_model import (
    SHAPES,
    check_tokenizer,
    model_config,
    num_parameters,
    write_model_folder,
)
from tandem.deploy.processes import free_port

REPO = Path(__file__).resolve().parents[1]

# Targets on one H200 for Llama-3.1-8B, bf16 (the numbers).
TARGET_BATCH1_OF_CEILING = 0.85
TARGET_C64_TOK_S = 10_000.0
TARGET_C256_DECODE_TOK_S = 20_000.0
TARGET_8K_TTFT_S = 0.30
TARGET_SERVE_OF_ENGINE = 0.80

DECODE_DEFINITION = (
    "decode tok/s = tokens returned by the step() calls that start after every request has "
    "its first token, divided by the wall time from the start of the first such step to the "
    "end of the last (no prompt token is computed in that phase)"
)


# -- small helpers ------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def make_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """`count` distinct random prompts (ids below the special tokens), reproducible by seed."""
    g = torch.Generator().manual_seed(seed)
    high = vocab - 256 if vocab > 1024 else vocab - 3
    return [torch.randint(10, high, (length,), generator=g).tolist() for _ in range(count)]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- 1. the GPU's ceilings -----------------------------------------------------------------


def timed(fn, device: torch.device) -> float:
    """Seconds that `fn()` takes on `device` (CUDA events on a GPU)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def copy_bandwidth(device: torch.device, gib: float, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy (read + written), best of `repeats`."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(partial(dst.copy_, src), device) for _ in range(repeats))
    del src, dst
    free_memory(device)
    return 2 * n * 2 / best


def _matmuls(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, count: int) -> None:
    for _ in range(count):
        torch.matmul(a, b, out=out)


def matmul_peak(device: torch.device, size: int, dtype: torch.dtype, iters: int = 10) -> float:
    """FLOP/s of a size^3 matmul in `dtype`: mean of `iters` back-to-back after a warm-up."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    _matmuls(a, b, out, 3)
    elapsed = timed(partial(_matmuls, a, b, out, iters), device) / iters
    del a, b, out
    free_memory(device)
    return 2 * size**3 / elapsed


def prefill_flops(config: dict[str, Any], tokens: int) -> dict[str, float]:
    """FLOPs of one prompt's prefill: the layers' matmuls on every token, lm_head on the last
    one only (the engine computes logits for sampled rows), causal attention (QK^T and PV)."""
    params = num_parameters(config)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    linear = 2 * params["layers"] * tokens + 2 * (params["lm_head"] or params["embedding"])
    attention = 2 * config["num_hidden_layers"] * heads * head_dim * tokens * tokens
    return {"linear": float(linear), "attention": float(attention), "total": linear + attention}


# -- 2. Hugging Face generate -------------------------------------------------------------


def run_hf(
    folder: Path, device: torch.device, dtype: torch.dtype, workloads: dict[str, Any]
) -> dict[str, Any]:
    """Greedy `generate` throughput (output tokens / wall time) of each workload, once each
    after a short warm-up. `workloads` maps a name to (prompts, max_new_tokens)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    started = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    build_s = time.perf_counter() - started
    log(f"hf: model built in {build_s:.1f} s")
    pad = config.eos_token_id

    def generate(model, prompts: list[list[int]], new: int) -> tuple[int, float]:
        ids = torch.tensor(prompts, device=device)
        synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=pad,
            )
        synchronize(device)
        elapsed = time.perf_counter() - start
        return (out.shape[1] - ids.shape[1]) * ids.shape[0], elapsed

    results: dict[str, Any] = {"build_s": build_s}
    try:
        for name, (prompts, new) in workloads.items():
            generate(model, prompts, min(8, new))  # warm-up: kernels, allocator, caches
            tokens, elapsed = generate(model, prompts, new)
            if tokens != len(prompts) * new:
                raise RuntimeError(f"hf {name}: {tokens} tokens, expected {len(prompts) * new}")
            results[name] = {"tokens": tokens, "elapsed_s": elapsed, "tok_s": tokens / elapsed}
            log(f"hf {name}: {tokens / elapsed:,.1f} output tok/s ({elapsed:.2f} s)")
    finally:
        del model
        free_memory(device)
    return results


# -- 3. the engine --------------------------------------------------------------------------


@dataclass
class StepRecord:
    start: float
    end: float
    tokens: int
    all_started: bool  # every request had its first token before this step began
    outputs: int


@dataclass
class Trace:
    """What one run of a set of requests through EngineCore looked like, step by step."""

    submit: float
    num_requests: int
    max_tokens: int
    first: dict[str, float] = field(default_factory=dict)
    done: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.counts.values())

    @property
    def end(self) -> float:
        return max(self.done.values())

    def output_tok_s(self) -> float:
        return self.total_tokens / (self.end - self.submit)

    def ttft_s(self) -> float:
        return max(self.first.values()) - self.submit

    def single_decode_tok_s(self) -> float:
        """One request: tokens after the first / time after the first."""
        (rid,) = self.counts
        return (self.counts[rid] - 1) / (self.done[rid] - self.first[rid])

    def decode_phase(self) -> dict[str, float]:
        steps = [s for s in self.steps if s.all_started]
        if not steps:
            return {"tokens": 0, "elapsed_s": float("nan"), "tok_s": float("nan"), "steps": 0}
        tokens = sum(s.tokens for s in steps)
        elapsed = steps[-1].end - steps[0].start
        return {
            "tokens": tokens,
            "elapsed_s": elapsed,
            "tok_s": tokens / elapsed,
            "steps": len(steps),
        }

    def full_batch_step_s(self) -> float:
        """Mean step() time while every request is decoding (each returns a token)."""
        times = [
            s.end - s.start for s in self.steps if s.all_started and s.outputs == self.num_requests
        ]
        return statistics.fmean(times) if times else float("nan")


class EngineBench:
    def __init__(self, config, device: torch.device) -> None:
        from tandem.engine.core import EngineCore

        started = time.perf_counter()
        self.core = EngineCore(config)
        synchronize(device)
        self.build_s = time.perf_counter() - started
        self.device = device
        self.runs = 0

    def weight_bytes(self) -> int | None:
        model = getattr(self.core.runner, "model", None)
        if model is None:
            return None
        return sum(p.numel() * p.element_size() for p in model.parameters())

    def run(self, prompts: list[list[int]], max_tokens: int) -> Trace:
        from tandem.protocol import GenerateRequest, SamplingParams

        self.runs += 1
        core = self.core
        synchronize(self.device)
        trace = Trace(time.perf_counter(), len(prompts), max_tokens)
        for i, prompt in enumerate(prompts):
            sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            rid = f"r{self.runs}-{i}"
            core.add_request(
                GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling)
            )
            trace.counts[rid] = 0
        reasons: dict[str, str] = {}
        while core.has_work():
            all_started = len(trace.first) == len(prompts)
            start = time.perf_counter()
            outputs = core.step()
            end = time.perf_counter()
            tokens = 0
            for out in outputs:
                tokens += len(out.token_ids)
                trace.counts[out.request_id] += len(out.token_ids)
                if out.token_ids:
                    trace.first.setdefault(out.request_id, end)
                if out.finish_reason:
                    trace.done[out.request_id] = end
                    reasons[out.request_id] = out.finish_reason
            trace.steps.append(StepRecord(start, end, tokens, all_started, len(outputs)))
        synchronize(self.device)
        bad = {r: n for r, n in trace.counts.items() if n != max_tokens or reasons[r] != "length"}
        if bad:
            raise RuntimeError(f"requests ended early (tokens by request): {bad}")
        return trace

    def close(self) -> None:
        del self.core
        free_memory(self.device)


def profile_decode(bench: EngineBench, prompts: list[list[int]], steps: int) -> dict[str, Any]:
    """GPU kernel time against wall time over `steps` decode steps (torch.profiler): where a
    step's time goes, and how much of it the GPU sits idle waiting for the host."""
    from torch.profiler import ProfilerActivity, profile

    from tandem.protocol import GenerateRequest, SamplingParams

    core = bench.core
    sampling = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        rid = f"prof-{len(prompts)}-{i}"
        request = GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling)
        core.add_request(request)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in core.running_sequences):
        core.step()
    core.step()
    synchronize(bench.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            core.step()
        synchronize(bench.device)
        wall = (time.perf_counter() - started) / steps
    while core.has_work():
        core.step()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    gpu = sum(e.self_device_time_total for e in events) / steps / 1e6
    launches = sum(e.count for e in events) / steps
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:12]
    kernels = {e.key[:80]: e.self_device_time_total / steps / 1e3 for e in top}
    busy, span = _busy_span([e.time_range for e in prof.events() if e.device_type.name == "CUDA"])
    log(
        f"profile batch {len(prompts)}: step {wall * 1e3:.2f} ms wall, {gpu * 1e3:.2f} ms GPU,"
        f" {launches:.0f} kernels; GPU busy {busy / steps / 1e3:.2f} ms of"
        f" {span / steps / 1e3:.2f} ms from first to last kernel"
    )
    for e in top:
        ms, per_step = e.self_device_time_total / steps / 1e3, e.count / steps
        log(f"    {ms:7.3f} ms  x{per_step:5.0f}  {e.key[:80]}")
    return {
        "step_wall_s": wall,
        "step_gpu_s": gpu,
        "kernels_per_step": launches,
        "gpu_busy_s": busy / steps / 1e6,
        "gpu_span_s": span / steps / 1e6,
        "top_kernels_ms": kernels,
    }


def _busy_span(ranges) -> tuple[float, float]:
    """Microseconds the GPU ran any kernel, and from the first kernel's start to the last's
    end: their difference is the time it sat idle between kernels (launch gaps, host waits)."""
    busy, end, first = 0.0, None, None
    for r in sorted(ranges, key=lambda r: r.start):
        first = r.start if first is None else first
        if end is None or r.start >= end:
            busy += r.end - r.start
            end = r.end
        elif r.end > end:
            busy += r.end - end
            end = r.end
    return busy, (end - first) if first is not None else 0.0


def engine_config(args: argparse.Namespace, folder: Path, overlap: bool = False):
    from tandem.engine.config import EngineConfig

    return EngineConfig(
        model=str(folder),
        device=args.device,
        dtype=args.dtype,
        load_format="dummy",
        enable_prefix_caching=False,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        async_scheduling=overlap,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_gb=args.kv_cache_gb,
    )


def run_engine(
    args: argparse.Namespace,
    folder: Path,
    vocab: int,
    device: torch.device,
    results: dict[str, Any],
    overlap: bool = False,
) -> None:
    """Build the engine, then warm up and time each workload; fills `results` as it goes."""
    bench = EngineBench(engine_config(args, folder, overlap), device)
    log(f"engine: built in {bench.build_s:.1f} s")
    (b1_in, b1_out), (c_n, c_in, c_out), (h_n, h_in, h_out) = (
        args.batch1,
        args.concurrent,
        args.high_concurrent,
    )
    workloads = {
        "batch1": (1, b1_in, b1_out),
        "concurrent": (c_n, c_in, c_out),
        "high_concurrent": (h_n, h_in, h_out),
        "long_prompt": (1, args.long_prompt, 1),
    }
    results.update(
        build_s=bench.build_s,
        weight_bytes=bench.weight_bytes(),
        num_kv_blocks=bench.core.block_manager.num_blocks,
        max_model_len=bench.core.max_model_len,
    )
    try:
        for w, (name, (count, length, out)) in enumerate(workloads.items()):
            # Warm-up at full size: kernels compile and graphs get used at every batch size the
            # timed runs pass through; its prompts differ from the timed ones.
            bench.run(make_prompts(count, length, vocab, seed=1000 + w), out)
            traces = [
                bench.run(make_prompts(count, length, vocab, seed=100 * w + r), out)
                for r in range(args.repeats)
            ]
            results[name] = summarize_traces(name, traces)
            log(f"engine {name}: {json.dumps(results[name]['median'])}")
        if args.profile_steps:
            steps = args.profile_steps
            results["profile"] = {
                str(n): profile_decode(bench, make_prompts(n, 128, vocab, seed=7), steps)
                for n in (1, args.concurrent[0])
            }
    finally:
        bench.close()


def summarize_traces(name: str, traces: list[Trace]) -> dict[str, Any]:
    runs: list[dict[str, float]] = []
    for t in traces:
        run: dict[str, float] = {
            "output_tok_s": t.output_tok_s(),
            "elapsed_s": t.end - t.submit,
            "ttft_s": t.ttft_s(),
            "steps": len(t.steps),
        }
        if name == "batch1":
            run["decode_tok_s"] = t.single_decode_tok_s()
        if name in ("concurrent", "high_concurrent"):
            phase = t.decode_phase()
            run["decode_tok_s"] = phase["tok_s"]
            run["decode_tokens"] = phase["tokens"]
            run["decode_steps"] = phase["steps"]
            run["full_batch_step_s"] = t.full_batch_step_s()
        runs.append(run)
    keys = runs[0].keys()
    return {"runs": runs, "median": {k: median([r[k] for r in runs]) for k in keys}}


# -- 4. tandem serve + tandem bench -----------------------------------------------------------



def cli_command(*args: str) -> list[str]:
    """`tandem ARGS...` run by this interpreter, whether or not the console script exists."""
    return [sys.executable, "-m", "tandem.cli.main", *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{path}" if path else str(REPO)
    return env


class Server:
    """`tandem serve` in a subprocess; its log goes to a file and is watched for the ready
    line."""

    READY = re.compile(r"serving .* at (http://\S+)/v1")

    def __init__(self, cmd: list[str], log_path: Path) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.url: str | None = None
        self.ready = threading.Event()
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env()
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(self.log_path, "w") as f:
            for line in self.proc.stdout:
                f.write(line)
                f.flush()
                m = self.READY.search(line)
                if m and not self.ready.is_set():
                    self.url = m.group(1)
                    self.ready.set()
        self.ready.set()  # the process ended: stop waiting

    def wait_ready(self, timeout: float) -> str:
        if not self.ready.wait(timeout) or self.url is None:
            tail = self.log_path.read_text()[-3000:] if self.log_path.exists() else ""
            raise RuntimeError(f"tandem serve did not become ready; log tail:\n{tail}")
        return self.url

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(5)
        return self.proc.returncode


def serve_flags(args: argparse.Namespace) -> list[str]:
    flags = [
        "--load-format",
        "dummy",
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--no-enable-prefix-caching",
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--max-num-batched-tokens",
        str(args.max_num_batched_tokens),
        "--max-model-len",
        str(args.max_model_len),
        "--attention-backend",
        args.attention_backend,
        "--gpu-memory-utilization",
        str(args.gpu_memory_utilization),
        "--max-waiting",
        str(max(256, 2 * args.concurrent[0])),
    ]
    if args.enforce_eager:
        flags.append("--enforce-eager")
    on = args.async_scheduling != "off"
    flags.append("--async-scheduling" if on else "--no-async-scheduling")
    if args.kv_cache_gb is not None:
        flags += ["--kv-cache-memory", str(args.kv_cache_gb)]
    return flags


def bench_run(url: str, count: int, c_in: int, out: int, num: int, path: Path) -> dict:
    cmd = cli_command(
        "bench",
        "run",
        "--base-url",
        url,
        "--workload",
        "synthetic",
        "--input-len",
        str(c_in),
        "--output-len",
        str(out),
        "--concurrency",
        str(count),
        "--num-requests",
        str(num),
        "--seed",
        str(7 + num),
        "--output",
        str(path),
        "--no-plots",
        "--quiet",
    )  # bench sends ignore_eos by default: every answer is max_tokens long
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"tandem bench failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(path.read_text())


def run_serve(
    args: argparse.Namespace, folder: Path, out_dir: Path, mode: str = "embedded"
) -> dict[str, Any]:
    """`embedded`: the engine in the HTTP server's process (its step loop in a thread);
    `worker`: the engine in a `tandem worker` process, the frontend apart, over a local NATS."""
    count, c_in, c_out = args.concurrent
    port = free_port()
    nats = None
    extra: list[str] = []
    if mode == "worker":
        from tandem.deploy.processes import NatsServer

        nats = NatsServer().start()
        extra = ["--nats", nats.url]
    cmd = cli_command(
        "serve",
        str(folder),
        "--port",
        str(port),
        "--served-model-name",
        "bench-model",
        *serve_flags(args),
        *extra,
    )
    log_path = out_dir / f"engine_gpu_serve_{mode}.log"
    log(f"serve: {' '.join(cmd)} (log: {log_path})")
    started = time.perf_counter()
    server = Server(cmd, log_path)
    try:
        url = server.wait_ready(args.serve_timeout)
        ready_s = time.perf_counter() - started
        log(f"serve: ready at {url} after {ready_s:.1f} s")
        bench_run(url, count, c_in, min(16, c_out), count, out_dir / "engine_gpu_bench_warm.json")
        num = count * args.serve_rounds
        result = bench_run(url, count, c_in, c_out, num, out_dir / f"engine_gpu_bench_{mode}.json")
    finally:
        code = server.stop()
        if nats is not None:
            nats.stop()
    summary = result["summary"]
    expected = num * c_out
    req = summary["requests"]
    full_length = summary["output_tokens"] == expected and req["completed"] == num
    return {
        "command": cmd,
        "ready_s": ready_s,
        "exit_code": code,
        "requests": req,
        "output_tokens": summary["output_tokens"],
        "expected_output_tokens": expected,
        "full_length_outputs": full_length,
        "output_tok_s": summary["output_token_throughput"],
        "elapsed_s": summary["elapsed_s"],
        "ttft_ms": summary["ttft_ms"],
        "tpot_ms": summary["tpot_ms"],
        "mode": mode,
        "bench_json": str(out_dir / f"engine_gpu_bench_{mode}.json"),
    }


# -- report ----------------------------------------------------------------------------------


class Table:
    """Rows of (figure, value, target, verdict) for the summary."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, figure: str, value: str, target: str = "", ok: bool | None = None) -> None:
        self.rows.append((figure, value, target, "-" if ok is None else "MET" if ok else "MISSED"))

    def print(self) -> None:
        header = ("figure", "value", "target", "")
        widths = [max(len(r[i]) for r in [header, *self.rows]) for i in range(4)]
        line = "  ".join(f"{{:<{w}}}" for w in widths)
        print("\n" + line.format(*header))
        print("  ".join("-" * w for w in widths))
        for r in self.rows:
            print(line.format(*r).rstrip())


def summary_table(res: dict[str, Any]) -> Table:
    t = Table()
    ceil, eng, ratio = res["ceilings"], res.get("engine", {}), res.get("ratios", {})
    work = res["workloads"]
    t.add("copy bandwidth", f"{ceil['copy_bandwidth_gb_s']:,.0f} GB/s")
    t.add(
        f"{ceil['matmul_dtype']} matmul peak",
        f"{ceil['matmul_tflop_s']:,.{1 if ceil['matmul_tflop_s'] >= 10 else 3}f} TFLOP/s",
    )
    t.add("weight bytes", f"{ceil['weight_bytes'] / 1e9:.2f} GB")
    t.add("batch-1 ceiling", f"{ceil['batch1_ceiling_tok_s']:,.1f} tok/s", "bandwidth / weights")
    if "batch1" in eng:
        b1, r = eng["batch1"]["median"], ratio["batch1_of_ceiling"]
        t.add(
            "batch 1 decode",
            f"{b1['decode_tok_s']:,.1f} tok/s = {r:.0%} of ceiling",
            f">= {TARGET_BATCH1_OF_CEILING:.0%} of ceiling",
            r >= TARGET_BATCH1_OF_CEILING,
        )
        t.add("batch 1 output (submit to last)", f"{b1['output_tok_s']:,.1f} tok/s")
    if "concurrent" in eng:
        c, n = eng["concurrent"]["median"], work["concurrent"][0]
        t.add(
            f"{n} concurrent output",
            f"{c['output_tok_s']:,.0f} tok/s",
            f">= {TARGET_C64_TOK_S:,.0f} tok/s",
            c["output_tok_s"] >= TARGET_C64_TOK_S,
        )
        t.add(f"{n} concurrent decode step", f"{c['full_batch_step_s'] * 1e3:.2f} ms")
    if "high_concurrent" in eng:
        h, n = eng["high_concurrent"]["median"], work["high_concurrent"][0]
        t.add(
            f"{n} concurrent decode",
            f"{h['decode_tok_s']:,.0f} tok/s",
            f">= {TARGET_C256_DECODE_TOK_S:,.0f} tok/s",
            h["decode_tok_s"] >= TARGET_C256_DECODE_TOK_S,
        )
        t.add(f"{n} concurrent output", f"{h['output_tok_s']:,.0f} tok/s")
    if "long_prompt" in eng:
        ttft, bound = eng["long_prompt"]["median"]["ttft_s"], ratio["long_prompt_bound_s"]
        t.add(
            f"{work['long_prompt']}-token prompt TTFT",
            f"{ttft:.3f} s",
            f"<= {TARGET_8K_TTFT_S:.2f} s",
            ttft <= TARGET_8K_TTFT_S,
        )
        t.add("  its matmul lower bound", f"{bound:.3f} s = {bound / ttft:.0%} of TTFT")
    overlapped = res.get("engine_async") or {}
    for name, figure, label in (
        ("batch1", "decode_tok_s", "batch 1 decode"),
        ("concurrent", "output_tok_s", f"{work['concurrent'][0]} concurrent output"),
        ("high_concurrent", "decode_tok_s", f"{work['high_concurrent'][0]} concurrent decode"),
        ("long_prompt", "ttft_s", "long prompt TTFT (s)"),
    ):
        if name in overlapped and name in eng:
            on, off = overlapped[name]["median"][figure], eng[name]["median"][figure]
            t.add(f"  --async-scheduling: {label}", f"{on:,.3g}", f"{on / off:.2f}x without")
    hf = res.get("hf") or {}
    for name, label in (("batch1", "batch 1"), ("concurrent", f"batch {work['concurrent'][0]}")):
        if name in hf and f"{name}_vs_hf" in ratio:
            t.add(
                f"HF generate {label}",
                f"{hf[name]['tok_s']:,.1f} tok/s",
                f"tandem / HF = {ratio[f'{name}_vs_hf']:.2f}x",
            )
    for mode, serve in (res.get("serve") or {}).items():
        if "output_tok_s" in serve and f"serve_{mode}_of_engine" in ratio:
            r = ratio[f"serve_{mode}_of_engine"]
            short = "" if serve["full_length_outputs"] else " (short outputs!)"
            t.add(
                f"serve ({mode}) + bench output",
                f"{serve['output_tok_s']:,.0f} tok/s = {r:.0%} of engine{short}",
                f">= {TARGET_SERVE_OF_ENGINE:.0%} of engine",
                r >= TARGET_SERVE_OF_ENGINE and serve["full_length_outputs"],
            )
        else:
            t.add(f"serve ({mode}) + bench", f"failed: {serve.get('error', '?')[:70]}", "", False)
    return t


def ratios(res: dict[str, Any], config: dict[str, Any]) -> dict[str, float]:
    eng, hf, out = res.get("engine", {}), res.get("hf") or {}, {}
    ceil = res["ceilings"]
    if "batch1" in eng:
        out["batch1_of_ceiling"] = (
            eng["batch1"]["median"]["decode_tok_s"] / ceil["batch1_ceiling_tok_s"]
        )
    if "long_prompt" in eng:
        flops = prefill_flops(config, res["workloads"]["long_prompt"])
        out["long_prompt_flops"] = flops["total"]
        out["long_prompt_bound_s"] = flops["total"] / ceil["matmul_flop_s"]
        out["long_prompt_bound_of_ttft"] = (
            out["long_prompt_bound_s"] / eng["long_prompt"]["median"]["ttft_s"]
        )
    for name in ("batch1", "concurrent"):
        if name in hf and name in eng:
            out[f"{name}_vs_hf"] = eng[name]["median"]["output_tok_s"] / hf[name]["tok_s"]
    for mode, serve in (res.get("serve") or {}).items():
        if "output_tok_s" in serve and "concurrent" in eng:
            engine_tok_s = eng["concurrent"]["median"]["output_tok_s"]
            out[f"serve_{mode}_of_engine"] = serve["output_tok_s"] / engine_tok_s
    return out


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = props.total_memory / 2**30
        env["cuda"] = torch.version.cuda
    return env


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--model-shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    p.add_argument(
        "--model-dir",
        type=Path,
        help="write the model folder here and keep it (default: a temporary folder)",
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if cuda else "cpu")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        help="default: bfloat16 on cuda, float32 on cpu",
    )
    w = p.add_argument_group("workloads")
    w.add_argument("--batch1", type=int, nargs=2, metavar=("IN", "OUT"), default=[128, 256])
    w.add_argument(
        "--concurrent", type=int, nargs=3, metavar=("N", "IN", "OUT"), default=[64, 128, 128]
    )
    w.add_argument(
        "--high-concurrent", type=int, nargs=3, metavar=("N", "IN", "OUT"), default=[256, 128, 64]
    )
    w.add_argument("--long-prompt", type=int, metavar="TOKENS", default=8192)
    w.add_argument("--repeats", type=int, default=3, help="timed runs per workload (medians)")
    c = p.add_argument_group("ceilings")
    c.add_argument("--copy-gib", type=float, help="copied tensor size (default 4 cuda, 0.25 cpu)")
    c.add_argument("--matmul-size", type=int, help="N of the NxN bf16 matmul (8192 cuda, 1024 cpu)")
    e = p.add_argument_group("engine")
    e.add_argument("--attention-backend", default="auto")
    e.add_argument("--enforce-eager", action="store_true")
    e.add_argument(
        "--async-scheduling",
        choices=("off", "on", "both"),
        default="both",
        help="engine steps overlapped with the host's work; both: the engine figures without,"
        " then with, side by side (serve runs with it unless off) (%(default)s)",
    )
    e.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    e.add_argument("--kv-cache-gb", type=float, help="KV cache GiB (default: the engine sizes it)")
    e.add_argument("--max-num-seqs", type=int, help="default: the largest concurrency")
    e.add_argument("--max-num-batched-tokens", type=int, default=8192)
    e.add_argument("--max-model-len", type=int, help="default: the long prompt + 128")
    e.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="also profile this many decode steps at batch 1 and at --concurrent's batch",
    )
    o = p.add_argument_group("baselines and serving")
    o.add_argument("--skip-hf", action="store_true", help="no Hugging Face generate baseline")
    o.add_argument(
        "--serve",
        action=argparse.BooleanOptionalAction,
        help="also measure tandem serve + tandem bench (default: on with cuda)",
    )
    o.add_argument(
        "--serve-modes",
        default="embedded",
        help="comma-separated: embedded (engine in the server process), worker (engine in a"
        " tandem worker process over a local NATS) (%(default)s)",
    )
    o.add_argument(
        "--serve-rounds",
        type=int,
        default=3,
        help="requests sent = rounds x concurrency (%(default)s)",
    )
    o.add_argument(
        "--serve-timeout",
        type=float,
        default=300.0,
        help="seconds tandem serve may take to become ready (%(default)s)",
    )
    p.add_argument("--output", type=Path, default=Path("results/engine_gpu.json"))
    args = p.parse_args(argv)
    if args.device == "cuda" and not cuda:
        p.error("--device cuda, but torch sees no CUDA GPU")
    on_gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.copy_gib = args.copy_gib or (4.0 if on_gpu else 0.25)
    args.matmul_size = args.matmul_size or (8192 if on_gpu else 1024)
    args.max_num_seqs = args.max_num_seqs or max(args.concurrent[0], args.high_concurrent[0])
    args.max_model_len = args.max_model_len or args.long_prompt + 128
    args.serve = on_gpu if args.serve is None else args.serve
    return args


def main(argv: list[str] | None = None) -> int:
    import logging

    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = model_config(args.model_shape)
    vocab = config["vocab_size"]
    began = time.perf_counter()
    tmp = None
    if args.model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix=f"tandem-{args.model_shape}-")
        folder = Path(tmp.name)
    else:
        folder = args.model_dir
    write_model_folder(folder, args.model_shape)
    check_tokenizer(folder, vocab)
    params = num_parameters(config)
    log(
        f"model folder {folder} ({args.model_shape}: {params['total'] / 1e9:.3f} B parameters, "
        f"{args.dtype}), device {args.device}"
    )

    res: dict[str, Any] = {
        "benchmark": "engine_gpu",
        "model_shape": args.model_shape,
        "model_config": config,
        "parameters": params,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": environment(device),
        "workloads": {
            "batch1": args.batch1,
            "concurrent": args.concurrent,
            "high_concurrent": args.high_concurrent,
            "long_prompt": args.long_prompt,
        },
        "definitions": {
            "copy_bandwidth": "bytes read + written / time of one device-to-device copy, best "
            "of 10",
            "matmul_peak": f"2 N^3 / mean time of {args.matmul_size}^3 {args.dtype} matmuls",
            "batch1_ceiling": "copy bandwidth / weight bytes (every weight read once per token)",
            "batch1_decode": "(output tokens - 1) / (last token time - first token time)",
            "output_tok_s": "all output tokens / (last token time - submit time)",
            "decode_tok_s": DECODE_DEFINITION,
            "full_batch_step_s": "mean step() wall time over steps where every request of the "
            "batch is decoding and gets a token",
            "ttft_s": "submit to first output token (several requests: to the last one's first)",
            "long_prompt_bound": "(2 x layer parameters x tokens + 2 x lm_head + causal "
            "attention 2 x layers x heads x head_dim x tokens^2) / matmul peak",
        },
    }
    try:
        measure(args, res, folder, config, device, dtype)
    except Exception:  # keep what was measured: write it, print it, then fail
        res["error"] = traceback.format_exc()
        log(res["error"])
    finally:
        res["total_s"] = time.perf_counter() - began
        if tmp is not None:
            tmp.cleanup()
    if "ceilings" in res:
        res["ratios"] = ratios(res, config)
        summary_table(res).print()
        print(f"\n{DECODE_DEFINITION}.")
    if args.model_shape != "llama-3.1-8b" or args.device != "cuda":
        print("(the targets are for the llama-3.1-8b shape on one H200)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(res, indent=2, default=str) + "\n")
    status = "FAILED (see 'error' in the JSON)" if "error" in res else "done"
    print(f"{status}; total {res['total_s']:.0f} s; wrote {args.output}")
    return 1 if "error" in res else 0


def measure(
    args: argparse.Namespace,
    res: dict[str, Any],
    folder: Path,
    config: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Fill `res` in order: ceilings, HF (built and freed first), the engine, serve."""
    vocab = config["vocab_size"]
    phases = res.setdefault("phase_s", {})
    mark = time.perf_counter()

    def phase_done(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = now - mark
        mark = now

    bandwidth = copy_bandwidth(device, args.copy_gib)
    peak = matmul_peak(device, args.matmul_size, dtype)
    weight_bytes = num_parameters(config)["total"] * dtype.itemsize
    res["ceilings"] = {
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "copy_gib": args.copy_gib,
        "matmul_flop_s": peak,
        "matmul_tflop_s": peak / 1e12,
        "matmul_size": args.matmul_size,
        "matmul_dtype": args.dtype,
        "weight_bytes": weight_bytes,
        "batch1_ceiling_tok_s": bandwidth / weight_bytes,
    }
    log(
        f"ceilings: copy {bandwidth / 1e9:,.0f} GB/s, matmul {peak / 1e12:,.1f} TFLOP/s, "
        f"batch-1 ceiling {bandwidth / weight_bytes:,.1f} tok/s"
    )
    phase_done("ceilings")

    if not args.skip_hf:
        (b1_in, b1_out), (c_n, c_in, c_out) = args.batch1, args.concurrent
        res["hf"] = run_hf(
            folder,
            device,
            dtype,
            {
                "batch1": (make_prompts(1, b1_in, vocab, seed=0), b1_out),
                "concurrent": (make_prompts(c_n, c_in, vocab, seed=100), c_out),
            },
        )
        phase_done("hf")
    if args.async_scheduling in ("off", "both"):
        run_engine(args, folder, vocab, device, res.setdefault("engine", {}))
        phase_done("engine")
    if args.async_scheduling in ("on", "both"):
        key = "engine" if args.async_scheduling == "on" else "engine_async"
        run_engine(args, folder, vocab, device, res.setdefault(key, {}), overlap=True)
        phase_done(key)
    built = res["engine"].get("weight_bytes")
    if built and built != weight_bytes:
        log(f"warning: the engine's parameters hold {built} bytes, the config says {weight_bytes}")
    if args.serve:
        if device.type == "cuda":
            held = torch.cuda.memory_reserved(device) / 2**30
            free, total = (x / 2**30 for x in torch.cuda.mem_get_info(device))
            log(f"before serve: this process holds {held:.1f} GiB; {free:.1f} of {total:.1f} free")
        for mode in args.serve_modes.split(","):
            try:
                result = run_serve(args, folder, args.output.parent, mode)
            except Exception as exc:  # report it beside the engine's figures, which stand
                log(f"serve ({mode}): failed: {exc}")
                result = {"error": str(exc)}
            res.setdefault("serve", {})[mode] = result
            phase_done(f"serve {mode}")


if __name__ == "__main__":
    sys.exit(main())
