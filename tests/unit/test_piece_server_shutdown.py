"""PieceServer when clients go away mid-request, and when it stops: no request task is lost.

aiohttp forgets the request task of a connection once the connection is lost (the task then
lives only as long as something it waits on refers to it), and its shutdown neither cancels nor
waits for such a task beyond the grace period. A task that ends up unreferenced while pending is
destroyed by the garbage collector, which the loop reports as "Task was destroyed but it is
pending!". These tests make raw clients leave (reset or close) at each point where a request of
the piece server waits, collect garbage, and check what the loop reported and what is left.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvloop
from aiohttp import web

from common.pieces import piece_span
from peer.metrics import DaemonMetrics
from peer.storage.store import PieceStore
from peer.upload.piece_server import PieceServer

TASK = "f" * 64
BIG = 16 * 1024 * 1024  # far more than loopback socket buffers hold for a client that reads nothing
SMALL_RCVBUF = 4096  # a client that reads nothing, with a small window
DEADLINE = 10.0
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


async def add_big_piece(store: PieceStore) -> None:
    task = store.create(TASK, url="http://origin.test/blob")
    task.set_content_info(BIG, BIG, {})
    span = piece_span(0, BIG, BIG)

    async def zeros() -> AsyncIterator[bytes]:
        for _ in range(span.length // (1024 * 1024)):
            yield bytes(1024 * 1024)

    await task.write_piece(0, zeros())


def counter(metric: object) -> float:
    return float(metric._value.get())  # type: ignore[attr-defined]


async def eventually(condition: Callable[[], bool], attempts: int = 500) -> None:
    for _ in range(attempts):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met within the deadline")


def other_tasks() -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks() if task is not asyncio.current_task() and not task.done()]


class LoopReports:
    """The exception handler of the loop under test: what it reported (a task destroyed pending...)."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.messages.append(f"{context.get('message')}: {context.get('task', context.get('exception'))!r}")
        loop.default_exception_handler(context)

    def collect(self) -> list[str]:
        """Collect garbage (a pending task nothing refers to is destroyed now): the reports so far."""
        gc.collect()
        return list(self.messages)


async def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def send_request(sock: socket.socket, path: str) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def leave(sock: socket.socket, how: str) -> None:
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@asynccontextmanager
async def serving(store: PieceStore, *, full_socket: bool = False, **options: Any) -> AsyncIterator[SimpleNamespace]:
    """A started PieceServer; with `full_socket`, every response waits behind megabytes the client never reads.

    (A response hook stuffs the connection first, so the response's own first write waits for
    the transport's buffer to drain.)
    """
    metrics = DaemonMetrics()
    server = PieceServer(store, metrics=metrics, **{"upload_slots": 1, "slot_wait": DEADLINE, **options})
    if full_socket:

        async def stuff(request: web.Request, response: web.StreamResponse) -> None:
            assert request.transport is not None
            request.transport.write(bytes(BIG))

        server.app.on_response_prepare.append(stuff)
    port = await server.start("127.0.0.1", 0)
    try:
        yield SimpleNamespace(server=server, metrics=metrics, port=port)
    finally:
        await server.stop()


POINTS = ["slot", "send", "flush", "refusal", "stalled"]
# `flush` is the wait of our threaded send, so uvloop only. (On asyncio the response headers wait
# inside loop.sendfile, whose selector transport, on a write error while it waits, has its
# connection_lost set the already failed waiter again and log InvalidStateError: a stdlib quirk
# that loses no task.)
CASES = [(loop, point) for loop in sorted(LOOPS) for point in POINTS if (loop, point) != ("asyncio", "flush")]


@pytest.mark.parametrize("how", ["reset", "close"])
@pytest.mark.parametrize(("loop_name", "point"), CASES)
def test_client_leaving_while_a_request_waits_loses_no_task(
    tmp_path: Path, loop_name: str, point: str, how: str
) -> None:
    """The client leaves while its request waits for: an upload slot (`slot`), the body going out
    (`send`: a sender thread, or the loop's sendfile), the response headers leaving the transport
    (`flush`), a refusal leaving the transport (`refusal`, aiohttp's own drain), or after the
    server gave it up as stalled and closed the connection itself (`stalled`)."""
    reports = LoopReports()
    piece = f"/pieces/{TASK}/0"

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(reports)
        store = PieceStore(tmp_path)
        store.load()
        await add_big_piece(store)
        options: dict[str, Any] = {"full_socket": point in ("flush", "refusal")}
        if point == "stalled":
            options["stall_timeout"] = 0.2
        async with serving(store, **options) as served:
            uploads = served.metrics.upload_pieces
            clients = [await connect(served.port, SMALL_RCVBUF)]
            if point == "refusal":
                await send_request(clients[0], f"/pieces/{TASK}/1")
                await eventually(lambda: counter(uploads.labels("not_found")) == 1)
            else:
                await send_request(clients[0], piece)
                await eventually(lambda: served.server.uploads_in_progress == 1)
            if point == "slot":  # the one slot is taken: a second request waits for it
                clients.append(await connect(served.port))
                await send_request(clients[1], piece)
            if point == "stalled":
                await eventually(lambda: counter(uploads.labels("failed")) == 1)
            await asyncio.sleep(0.1)  # the request is waiting now

            leave(clients.pop(), how)
            await asyncio.sleep(0.1)  # the loss is noticed; the request may still be waiting
            assert reports.collect() == []
            while clients:
                leave(clients.pop(), how)
            await eventually(lambda: not other_tasks())  # every request finished
            assert served.server.uploads_in_progress == 0
            assert reports.collect() == []
        assert not other_tasks()

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(scenario())
    assert reports.collect() == []


def test_stop_finishes_an_upload_that_outlived_its_connection(tmp_path: Path) -> None:
    """uvloop closes the transport when the client half-closes (EOF), while the sender thread goes
    on sending on its own duplicate of the socket until the stall timeout: aiohttp no longer
    tracks that request, so stop() must finish it, or closing the loop destroys it pending."""
    reports = LoopReports()
    loop = uvloop.new_event_loop()
    loop.set_exception_handler(reports)
    client: list[socket.socket] = []

    async def scenario() -> None:
        store = PieceStore(tmp_path)
        store.load()
        await add_big_piece(store)
        metrics = DaemonMetrics()
        server = PieceServer(store, upload_slots=1, metrics=metrics)  # the 30 s stall timeout
        port = await server.start("127.0.0.1", 0)
        try:
            client.append(await connect(port, SMALL_RCVBUF))
            await send_request(client[0], f"/pieces/{TASK}/0")
            await eventually(lambda: server.sendfile_in_threads and server.uploads_in_progress == 1)
            await asyncio.sleep(0.1)  # the sender thread waits for the client to read
            client[0].shutdown(socket.SHUT_WR)
            await asyncio.sleep(0.1)
            assert server.uploads_in_progress == 1  # the upload goes on without its transport
        finally:
            await server.stop()
        assert not other_tasks()  # nothing left for the closing loop to destroy
        assert server.uploads_in_progress == 0
        assert counter(metrics.concurrent_uploads) == 0

    try:
        # no Runner: it would cancel the leftovers that stop() must not leave behind
        loop.run_until_complete(scenario())
    finally:
        loop.close()
        for sock in client:
            sock.close()
    assert reports.collect() == []
