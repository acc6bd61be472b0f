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
    """`auto` keeps the checkpoint's dtype on GPU and uses float32 on CPU, where half
    precision matmuls are slow on most processors."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if device == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, torch.dtype):
        return stored if stored != torch.float32 else torch.bfloat16
    return DTYPES.get(str(stored), torch.bfloat16) if stored != "float32" else torch.bfloat16


def iter_safetensors(model_path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_path}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, f.get_tensor(name)
