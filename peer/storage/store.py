"""Piece storage on disk: one sparse content file and one metadata file per task.

Layout under the data directory::

    tasks/<task_id[:3]>/<task_id>/content     the content, pieces written at their offsets
    tasks/<task_id[:3]>/<task_id>/metadata    msgpack: url, digest, state, sizes, piece digests
    trash/                                    deleted task directories waiting to be removed

A piece is complete only when its digest is recorded in the metadata file, and it is recorded
only after the piece's bytes were flushed (``fdatasync``). The metadata file is replaced
atomically (tmp file, fsync, rename), so a crash at any moment loses no completed piece and never
exposes a partially written one: after a restart the piece simply is not there.

Only a task's latest pieces stay in the page cache (``page_cache_window``, 32 MiB by default):
older ones are dropped from it once flushed, and again after a late upload read them back
(:class:`_DropBehind`). They stay on disk.

Task states and the transitions allowed between them live in :data:`TRANSITIONS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgpack  # type: ignore[import-untyped]

from common.clock import Clock, SystemClock
from common.digest import PIECE_DIGEST_ALGORITHM, Hasher, format_digest, new_hasher, new_piece_hasher
from common.errors import (
    DamselflyError,
    DiskFull,
    DownloadFailed,
    InvalidRequest,
    OriginError,
    ParentError,
    PieceDigestMismatch,
    StorageError,
    TaskNotFound,
)
from common.pieces import PieceSpan, piece_count, piece_span
from peer.metrics import DaemonMetrics

log = logging.getLogger(__name__)

_T = TypeVar("_T")

TASK_ID_RE = re.compile(r"^[0-9a-f]{64}$")
_PIECE_DIGEST_RE = re.compile(r"^xxh3:[0-9a-f]{32}$")
METADATA_FORMAT = 1
CONTENT_FILE = "content"
METADATA_FILE = "metadata"
# Chunks at least this big are written and hashed in a worker thread, so the event loop stays
# free; smaller ones cost less than the hand-off.
THREAD_WRITE_THRESHOLD = 256 * 1024
# Bytes read at once when the whole content is hashed (one buffer, reused).
CONTENT_READ_BUFFER = 4 * 1024 * 1024

# A task's most recently completed pieces kept in the page cache by default (see
# :class:`_DropBehind`): what its children and local readers ask for next. Small enough that a
# node's writes reuse the pages its drops just freed instead of touching new memory (64 MiB N=16
# swarm: 9.1-9.6 s with 16 or 32 MiB, 11.1-11.8 s with 64 MiB, where no piece of it was dropped).
DEFAULT_PAGE_CACHE_WINDOW = 32 * 1024 * 1024

# The digest a piece must have: known, asked for once its bytes are in, or none to check.
ExpectedDigest = str | Callable[[], Awaitable[str]] | None
# A blocking source of one piece: receive(length, sink) passes its bytes to sink, in order.
PieceReceiver = Callable[[int, Callable[[memoryview], None]], None]

PENDING = "pending"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
STATES = (PENDING, RUNNING, SUCCEEDED, FAILED)
# Cached blobs may be private layers: only the daemon's user reads them (issue 12 item 11).
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
# state -> states it may move to. A failed task may be retried (running) or, when all its pieces
# are there after all, succeed; a succeeded task is final until deleted, unless a scrub finds a
# corrupt piece: then it is pending again (its other pieces stay).
TRANSITIONS: Mapping[str, frozenset[str]] = {
    PENDING: frozenset({PENDING, RUNNING, SUCCEEDED, FAILED}),
    RUNNING: frozenset({RUNNING, SUCCEEDED, FAILED}),
    FAILED: frozenset({RUNNING, SUCCEEDED, FAILED}),
    SUCCEEDED: frozenset({SUCCEEDED, PENDING}),
}


def validate_task_id(task_id: str) -> None:
    """Raise InvalidRequest unless `task_id` is 64 lowercase hex digits (so it is a safe path)."""
    if not isinstance(task_id, str) or not TASK_ID_RE.match(task_id):
        raise InvalidRequest(f"task id {task_id!r} is not 64 lowercase hex digits")


def _disk_error(exc: OSError, what: str) -> StorageError:
    """Translate an OSError from the content or metadata file into our tree."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"no space left on device {what}: {exc.strerror}")
    return StorageError(f"{what}: {exc}")


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _write_and_hash(fd: int, hasher: Hasher, data: bytes | memoryview, offset: int) -> None:
    hasher.update(data)
    _pwrite_all(fd, data, offset)


