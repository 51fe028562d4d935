"""Connection limits of the proxy listener: caps per listener and per client, and a header timeout.

Without them a few hundred half-sent requests (slowloris) hold the proxy's sockets open
indefinitely and exhaust the daemon's file descriptors, taking the piece server and dfget down
with it. :class:`ConnectionLimits` is the pure bookkeeping (how many connections are open, in
total and per client IP); :class:`GuardedServer` is the aiohttp server that applies it:

- a connection over ``max_connections``, or over ``max_per_client`` from one IP, is closed as
  soon as it is accepted;
- a connection must deliver a request's headers within ``header_timeout`` of being opened, and
  the next request's within ``header_timeout`` of the previous answer (an idle keep-alive
  connection is closed then too, which HTTP clients expect); a request being answered (a blob
  streaming, a ``CONNECT`` tunnel) is never cut by it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class ConnectionLimits:
    """Open connections in total and per client; pure (no I/O)."""

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self.per_client: dict[str, int] = {}
        self.refused = 0  # connections closed at once for being over a cap

    def admit(self, client: str) -> str | None:
        """None: admitted (call :meth:`release` when it closes). Else which cap it is over."""
        if self.total >= self.max_total:
            self.refused += 1
            return f"max {self.max_total} connections"
        if self.per_client.get(client, 0) >= self.max_per_client:
            self.refused += 1
            return f"max {self.max_per_client} connections per client"
        self.total += 1
        self.per_client[client] = self.per_client.get(client, 0) + 1
        return None

    def release(self, client: str) -> None:
        """An admitted connection closed."""
        self.total -= 1
        left = self.per_client[client] - 1
        if left:
            self.per_client[client] = left
        else:
            del self.per_client[client]  # the map holds only clients with open connections


@dataclass
class _Connection:
    client: str
    transport: asyncio.Transport
    busy: int = 0  # requests being answered
    timer: asyncio.TimerHandle | None = field(default=None)


class GuardedServer(web.Server):
    """An aiohttp low-level server with :class:`ConnectionLimits` and a header timeout."""

    def __init__(self, handler: Handler, *, limits: ConnectionLimits, header_timeout: float,
                 **kwargs: Any) -> None:
        super().__init__(self._guarded, **kwargs)
        self._inner = handler
        self.limits = limits
        self.header_timeout = header_timeout
        self._open: dict[RequestHandler, _Connection] = {}
        self.timed_out = 0  # connections closed for not sending headers in time

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        over = self.limits.admit(client)
        if over is not None:
            log.debug("proxy connection from %s closed: %s", client or "?", over)
            transport.abort()
            return
        connection = _Connection(client, transport)
        self._open[handler] = connection
        self._arm(connection)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        connection = self._open.pop(handler, None)
        if connection is not None:
            if connection.timer is not None:
                connection.timer.cancel()
            self.limits.release(connection.client)
        super().connection_lost(handler, exc)

    def _arm(self, connection: _Connection) -> None:
        if connection.timer is not None:
            connection.timer.cancel()
        connection.timer = self._loop.call_later(self.header_timeout, self._expire, connection)

    def _expire(self, connection: _Connection) -> None:
        connection.timer = None
        if connection.busy:
            return
        self.timed_out += 1
        log.debug("proxy connection from %s closed: no request headers within %.0fs", connection.client,
                  self.header_timeout)
        connection.transport.abort()

    async def _guarded(self, request: web.BaseRequest) -> web.StreamResponse:
        connection = self._open.get(request.protocol)
        if connection is None:
            return await self._inner(request)
        connection.busy += 1
        if connection.timer is not None:
            connection.timer.cancel()
            connection.timer = None
        try:
            return await self._inner(request)
        finally:
            connection.busy -= 1
            if not connection.busy and request.protocol in self._open:
                self._arm(connection)  # the next request's headers are due within header_timeout
