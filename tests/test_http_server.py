"""The uvicorn server every Tandem HTTP process runs (`tandem.http.server.ReadyServer`)."""

from __future__ import annotations

import asyncio
import gc

import httpx
import uvicorn

from tandem.http.server import ReadyServer, bind_socket


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_a_ready_server_freezes_its_start_up_heap():
    """Once serving, the objects start-up made are out of the collector's sight (collections
    of them paused every request in flight for 100s of ms); shutdown still runs."""
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    shut = []
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = ReadyServer(uvicorn.Config(app, log_level="warning"), "ready", lambda: shut.append(1))

    async def main() -> None:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        frozen = gc.get_freeze_count()
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/")).text == "ok"
        server.should_exit = True
        await serving
        assert frozen > 1000

    try:
        asyncio.run(main())
    finally:
        gc.unfreeze()
        sock.close()
    assert shut == [1]
