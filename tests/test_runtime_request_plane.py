"""Request plane: streaming, multiplexing, backpressure, cancellation both ways, deadlines,
peer death, bad frames. The shared cases run on both the TCP and the in-process plane."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time

import msgspec
import pytest

from tandem.protocol import GenerateOutput
from tandem.runtime import (
    EndpointNotFound,
    FrameTooLarge,
    LocalRequestPlane,
    PeerGone,
    RemoteError,
    TcpRequestClient,
    TcpRequestServer,
)
from tandem.runtime.framing import PREFACE, cluster_token, encode_frame, frame_header
from tandem.runtime.messages import DataFrame, EndFrame, ErrorFrame, Frame, RequestFrame
from tandem.runtime.testing import spawn_token_server


def run(coro, timeout: float = 15.0):
    async def guarded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(guarded())


class Handlers:
    """Endpoints that record what happened to them."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.produced = 0

    async def count(self, req):
        for i in range(req["n"]):
            yield {"i": i, "tag": req.get("tag")}

    async def slow(self, req):
        try:
            for i in range(1 << 30):
                await asyncio.sleep(req.get("delay", 0.01))
                yield i
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def flood(self, req):
        try:
            for i in range(1 << 30):
                self.produced += 1
                yield i
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def fail(self, req):
        yield "first"
        raise ValueError(f"bad input {req['x']}")

    async def typed(self, req: GenerateOutput):
        for t in req.token_ids:
            yield GenerateOutput(request_id=req.request_id, token_ids=[t])

    async def big(self, req):
        yield b"x" * req["size"]

    def install(self, server) -> None:
        for name in ("count", "slow", "flood", "fail", "big"):
            server.add_endpoint(name, getattr(self, name))
        server.add_endpoint("typed", self.typed, request_type=GenerateOutput)


async def make(kind: str, **server_kw):
    if kind == "tcp":
        server = TcpRequestServer(**server_kw)
        client = TcpRequestClient(window=8)
    else:
        plane = LocalRequestPlane()
        server, client = plane.server(), plane.client(window=8)
    handlers = Handlers()
    handlers.install(server)
    await server.start()
    return server, client, handlers


KINDS = ["tcp", "local"]


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_typed_and_errors(kind):
    async def main():
        server, client, _ = await make(kind)
        items = [x async for x in client.call(server.address, "count", {"n": 5, "tag": "a"})]
        assert items == [{"i": i, "tag": "a"} for i in range(5)]

        req = GenerateOutput(request_id="r1", token_ids=[7, 8, 9])
        outs = [
            o async for o in client.call(server.address, "typed", req, response_type=GenerateOutput)
        ]
        assert [o.token_ids for o in outs] == [[7], [8], [9]]
        assert all(isinstance(o, GenerateOutput) and o.request_id == "r1" for o in outs)

        got = []
        with pytest.raises(RemoteError, match="ValueError: bad input 42") as info:
            async for x in client.call(server.address, "fail", {"x": 42}):
                got.append(x)
        assert got == ["first"] and info.value.code == "handler_error"

        with pytest.raises(EndpointNotFound):
            async for _ in client.call(server.address, "nope", {}):
                pass
        with pytest.raises(RemoteError) as info:
            async for _ in client.call(server.address, "typed", {"request_id": 5}):
                pass
        assert info.value.code == "bad_request"
        await client.close()
        await server.stop()

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_many_concurrent_streams_one_connection(kind):
    async def main():
        server, client, _ = await make(kind)

        async def one(tag):
            return [x async for x in client.call(server.address, "count", {"n": 50, "tag": tag})]

        results = await asyncio.gather(*(one(t) for t in range(200)))
        for tag, items in enumerate(results):
            assert items == [{"i": i, "tag": tag} for i in range(50)]
        if kind == "tcp":
            assert len(client._conns) == 1 and len(server._connections) == 1
        assert server.inflight == 0
        await client.close()
        await server.stop()

    run(main())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["aclose", "break"])
