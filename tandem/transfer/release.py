"""Telling a prefill worker it may free an export: the decode worker does it after its pull,
the frontend when no decode worker will pull. Torch-free, so the frontend can import it."""

from __future__ import annotations

import logging
from typing import Any

from tandem.protocol import KvTransferParams
from tandem.protocol.transfer import KV_RELEASE_ENDPOINT, KvReleased, KvReleaseRequest

log = logging.getLogger(__name__)

RELEASE_TIMEOUT = 5.0


async def release_kv(client: Any, params: KvTransferParams) -> int:
    """Blocks freed on the prefill worker (0 if already freed). A failure is logged, not
    raised: the worker is gone, or its deadline frees the blocks."""
    try:
        stream = client.call(
            params.address,
            KV_RELEASE_ENDPOINT,
            KvReleaseRequest(request_id=params.request_id),
            response_type=KvReleased,
            timeout=RELEASE_TIMEOUT,
        )
        async with stream:
            async for reply in stream:
                return reply.blocks
    except Exception as exc:
        log.warning(
            "request %s: releasing its KV on worker %s failed (%s); its deadline will free it",
            params.request_id,
            params.worker_id,
            exc,
        )
    return 0
