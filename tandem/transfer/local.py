"""Both engines in one process: the decode engine reads the prefill engine's cache directly."""

from __future__ import annotations

from typing import Any

from tandem.protocol import KvLayout, KvTransferParams
from tandem.transfer.blocks import CacheBlocks, check_layout


class LocalKvSource:
    """Exporting engines by worker id; `fetch` hands out their blocks, `release` frees them."""

    def __init__(self, layout: KvLayout, exporters: dict[str, Any] | None = None) -> None:
        self.layout = layout
        self.exporters: dict[str, Any] = dict(exporters or {})

    def register(self, worker_id: str, engine: Any) -> None:
        """Refuse, at once, an exporter whose cache does not match this one."""
        check_layout(self.layout, engine.kv_layout, f"worker {worker_id}")
        self.exporters[worker_id] = engine

    def _engine(self, params: KvTransferParams) -> Any:
        engine = self.exporters.get(params.worker_id)
        if engine is None:
            raise LookupError(f"no exporting engine {params.worker_id!r} in this process")
        return engine

    async def fetch(
        self, params: KvTransferParams, indices: list[int], dst: list[int]
    ) -> CacheBlocks | None:
        check_layout(self.layout, params.layout, f"worker {params.worker_id}")
        engine = self._engine(params)
        await engine.touch_export(params.request_id)  # raises if it expired meanwhile
        caches = engine.kv_caches()
        if caches is None:  # mock engines hold no KV data
            return None
        return CacheBlocks(caches[0], caches[1], [params.block_ids[i] for i in indices])

    async def release(self, params: KvTransferParams) -> None:
        await self._engine(params).release_export(params.request_id)
