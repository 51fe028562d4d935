"""The dfdaemon's gRPC services: `DfdaemonUpload` (for peers and the scheduler, over TCP) and
`DfdaemonDownload` (for dfget, over a unix socket). Both are thin: they translate messages and
delegate to the engine and the piece store; errors end a call with the status code
:mod:`common.rpc` gives them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc
from google.protobuf import empty_pb2

from common import rpc
from common.download import DownloadRequest
from common.errors import DamselflyError, InvalidRequest, OutputUnwritable, PermissionDenied, TaskNotFound
from common.identity import grpc_identity
from peer.access import TriggerPolicy, caller_ip, public_url, trigger_refusal
from peer.dfget_output import is_temp_name
from peer.download.engine import PIECE_LENGTH_HEADER, RESPONSE_HEADER_PREFIX, Conductor, Engine, progress
from peer.output_fill import OutputFill, remove_when_abandoned

if TYPE_CHECKING:
    from peer.storage.store import LocalTask, PieceStore

log = logging.getLogger(__name__)


def _unimplemented(name: str) -> Any:
    async def handler(self: object, request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented by Damselfly's dfdaemon")

    return handler


# Origin response headers StatTask passes on (they describe the content); the others (cookies,
# redirect targets with signatures, auth challenges) stay on this node.
SHARED_RESPONSE_HEADERS = frozenset({
    "accept-ranges", "cache-control", "content-disposition", "content-encoding", "content-language",
    "content-type", "docker-content-digest", "etag", "last-modified",
})


def task_message(local: LocalTask, *, piece_digests: bool) -> common_pb2.Task:
    """A local task as `common.v2.Task` (what StatTask answers).

    The URL goes out without its query and user info: signed URLs and credentials of the client
    that asked for it are not for other hosts to read.
    """
    task = common_pb2.Task(id=local.task_id, url=public_url(local.url), digest=local.digest or "", tag=local.tag,
                           application=local.application, state=local.state)
    if local.content_length is not None and local.piece_length is not None:
        task.content_length = local.content_length
        task.piece_count = local.piece_count
        task.request_header[PIECE_LENGTH_HEADER] = str(local.piece_length)
        for name, value in local.response_headers.items():
            if name.lower() in SHARED_RESPONSE_HEADERS:
                task.request_header[RESPONSE_HEADER_PREFIX + name] = value
        for number in local.finished_pieces():
            span = local.span(number)
            piece = task.pieces.add(number=number, offset=span.offset, length=span.length)
            if piece_digests:
                piece.digest = local.piece_digest(number) or ""
    return task


async def _download_responses(
    conductor: Conductor, host_id: str
) -> AsyncIterator[dfdaemon_pb2.DownloadTaskResponse]:
    task_id, peer_id = conductor.task_id, conductor.peer_id
    async for content_length, number in progress(conductor):
        if number is None:
            started = dfdaemon_pb2.DownloadTaskStartedResponse(content_length=content_length or 0,
                                                               is_finished=conductor.done.done())
            yield dfdaemon_pb2.DownloadTaskResponse(host_id=host_id, task_id=task_id, peer_id=peer_id,
                                                    download_task_started_response=started)
        else:
            span = conductor.local.span(number)
            piece = common_pb2.Piece(number=number, offset=span.offset, length=span.length,
                                     digest=conductor.local.piece_digest(number) or "")
            yield dfdaemon_pb2.DownloadTaskResponse(host_id=host_id, task_id=task_id, peer_id=peer_id,
                                                    download_piece_finished_response=(
                                                        dfdaemon_pb2.DownloadPieceFinishedResponse(piece=piece)))


class _LocalTaskRpcs:
    """StatTask, the same on both services."""

    store: PieceStore

    async def StatTask(self, request: dfdaemon_pb2.StatTaskRequest,
                       context: grpc.aio.ServicerContext[Any, Any]) -> common_pb2.Task:
        local = self.store.get(request.task_id)
        if local is None:
            await rpc.abort(context, TaskNotFound(request.task_id))
        return task_message(local, piece_digests=True)


class _LocalDelete:
    """DeleteTask: on the unix socket only (a remote caller must not wipe a node's cache)."""

    store: PieceStore

    async def DeleteTask(self, request: dfdaemon_pb2.DeleteTaskRequest,
                         context: grpc.aio.ServicerContext[Any, Any]) -> empty_pb2.Empty:
        if self.store.get(request.task_id) is None:
            await rpc.abort(context, TaskNotFound(request.task_id))
        await self.store.delete(request.task_id)
        return empty_pb2.Empty()


class UploadService(_LocalTaskRpcs, dfdaemon_pb2_grpc.DfdaemonUploadServicer):  # type: ignore[misc]
    """`dfdaemon.v2.DfdaemonUpload`: what other peers and the scheduler call on this node.

    Who may call what is :mod:`peer.access`'s decision: pieces and task info for the swarm,
    download triggers for the scheduler on seeds only, no deletion.
    """

    def __init__(self, engine: Engine, store: PieceStore, host_ip: str, upload_port: int,
                 policy: TriggerPolicy) -> None:
        self.engine = engine
        self.store = store
        self.host_ip = host_ip
        self.upload_port = upload_port
        self.policy = policy

    async def DeleteTask(self, request: dfdaemon_pb2.DeleteTaskRequest,
                         context: grpc.aio.ServicerContext[Any, Any]) -> empty_pb2.Empty:
        await rpc.abort(context, PermissionDenied("DeleteTask is served on the dfdaemon's local unix socket only"))

    async def SyncPieces(self, request: dfdaemon_pb2.SyncPiecesRequest,
                         context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[dfdaemon_pb2.SyncPiecesResponse]:
        local = self.store.get(request.task_id)
        if local is None:
            await rpc.abort(context, TaskNotFound(request.task_id))
        interested = set(request.interested_piece_numbers)
        child = request.host_id
        if not interested:
            local.forget_announced(child)  # a new subscription: what it told us may be gone since
        try:
            async for number in local.subscribe():
                if interested:
                    if number not in interested:
                        continue
                elif local.announced_by(child, number):
                    continue  # the child is also our parent and told us it has this piece
                span = local.span(number)
                yield dfdaemon_pb2.SyncPiecesResponse(number=number, offset=span.offset, length=span.length,
                                                      ip=self.host_ip, tcp_port=self.upload_port)
                if interested:
                    interested.discard(number)
                    if not interested:
                        return
            # Every piece was announced. The stream stays open until the child leaves or the task
            # is deleted: its end tells a child that still fetches from this node that it died
            # (a child with no piece in flight here would not learn it otherwise, and a dead
            # parent went on being offered: tests/integration/test_faults.py, dead parent).
            await local.until_deleted()
        except DamselflyError as exc:  # the task was deleted or failed under the subscriber
            await rpc.abort(context, exc)

    async def DownloadTask(
        self, request: dfdaemon_pb2.DownloadTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[dfdaemon_pb2.DownloadTaskResponse]:
        """A seed trigger from the scheduler (or a preheat): download the task here."""
        refusal = trigger_refusal(self.policy, grpc_identity(context), caller_ip(context.peer()))
        if refusal is not None:
            log.warning("DownloadTask from %s refused: %s", context.peer(), refusal)
            await rpc.abort(context, PermissionDenied(refusal))
        try:
            download = DownloadRequest.from_proto(request.download)
        except DamselflyError as exc:
            await rpc.abort(context, exc)
        conductor = self.engine.download(download)
        log.info("download of task %s triggered remotely (%s)", conductor.task_id, public_url(download.url))
        try:
            async for response in _download_responses(conductor, self.engine.host_id):
                yield response
        except DamselflyError as exc:
            await rpc.abort(context, exc)


class DownloadService(_LocalTaskRpcs, _LocalDelete, dfdaemon_pb2_grpc.DfdaemonDownloadServicer):  # type: ignore[misc]
    """`dfdaemon.v2.DfdaemonDownload` on the unix socket: dfget and local tools."""

    def __init__(self, engine: Engine, store: PieceStore) -> None:
        self.engine = engine
        self.store = store
        self._watchers: set[asyncio.Task[bool]] = set()

    async def DownloadTask(
        self, request: dfdaemon_pb2.DownloadTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[dfdaemon_pb2.DownloadTaskResponse]:
        try:
            async with contextlib.aclosing(self.responses(request)) as responses:
                async for response in responses:
                    yield response
        except DamselflyError as exc:
            await rpc.abort(context, exc)

    async def responses(
        self, request: dfdaemon_pb2.DownloadTaskRequest
    ) -> AsyncGenerator[dfdaemon_pb2.DownloadTaskResponse, None]:
        """Run one download for a local client (gRPC or the download socket): its responses;
        DamselflyError when it fails (OutputUnwritable, an INTERNAL status, for the client's
        file). Closing the iterator early (the client went away) removes what was written into
        the client's file."""
        download = DownloadRequest.from_proto(request.download)
        output = _check_output_path(request.download.output_path)
        # The client's file, checked and opened before anything is downloaded, fills piece by
        # piece as the download runs; it is removed again if the download fails or the client
        # goes away (dfget killed).
        fill = OutputFill(output) if output is not None else None
        filled: os.stat_result | None = None
        try:
            if fill is not None:
                await fill.open()
            conductor = self.engine.download(download)
            with conductor.local.reader():
                if fill is not None:
                    fill.source = conductor.local.content_path
                async for response in _download_responses(conductor, self.engine.host_id):
                    if fill is not None and response.HasField("download_piece_finished_response"):
                        piece = response.download_piece_finished_response.piece
                        fill.add(piece.offset, piece.length)
                    yield response
                await self.engine.check_digest(download, conductor.local)
                if fill is not None:
                    filled = await fill.finish(conductor.local.content_length or 0)
            if output is not None and filled is not None and is_temp_name(output.name):
                # A dfget killed after the copy, before it moved the file onto FILE, leaves
                # it unlocked: removed then (a living dfget holds it until it is moved).
                self._watch(output, filled)
        except OSError as exc:
            raise OutputUnwritable(f"cannot write {output}: {exc.strerror}") from None
        finally:
            if fill is not None and filled is None:
                await fill.discard()

    def _watch(self, temp: Path, filled: os.stat_result) -> None:
        watcher = asyncio.ensure_future(remove_when_abandoned(temp, filled))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    StatLocalTask = _unimplemented("StatLocalTask")
    ListLocalTasks = _unimplemented("ListLocalTasks")
    ListTaskEntries = _unimplemented("ListTaskEntries")


def _check_output_path(path: str) -> Path | None:
    if not path:
        return None
    output = Path(path)
    if not output.is_absolute():
        raise InvalidRequest(f"output path {path!r} must be absolute")
    if not output.parent.is_dir():
        raise InvalidRequest(f"output directory {output.parent} does not exist")
    return output
