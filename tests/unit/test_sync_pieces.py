"""SyncPieces (peer.services.UploadService) over a real gRPC server on loopback: how a child's
stream of a parent's announcements ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from dragonfly_api import dfdaemon_pb2, dfdaemon_pb2_grpc

from peer.access import TriggerPolicy
from peer.services import UploadService
from peer.storage.store import PieceStore

TASK = "5e" + "f" * 62
PIECE = 4096


@pytest.fixture
async def parent(tmp_path: Path) -> AsyncIterator[tuple[PieceStore, dfdaemon_pb2_grpc.DfdaemonUploadStub]]:
    """A parent holding every piece of TASK (3 pieces), and a stub to its upload service."""
    store = PieceStore(tmp_path)
    store.load()
    task = store.create(TASK, url="http://origin.invalid/blob")
    task.set_content_info(3 * PIECE, PIECE, {})

    async def one(number: int) -> AsyncIterator[bytes]:
        yield bytes([number]) * PIECE

    for number in range(3):
        await task.write_piece(number, one(number))
    server = grpc.aio.server()
    # SyncPieces uses the store only: no engine behind it.
    policy = TriggerPolicy(seed=False, mutual_tls=False, scheduler_ips=frozenset())
    service = UploadService(cast(Any, None), store, "127.0.0.1", 1, policy)
    dfdaemon_pb2_grpc.add_DfdaemonUploadServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield store, dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)
    await server.stop(None)


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


async def test_a_child_is_not_told_of_pieces_it_announced_to_this_node(
    parent: tuple[PieceStore, dfdaemon_pb2_grpc.DfdaemonUploadStub],
) -> None:
    """Parents are also children in the mesh: a host that told us it has a piece (as our parent)
    does not hear of it back; any other host does, and so does one that asks for it by number."""
    store, stub = parent
    local = store.get(TASK)
    assert local is not None
    local.note_announced("child", 1)
    call = stub.SyncPieces(dfdaemon_pb2.SyncPiecesRequest(host_id="child", task_id=TASK))
    assert [(await call.read()).number for _ in range(2)] == [0, 2]
    other = stub.SyncPieces(dfdaemon_pb2.SyncPiecesRequest(host_id="other", task_id=TASK))
    assert [(await other.read()).number for _ in range(3)] == [0, 1, 2]
    asked = stub.SyncPieces(dfdaemon_pb2.SyncPiecesRequest(host_id="child", task_id=TASK,
                                                           interested_piece_numbers=[1]))
    assert (await asked.read()).number == 1
    assert await asked.read() is grpc.aio.EOF
    # Piece 1 was held back from "child", not delayed: its stream now waits for new pieces.
    await store.delete(TASK)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await call.read()
    assert ended.value.code() == grpc.StatusCode.NOT_FOUND