def _private_mkdir(path: Path) -> None:
    """Create `path` and its missing parents 0700 (Path.mkdir gives parents the umask's mode)."""
    if path.is_dir():
        return
    _private_mkdir(path.parent)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=PRIVATE_DIR_MODE)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_from_page_cache(fd: int, spans: list[tuple[int, int]]) -> None:
    """Ask the kernel to drop these (flushed, so clean) spans of the file from the page cache."""
    for offset, length in spans:
        with contextlib.suppress(OSError):  # advice only: a file system without it keeps the pages
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class _DropBehind:
    """Which complete pieces of a task to take out of the page cache: all but the most recent
    `window` bytes of them.

    A node's cache is written once and mostly read soon after (children fetch a new piece while it
    is rare, dfget's output and Range readers take it as it arrives); left in the page cache, a
    5 GB image pushes 5 GB of the node's workloads' memory out, and every new page costs the
    kernel an allocation (on a VM whose balloon hands free memory back to its host, a fault in the
    host: 16 writers of 256 MiB each, 4 MiB pieces flushed one by one, spent 7.5-10.4 CPU-s on the
    bench machine, 1.7-3.4 CPU-s when each dropped all but its last 64 MiB). Dropped pieces stay
    on disk; a late reader gets them from there.
    """

    def __init__(self, window: int) -> None:
        self._window = window
        self._recent: deque[tuple[int, int]] = deque()
        self._recent_offsets: set[int] = set()
        self._recent_bytes = 0

    def completed(self, offset: int, length: int) -> list[tuple[int, int]]:
        """A piece is complete: the spans (offset, length) of the pieces it pushes out of the
        window, oldest first, to drop now."""
        if self._window <= 0:
            return []
        self._recent.append((offset, length))
        self._recent_offsets.add(offset)
        self._recent_bytes += length
        leaving = []
        while self._recent_bytes > self._window:
            span = self._recent.popleft()
            self._recent_offsets.discard(span[0])
            self._recent_bytes -= span[1]
            leaving.append(span)
        return leaving

    def is_old(self, offset: int) -> bool:
        """Whether a complete piece at `offset` is out of the window (dropped once already)."""
        return self._window > 0 and offset not in self._recent_offsets


class _PieceFile:
    """The content file opened for writing one piece.

    A worker thread may still be using the descriptor when the writing coroutine is cancelled;
    the descriptor is then closed only when that thread is done, never under its feet (a reused
    descriptor number would let it write into another file).
    """

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        self._inflight: asyncio.Future[Any] | None = None

    async def run(self, fn: Callable[..., _T], *args: Any, executor: Executor | None = None) -> _T:
        loop = asyncio.get_running_loop()
        self._inflight = loop.run_in_executor(executor, fn, *args)
        result: _T = await self._inflight
        self._inflight = None
        return result

    def close(self) -> None:
        fd, inflight = self.fd, self._inflight
        if inflight is not None and not inflight.done():
            inflight.add_done_callback(lambda _: os.close(fd))
        else:
            os.close(fd)


class _PieceWriter:
    """One piece's bytes, in order, into its span of the content file: checked against the
    piece's length, hashed, written, and flushed by :meth:`finish`. Usable from a worker thread."""

    def __init__(self, task_id: str, span: PieceSpan, fd: int, what: str, parent_id: str) -> None:
        self._task_id = task_id
        self._span = span
        self._fd = fd
        self._what = what
        self._parent_id = parent_id
        self._hasher = new_piece_hasher()
        self._received = 0

    def write(self, part: bytes | memoryview) -> None:
        span = self._span
        if self._received + len(part) > span.length:
            raise self._length_error(f"more than {span.length} bytes")
        try:
            _write_and_hash(self._fd, self._hasher, part, span.offset + self._received)
        except OSError as exc:
            raise _disk_error(exc, self._what) from exc
        self._received += len(part)

    def finish(self) -> str:
        """Flush the piece once all of it arrived; its digest."""
        span = self._span
        if self._received != span.length:
            raise self._length_error(f"{self._received} bytes instead of {span.length}")
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise _disk_error(exc, self._what) from exc
        return format_digest(PIECE_DIGEST_ALGORITHM, self._hasher)

    def _length_error(self, detail: str) -> DamselflyError:
        """Too many or too few bytes: the parent's fault, or the origin's when there is none."""
        reason = f"piece {self._span.number} of task {self._task_id}: got {detail}"
        if self._parent_id:
            return ParentError(self._parent_id, reason)
        return OriginError(reason)

    def receive_all(self, receive: PieceReceiver) -> str:
        """The whole piece from a blocking receiver, then :meth:`finish` (in one worker thread)."""
        receive(self._span.length, self.write)
        return self.finish()


