"""Connection limits of an aiohttp listener: header/idle timeout, caps in all and per client.

aiohttp's own ``keepalive_timeout`` already closes a connection that has not completed a request
within that time, from the moment it is accepted (aiohttp ``web_protocol.connection_made``), so it
is the header timeout as well as the idle timeout: a slowloris connection that trickles a byte a
second is closed when it runs out. What aiohttp lacks is a cap: :class:`LimitedSite` accepts a
connection only while the listener holds fewer than ``max_connections`` and that client's address
fewer than ``max_per_client``; any other is closed at once, so one host cannot take every file
descriptor of the daemon. The decision is :func:`admits`, pure.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Limits of one listener."""

    # A request's headers (and a TLS handshake) must arrive within this; also the idle limit (give it
    # to web.AppRunner as keepalive_timeout).
    header_timeout: float
    max_connections: int
    max_per_client: int

    def __post_init__(self) -> None:
        if self.header_timeout <= 0 or self.max_connections < 1 or self.max_per_client < 1:
            raise ValueError(f"bad connection limits {self}")


# Health and metrics: a probe or a scrape now and then, nothing that needs many connections.
STATUS_LIMITS = ConnectionLimits(header_timeout=5.0, max_connections=64, max_per_client=16)


def admits(limits: ConnectionLimits, open_clients: Iterable[str | None], client: str | None) -> bool:
    """Whether a new connection from `client` may be accepted next to the open ones."""
    total = 0
    same = 0
    for address in open_clients:
        total += 1
        same += address == client
    return total < limits.max_connections and same < limits.max_per_client


def _client_of(transport: asyncio.BaseTransport | None) -> str | None:
    if transport is None:
        return None
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else None


class _Closing(asyncio.Protocol):
    """Takes a connection over the cap and closes it at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class LimitedSite(web.TCPSite):
    """A TCPSite that refuses connections over its :class:`ConnectionLimits`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, limits: ConnectionLimits, *,
                 ssl_context: ssl.SSLContext | None = None, reuse_address: bool | None = None) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, reuse_address=reuse_address)
        self.limits = limits
        self.refused = 0

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        handler_factory = server
        loop = asyncio.get_running_loop()

        class _Admission(asyncio.Protocol):
            """Decides on the accepted connection, then hands it to aiohttp's handler."""

            def __init__(self, site: LimitedSite) -> None:
                self.site = site
                self.inner: asyncio.Protocol | None = None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                client = _client_of(transport)
                open_clients = (_client_of(handler.transport) for handler in handler_factory.connections)
                if not admits(self.site.limits, open_clients, client):
                    self.site.refused += 1
                    if self.site.refused == 1 or self.site.refused % 1000 == 0:
                        log.warning("%s: connection from %s refused (over %s); %d refused so far",
                                    self.site.name, client, self.site.limits, self.site.refused)
                    self.inner = _Closing()
                else:
                    self.inner = handler_factory()
                self.inner.connection_made(transport)

            def data_received(self, data: bytes) -> None:
                if self.inner is not None:
                    self.inner.data_received(data)

            def eof_received(self) -> bool | None:
                return self.inner.eof_received() if self.inner is not None else None

            def connection_lost(self, exc: Exception | None) -> None:
                if self.inner is not None:
                    self.inner.connection_lost(exc)

            def pause_writing(self) -> None:
                if self.inner is not None:
                    self.inner.pause_writing()

            def resume_writing(self) -> None:
                if self.inner is not None:
                    self.inner.resume_writing()

        self._server = await loop.create_server(
            lambda: _Admission(self), self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
            ssl_handshake_timeout=self.limits.header_timeout if self._ssl_context is not None else None,
        )
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]
        else:
            self._bound_port = self._port


async def start_limited_http(app: web.Application, host: str, port: int, limits: ConnectionLimits) -> web.AppRunner:
    """Serve `app` on host:port under `limits`; the runner to clean up when done."""
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=limits.header_timeout)
    await runner.setup()
    try:
        await LimitedSite(runner, host, port, limits).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
