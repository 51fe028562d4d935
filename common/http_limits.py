"""Connection limits of an aiohttp listener: a header/idle timeout, caps in all and per client.

Without them a few hundred half-sent requests (slowloris) hold a listener's sockets open
indefinitely and exhaust the daemon's file descriptors, taking every other listener down with it.
Every HTTP listener of a dfdaemon uses this module: the registry mirror / proxy, the piece server
and the health and metrics listeners.

- :class:`ConnectionLimits` is the value object, validated once.
- :class:`OpenConnections` is the pure bookkeeping: how many connections are open, in all and per
  client address, and whether one more may be accepted.
- :class:`LimitedSite` applies the caps: a connection over ``max_connections``, or over
  ``max_per_client`` from one address, is closed as soon as it is accepted, before aiohttp builds
  a request handler for it. A TLS handshake must finish within ``header_timeout``.
- The header timeout itself is aiohttp's ``keepalive_timeout`` (give it ``header_timeout``, as
  :func:`start_limited_http` does): aiohttp arms it when a connection is accepted and again after
  each answer, and closes the connection only while it waits for a request's headers
  (``web_protocol.RequestHandler._process_keepalive``). So a slowloris connection that trickles a
  byte a second is closed when it runs out, an idle keep-alive connection too (which HTTP clients
  expect), and a request being answered (a blob streaming, a ``CONNECT`` tunnel) never is.
- :func:`listen_limited` serves an aiohttp runner through a :class:`LimitedSite`;
  :func:`start_limited_http` does it for an application, with the header timeout set.

A handler may take a connection over from aiohttp (the proxy's ``CONNECT`` tunnels replace the
transport's protocol, or start TLS on it); the site then never hears that it closed. It counts such
a connection as open until it finds its transport closed, which it checks whenever a cap is
reached, so finished tunnels never use up a client's cap.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass

from aiohttp import web

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Limits of one listener."""

    # A request's headers (and a TLS handshake) must arrive within this; also the idle limit (give it
    # to the aiohttp runner as keepalive_timeout).
    header_timeout: float
    max_connections: int
    max_per_client: int

    def __post_init__(self) -> None:
        if self.header_timeout <= 0 or self.max_connections < 1 or self.max_per_client < 1:
            raise ValueError(f"bad connection limits {self}: the timeout and both caps must be positive")


# Health and metrics: a probe or a scrape now and then, nothing that needs many connections.
STATUS_LIMITS = ConnectionLimits(header_timeout=5.0, max_connections=64, max_per_client=16)


class OpenConnections:
    """The open connections of one listener, in all and per client address; pure (no I/O)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.total = 0
        self.per_client: dict[str, int] = {}  # only clients with open connections
        self.refused = 0  # connections closed at once for being over a cap

    def over_cap(self, client: str) -> str | None:
        """Which cap one more connection from `client` would exceed; None if it fits."""
        if self.total >= self.limits.max_connections:
            return f"max {self.limits.max_connections} connections"
        if self.per_client.get(client, 0) >= self.limits.max_per_client:
            return f"max {self.limits.max_per_client} connections per client"
        return None

    def admit(self, client: str) -> str | None:
        """None: admitted (call :meth:`release` when it closes). Else refused, and which cap it is over."""
        over = self.over_cap(client)
        if over is not None:
            self.refused += 1
            return over
        self.total += 1
        self.per_client[client] = self.per_client.get(client, 0) + 1
        return None

    def release(self, client: str) -> None:
        """An admitted connection closed."""
        left = self.per_client[client] - 1
        self.total -= 1
        if left:
            self.per_client[client] = left
        else:
            del self.per_client[client]


def _client_of(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


class _Closing(asyncio.Protocol):
    """Takes a connection over the cap and closes it at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Admitted(asyncio.Protocol):
    """An admitted connection: hands everything to aiohttp's handler, and tells the site when it closes."""

    def __init__(self, site: LimitedSite, transport: asyncio.BaseTransport, client: str,
                 inner: asyncio.Protocol) -> None:
        self.site = site
        self.transport = transport
        self.client = client
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.site._closed(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class LimitedSite(web.TCPSite):
    """A TCPSite that refuses connections over its :class:`ConnectionLimits`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, limits: ConnectionLimits, *,
                 ssl_context: ssl.SSLContext | None = None, reuse_address: bool | None = None) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, reuse_address=reuse_address)
        self.limits = limits
        self.connections = OpenConnections(limits)
        self._open: set[_Admitted] = set()

    @property
    def refused(self) -> int:
        """Connections closed at once for being over a cap."""
        return self.connections.refused

    def _accept(self) -> asyncio.Protocol:
        """The protocol of a connection just accepted: aiohttp's handler, or one that closes it."""
        site = self

        class _Admission(asyncio.Protocol):
            # asyncio asks for the protocol before it has the transport (and the client's address).
            def __init__(self) -> None:
                self.inner: asyncio.Protocol | None = None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.inner = site._admit(transport)
                # The transport calls the chosen protocol directly from now on.
                transport.set_protocol(self.inner)
                self.inner.connection_made(transport)

        return _Admission()

    def _admit(self, transport: asyncio.BaseTransport) -> asyncio.Protocol:
        handler_factory = self._runner.server
        assert handler_factory is not None  # set up by the runner before any site starts
        client = _client_of(transport)
        if self.connections.over_cap(client) is not None:
            self._forget_taken_over()
        over = self.connections.admit(client)
        if over is not None:
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("%s: connection from %s refused (over %s); %d refused so far",
                            self.name, client or "?", over, self.refused)
            return _Closing()
        admitted = _Admitted(self, transport, client, handler_factory())
        self._open.add(admitted)
        return admitted

    def _closed(self, connection: _Admitted) -> None:
        if connection in self._open:
            self._open.remove(connection)
            self.connections.release(connection.client)

    def _forget_taken_over(self) -> None:
        """Release the connections a handler took over and has closed since (their protocol is not ours)."""
        for connection in [c for c in self._open if c.transport.is_closing()]:
            self._closed(connection)

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._accept, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
            ssl_handshake_timeout=self.limits.header_timeout if self._ssl_context is not None else None,
        )
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]
        else:
            self._bound_port = self._port


async def listen_limited(runner: web.BaseRunner, host: str, port: int, limits: ConnectionLimits,
                         ssl_context: ssl.SSLContext | None = None) -> int:
    """Set up `runner` and serve it on host:port (0 picks a free port) under `limits`; the bound port.

    The runner's server must have ``keepalive_timeout=limits.header_timeout`` (the header timeout).
    When the port cannot be bound the runner is cleaned up again before the error propagates.
    """
    await runner.setup()
    try:
        await LimitedSite(runner, host, port, limits, ssl_context=ssl_context, reuse_address=True).start()
    except BaseException:
        await runner.cleanup()
        raise
    return int(runner.addresses[0][1])


async def start_limited_http(app: web.Application, host: str, port: int, limits: ConnectionLimits) -> web.AppRunner:
    """Serve `app` on host:port under `limits`; the runner to clean up when done."""
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=limits.header_timeout)
    await listen_limited(runner, host, port, limits)
    return runner