def test_client_cancel_cancels_handler(kind, how):
    async def main():
        server, client, handlers = await make(kind)
        stream = client.call(server.address, "slow", {"delay": 0.005})
        got = []
        if how == "aclose":
            async for x in stream:
                got.append(x)
                if len(got) == 3:
                    break
            await stream.aclose()
        else:
            del stream
            async for x in client.call(server.address, "slow", {"delay": 0.005}):
                got.append(x)
                if len(got) == 3:
                    break  # the stream is dropped here; its finaliser cancels the call
        assert got == [0, 1, 2]
        await asyncio.wait_for(handlers.cancelled.wait(), 2.0)
        for _ in range(100):
            if server.inflight == 0:
                break
            await asyncio.sleep(0.01)
        assert server.inflight == 0
        await client.close()
        await server.stop()

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_deadline_cancels_handler_and_raises_timeout(kind):
    async def main():
        server, client, handlers = await make(kind)
        got = []
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            async for x in client.call(server.address, "slow", {"delay": 0.05}, timeout=0.3):
                got.append(x)
        assert 0.25 < time.monotonic() - start < 5.0  # not before the deadline; no hang
        assert 1 <= len(got) <= 7
        await asyncio.wait_for(handlers.cancelled.wait(), 2.0)
        # An absolute deadline (time.monotonic()) works the same way.
        with pytest.raises(TimeoutError):
            async for _ in client.call(
                server.address, "slow", {"delay": 1.0}, deadline=time.monotonic() + 0.1
            ):
                pass
        await client.close()
        await server.stop()

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_backpressure_bounds_a_slow_consumer(kind):
    async def main():
        server, client, handlers = await make(kind)
        fast = []
        async with client.call(server.address, "flood", {}, window=8) as stream:
            first = await stream.__anext__()
            assert first == 0
            await asyncio.sleep(0.3)  # a stalled consumer: the producer must stop, not buffer
            assert handlers.produced <= 8 + 2
            # Another stream on the same connection is not blocked by the stalled one.
            async for x in client.call(server.address, "count", {"n": 2000}):
                fast.append(x)
            assert len(fast) == 2000
            # Resuming the slow stream keeps flowing.
            for _ in range(100):
                await stream.__anext__()
        await asyncio.wait_for(handlers.cancelled.wait(), 2.0)
        await client.close()
        await server.stop()

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_server_stop_ends_streams_with_shutdown(kind):
    async def main():
        server, client, handlers = await make(kind)
        stream = client.call(server.address, "slow", {"delay": 0.01})
        assert await stream.__anext__() == 0
        await server.stop(grace=0.05)
        with pytest.raises(RemoteError) as info:
            async for _ in stream:
                pass
        assert info.value.code == "shutdown"
        assert handlers.cancelled.is_set()
        with pytest.raises(PeerGone):
            async for _ in client.call(server.address, "count", {"n": 1}):
                pass
        await client.close()

    run(main())


def test_peer_killed_mid_stream_raises_peer_gone():
    proc, address, _ = spawn_token_server(delay=0.01)
    try:

        async def main():
            client = TcpRequestClient()
            other = client.call(address, "tokens", {"n": 10**9})
            got = []
            start = None
            with pytest.raises(PeerGone):
                async for x in client.call(address, "tokens", {"n": 10**9}):
                    got.append(x)
                    if len(got) == 5:
                        proc.send_signal(signal.SIGKILL)
                        start = time.monotonic()
            assert time.monotonic() - start < 10.0  # a liveness bound: no hang
            # Every stream on the dead connection fails, not only the one being read.
            with pytest.raises(PeerGone):
                async for _ in other:
                    pass
            # A new call to the dead address fails fast too.
            with pytest.raises(PeerGone):
                async for _ in client.call(address, "tokens", {"n": 1}):
                    pass
            await client.close()

        run(main())
    finally:
        proc.kill()
        proc.wait()


def test_malformed_and_oversized_frames_are_rejected_server_keeps_serving(caplog):
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(Frame)

    async def main():
        server, client, _ = await make("tcp", max_frame=64 * 1024)
        host, port = server.address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(PREFACE + cluster_token(None))
        writer.write(frame_header(3, 1) + b"\xc1\xc1\xc1")  # not msgpack
        writer.write(encode_frame(encoder, 1, [99, 1, 2]))  # msgpack, but no such frame type
        big = 200 * 1024
        writer.write(frame_header(big, 2) + b"\0" * big)  # oversized: skipped, not buffered
        payload = msgspec.Raw(encoder.encode({"n": 3, "tag": "raw"}))
        writer.write(encode_frame(encoder, 1, RequestFrame("count", payload, None, 16)))
        await writer.drain()
        frames = []
        while not frames or not isinstance(frames[-1][1], EndFrame):
            header = await reader.readexactly(8)
            size, stream_id = int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")
            frames.append((stream_id, decoder.decode(await reader.readexactly(size))))
        [(_, rejected)] = [f for f in frames if f[0] == 2]  # the oversized frame's stream failed
        assert isinstance(rejected, ErrorFrame) and rejected.code == "frame_too_large"
        frames = [f for sid, f in frames if sid == 1]
        assert [msgspec.msgpack.decode(f.payload) for f in frames if isinstance(f, DataFrame)] == [
            {"i": i, "tag": "raw"} for i in range(3)
        ]
        writer.close()

        # A peer that does not speak the protocol is turned away; others are unaffected.
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 2.0) == b""
        writer.close()

        # Oversized messages are refused by the sender when it knows the limit ...
        small = TcpRequestClient(max_frame=64 * 1024)
        with pytest.raises(FrameTooLarge):
            async for _ in small.call(server.address, "count", {"n": 1, "tag": "y" * big}):
                pass
        with pytest.raises(RemoteError) as info:
            async for _ in client.call(server.address, "big", {"size": big}):
                pass
        assert info.value.code == "frame_too_large"
        # ... and by the receiver otherwise, failing only that stream, in both directions.
        with pytest.raises(RemoteError) as info:
            async for _ in client.call(server.address, "count", {"n": 1, "tag": "y" * big}):
                pass
        assert info.value.code == "frame_too_large"
        roomy = TcpRequestServer(max_frame=1 << 20)
        Handlers().install(roomy)
        await roomy.start()
        with pytest.raises(RemoteError) as info:
            async for _ in small.call(roomy.address, "big", {"size": big}):
                pass
        assert info.value.code == "frame_too_large"
        assert len([x async for x in small.call(roomy.address, "count", {"n": 3})]) == 3
        await small.close()
        await roomy.stop()
        items = [x async for x in client.call(server.address, "count", {"n": 2})]
        assert len(items) == 2
        await client.close()
        await server.stop()

    with caplog.at_level(logging.ERROR, logger="tandem.runtime"):
        run(main())
    text = caplog.text
    assert "malformed frame" in text and "exceeds the limit" in text
    assert "unexpected" in text or "malformed" in text
    assert "no Tandem preface" in text


