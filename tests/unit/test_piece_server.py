"""PieceServer over a real aiohttp server on 127.0.0.1 with a real aiohttp client."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import uvloop

from common.digest import piece_digest
from common.pieces import piece_span
from peer.metrics import DaemonMetrics
from peer.piece_server import PIECE_DIGEST_HEADER, PieceServer
from peer.storage import LocalTask, PieceStore

TASK = "d" * 64
PIECE = 256 * 1024
DEADLINE = 10.0


def content_bytes(size: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


async def chunks_of(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def add_task(
    store: PieceStore, data: bytes, pieces: range | list[int], task_id: str = TASK, piece_length: int = PIECE
) -> LocalTask:
    task = store.create(task_id, url="http://origin.test/blob")
    task.set_content_info(len(data), piece_length, {})
    for number in pieces:
        span = piece_span(number, len(data), piece_length)
        await task.write_piece(number, chunks_of(data[span.offset : span.end]))
    return task


def counter(metric: object) -> float:
    return float(metric._value.get())  # type: ignore[attr-defined]


@pytest.fixture
def store(tmp_path: Path) -> PieceStore:
    s = PieceStore(tmp_path)
    s.load()
    return s


@pytest.fixture(params=[True, False], ids=["sendfile", "chunks"])
async def served(request: pytest.FixtureRequest, store: PieceStore) -> AsyncIterator[SimpleNamespace]:
    metrics = DaemonMetrics()
    server = PieceServer(store, upload_slots=4, metrics=metrics, use_sendfile=request.param)
    port = await server.start("127.0.0.1", 0)
    connections = 0

    async def on_create(*_: object) -> None:
        nonlocal connections
        connections += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), trace_configs=[trace])
    ns = SimpleNamespace(
        server=server,
        metrics=metrics,
        session=session,
        base=f"http://127.0.0.1:{port}",
        connections=lambda: connections,
    )
    try:
        yield ns
    finally:
        await session.close()
        await server.stop()


async def test_serves_exact_piece_bytes_over_keep_alive(
    served: SimpleNamespace, store: PieceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = content_bytes(7 * PIECE + 1000)  # last piece is short
    task = await add_task(store, data, range(8))
    loop = asyncio.get_running_loop()
    native = loop.sendfile
    sendfile_calls: list[tuple[int, int]] = []

    async def spy(
        transport: asyncio.WriteTransport,
        file: Any,
        offset: int = 0,
        count: int | None = None,
        *,
        fallback: bool = True,
    ) -> int:
        sendfile_calls.append((offset, count or 0))
        return await native(transport, file, offset, count, fallback=fallback)

    monkeypatch.setattr(loop, "sendfile", spy)
    received = bytearray()
    for number in range(8):
        async with served.session.get(f"{served.base}/pieces/{TASK}/{number}") as response:
            assert response.status == 200
            body = await response.read()
            span = task.span(number)
            assert response.headers["Content-Length"] == str(span.length)
            assert response.headers[PIECE_DIGEST_HEADER] == piece_digest(body) == task.piece_digest(number)
            received += body
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(data).hexdigest()
    assert served.connections() == 1  # every request went over the same connection
    if served.server.uses_sendfile:
        assert sendfile_calls == [(task.span(n).offset, task.span(n).length) for n in range(8)]
    else:
        assert sendfile_calls == []
    # the next request on the connection starts only after the previous handler finished
    async with served.session.get(f"{served.base}/healthy") as response:
        assert response.status == 200 and await response.text() == "ok"
    assert counter(served.metrics.upload_traffic) == len(data)
    assert counter(served.metrics.upload_pieces.labels("succeeded")) == 8
    assert counter(served.metrics.concurrent_uploads) == 0
    assert task.readers == 0


@pytest.mark.parametrize(
    ("path", "status", "text"),
    [
        (f"/pieces/{'e' * 64}/0", 404, "not found"),  # unknown task
        (f"/pieces/{TASK}/1", 404, "not available"),  # incomplete piece
        (f"/pieces/{TASK}/99", 404, "not available"),  # outside the content
        (f"/pieces/{TASK}/{'9' * 5000}", 404, "not available"),  # absurd number
        (f"/pieces/{TASK}/-1", 400, "not a number"),
        (f"/pieces/{TASK}/x", 400, "not a number"),
        (f"/pieces/{'D' * 64}/0", 400, "hex"),
        ("/pieces/..%2F..%2Fetc/0", 400, "hex"),
        (f"/pieces/{TASK[:-1]}/0", 400, "hex"),
    ],
)
async def test_bad_requests(
    served: SimpleNamespace, store: PieceStore, path: str, status: int, text: str
) -> None:
    await add_task(store, content_bytes(3 * PIECE), [0, 2])
    async with served.session.get(served.base + path) as response:
        assert response.status == status
        assert text in await response.text()


async def test_busy_slots_answer_503(store: PieceStore) -> None:
    big = 32 * 1024 * 1024  # far more than loopback socket buffers: the send blocks on the client
    data = bytes(big)
    await add_task(store, data, [0], piece_length=big)
    metrics = DaemonMetrics()
    server = PieceServer(store, upload_slots=1, metrics=metrics, slot_wait=0.05)
    port = await server.start("127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}/pieces/{TASK}/0"
    try:
        async with aiohttp.ClientSession() as holder, aiohttp.ClientSession() as other:
            slow = await asyncio.wait_for(holder.get(url), DEADLINE)  # headers in: the slot is held
            assert slow.status == 200
            assert server.uploads_in_progress == 1
            async with other.get(url) as refused:
                assert refused.status == 503
                assert refused.headers["Retry-After"] == "1"
            assert counter(metrics.upload_pieces.labels("busy")) == 1
            body = await asyncio.wait_for(slow.read(), DEADLINE)
            assert body == data
            slow.release()
            async with other.get(url) as again:  # the slot is free again
                assert again.status == 200
                assert len(await again.read()) == big
    finally:
        await server.stop()


async def test_client_going_away_frees_the_slot(store: PieceStore) -> None:
    big = 32 * 1024 * 1024
    await add_task(store, bytes(big), [0], piece_length=big)
    metrics = DaemonMetrics()
    server = PieceServer(store, upload_slots=1, metrics=metrics, slot_wait=DEADLINE)
    port = await server.start("127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}/pieces/{TASK}/0"
    try:
        async with aiohttp.ClientSession() as session:
            response = await asyncio.wait_for(session.get(url), DEADLINE)
            response.close()  # drop the connection mid-piece
            # waits for the slot the dropped upload gives back
            async with session.get(url) as again:
                assert again.status == 200
                assert len(await again.read()) == big
        assert counter(metrics.upload_pieces.labels("failed")) == 1
        assert counter(metrics.upload_traffic) == big
    finally:
        await server.stop()


async def test_start_twice_and_stop_idempotent(store: PieceStore) -> None:
    server = PieceServer(store, upload_slots=1, metrics=DaemonMetrics())
    port = await server.start("127.0.0.1", 0)
    assert port > 0
    with pytest.raises(RuntimeError):
        await server.start("127.0.0.1", 0)
    await server.stop()
    await server.stop()
    with pytest.raises(ValueError):
        PieceServer(store, upload_slots=0, metrics=DaemonMetrics())


def test_falls_back_to_chunks_under_uvloop(tmp_path: Path) -> None:
    """uvloop has no loop.sendfile: the server notices once and reads chunks instead."""
    data = content_bytes(3 * PIECE + 7)

    async def scenario() -> None:
        store = PieceStore(tmp_path)
        store.load()
        await add_task(store, data, range(4))
        metrics = DaemonMetrics()
        server = PieceServer(store, upload_slots=2, metrics=metrics)
        port = await server.start("127.0.0.1", 0)
        try:
            received = bytearray()
            async with aiohttp.ClientSession() as session:
                for number in range(4):
                    async with session.get(f"http://127.0.0.1:{port}/pieces/{TASK}/{number}") as response:
                        assert response.status == 200
                        received += await response.read()
            assert bytes(received) == data
            assert not server.uses_sendfile
        finally:
            await server.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