class PieceFeed:
    """A task's complete pieces for one subscriber, in batches: every piece complete when it
    began (sorted) at the first :meth:`take`, then those completed since the last one."""

    def __init__(self, task: LocalTask, order: list[int], complete: set[int]) -> None:
        self._task = task
        self._order = order  # the task's completion order (appended to as pieces complete)
        self._cursor = len(order)
        self._sent = complete
        self._first: list[int] | None = sorted(complete)

    def take(self) -> list[int]:
        """The pieces this subscriber has not been given yet."""
        batch, self._first = self._first or [], None
        while self._cursor < len(self._order):
            number = self._order[self._cursor]
            self._cursor += 1
            if number not in self._sent:
                self._sent.add(number)
                batch.append(number)
        return batch

    @property
    def complete(self) -> bool:
        """Whether every piece of the task was given (nothing more will come)."""
        task = self._task
        return task.content_length is not None and len(self._sent) >= task.piece_count


@dataclass
class _PieceLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class LocalTask:
    """One task's content and piece bookkeeping on this node. Made by :class:`PieceStore`."""

    def __init__(
        self,
        store: PieceStore,
        task_id: str,
        *,
        url: str,
        digest: str | None = None,
        tag: str = "",
        application: str = "",
    ) -> None:
        self._store = store
        self.task_id = task_id
        self.url = url
        self.digest = digest
        self.tag = tag
        self.application = application
        self.state = PENDING
        self.failure_reason = ""
        self.content_length: int | None = None
        self.piece_length: int | None = None
        self.response_headers: dict[str, str] = {}
        self.directory = store.task_directory(task_id)
        self.content_path = self.directory / CONTENT_FILE
        self.metadata_path = self.directory / METADATA_FILE
        self.created_at = time.time()  # wall clock: persisted, meaningful across restarts
        self.last_access = store.clock.time()  # monotonic, for LRU GC
        self._pieces: dict[int, str] = {}  # complete (durable) pieces
        self._unpersisted: dict[int, str] = {}  # written and flushed, metadata not yet durable
        self._order: list[int] = []  # completion order, for subscribers
        # Pieces that other hosts announced to this node as its parents, by host id: a host is
        # not told of a piece it told us it has (half of all announcements in a mesh where
        # parents are also children). Bounded by the parents the scheduler gives this task.
        self._announced_by: dict[str, set[int]] = {}
        self._drop_behind = _DropBehind(store.page_cache_window)
        self._used = 0
        self._readers = 0
        self._deleted = False
        self._piece_locks: dict[int, _PieceLock] = {}
        self._changed = asyncio.Event()
        # Metadata versions: bumped on every change; a write covers every version up to its own.
        self._version = 0
        self._written_version = 0  # newest version renamed into place
        self._durable_version = 0  # newest version known to be on disk after a crash
        self._persist_lock = asyncio.Lock()  # one durable write at a time (coalesces the rest)
        self._rename_lock = threading.Lock()  # orders renames of the loop thread and workers

    def __repr__(self) -> str:
        return f"<LocalTask {self.task_id[:12]} {self.state} {len(self._pieces)} pieces>"

    # ---- content info ------------------------------------------------------------------------

    def set_content_info(
        self, content_length: int, piece_length: int, response_headers: Mapping[str, str]
    ) -> None:
        """Fix the content's size and piece length, size the content file (sparse) and persist.

        Calling again with the same sizes does nothing; different sizes raise StorageError.
        """
        if content_length < 0 or piece_length <= 0:
            raise StorageError(
                f"task {self.task_id}: bad sizes content_length={content_length} piece_length={piece_length}"
            )
        if self.content_length is not None:
            if (self.content_length, self.piece_length) != (content_length, piece_length):
                raise StorageError(
                    f"task {self.task_id}: content info conflict: have length {self.content_length} "
                    f"piece {self.piece_length}, got length {content_length} piece {piece_length}"
                )
            return
        self._check_alive()
        try:
            fd = os.open(self.content_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
            try:
                os.ftruncate(fd, content_length)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _disk_error(exc, f"sizing the content file of task {self.task_id}") from exc
        self.content_length = content_length
        self.piece_length = piece_length
        self.response_headers = dict(response_headers)
        self._persist_now()
        self._notify()

    @property
    def has_content_info(self) -> bool:
        """Whether content length and piece length are known."""
        return self.content_length is not None

    @property
    def piece_count(self) -> int:
        """Number of pieces; raises StorageError while the content length is unknown."""
        content_length, piece_length = self._sizes()
        return piece_count(content_length, piece_length)

    def span(self, number: int) -> PieceSpan:
        """Offset and length of piece `number`; InvalidRequest when it is outside the content."""
        content_length, piece_length = self._sizes()
        try:
            return piece_span(number, content_length, piece_length)
        except ValueError as exc:
            raise InvalidRequest(f"task {self.task_id}: {exc}") from exc

    def _sizes(self) -> tuple[int, int]:
        if self.content_length is None or self.piece_length is None:
            raise StorageError(f"task {self.task_id}: content length not known yet")
        return self.content_length, self.piece_length

    # ---- pieces ------------------------------------------------------------------------------

    def _drop_spans(self, spans: list[tuple[int, int]]) -> None:
        # On the loop: dropping a flushed 4 MiB piece takes ~0.25 ms, once per piece; a worker
        # thread's hand-off and wake-up would cost about as much.
        if not spans:
            return
        try:
            fd = os.open(self.content_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            _drop_from_page_cache(fd, spans)
        finally:
            os.close(fd)

    def content_digest(self, algorithm: str) -> str:
        """``algo:hex`` of the whole content, read piece by piece; a piece out of the page cache
        window leaves it again once hashed (the check at the end of a download would otherwise
        bring every dropped piece back into memory). Blocking: call it in a thread."""
        content_length, piece_length = self._sizes()
        hasher = new_hasher(algorithm)
        buffer = memoryview(bytearray(min(piece_length, CONTENT_READ_BUFFER)))
        with open(self.content_path, "rb") as file:
            fd = file.fileno()
            for number in range(piece_count(content_length, piece_length)):
                span = piece_span(number, content_length, piece_length)
                offset = span.offset
                while offset < span.end:
                    read = os.preadv(fd, [buffer[:min(len(buffer), span.end - offset)]], offset)
                    if read == 0:
                        raise StorageError(f"task {self.task_id}: content file ends at {offset}")
                    hasher.update(buffer[:read])
                    offset += read
                if self._drop_behind.is_old(span.offset):
                    _drop_from_page_cache(fd, [(span.offset, span.length)])
        return format_digest(algorithm, hasher)

    def after_upload(self, fd: int, span: PieceSpan) -> None:
        """A piece was sent to another host from `fd`: an old one (out of the page cache window)
        leaves the page cache again (its other children, if any, come later or not at all)."""
        if span.number in self._pieces and self._drop_behind.is_old(span.offset):
            _drop_from_page_cache(fd, [(span.offset, span.length)])

    def has_piece(self, number: int) -> bool:
        """Whether piece `number` is complete (False for any number outside the content)."""
        return number in self._pieces

    def note_announced(self, host_id: str, number: int) -> None:
        """Remember that host `host_id`, a parent of this node for this task, has piece `number`."""
        held = self._announced_by.get(host_id)
        if held is None:
            held = self._announced_by[host_id] = set()
        held.add(number)

    def forget_announced(self, host_id: str) -> None:
        """Host `host_id` subscribes to this node's pieces anew: it may have lost pieces since it
        announced them (its task deleted, its daemon restarted), so it hears of every piece."""
        self._announced_by.pop(host_id, None)

    def announced_by(self, host_id: str, number: int) -> bool:
        """Whether host `host_id` announced piece `number` to this node (so it needs no announcement)."""
        held = self._announced_by.get(host_id)
        return held is not None and number in held

    def finished_pieces(self) -> list[int]:
        """Numbers of the complete pieces, sorted."""
        return sorted(self._pieces)

    def piece_digest(self, number: int) -> str | None:
        """Digest of a complete piece, None otherwise."""
        return self._pieces.get(number)

    def piece_digests(self) -> dict[int, str]:
        """Digests of all complete pieces."""
        return dict(self._pieces)

    def is_complete(self) -> bool:
        """Whether every piece is complete (False while the content length is unknown)."""
        return self.content_length is not None and len(self._pieces) == self.piece_count

    async def verify_pieces(self) -> list[int]:
        """Re-hash every complete piece against its recorded digest; forget the ones that differ.

        Catches bytes changed on disk behind our back (bit rot, a tampered cache), so this node
        stops serving them. Hashing runs in a thread. Returns the numbers of the corrupt pieces.
        """
        if self.content_length is None or not self._pieces:
            return []
        corrupt = await asyncio.to_thread(self._find_corrupt, dict(self._pieces))
        corrupt = [n for n in corrupt if n in self._pieces and not self._deleted]
        if not corrupt:
            return []
        for number in corrupt:
            length = self.span(number).length
            del self._pieces[number]
            self._order.remove(number)
            self._used -= length
            self._store._add_used(-length)
        log.warning("task %s: %d corrupt pieces dropped: %s", self.task_id, len(corrupt), corrupt[:10])
        if self.state == SUCCEEDED:
            self._transition(PENDING, "")
        else:
            self._persist_now()
        return corrupt

    def _find_corrupt(self, pieces: Mapping[int, str]) -> list[int]:
        corrupt = []
        with open(self.content_path, "rb") as file:
            for number, digest in sorted(pieces.items()):
                span = self.span(number)
                hasher = new_piece_hasher()
                remaining, offset = span.length, span.offset
                while remaining > 0:
                    chunk = os.pread(file.fileno(), min(remaining, 1 << 20), offset)
                    if not chunk:
                        break
                    hasher.update(chunk)
                    remaining -= len(chunk)
                    offset += len(chunk)
                if remaining or format_digest(PIECE_DIGEST_ALGORITHM, hasher) != digest:
                    corrupt.append(number)
        return corrupt

    @property
    def used_bytes(self) -> int:
        """Bytes of this task's complete pieces."""
        return self._used

    async def write_piece(
        self,
        number: int,
        chunks: AsyncIterable[bytes],
        *,
        expected_digest: ExpectedDigest = None,
        parent_id: str = "",
    ) -> str:
        """Stream one piece's bytes to disk, verify, record it; return its digest.

        Exactly the piece's length must arrive: more or fewer bytes raise ParentError (from a
        parent, `parent_id` given) or OriginError (no parent: the bytes came from the origin).
        A wrong digest raises PieceDigestMismatch. In every failure the piece stays incomplete.
        A piece that is already complete is not written again (the chunks are not consumed).
        `expected_digest` may be a coroutine function: it is asked once the bytes are in.
        """
        return await self._write_piece(number, lambda span: self._receive(span, chunks, parent_id),
                                       expected_digest, parent_id)

    async def write_piece_in_thread(
        self,
        number: int,
        receive: PieceReceiver,
        *,
        executor: Executor,
        expected_digest: ExpectedDigest = None,
        parent_id: str = "",
    ) -> str:
        """Like :meth:`write_piece`, for a blocking receiver: ``receive(length, sink)`` runs in a
        thread of `executor` and passes the piece's bytes to `sink`, which hashes and writes each
        part in that same thread (one hand-off per piece, not per chunk; the flush too)."""
        return await self._write_piece(number, lambda span: self._receive_in_thread(span, receive, executor, parent_id),
                                       expected_digest, parent_id)

    async def _write_piece(
        self, number: int, receive: Callable[[PieceSpan], Awaitable[str]], expected_digest: ExpectedDigest,
        parent_id: str,
    ) -> str:
        span = self.span(number)
        self._check_alive()
        done = self._pieces.get(number)
        if done is not None:
            return done
        entry = self._piece_locks.get(number)
        if entry is None:
            entry = self._piece_locks[number] = _PieceLock()
        entry.users += 1
        try:
            async with entry.lock:  # a second writer of the same piece waits for the first
                done = self._pieces.get(number)
                if done is not None:
                    return done
                self._check_alive()
                if self.state == PENDING:
                    self.state = RUNNING  # persisted with the piece
                digest = await receive(span)
                expected = expected_digest if expected_digest is None or isinstance(expected_digest, str) \
                    else await expected_digest()
                if expected is not None and expected.strip().lower() != digest:
                    raise PieceDigestMismatch(self.task_id, number, expected, digest, parent_id)
                self._unpersisted[number] = digest
                try:
                    await self._persist_durably()
                finally:
                    self._unpersisted.pop(number, None)
                self._check_alive()
                self._pieces[number] = digest
                self._order.append(number)
                self._drop_spans(self._drop_behind.completed(span.offset, span.length))
                self._used += span.length
                self._store._add_used(span.length)
                self._notify()
                return digest
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._piece_locks[number]

    def _open_for(self, span: PieceSpan, parent_id: str) -> tuple[_PieceFile, _PieceWriter]:
        """The content file opened to write a piece, and the writer of its bytes."""
        what = f"writing piece {span.number} of task {self.task_id}"
        try:
            file = _PieceFile(self.content_path)
        except OSError as exc:
            raise _disk_error(exc, what) from exc
        return file, _PieceWriter(self.task_id, span, file.fd, what, parent_id)

    async def _receive_in_thread(self, span: PieceSpan, receive: PieceReceiver, executor: Executor,
                                 parent_id: str) -> str:
        file, writer = self._open_for(span, parent_id)
        try:
            return await file.run(writer.receive_all, receive, executor=executor)
        finally:
            file.close()

    async def _receive(self, span: PieceSpan, chunks: AsyncIterable[bytes], parent_id: str) -> str:
        file, writer = self._open_for(span, parent_id)
        try:
            async for chunk in chunks:
                if len(chunk) >= THREAD_WRITE_THRESHOLD:
                    await file.run(writer.write, chunk)
                elif chunk:
                    writer.write(chunk)
            return await file.run(writer.finish)
        finally:
            file.close()

    # ---- waiting -----------------------------------------------------------------------------

    # The timeout parameter is part of the API the engine uses (ASYNC109 prefers asyncio.timeout).
    async def wait_for_piece(self, number: int, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Return once piece `number` is complete.

        Raises TaskNotFound if the task is deleted, DownloadFailed if it failed, InvalidRequest
        for a number outside the content and TimeoutError after `timeout` seconds.
        """
        async with asyncio.timeout(timeout):
            while True:
                if number in self._pieces:
                    return
                self._raise_if_ended()
                if self.content_length is not None:
                    self.span(number)  # raises for a number outside the content
                await self._changed.wait()

    async def subscribe(self) -> AsyncIterator[int]:
        """Yield complete piece numbers: those complete now (sorted), then each new one.

        Ends when all pieces are complete; raises TaskNotFound / DownloadFailed when the task is
        deleted or fails before that.
        """
        feed = self.feed()
        while True:
            for number in feed.take():
                yield number
            if feed.complete:
                return
            await self.changed()

    def feed(self) -> PieceFeed:
        """A :class:`PieceFeed` of this task's pieces, from now on."""
        return PieceFeed(self, self._order, set(self._pieces))

    async def changed(self) -> None:
        """Wait for the next change (a piece complete, geometry known, a state); raises
        TaskNotFound / DownloadFailed at once when the task is deleted or failed."""
        self._raise_if_ended()
        await self._changed.wait()

    async def until_deleted(self) -> None:
        """Wait until the task is deleted, then raise TaskNotFound."""
        while True:
            self._check_alive()
            await self._changed.wait()

    def _raise_if_ended(self) -> None:
        self._check_alive()
        if self.state == FAILED:
            raise DownloadFailed(f"task {self.task_id} failed: {self.failure_reason or 'no reason given'}")

    def _check_alive(self) -> None:
        if self._deleted:
            raise TaskNotFound(self.task_id)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # ---- state -------------------------------------------------------------------------------

    def mark_running(self) -> None:
        """A download of this task (re)starts; a failed task becomes running again."""
        self._transition(RUNNING, "")

    def mark_succeeded(self) -> None:
        """All pieces are there and verified; raises StorageError if a piece is missing."""
        if not self.is_complete():
            have = len(self._pieces)
            total = self.piece_count if self.content_length is not None else "?"
            raise StorageError(f"task {self.task_id}: cannot succeed with {have} of {total} pieces")
        self._transition(SUCCEEDED, "")

    def mark_failed(self, reason: str) -> None:
        """The download failed; waiters and subscribers get DownloadFailed."""
        self._transition(FAILED, reason)

    def _transition(self, state: str, reason: str) -> None:
        self._check_alive()
        if state not in TRANSITIONS[self.state]:
            raise StorageError(f"task {self.task_id}: illegal state change {self.state} -> {state}")
        self.state = state
        self.failure_reason = reason
        self._persist_now()
        self._notify()

    # ---- readers and access ------------------------------------------------------------------

    @contextlib.contextmanager
    def reader(self) -> Iterator[None]:
        """Hold while reading the content; GC does not evict a task with readers."""
        self._readers += 1
        try:
            yield
        finally:
            self._readers -= 1

    @property
    def readers(self) -> int:
        """How many readers hold the task now."""
        return self._readers

    @property
    def deleted(self) -> bool:
        """Whether the task was deleted from the store."""
        return self._deleted

    def touch(self) -> None:
        """Record an access now (LRU GC). Not persisted by itself."""
        self.last_access = self._store.clock.time()

    # ---- metadata ----------------------------------------------------------------------------

    def _snapshot(self) -> bytes:
        idle = max(0.0, self._store.clock.time() - self.last_access)
        now = time.time()
        data: bytes = msgpack.packb(
            {
                "format": METADATA_FORMAT,
                "task_id": self.task_id,
                "url": self.url,
                "digest": self.digest,
                "tag": self.tag,
                "application": self.application,
                "state": self.state,
                "failure_reason": self.failure_reason,
                "content_length": self.content_length,
                "piece_length": self.piece_length,
                "response_headers": self.response_headers,
                "pieces": self._pieces | self._unpersisted,
                "created_at": self.created_at,
                "updated_at": now,
                "accessed_at": now - idle,
            }
        )
        return data

    def _persist_now(self) -> None:
        """Write the metadata from the loop thread: atomic (rename) but not fsynced.

        Used for rare, small changes (creation, content info, state); the next piece write
        makes everything durable.
        """
        if self._deleted:
            return
        self._version += 1
        try:
            self._write_metadata(self._snapshot(), self._version, durable=False)
        except OSError as exc:
            raise _disk_error(exc, f"writing the metadata of task {self.task_id}") from exc

    async def _persist_durably(self) -> None:
        """Make the current metadata durable; concurrent callers share one write."""
        self._version += 1
        wanted = self._version
        async with self._persist_lock:
            if self._durable_version >= wanted:
                return  # a write that started after our change already covered it
            self._check_alive()
            version = self._version
            data = self._snapshot()
            try:
                await asyncio.to_thread(self._write_metadata, data, version, True)
            except OSError as exc:
                raise _disk_error(exc, f"writing the metadata of task {self.task_id}") from exc
            self._durable_version = max(self._durable_version, version)

    def _write_metadata(self, data: bytes, version: int, durable: bool) -> None:
        tmp = self.directory / f"{METADATA_FILE}.tmp.{version}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        with os.fdopen(os.open(tmp, flags, PRIVATE_FILE_MODE), "wb") as file:
            file.write(data)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        with self._rename_lock:
            if version > self._written_version:
                os.replace(tmp, self.metadata_path)
                self._written_version = version
                replaced = True
            else:
                replaced = False
        if not replaced:
            tmp.unlink(missing_ok=True)
            if durable:
                # A newer snapshot (a superset of ours) was renamed unsynced: flush it instead.
                with open(self.metadata_path, "rb") as current:
                    os.fsync(current.fileno())
        if durable:
            _fsync_directory(self.directory)

    def _restore(self, meta: Mapping[str, Any], clock_now: float) -> None:
        """Apply parsed metadata (see :func:`_parse_metadata`) and reconcile with the content file."""
        self.state = meta["state"]
        if self.state == RUNNING:
            self.state = PENDING  # nobody is downloading it after a restart
        self.failure_reason = meta["failure_reason"]
        self.created_at = meta["created_at"]
        self.last_access = clock_now - max(0.0, time.time() - meta["accessed_at"])
        self.response_headers = meta["response_headers"]
        content_length, piece_length = meta["content_length"], meta["piece_length"]
        if content_length is None or piece_length is None:
            return
        self.content_length, self.piece_length = content_length, piece_length
        try:
            size = self.content_path.stat().st_size
        except FileNotFoundError:
            size = 0
        pieces = {}
        for number, digest in meta["pieces"].items():
            if not 0 <= number < self.piece_count:
                raise ValueError(f"piece {number} outside the content")
            if self.span(number).end <= size:
                pieces[number] = digest
        lost = len(meta["pieces"]) - len(pieces)
        if lost:
            log.warning("task %s: content file is short (%d bytes), %d pieces lost", self.task_id, size, lost)
        if size != content_length:
            with open(self.content_path, "ab") as file:
                os.ftruncate(file.fileno(), content_length)
        if self.state == SUCCEEDED and len(pieces) != self.piece_count:
            self.state = PENDING
        self._pieces = pieces
        self._order = sorted(pieces)
        self._used = sum(self.span(number).length for number in pieces)


def _parse_metadata(raw: bytes, task_id: str) -> dict[str, Any]:
    """Parse and type-check a metadata file; ValueError says what is wrong."""
    meta = msgpack.unpackb(raw, strict_map_key=False)
    if not isinstance(meta, dict):
        raise ValueError("not a map")
    if meta.get("format") != METADATA_FORMAT:
        raise ValueError(f"unknown format {meta.get('format')!r}")
    if meta.get("task_id") != task_id:
        raise ValueError(f"belongs to task {meta.get('task_id')!r}")

    def need(key: str, kinds: type | tuple[type, ...], optional: bool = False) -> Any:
        value = meta.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise ValueError(f"{key} is {value!r}")
        return value

    state = need("state", str)
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}")
    content_length = need("content_length", int, optional=True)
    piece_length = need("piece_length", int, optional=True)
    if (content_length is None) != (piece_length is None) or (
        content_length is not None and (content_length < 0 or piece_length <= 0)
    ):
        raise ValueError(f"bad sizes {content_length!r}/{piece_length!r}")
    headers = need("response_headers", dict)
    pieces = need("pieces", dict)
    for number, digest in pieces.items():
        if not isinstance(number, int) or not isinstance(digest, str) or not _PIECE_DIGEST_RE.match(digest):
            raise ValueError(f"bad piece entry {number!r}: {digest!r}")
    if pieces and content_length is None:
        raise ValueError("pieces without a content length")
    return {
        "url": need("url", str),
        "digest": need("digest", str, optional=True),
        "tag": need("tag", str),
        "application": need("application", str),
        "state": state,
        "failure_reason": need("failure_reason", str),
        "content_length": content_length,
        "piece_length": piece_length,
        "response_headers": {str(k): str(v) for k, v in headers.items()},
        "pieces": pieces,
        "created_at": float(need("created_at", (int, float))),
        "accessed_at": float(need("accessed_at", (int, float))),
    }


class PieceStore:
    """All tasks kept on this node's disk."""

    def __init__(
        self, data_dir: Path, *, clock: Clock | None = None, metrics: DaemonMetrics | None = None,
        page_cache_window: int = DEFAULT_PAGE_CACHE_WINDOW,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.clock: Clock = clock or SystemClock()
        self.metrics = metrics
        # Bytes of each task's latest pieces left in the page cache (0: every piece; _DropBehind).
        self.page_cache_window = page_cache_window
        self._tasks: dict[str, LocalTask] = {}
        self._used = 0
        self._tasks_dir = self.data_dir / "tasks"
        self._trash_dir = self.data_dir / "trash"

    def task_directory(self, task_id: str) -> Path:
        """Directory of a task (the id is validated, so it cannot escape the data directory)."""
        validate_task_id(task_id)
        return self._tasks_dir / task_id[:3] / task_id

    def load(self) -> None:
        """Reload the tasks found on disk: complete and partial. Bad metadata is logged and skipped."""
        _private_mkdir(self._tasks_dir)
        if self._trash_dir.exists():
            shutil.rmtree(self._trash_dir, ignore_errors=True)
        now = self.clock.time()
        for prefix in sorted(self._tasks_dir.iterdir()):
            if not prefix.is_dir():
                continue
            for directory in sorted(prefix.iterdir()):
                task_id = directory.name
                if not TASK_ID_RE.match(task_id) or task_id[:3] != prefix.name or not directory.is_dir():
                    log.warning("ignoring unexpected entry %s in the piece store", directory)
                    continue
                if task_id in self._tasks:
                    continue
                for leftover in directory.glob(f"{METADATA_FILE}.tmp.*"):
                    leftover.unlink(missing_ok=True)
                try:
                    task = self._load_task(task_id, directory / METADATA_FILE, now)
                except Exception as exc:  # any parse or I/O failure: skip this task, keep starting
                    log.error("skipping task %s: cannot load its metadata: %s", task_id, exc)
                    continue
                self._tasks[task_id] = task
        self._add_used(sum(task.used_bytes for task in self._tasks.values()) - self._used)
        log.info("piece store %s: loaded %d tasks, %d bytes", self.data_dir, len(self._tasks), self._used)

    def _load_task(self, task_id: str, path: Path, now: float) -> LocalTask:
        meta = _parse_metadata(path.read_bytes(), task_id)
        task = LocalTask(
            self,
            task_id,
            url=meta["url"],
            digest=meta["digest"],
            tag=meta["tag"],
            application=meta["application"],
        )
        task._restore(meta, now)
        return task

    def get(self, task_id: str) -> LocalTask | None:
        """The task, or None."""
        return self._tasks.get(task_id)

    def require(self, task_id: str) -> LocalTask:
        """The task; raises TaskNotFound."""
        task = self._tasks.get(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    def create(
        self, task_id: str, *, url: str, digest: str | None = None, tag: str = "", application: str = ""
    ) -> LocalTask:
        """A new pending task persisted on disk, or the existing task with that id."""
        existing = self._tasks.get(task_id)
        if existing is not None:
            return existing
        task = LocalTask(self, task_id, url=url, digest=digest, tag=tag, application=application)
        try:
            _private_mkdir(task.directory)
        except OSError as exc:
            raise _disk_error(exc, f"creating the directory of task {task_id}") from exc
        task._persist_now()
        self._tasks[task_id] = task
        return task

    async def delete(self, task_id: str) -> None:
        """Forget a task and remove its files; its waiters and subscribers get TaskNotFound."""
        task = self._tasks.pop(task_id, None)
        if task is None:
            return
        task._deleted = True
        task._notify()
        self._add_used(-task.used_bytes)
        async with task._persist_lock:  # no metadata write is running once we hold it
            trash = self._trash_dir / f"{task_id}.{uuid.uuid4().hex}"
            try:
                _private_mkdir(self._trash_dir)
                os.rename(task.directory, trash)
            except FileNotFoundError:
                return
            except OSError as exc:
                raise _disk_error(exc, f"deleting task {task_id}") from exc
        await asyncio.to_thread(shutil.rmtree, trash, True)

    def tasks(self) -> list[LocalTask]:
        """All tasks."""
        return list(self._tasks.values())

    async def verify_all(self) -> int:
        """Scrub every task (see LocalTask.verify_pieces); returns how many pieces were corrupt."""
        corrupt = 0
        for task in list(self._tasks.values()):
            if not task.deleted:
                corrupt += len(await task.verify_pieces())
        return corrupt

    def used_bytes(self) -> int:
        """Bytes of complete pieces of all tasks."""
        return self._used

    def _add_used(self, delta: int) -> None:
        self._used += delta
        if self.metrics is not None:
            self.metrics.cache_used.set(self._used)
