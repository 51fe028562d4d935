"""Connection limits of every HTTP listener (common.http_limits): the pure bookkeeping as tables,
then the aiohttp adapter on a real loopback socket with a handler that takes connections over the
way the proxy's CONNECT tunnels do."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from common.http_limits import ConnectionLimits, LimitedSite, OpenConnections

LIMITS = ConnectionLimits(header_timeout=5.0, max_connections=4, max_per_client=2)


@pytest.mark.parametrize(
    ("open_clients", "client", "refusal"),
    [
        ([], "10.0.0.1", None),
        (["10.0.0.1"], "10.0.0.1", None),
        (["10.0.0.1", "10.0.0.1"], "10.0.0.1", "max 2 connections per client"),
        (["10.0.0.1", "10.0.0.1"], "10.0.0.2", None),
        (["a", "b", "c", "d"], "e", "max 4 connections"),
        (["a", "a", "b", "c"], "a", "max 4 connections"),  # the total cap is named first
    ],
)
def test_admission(open_clients: list[str], client: str, refusal: str | None) -> None:
    connections = OpenConnections(LIMITS)
    for address in open_clients:
        assert connections.admit(address) is None
    assert connections.admit(client) == refusal
    assert connections.refused == (refusal is not None)
    assert connections.total == len(open_clients) + (refusal is None)


def test_release_makes_room_and_forgets_clients_that_left() -> None:
    connections = OpenConnections(ConnectionLimits(header_timeout=1.0, max_connections=2, max_per_client=2))
    assert connections.admit("a") is None and connections.admit("b") is None
    assert connections.over_cap("c") == "max 2 connections"
    assert connections.refused == 0  # asking is not refusing
    connections.release("a")
    assert connections.admit("c") is None
    connections.release("b")
    connections.release("c")
    assert connections.total == 0 and connections.per_client == {}


@pytest.mark.parametrize(("timeout", "total", "per_client"), [(0, 1, 1), (1.0, 0, 1), (1.0, 1, 0), (-1.0, 1, 1)])
def test_bad_limits_are_refused(timeout: float, total: int, per_client: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        ConnectionLimits(header_timeout=timeout, max_connections=total, max_per_client=per_client)


# -- the adapter on a real socket -------------------------------------------------------------------


async def _tunnel_or_answer(request: web.BaseRequest) -> web.StreamResponse:
    """``CONNECT``: answer 200, take the connection from aiohttp and echo until the client closes
    (as the proxy's tunnels do); anything else: ``ok``."""
    if request.method != "CONNECT":
        return web.Response(text="ok")
    transport = request.transport
    assert transport is not None
    response = web.StreamResponse(status=200)
    response.force_close()
    writer = await response.prepare(request)
    assert writer is not None
    await writer.drain()
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    transport.resume_reading()
    while data := await reader.read(1024):
        transport.write(data)
    transport.close()
    return response


@pytest.fixture
async def site() -> AsyncIterator[LimitedSite]:
    limits = ConnectionLimits(header_timeout=0.5, max_connections=8, max_per_client=2)
    # A web.Server takes keepalive_timeout itself: given to a ServerRunner it would be ignored.
    server = web.Server(_tunnel_or_answer, keepalive_timeout=limits.header_timeout)
    runner = web.ServerRunner(server, shutdown_timeout=1.0)
    await runner.setup()
    limited = LimitedSite(runner, "127.0.0.1", 0, limits)
    await limited.start()
    yield limited
    await runner.cleanup()


async def _open(site: LimitedSite) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", site._bound_port)


async def _tunnel(site: LimitedSite) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await _open(site)
    writer.write(b"CONNECT origin:443 HTTP/1.1\r\nHost: origin:443\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


async def _get(site: LimitedSite) -> bytes:
    reader, writer = await _open(site)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    return answer


async def test_finished_tunnels_do_not_use_up_the_clients_cap(site: LimitedSite) -> None:
    async with asyncio.timeout(10):
        for _ in range(3):  # more tunnels, one after the other, than the per-client cap
            reader, writer = await _tunnel(site)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.write_eof()
            assert await reader.read() == b""  # the tunnel closed on the server side
            writer.close()
        assert (await _get(site)).endswith(b"ok")
    assert site.refused == 0


async def test_caps_close_at_once_while_the_header_timeout_spares_tunnels(site: LimitedSite) -> None:
    async with asyncio.timeout(10):
        tunnel_reader, tunnel_writer = await _tunnel(site)
        slow_reader, slow_writer = await _open(site)
        slow_writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        over_reader, over_writer = await _open(site)  # the third from 127.0.0.1
        assert await over_reader.read() == b""
        assert site.refused == 1
        # The half-sent request is closed by the header timeout...
        assert await slow_reader.read() == b""
        # ... and the tunnel, open for longer than that, still carries bytes.
        tunnel_writer.write(b"still here")
        assert await tunnel_reader.readexactly(10) == b"still here"
        for writer in (tunnel_writer, slow_writer, over_writer):
            writer.close()
