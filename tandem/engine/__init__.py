"""The built-in engine: paged KV cache, prefix caching, continuous batching, sampling.

It knows nothing of the runtime: `AsyncEngine` is the whole surface a worker or an
embedded frontend talks to; `VllmEngine` puts vLLM behind the same surface.
"""

from __future__ import annotations

from typing import Any


def open_engine(config: Any, role: str = "aggregated") -> Any:
    """The engine `config.engine` names: Tandem's own (real or mock) or vLLM's. `role`: the
    worker's (a vLLM engine hands KV over through its connector in prefill/decode roles)."""
    if config.engine == "vllm":
        from tandem.engine.vllm_engine import VllmEngine

        return VllmEngine(config, role)
    from tandem.engine.async_engine import AsyncEngine

    return AsyncEngine(config)
