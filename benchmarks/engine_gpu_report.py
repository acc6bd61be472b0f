"""engine_gpu.py's report: the summary table of figures against their targets, and the
environment a run was made in."""

import os
import platform
from typing import Any

# isort: off
import tandem  # noqa: F401 - first: its import sets OMP_WAIT_POLICY before torch loads
import torch

# isort: on

# Sibling modules: `python benchmarks/engine_gpu.py` puts benchmarks/ on sys.path.
from gpu_baselines import prefill_flops

# Targets on one H200 for Llama-3.1-8B, bf16 (the numbers).
TARGET_BATCH1_OF_CEILING = 0.85
TARGET_C64_TOK_S = 10_000.0
TARGET_C256_DECODE_TOK_S = 20_000.0
TARGET_8K_TTFT_S = 0.30
TARGET_SERVE_OF_ENGINE = 0.80


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
