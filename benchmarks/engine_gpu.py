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

The parts live beside this script: `gpu_baselines.py` (1, 2), `engine_runs.py` (3),
`serve_runs.py` (4) and `engine_gpu_report.py` (the table). It prints every figure with its
target (the targets are for Llama-3.1-8B on one H200) and writes all of it to `--output`
(default results/engine_gpu.json).

    python benchmarks/engine_gpu.py                                 # on a GPU, ~5 minutes
    python benchmarks/engine_gpu.py --skip-hf --no-serve            # the engine only
    python benchmarks/engine_gpu.py --device cpu --model-shape tiny --batch1 32 16 \\
        --concurrent 4 32 16 --high-concurrent 8 32 8 --long-prompt 512 --repeats 1  # smoke
"""

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

# isort: off
import tandem  # noqa: F401 - first: its import sets OMP_WAIT_POLICY before torch loads
import torch

# isort: on
# Sibling modules: `python benchmarks/engine_gpu.py` puts benchmarks/ on sys.path.
from engine_gpu_report import environment, ratios, summary_table
from engine_runs import run_engine
from gpu_baselines import copy_bandwidth, log, make_prompts, matmul_peak, run_hf
from serve_runs import run_serve

from tandem.bench.dummy_model import (
    SHAPES,
    check_tokenizer,
    model_config,
    num_parameters,
    write_model_folder,
)

DECODE_DEFINITION = (
    "decode tok/s = tokens returned by the step() calls that start after every request has "
    "its first token, divided by the wall time from the start of the first such step to the "
    "end of the last (no prompt token is computed in that phase)"
)


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
