"""engine_gpu.py's engine part: `EngineCore` stepped directly over the workloads, with the
step traces and the kernel profile of decode steps."""

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# isort: off
import tandem  # noqa: F401 - first: its import sets OMP_WAIT_POLICY before torch loads
import torch

# isort: on

# Sibling modules: `python benchmarks/engine_gpu.py` puts benchmarks/ on sys.path.
from gpu_baselines import free_memory, log, make_prompts, median, synchronize

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
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:20]
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
