"""Build a model from a Hugging Face folder: config, safetensors weights (sharded or not)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_config(model_path: str | Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(str(model_path))


def resolve_dtype(name: str, config: PretrainedConfig, device: str) -> torch.dtype:
    """`auto` is bfloat16 on GPUs (float16 if the checkpoint says so) and on CPUs with native
    bfloat16 matmuls (AVX512-BF16, AMX), where it runs two to three times faster than float32
    (benchmarks/engine_cpu.py); float32 on other CPUs, whose half-precision kernels are slow."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if device == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return torch.float16 if str(stored).removeprefix("torch.") == "float16" else torch.bfloat16


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def iter_safetensors(model_path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_path}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, f.get_tensor(name)
