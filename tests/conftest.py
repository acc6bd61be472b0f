"""Shared fixtures: tiny random-weight models in the Hugging Face layout."""

from __future__ import annotations

import gc
import glob
import os
from pathlib import Path

# Without an NVIDIA GPU the Triton kernels run on CPU tensors in Triton's interpreter; the
# variable must be set before any kernel module imports triton.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from disagg_support import make_engine

from tandem.engine.testing import make_tiny_model

ARCHS = ("llama", "qwen2", "qwen3")


@pytest.fixture(autouse=True)
def unfrozen_heap():
    """A server or load run started in this process freezes the heap (`tandem.runtime.heap`),
    as a served process should; a test's objects must still be collected after it."""
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="module", params=ARCHS)
def model_pair(request, tiny_models):
    """A tiny model folder of each family, with transformers' float32 model of it."""
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_models[request.param]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


@pytest.fixture(scope="module")
def aggregated(tiny_llama):
    """One aggregated engine: what a disaggregated pair must answer alike."""
    engine = make_engine(tiny_llama)
    yield engine
    engine.shutdown()


@pytest.fixture
def pair(tiny_llama):
    """`pair(prefill_ttl, transfer_timeout)`: a fresh prefill and decode engine."""
    made = []

    def make(prefill_ttl: float = 30.0, transfer_timeout: float = 10.0):
        prefill = make_engine(tiny_llama, kv_export_ttl=prefill_ttl)
        decode = make_engine(tiny_llama)
        decode.kv_transfer_timeout = transfer_timeout
        made.extend([prefill, decode])
        return prefill, decode

    yield make
    for engine in made:
        engine.shutdown()
