"""Small loopback HTTP servers for tests of HTTP clients (origins that misbehave on purpose).

``serve_app`` runs an aiohttp application; ``serve_raw`` runs a bare TCP handler that writes
whatever bytes it likes (short bodies, resets, broken headers). Both bind 127.0.0.1 on a free
port and yield the base URL ``http://127.0.0.1:PORT``.

Example::

    async def short(reader, writer):
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 10\\r\\n\\r\\nabc")
        writer.close()

    async with serve_raw(short) as base_url:
        ...
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web

RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Run `app` on 127.0.0.1:<free port> for the duration of the block."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def serve_raw(handler: RawHandler) -> AsyncIterator[str]:
    """Run a raw TCP `handler` per connection on 127.0.0.1:<free port>."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    """The request line and headers of one HTTP/1.1 request (bodies are not expected)."""
    return await reader.readuntil(b"\r\n\r\n")
