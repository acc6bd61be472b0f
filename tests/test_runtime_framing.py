"""FrameProtocol's receive side, fed the way asyncio feeds a BufferedProtocol (`get_buffer`, then
`buffer_updated`) with the byte stream cut at arbitrary places: every frame comes out whole and in
order, whatever the cuts, small frames from the shared receive buffer and large ones from their
own, and oversized frames are skipped with their stream id reported."""

from __future__ import annotations

import random

import pytest

from tandem.runtime.framing import (
    LARGE_FRAME,
    PREFACE,
    RECV_BYTES,
    FrameProtocol,
    cluster_token,
    frame_header,
)

MAX_FRAME = 1 << 20


class Recorder(FrameProtocol):
    def __init__(self) -> None:
        super().__init__(MAX_FRAME, expect_preface=True)
        self.frames: list[tuple[int, bytes]] = []
        self.rejected: list[tuple[str, int]] = []
        self.prefaced = False

    def preface_received(self) -> None:
        self.prefaced = True

    def frame_received(self, stream_id: int, frame: bytes | bytearray) -> None:
        self.frames.append((stream_id, bytes(frame)))

    def frame_rejected(self, reason: str, stream_id: int) -> None:
        self.rejected.append((reason, stream_id))


def framed(payload: bytes, stream_id: int = 7) -> bytes:
    return frame_header(len(payload), stream_id) + payload


def feed(protocol: FrameProtocol, data: bytes, cuts: random.Random | int) -> None:
    """Deliver `data` in reads of random (or fixed) sizes, each at most what get_buffer offers."""
    pos = 0
    while pos < len(data):
        buf = protocol.get_buffer(-1)
        want = cuts if isinstance(cuts, int) else cuts.choice([1, 3, 100, 5000, 70000, 1 << 20])
        n = min(len(buf), want, len(data) - pos)
        assert n > 0, "get_buffer offered no room"
        buf[:n] = data[pos : pos + n]
        protocol.buffer_updated(n)
        pos += n


def payloads(rng: random.Random) -> list[bytes]:
    sizes = [0, 1, 17, LARGE_FRAME - 1, LARGE_FRAME, RECV_BYTES, 3 * RECV_BYTES + 5, MAX_FRAME]
    sizes += [rng.randrange(0, 2000) for _ in range(300)]
    rng.shuffle(sizes)
    return [rng.randbytes(size) for size in sizes]


@pytest.mark.parametrize("seed", range(4))
def test_frames_survive_any_cut_of_the_stream(seed: int) -> None:
    rng = random.Random(seed)
    sent = payloads(rng)
    oversized = rng.randbytes(MAX_FRAME + 1)
    stream = b"".join(framed(p, i) for i, p in enumerate(sent[:150]))
    stream += framed(oversized, 2**32 - 1)
    stream += b"".join(framed(p, i) for i, p in enumerate(sent[150:], 150))
    protocol = Recorder()
    feed(protocol, PREFACE + cluster_token(None) + stream, rng)
    assert protocol.prefaced
    assert protocol.frames == list(enumerate(sent))
    [(reason, stream_id)] = protocol.rejected
    assert f"frame of {MAX_FRAME + 1} bytes exceeds the limit" in reason
    assert stream_id == 2**32 - 1


def test_byte_by_byte_and_in_whole_buffers() -> None:
    rng = random.Random(9)
    sent = [rng.randbytes(rng.randrange(0, 300)) for _ in range(200)]
    for cut in (1, RECV_BYTES):
        protocol = Recorder()
        feed(protocol, PREFACE + cluster_token(None) + b"".join(framed(p) for p in sent), cut)
        assert [frame for _, frame in protocol.frames] == sent


def test_a_stream_without_the_preface_is_refused() -> None:
    protocol = Recorder()
    feed(protocol, b"GET / HTTP/1.1\r\n\r\n", 4096)
    assert not protocol.prefaced and protocol.frames == []
