"""A consumer that falls behind takes the tokens already queued as one output, on the
request plane (both kinds) and from the engine: same tokens, fewer outputs, the end and
errors kept in their place."""

from __future__ import annotations

import asyncio

import pytest

from tandem.frontend.streams import coalesced
from tandem.protocol import GenerateOutput, TokenLogprob, merge_output
from tandem.runtime import LocalRequestPlane, RemoteError, TcpRequestClient, TcpRequestServer


def out(token: int, index: int = 0, finish: str | None = None, logprob: bool = False):
    lp = [TokenLogprob(token, -0.5)] if logprob else None
    return GenerateOutput(request_id="r", index=index, token_ids=[token], logprobs=lp,
                          finish_reason=finish, num_cached_tokens=token)  # fmt: skip


def test_merge_output_joins_one_sequence_until_its_end() -> None:
    first = out(1, logprob=True)
    assert merge_output(first, out(2, logprob=True))
    assert merge_output(first, out(3, finish="length", logprob=True))
    assert first.token_ids == [1, 2, 3] and first.finish_reason == "length"
    assert [lp.token_id for lp in first.logprobs] == [1, 2, 3] and first.num_cached_tokens == 3
    assert not merge_output(first, out(4))  # it ended
    other = out(5)
    assert not merge_output(other, out(6, index=1)) and other.token_ids == [5]
    assert not merge_output(other, GenerateOutput(request_id="q", token_ids=[7]))


async def tokens(req: GenerateOutput):
    for i, t in enumerate(req.token_ids):
        yield out(t, finish="length" if i == len(req.token_ids) - 1 else None)


async def fails_after_three(req: GenerateOutput):
    for t in (1, 2, 3):
        yield out(t)
    raise ValueError("broken engine")


async def plane(kind: str):
    if kind == "tcp":
        server, client = TcpRequestServer(), TcpRequestClient(window=8)
    else:
        local = LocalRequestPlane()
        server, client = local.server(), local.client(window=8)
    server.add_endpoint("tokens", tokens, request_type=GenerateOutput)
    server.add_endpoint("fails", fails_after_three, request_type=GenerateOutput)
    await server.start()
    return server, client


async def behind(stream, count: int) -> GenerateOutput:
    """The first output, once `count` more items wait behind it."""
    first = await anext(stream)
    for _ in range(500):
        if stream.buffered() >= count:
            return first
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {stream.buffered()} items arrived")


@pytest.mark.parametrize("kind", ["tcp", "local"])
def test_a_stream_that_fell_behind_comes_as_one_output(kind: str) -> None:
    async def main():
        server, client = await plane(kind)
        req = GenerateOutput(request_id="r", token_ids=[10, 11, 12, 13, 14, 15])
        stream = client.call(server.address, "tokens", req, response_type=GenerateOutput)
        first = await behind(stream, 6)  # five outputs and the end
        got = [o async for o in coalesced(stream, first, timeout=5.0)]
        assert [o.token_ids for o in got] == [[10, 11, 12, 13, 14, 15]]
        assert got[0].finish_reason == "length"

        stream = client.call(server.address, "fails", req, response_type=GenerateOutput)
        first = await behind(stream, 3)  # two outputs and the error
        seen = []
        with pytest.raises(RemoteError, match="broken engine"):
            async for o in coalesced(stream, first, timeout=5.0):
                seen.append(o.token_ids)
        assert seen == [[1, 2, 3]]  # the tokens before the failure reach the caller
        await client.close()
        await server.stop()

    asyncio.run(asyncio.wait_for(main(), 20))
