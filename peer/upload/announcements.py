"""Piece announcements over the piece server: what ``SyncPieces`` tells a child, at a fraction of
the CPU.

A gRPC stream message costs 150-220 µs of CPU on the two sides together in Python (a server
streaming 20,000 ``SyncPiecesResponse`` to a client in the same process, grpcio 1.85: five thread
switches per message), and a parent announces every piece it gets to up to fifteen children:
16 lazy readers at once sent 22,000 of them, a fifth of the machine's CPU. Between Damselfly
peers the same announcements go as lines of an HTTP response instead::

    GET /tasks/{task_id}/pieces            X-Damselfly-Child: <the child's host id>

    200  X-Damselfly-Announcements: 1      (chunked, text/plain)
    <number>\\n ...                         every piece complete here (sorted), then each piece
                                           as it completes, several per write when they come
                                           together; an empty line every ANNOUNCE_KEEPALIVE
                                           seconds while nothing happens

As with ``SyncPieces``: pieces the child itself announced to this node are left out (a new
stream forgets them first), and the body ends when the task is deleted or fails here, or the
server stops, which the child takes as this parent gone. ``400``/``404`` (malformed, unknown
task) carry the marker header too: an answer without it comes from a server that has no such
route (a Dragonfly dfdaemon, an older Damselfly), and the child uses ``SyncPieces`` instead.
The keep-alive lines let the server notice a child that went away, and the child a parent that
did (no line for three intervals).

Each stream is a connection of its own (one per child, parent and task), where gRPC carries all of
a child's ``SyncPieces`` to a parent over one. So children follow seeds, the parents of every
node of a cluster, with ``SyncPieces``, and a child whose stream finds no answer at all (over a
parent's connection cap, say) falls back to ``SyncPieces`` too. One stream per pair of hosts for
all their tasks would lift that; it is not built.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from common.errors import DownloadFailed, TaskNotFound
from peer.storage.store import TASK_ID_RE, LocalTask, PieceStore

log = logging.getLogger(__name__)

ANNOUNCEMENTS_PATH = "/tasks/{task_id}/pieces"
MARKER_HEADER = "X-Damselfly-Announcements"
# A child's request header, here and on piece requests: its host id (who got a piece, for
# super-seeding; which pieces it announced to this node). A hint, not trusted.
CHILD_HEADER = "X-Damselfly-Child"
ANNOUNCE_KEEPALIVE = 5.0
# A piece number is a uint32 (Dragonfly's piece messages): ten digits at most.
MAX_NUMBER_DIGITS = 10


def announcements_path(task_id: str) -> str:
    return ANNOUNCEMENTS_PATH.format(task_id=task_id)


class Announcements:
    """The ``GET /tasks/{task_id}/pieces`` streams of one piece server."""

    def __init__(self, store: PieceStore, keepalive: float = ANNOUNCE_KEEPALIVE) -> None:
        self._store = store
        self.keepalive = keepalive
        self._streams: set[asyncio.Task[object]] = set()

    @property
    def open_streams(self) -> frozenset[asyncio.Task[object]]:
        """The request tasks of the streams open now."""
        return frozenset(self._streams)

    async def close(self) -> None:
        """End every stream (the server stops: its children learn that this parent is gone)."""
        streams = [stream for stream in self._streams if not stream.done()]
        for stream in streams:
            stream.cancel()
        if streams:
            await asyncio.wait(streams)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        task_id = request.match_info["task_id"]
        if not TASK_ID_RE.match(task_id):
            return _refusal(400, f"task id {task_id!r} is not 64 lowercase hex digits")
        task = self._store.get(task_id)
        if task is None:
            return _refusal(404, f"task {task_id} not found")
        child = request.headers.get(CHILD_HEADER, "")
        if child:
            task.forget_announced(child)  # a new subscription: what it told us may be gone since
        response = web.StreamResponse(headers={MARKER_HEADER: "1", "Content-Type": "text/plain",
                                               "Cache-Control": "no-store"})
        stream = asyncio.current_task()
        assert stream is not None  # aiohttp runs every request in a task of its own
        self._streams.add(stream)
        try:
            await response.prepare(request)
            # Once every piece was announced the stream stays until the task goes (or the child),
            # so that its end tells a child still fetching from here that this copy is gone.
            feed = task.feed()
            while True:
                numbers = [n for n in feed.take() if not (child and task.announced_by(child, n))]
                if numbers:
                    await response.write("".join(f"{n}\n" for n in numbers).encode())
                await self._until_changed_or_keepalive(task, response)
        except (TaskNotFound, DownloadFailed):
            pass  # deleted or failed here: the end of the body says this parent is gone
        except (ConnectionError, asyncio.CancelledError):
            # The child went away, or the server stops: no clean end (a cut body).
            if request.transport is not None:
                request.transport.abort()
            return response
        finally:
            self._streams.discard(stream)
        await response.write_eof()
        return response

    async def _until_changed_or_keepalive(self, task: LocalTask, response: web.StreamResponse) -> None:
        """Wait for the task to change; a keep-alive line for each interval without a change
        (writing to a child that went away raises ConnectionError)."""
        waiter = asyncio.ensure_future(task.changed())
        try:
            while True:
                done, _ = await asyncio.wait([waiter], timeout=self.keepalive)
                if done:
                    waiter.result()  # TaskNotFound / DownloadFailed
                    return
                await response.write(b"\n")
        finally:
            waiter.cancel()


def _refusal(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers={MARKER_HEADER: "1"})


async def follow_announcements(session: aiohttp.ClientSession, url: str, host_id: str,
                               have: Callable[[int], Awaitable[None]]) -> str | None:
    """Follow a parent's announcement stream at `url` as child `host_id`, calling `have` for each
    piece number, until the stream ends: "" then, or why it ended otherwise (an HTTP status, a
    broken connection, a parent silent for three keep-alive intervals, a line that is no piece
    number). None at once when there is no stream to follow: no answer at all (the connection
    refused or closed at once, as over the server's connection cap) or one without the marker
    header (a server without the route); the caller then uses SyncPieces."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=3 * ANNOUNCE_KEEPALIVE)
    try:
        response = await session.get(url, headers={CHILD_HEADER: host_id}, timeout=timeout)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        log.debug("no announcement stream at %s (%s): SyncPieces instead", url, exc or type(exc).__name__)
        return None
    try:
        async with response:
            if MARKER_HEADER not in response.headers:
                return None
            if response.status != 200:
                return f"HTTP {response.status}: {(await response.text())[:200].strip()}"
            pending = b""
            async for data in response.content.iter_any():
                lines = (pending + data).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if not line:
                        continue  # keep-alive
                    if not (line.isdigit() and len(line) <= MAX_NUMBER_DIGITS):
                        return f"announced {line[:40]!r}, which is no piece number"
                    await have(int(line))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return f"announcements: {exc or type(exc).__name__}"
    return ""