def test_connect_refused_is_peer_gone():
    async def main():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        client = TcpRequestClient()
        with pytest.raises(PeerGone):
            async for _ in client.call(f"127.0.0.1:{port}", "x", {}):
                pass
        await client.close()

    run(main())


def test_cluster_secret_admits_only_peers_that_present_it(caplog, monkeypatch):
    monkeypatch.delenv("TANDEM_CLUSTER_SECRET", raising=False)

    async def count(client, address):
        return [x async for x in client.call(address, "count", {"n": 2, "tag": "s"})]

    async def main():
        server, _, _ = await make("tcp", secret="correct horse")
        assert len(await count(TcpRequestClient(secret="correct horse"), server.address)) == 2
        for stranger in (TcpRequestClient(), TcpRequestClient(secret="battery staple")):
            with pytest.raises(PeerGone):
                await count(stranger, server.address)
        assert "did not present this cluster's secret" in caplog.text
        # The environment variable is the default on both sides (what the CLI sets).
        monkeypatch.setenv("TANDEM_CLUSTER_SECRET", "correct horse")
        assert len(await count(TcpRequestClient(), server.address)) == 2
        await server.stop()

    run(main())


def test_binding_beyond_loopback_needs_a_secret_or_insecure(monkeypatch):
    monkeypatch.delenv("TANDEM_CLUSTER_SECRET", raising=False)
    with pytest.raises(ValueError, match="without a cluster secret"):
        TcpRequestServer("0.0.0.0")
    TcpRequestServer("0.0.0.0", insecure=True)
    TcpRequestServer("0.0.0.0", secret="s")
    TcpRequestServer("127.0.0.1")
    TcpRequestServer("::1")
    monkeypatch.setenv("TANDEM_CLUSTER_SECRET", "s")
    TcpRequestServer("0.0.0.0")


def test_mutual_tls_between_peers_of_one_ca(tmp_path, monkeypatch, caplog):
    """With TANDEM_TLS_* set, both sides show certificates of the cluster's CA; a client
    without TLS, or with a certificate of another CA, gets nothing."""
    import trustme  # a test dependency: certificates for tests

    ca, other_ca = trustme.CA(), trustme.CA()

    def files(authority, name):
        cert = authority.issue_cert("127.0.0.1", "localhost")
        paths = tmp_path / f"{name}.pem", tmp_path / f"{name}.key", tmp_path / f"{name}-ca.pem"
        cert.cert_chain_pems[0].write_to_path(paths[0])
        cert.private_key_pem.write_to_path(paths[1])
        authority.cert_pem.write_to_path(paths[2])
        return [str(p) for p in paths]

    def use(paths):
        for name, path in zip(("TANDEM_TLS_CERT", "TANDEM_TLS_KEY", "TANDEM_TLS_CA"), paths,
                              strict=True):  # fmt: skip
            monkeypatch.setenv(name, path)

    ours, theirs = files(ca, "ours"), files(other_ca, "theirs")

    async def count(client, address):
        try:
            return [x async for x in client.call(address, "count", {"n": 2, "tag": "t"})]
        finally:
            await client.close()

    async def main():
        use(ours)
        server, _, _ = await make("tcp")
        assert len(await count(TcpRequestClient(), server.address)) == 2
        use(theirs)
        with pytest.raises(PeerGone):
            await count(TcpRequestClient(), server.address)
        for name in ("TANDEM_TLS_CERT", "TANDEM_TLS_KEY", "TANDEM_TLS_CA"):
            monkeypatch.delenv(name)
        with pytest.raises(PeerGone):
            await count(TcpRequestClient(), server.address)
        await server.stop()

    run(main())
