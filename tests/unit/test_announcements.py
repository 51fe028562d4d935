"""Piece announcements over the piece server (peer.upload.announcements): a real PieceServer on
loopback and the child's reader, follow_announcements. How SyncPieces does the same over gRPC is
in tests/unit/test_sync_pieces.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from peer.metrics import DaemonMetrics
from peer.storage.store import PieceStore
from peer.upload.announcements import CHILD_HEADER, MARKER_HEADER, announcements_path, follow_announcements
from peer.upload.piece_server import PieceServer
from tests.unit.test_sync_pieces import TASK, new_task, one

DEADLINE = 10.0
CHILD = "10.0.0.9-child"


@asynccontextmanager
async def serving(store: PieceStore) -> AsyncIterator[tuple[PieceServer, str, aiohttp.ClientSession]]:
    server = PieceServer(store, upload_slots=4, metrics=DaemonMetrics())
    port = await server.start("127.0.0.1", 0)
    session = aiohttp.ClientSession()
    try:
        yield server, f"http://127.0.0.1:{port}", session
    finally:
        await session.close()
        await server.stop()


class Follower:
    """follow_announcements in a task; the numbers it heard, as they come."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.heard: list[int] = []
        self._news = asyncio.Event()
        self.task = asyncio.create_task(follow_announcements(session, url, CHILD, self._have))

    async def _have(self, number: int) -> None:
        self.heard.append(number)
        self._news.set()

    async def until_heard(self, count: int) -> list[int]:
        async with asyncio.timeout(DEADLINE):
            while len(self.heard) < count:
                self._news.clear()
                await self._news.wait()
        return self.heard

    async def end(self) -> str | None:
        async with asyncio.timeout(DEADLINE):
            return await self.task


async def test_pieces_complete_now_come_sorted_then_each_as_it_completes(tmp_path: Path) -> None:
    store, task = new_task(tmp_path, 5)
    for number in (2, 0):
        await task.write_piece(number, one(number))
    async with serving(store) as (_, base, session):
        follower = Follower(session, base + announcements_path(TASK))
        assert await follower.until_heard(2) == [0, 2]
        await task.write_piece(4, one(4))
        assert await follower.until_heard(3) == [0, 2, 4]
        task.note_announced(CHILD, 1)  # the child told this node it has piece 1 (it is our parent too)
        await task.write_piece(1, one(1))
        await task.write_piece(3, one(3))
        assert await follower.until_heard(4) == [0, 2, 4, 3]
        # Complete here, the stream stays open (its end would say this copy is gone) until the
        # task is deleted.
        await asyncio.sleep(0.1)  # a moment in which nothing must happen (not a wait for it)
        assert not follower.task.done()
        await store.delete(TASK)
        assert await follower.end() == ""


async def test_the_keep_alive_lets_the_server_notice_a_child_that_went_away(tmp_path: Path) -> None:
    store, task = new_task(tmp_path, 3)
    await task.write_piece(0, one(0))
    async with serving(store) as (server, base, session):
        server.announcements.keepalive = 0.05
        async with session.get(base + announcements_path(TASK), headers={CHILD_HEADER: CHILD}) as response:
            assert response.headers[MARKER_HEADER] == "1"
            assert await response.content.readline() == b"0\n"
            assert await response.content.readline() == b"\n"  # idle: a keep-alive line
            streams = server.announcements.open_streams
            assert len(streams) == 1
        await session.close()  # the child goes away
        _, still_open = await asyncio.wait(streams, timeout=DEADLINE)
        assert not still_open and not server.announcements.open_streams


async def test_stopping_the_server_ends_the_streams(tmp_path: Path) -> None:
    store, task = new_task(tmp_path, 3)
    await task.write_piece(0, one(0))
    server = PieceServer(store, upload_slots=4, metrics=DaemonMetrics())
    port = await server.start("127.0.0.1", 0)
    async with aiohttp.ClientSession() as session:
        follower = Follower(session, f"http://127.0.0.1:{port}{announcements_path(TASK)}")
        await follower.until_heard(1)
        async with asyncio.timeout(DEADLINE):  # not the shutdown timeout of each open request
            await server.stop()
        reason = await follower.end()
    assert reason is not None and reason != ""  # a cut stream: the parent is gone


@pytest.mark.parametrize(("task_id", "status"), [("A" * 64, 400), ("x%00y", 400), ("b" * 64, 404)])
async def test_a_bad_or_unknown_task_is_refused_with_the_marker(tmp_path: Path, task_id: str, status: int) -> None:
    store, _ = new_task(tmp_path, 1)
    async with serving(store) as (_, base, session):
        async with session.get(base + f"/tasks/{task_id}/pieces") as response:
            assert response.status == status and response.headers[MARKER_HEADER] == "1"
        reason = await follow_announcements(session, base + f"/tasks/{task_id}/pieces", CHILD, _ignore)
    assert reason is not None and reason.startswith(f"HTTP {status}")


async def _ignore(number: int) -> None:
    pass


@asynccontextmanager
async def fake_parent(handler: object) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/tasks/{task_id}/pieces", handler)  # type: ignore[arg-type]
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}{announcements_path(TASK)}"
    finally:
        await runner.cleanup()


async def test_a_parent_without_the_stream_is_told_apart(tmp_path: Path) -> None:
    async def not_found(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()  # what a server without the route answers (no marker)

    async with fake_parent(not_found) as url, aiohttp.ClientSession() as session:
        assert await follow_announcements(session, url, CHILD, _ignore) is None  # then: SyncPieces


async def test_no_answer_at_all_is_told_apart_too() -> None:
    """A parent whose server closes the connection before answering (over its connection cap)."""
    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}{announcements_path(TASK)}"
            assert await follow_announcements(session, url, CHILD, _ignore) is None  # then: SyncPieces
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("line", [b"-1", b"99999999999", b"7; rm -rf /", b"\xff"])
async def test_a_line_that_is_no_piece_number_ends_the_stream(line: bytes) -> None:
    async def lying(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={MARKER_HEADER: "1"})
        await response.prepare(request)
        await response.write(b"3\n" + line + b"\n5\n")
        await response.write_eof()
        return response

    heard: list[int] = []

    async def have(number: int) -> None:
        heard.append(number)

    async with fake_parent(lying) as url, aiohttp.ClientSession() as session:
        reason = await follow_announcements(session, url, CHILD, have)
    assert heard == [3]
    assert reason is not None and "no piece number" in reason
