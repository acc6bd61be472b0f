"""Host time of one engine step, the part of a GPU step the GPU waits for.

Runs the mock engine with zero modelled step time at batch 64 and 256 (every sequence
decoding) and splits a step's median wall time into scheduling, packing the model's inputs
(`build_step`, what the real runner does before its one host-to-device copy) and the rest
(committing blocks, stop checks, building outputs). On a GPU these add to every decode step
unless they overlap with the previous step's kernels.

    python benchmarks/engine_host.py [--batches 64 256] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.engine.step_inputs import build_step
from tandem.engine.testing import make_tiny_model
from tandem.protocol import GenerateRequest, SamplingParams


def measure(model: Path, batch: int, steps: int, prompt_len: int) -> dict[str, float]:
    engine = EngineCore(
        EngineConfig(
            model=str(model),
            engine="mock",
            mock_speedup=1e12,  # modelled step time ~0: what is left is host work
            num_gpu_blocks=batch * (prompt_len + steps + 64) // 16 + 64,
            max_num_seqs=batch,
            max_num_batched_tokens=max(2048, batch * prompt_len),
        )
    )
    sampling = SamplingParams(max_tokens=steps + 16, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = [(i * 31 + j) % 300 + 3 for j in range(prompt_len)]
        engine.add_request(
            GenerateRequest(request_id=str(i), prompt_token_ids=prompt, sampling=sampling)
        )
    engine.step()  # every prompt in one step; from here on every sequence decodes
    schedule, execute, pack, total = [], [], [], []
    inner_schedule, inner_execute = engine.scheduler.schedule, engine.runner.execute

    def timed_schedule():
        t = time.perf_counter()
        batch_ = inner_schedule()
        schedule.append(time.perf_counter() - t)
        t = time.perf_counter()
        build_step(batch_, 16)
        pack.append(time.perf_counter() - t)
        return batch_

    def timed_execute(batch_):
        t = time.perf_counter()
        out = inner_execute(batch_)
        execute.append(time.perf_counter() - t)
        return out

    engine.scheduler.schedule = timed_schedule
    engine.runner.execute = timed_execute
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        total.append(time.perf_counter() - t)
    timings = {"schedule": schedule, "pack": pack, "execute": execute, "step": total}
    ms = {name: statistics.median(values) * 1e3 for name, values in timings.items()}
    # The step's own timer included the packing done here for measurement; the mock's
    # execute stands in for the model and is not host work of a real step.
    ms["bookkeeping"] = ms["step"] - ms["schedule"] - ms["pack"] - ms["execute"]
    ms["host"] = ms["schedule"] + ms["pack"] + ms["bookkeeping"]
    return ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output", type=Path, default=Path("results/engine_host.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", max_position_embeddings=4096)
        results = {b: measure(model, b, args.steps, args.prompt_len) for b in args.batches}
    print(f"{'batch':>6} {'host ms':>8} {'schedule':>9} {'pack':>7} {'bookkeeping':>12}")
    for b, ms in results.items():
        print(f"{b:>6} {ms['host']:8.3f} {ms['schedule']:9.3f} {ms['pack']:7.3f} "
              f"{ms['bookkeeping']:12.3f}")  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"median_ms_per_step": results}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
