"""SyncPieces (peer.services.UploadService) over a real gRPC server on loopback: how a child's
stream of a parent's announcements ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from dragonfly_api import dfdaemon_pb2, dfdaemon_pb2_grpc

from peer.access import TriggerPolicy
from peer.services import UploadService
from peer.storage.store import LocalTask, PieceStore

TASK = "5e" + "f" * 62
PIECE = 4096


async def one(number: int) -> AsyncIterator[bytes]:
    """Piece `number`'s bytes."""
    yield bytes([number]) * PIECE


@asynccontextmanager
async def serving(store: PieceStore) -> AsyncIterator[dfdaemon_pb2_grpc.DfdaemonUploadStub]:
    """The upload service of `store` on a real gRPC server, and a stub to it."""
    server = grpc.aio.server()
    # SyncPieces uses the store only: no engine behind it.
    policy = TriggerPolicy(seed=False, mutual_tls=False, scheduler_ips=frozenset())
    service = UploadService(cast(Any, None), store, "127.0.0.1", 1, policy)
    dfdaemon_pb2_grpc.add_DfdaemonUploadServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)
    finally:
        await server.stop(None)


def new_task(tmp_path: Path, pieces: int) -> tuple[PieceStore, LocalTask]:
    store = PieceStore(tmp_path)
    store.load()
    task = store.create(TASK, url="http://origin.invalid/blob")
    task.set_content_info(pieces * PIECE, PIECE, {})
    return store, task


@pytest.fixture
async def parent(tmp_path: Path) -> AsyncIterator[tuple[PieceStore, dfdaemon_pb2_grpc.DfdaemonUploadStub]]:
    """A parent holding every piece of TASK (3 pieces), and a stub to its upload service."""
    store, task = new_task(tmp_path, 3)
    for number in range(3):
        await task.write_piece(number, one(number))
    async with serving(store) as stub:
        yield store, stub


async def test_a_complete_parent_keeps_the_stream_open_until_the_task_is_deleted(
    parent: tuple[PieceStore, dfdaemon_pb2_grpc.DfdaemonUploadStub],
) -> None:
    store, stub = parent
    call = stub.SyncPieces(dfdaemon_pb2.SyncPiecesRequest(host_id="child", task_id=TASK))
    assert [(await call.read()).number for _ in range(3)] == [0, 1, 2]
    # Every piece was announced, and the stream did not end: its end now means something.
    await store.delete(TASK)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await call.read()
    assert ended.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_stream_of_interested_pieces_ends_once_they_were_all_announced(
    parent: tuple[PieceStore, dfdaemon_pb2_grpc.DfdaemonUploadStub],
) -> None:
    _, stub = parent
    request = dfdaemon_pb2.SyncPiecesRequest(host_id="child", task_id=TASK, interested_piece_numbers=[2, 0])
    call = stub.SyncPieces(request)
    assert [(await call.read()).number for _ in range(2)] == [0, 2]
    assert await call.read() is grpc.aio.EOF


async def numbers(call: Any, count: int) -> list[int]:
    """The next `count` piece numbers of a SyncPieces stream (a missing one fails, not hangs)."""
    return [(await asyncio.wait_for(call.read(), 10)).number for _ in range(count)]


async def test_a_child_is_not_told_of_pieces_it_announced_to_this_node(tmp_path: Path) -> None:
    """Parents are also children in the mesh: a piece a host told us it has (as our parent) is not
    announced back to it; any other host hears of it, and so does that host once it subscribes
    anew (it may have lost the piece since: its task deleted, its daemon restarted)."""
    store, local = new_task(tmp_path, 4)
    await local.write_piece(0, one(0))
    async with serving(store) as stub:
        child = stub.SyncPieces(dfdaemon_pb2.SyncPiecesRequest(host_id="child", task_id=TASK))
        other = stub.SyncPieces(dfdaemon_pb2.SyncPiecesRequest(host_id="other", task_id=TASK))
        assert await numbers(child, 1) == [0] and await numbers(other, 1) == [0]
        local.note_announced("child", 1)  # "child", our parent too, has piece 1
        for number in (1, 2):
            await local.write_piece(number, one(number))
        assert await numbers(child, 1) == [2]  # not 1
        assert await numbers(other, 2) == [1, 2]
        asked = stub.SyncPieces(dfdaemon_pb2.SyncPiecesRequest(host_id="child", task_id=TASK,
                                                           interested_piece_numbers=[1]))
        assert await numbers(asked, 1) == [1]  # asked for by number: told
        assert await asked.read() is grpc.aio.EOF
        local.note_announced("child", 0)
        again = stub.SyncPieces(dfdaemon_pb2.SyncPiecesRequest(host_id="child", task_id=TASK))
        assert await numbers(again, 3) == [0, 1, 2]  # a new subscription: every piece
        await store.delete(TASK)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await child.read()
        assert ended.value.code() == grpc.StatusCode.NOT_FOUND
