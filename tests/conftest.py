"""Shared fixtures: tiny random-weight models in the Hugging Face layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.engine.testing import make_tiny_model

ARCHS = ("llama", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]
