"""Output tokens/s of our engine vs Hugging Face `generate`, same weights, same machine, one run.

Workload: 128-token prompts, 64 output tokens each (EOS ignored), at 1, 8 and 32 concurrent
requests. Our engine serves them through its async API with continuous batching; Hugging Face
gets the same prompts as one static batch per concurrency level (left-padded batch of equal
lengths, greedy, KV cache on), the best it can do with all requests present at once.

    python benchmarks/engine_cpu.py [--model DIR] [--concurrency 1 8 32] [--repeats 3]

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
        self.rounds = 0

    def run(self, prompts: list[list[int]]) -> int:
        self.rounds += 1
        return asyncio.run(_run_ours(self.engine, prompts, f"r{self.rounds}"))

    def close(self) -> None:
        self.engine.shutdown()


class HuggingFace:
    name = "hf"

    def __init__(self, model: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

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
    args = parser.parse_args()

    if args.model:
        model = args.model
    else:
        from tandem.engine.model_source import resolve_model

        model = str(resolve_model(None))
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model).vocab_size
    threads = torch.get_num_threads()
    print(f"model {model}, torch threads {threads}, {PROMPT_LEN} in / {OUTPUT_LEN} out")
    systems = [Ours(model, max(args.concurrency)), HuggingFace(model)]
    rows = []
    try:
        for system in systems:  # warm-up: first calls pay for allocations and lazy init
            system.run(make_prompts(2, vocab, seed=99))
        for c in args.concurrency:
            prompts = make_prompts(c, vocab, seed=c)
            rates: dict[str, list[float]] = {s.name: [] for s in systems}
            # Alternate the two systems so that drifts in machine load hit both alike.
            for _ in range(args.repeats):
                for system in systems:
                    rates[system.name].append(measure(system, prompts))
            ours, hf = statistics.median(rates["tandem"]), statistics.median(rates["hf"])
            ratios = [a / b for a, b in zip(rates["tandem"], rates["hf"], strict=True)]
            rows.append(
                {
                    "concurrency": c,
                    "tandem_tok_s": ours,
                    "hf_tok_s": hf,
                    "ratio": ours / hf,
                    "tandem_runs": rates["tandem"],
                    "hf_runs": rates["hf"],
                    "paired_ratios": ratios,
                }
            )
            print(
                f"c={c:>3}: tandem {ours:7.1f} tok/s, hf {hf:7.1f} tok/s, ratio {ours / hf:.2f}x"
                f" (paired ratios {', '.join(f'{r:.2f}' for r in ratios)})",
                flush=True,
            )
    finally:
        for system in systems:
            system.close()
    print(f"\n{'concurrency':>11} {'tandem tok/s':>13} {'hf tok/s':>9} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['concurrency']:>11} {r['tandem_tok_s']:>13.1f} {r['hf_tok_s']:>9.1f}"
            f" {r['ratio']:>5.2f}x"
        )
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
