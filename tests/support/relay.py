"""A byte-counting TCP relay, to measure origin traffic independently of our own metrics.

Put it in front of the registry and point the system under test at ``relay.url`` instead of
``registry.url``; every byte the registry sends to anyone passes through it and is counted.
It runs its own event loop in a thread, so it works the same from sync and async tests.

Example::

    with ByteCountingRelay("127.0.0.1", registry.port) as relay:
        fetch(f"{relay.url}/v2/demo/blobs/{digest}")        # whatever the test exercises
        assert relay.bytes_from_target < size + 4096          # about one copy of the blob
        relay.reset()

Counting: a byte is counted when the relay has read it from one side and before it is written to
the other, so once a client has received something, the counter already includes it.
``cut_after`` makes the relay drop each connection after that many bytes from the target (an
origin that dies mid-body); :meth:`drop_connections` breaks the live ones now. ``rate`` caps the
bytes per second from the target over all connections together (a slow origin link).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from types import TracebackType

_READ_SIZE = 256 * 1024


class ByteCountingRelay:
    """Listens on ``127.0.0.1:<free port>`` and forwards every connection to the target."""

    def __init__(self, target_host: str, target_port: int, *, cut_after: int | None = None,
                 rate: float | None = None) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.cut_after = cut_after  # per connection, bytes from the target before the relay hangs up
        self.rate = rate  # bytes per second from the target, all connections together
        self._link_free_at = 0.0  # when the paced link has sent everything handed to it so far
        self._bytes_from_target = 0
        self._bytes_to_target = 0
        self._connections = 0
        self._changed = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._port = 0

    # -- counters -------------------------------------------------------------------------------

    @property
    def bytes_from_target(self) -> int:
        """Bytes the target sent to clients since start or :meth:`reset`."""
        with self._changed:
            return self._bytes_from_target

    @property
    def bytes_to_target(self) -> int:
        """Bytes clients sent to the target since start or :meth:`reset`."""
        with self._changed:
            return self._bytes_to_target

    @property
    def connections(self) -> int:
        """Client connections accepted since start or :meth:`reset`."""
        with self._changed:
            return self._connections

    def reset(self) -> None:
        """Zero the counters (live connections keep being counted from zero)."""
        with self._changed:
            self._bytes_from_target = 0
            self._bytes_to_target = 0
            self._connections = 0
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[ByteCountingRelay], bool], timeout: float = 10.0) -> bool:
        """Block until `predicate(self)` holds (re-checked on every count change) or `timeout` passes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                # predicate reads the counters, which take the (re-entrant) condition lock
                if predicate(self):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("relay not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``"""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ByteCountingRelay:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="byte-counting-relay", daemon=True)
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), loop
        ).result(timeout=10)
        self._server = server
        self._port = int(server.sockets[0].getsockname()[1])
        return self

    def drop_connections(self) -> None:
        """Abort every live connection (both sides see a reset)."""
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._abort_all(), self._loop).result(timeout=10)

    def close(self) -> None:
        loop = self._loop
        if loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        loop.close()
        self._loop = None
        self._thread = None

    def __enter__(self) -> ByteCountingRelay:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- inside the relay's loop ----------------------------------------------------------------

    async def _abort_all(self) -> None:
        for client, target in list(self._pairs):
            client.transport.abort()
            target.transport.abort()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._abort_all()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _count(self, from_target: int = 0, to_target: int = 0, connection: int = 0) -> None:
        with self._changed:
            self._bytes_from_target += from_target
            self._bytes_to_target += to_target
            self._connections += connection
            self._changed.notify_all()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._count(connection=1)
        try:
            target_reader, target_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        pair = (client_writer, target_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(
                self._pump(client_reader, target_writer, from_target=False),
                self._pump(target_reader, client_writer, from_target=True),
            )
        except asyncio.CancelledError:
            pass  # the relay is closing; asyncio's stream callback would log a re-raised cancel
        finally:
            self._pairs.discard(pair)
            for writer in pair:
                writer.close()

    async def _pace(self, size: int) -> None:
        """Hold `size` bytes until the shared link of `rate` bytes per second has sent them."""
        assert self.rate
        now = time.monotonic()
        self._link_free_at = max(now, self._link_free_at) + size / self.rate
        await asyncio.sleep(self._link_free_at - now)  # the link's own pace, not a wait for a condition

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, from_target: bool
    ) -> None:
        sent = 0
        try:
            while True:
                data = await reader.read(_READ_SIZE)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()  # pass the half-close on; the other direction goes on
                    return
                if from_target and self.cut_after is not None:
                    data = data[: max(self.cut_after - sent, 0)]
                self._count(from_target=len(data)) if from_target else self._count(to_target=len(data))
                if from_target and self.rate:
                    await self._pace(len(data))
                writer.write(data)
                await writer.drain()
                sent += len(data)
                if from_target and self.cut_after is not None and sent >= self.cut_after:
                    raise ConnectionAbortedError("cut_after reached")
        except (ConnectionError, OSError):
            # One side broke (or the relay cut it): break the other side too.
            writer.transport.abort()
            for pair in list(self._pairs):
                if writer in pair:
                    for side in pair:
                        side.transport.abort()
