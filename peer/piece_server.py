"""The HTTP piece server: other peers fetch complete pieces of our tasks here.

``GET /pieces/{task_id}/{number}`` answers exactly that piece's bytes, sent from the content file
with ``sendfile`` (no copy through Python), with ``Content-Length`` and the informative
``X-Damselfly-Piece-Digest``. Bad input is answered, never crashed on: ``400`` for a malformed
task id or piece number, ``404`` for an unknown task or a piece that is not complete here,
``503`` with ``Retry-After`` when every upload slot stays busy for a moment.
``GET /healthy`` answers ``ok``.

The handler is a thin edge: parse, look up in the :class:`~peer.storage.PieceStore`, send, count.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import BinaryIO

from aiohttp import web

from common.pieces import PieceSpan
from peer.metrics import DaemonMetrics
from peer.storage import TASK_ID_RE, LocalTask, PieceStore

log = logging.getLogger(__name__)

PIECE_DIGEST_HEADER = "X-Damselfly-Piece-Digest"
# How long a request waits for a free upload slot before it is told to come back.
DEFAULT_SLOT_WAIT = 2.0
RETRY_AFTER_SECONDS = 1
# Read size of the fallback path (event loops without sendfile, e.g. uvloop).
FALLBACK_CHUNK = 1024 * 1024
# Longer numbers cannot be a piece of any content (and int() of huge strings is refused).
_MAX_NUMBER_DIGITS = 12


def _pread_exactly(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise OSError(f"short read at {offset}: {len(data)} of {length} bytes")
    return data


class PieceServer:
    """aiohttp server of complete pieces with a bounded number of concurrent uploads."""

    def __init__(
        self,
        store: PieceStore,
        *,
        upload_slots: int,
        metrics: DaemonMetrics,
        slot_wait: float = DEFAULT_SLOT_WAIT,
        use_sendfile: bool = True,
    ) -> None:
        if upload_slots < 1:
            raise ValueError(f"upload_slots must be at least 1, got {upload_slots}")
        self._store = store
        self._metrics = metrics
        self._upload_slots = upload_slots
        self._slot_wait = slot_wait
        self._slots = asyncio.Semaphore(upload_slots)
        self._use_sendfile = use_sendfile  # cleared when the loop turns out not to support it
        self._uploads = 0
        self._runner: web.AppRunner | None = None
        self.app = web.Application()
        self.app.router.add_get("/pieces/{task_id}/{number}", self._get_piece, allow_head=False)
        self.app.router.add_get("/healthy", self._healthy, allow_head=False)

    @property
    def upload_slots(self) -> int:
        """The slot limit (announced to the scheduler)."""
        return self._upload_slots

    @property
    def uses_sendfile(self) -> bool:
        """False once the event loop turned out to have no sendfile (uvloop)."""
        return self._use_sendfile

    @property
    def uploads_in_progress(self) -> int:
        """Pieces being sent now (announced as the upload connection count)."""
        return self._uploads

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks a free port) and return the bound port."""
        if self._runner is not None:
            raise RuntimeError("piece server already started")
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0][1]
        log.info("piece server listening on %s:%d (%d upload slots)", host, bound, self._upload_slots)
        return int(bound)

    async def stop(self) -> None:
        """Stop listening and close connections (waits briefly for uploads in progress)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # ---- handlers ----------------------------------------------------------------------------

    async def _healthy(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _get_piece(self, request: web.Request) -> web.StreamResponse:
        task_id = request.match_info["task_id"]
        raw_number = request.match_info["number"]
        if not TASK_ID_RE.match(task_id):
            return self._refuse(400, "bad_request", f"task id {task_id!r} is not 64 lowercase hex digits")
        if not (raw_number.isascii() and raw_number.isdigit()):
            return self._refuse(400, "bad_request", f"piece number {raw_number!r} is not a number")
        task = self._store.get(task_id)
        if task is None:
            return self._refuse(404, "not_found", f"task {task_id} not found")
        number = int(raw_number) if len(raw_number) <= _MAX_NUMBER_DIGITS else -1
        digest = task.piece_digest(number)
        if digest is None:
            return self._refuse(404, "not_found", f"piece {raw_number} of task {task_id} is not available")
        span = task.span(number)

        if not await self._acquire_slot():
            response = self._refuse(503, "busy", "all upload slots are busy")
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            return response
        self._uploads += 1
        self._metrics.concurrent_uploads.inc()
        try:
            with task.reader():
                task.touch()
                return await self._send_piece(request, task, span, digest)
        finally:
            self._uploads -= 1
            self._metrics.concurrent_uploads.dec()
            self._slots.release()

    async def _acquire_slot(self) -> bool:
        try:
            async with asyncio.timeout(self._slot_wait):
                await self._slots.acquire()
        except TimeoutError:
            return False
        return True

    def _refuse(self, status: int, result: str, message: str) -> web.Response:
        self._metrics.upload_pieces.labels(result).inc()
        return web.Response(status=status, text=message + "\n")

    async def _send_piece(
        self, request: web.Request, task: LocalTask, span: PieceSpan, digest: str
    ) -> web.StreamResponse:
        try:
            # open() of a local file costs a lookup, not a disk read; the file is closed after the send
            file = open(task.content_path, "rb")  # noqa: ASYNC230, SIM115
        except FileNotFoundError:  # deleted since we looked it up
            return self._refuse(404, "not_found", f"task {task.task_id} not found")
        with file:
            response = web.StreamResponse(
                headers={PIECE_DIGEST_HEADER: digest, "Content-Type": "application/octet-stream"}
            )
            response.content_length = span.length
            try:
                await response.prepare(request)
                if span.length:
                    await self._send_region(request, response, file, span)
                await response.write_eof()
            except (ConnectionError, OSError) as exc:
                # The peer went away, or the disk failed mid-piece: the response cannot be
                # completed, so the connection must not be reused.
                self._metrics.upload_pieces.labels("failed").inc()
                log.debug("piece %d of task %s not sent: %s", span.number, task.task_id, exc)
                if request.transport is not None:
                    request.transport.close()
                return response
        self._metrics.upload_traffic.inc(span.length)
        self._metrics.upload_pieces.labels("succeeded").inc()
        return response

    async def _send_region(
        self, request: web.Request, response: web.StreamResponse, file: BinaryIO, span: PieceSpan
    ) -> None:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection lost")
        if self._use_sendfile:
            loop = asyncio.get_running_loop()
            try:
                await loop.sendfile(transport, file, span.offset, span.length, fallback=False)
                return
            except NotImplementedError:  # the loop has no sendfile at all (uvloop)
                self._use_sendfile = False
            except RuntimeError:  # not for this transport (TLS) or this file
                if file.tell() != 0:  # some bytes went out: too late to switch
                    raise ConnectionResetError("sendfile failed mid-piece") from None
        await self._send_chunks(response, file, span)

    async def _send_chunks(self, response: web.StreamResponse, file: BinaryIO, span: PieceSpan) -> None:
        fd = file.fileno()
        offset = span.offset
        while offset < span.end:
            length = min(FALLBACK_CHUNK, span.end - offset)
            chunk = await asyncio.to_thread(_pread_exactly, fd, length, offset)
            await response.write(chunk)
            offset += length
