"""The HTTP piece server: other peers fetch complete pieces of our tasks here.

``GET /pieces/{task_id}/{number}`` answers exactly that piece's bytes, sent from the content file
with ``sendfile`` (no copy through Python), with ``Content-Length`` and the informative
``X-Damselfly-Piece-Digest``. Bad input is answered, never crashed on: ``400`` for a malformed
task id or piece number, ``404`` for an unknown task or a piece that is not complete here,
``503`` with ``Retry-After`` when every upload slot stays busy for a moment.
``GET /healthy`` answers ``ok``. ``GET /tasks/{task_id}/pieces`` streams the task's piece
announcements (:mod:`peer.upload.announcements`).

Choking, as BitTorrent unchokes a few peers at a time: a request that says it can go elsewhere
(``X-Damselfly-When-Busy: refuse``, sent by children for pieces other parents may have) is
answered ``503`` with ``X-Damselfly-Busy: uplink`` at once when ``swarm_slots`` pieces are already
on their way out. The uplink then carries a few pieces at full speed, whose receivers pass them on,
instead of one piece to every child at a fraction of the speed, so that every child waits for the
same parent and the others' uplinks idle (bench/swarm_sim.py, 16 peers, 64 MiB: 3.6x the lower
bound without it, 2.1x with 4 slots).

Super-seeding (a seed's server, ``share_window`` set): a piece leaves the seed for the swarm
once, and the other children get it from the child it went to, which announces it as soon as it is
there. A demanded piece the seed sent to one child is not sent for another child's demand within
the window (sixteen lazy readers waiting for the same chunk otherwise had the seed send it once per
reader: bench/lazyload.py, N=16, 13x the bytes read). Any other piece a child may fetch elsewhere
(a whole download's) is refused to other children while it is on its way to the first and for the
window after it got there; at once again if it did not get there. Without that the seed's uplink,
which the origin's bytes also come through, carried 1.4-1.7 copies of the blob and was the
swarm's bottleneck (bench/swarm_sim.py, 256 MiB, every link 200 Mbit/s, random seeds 1-3: 4 peers
16.4-19.3 s -> 14.6-15.0 s, 16 peers 17.9-20.4 s -> 17.3-18.1 s, the seed sending 1.0-1.14 copies).
Readers' pieces are not held: a reader waits for them now.

Readers first: a child marks the request for a piece one of its readers waits for
(``X-Damselfly-Priority: reader``; a lazily loaded image's Range reads). While such pieces are being
sent, and for :data:`READER_GRACE` after, a request that may go elsewhere and is for no reader (a
prefetch, the rest of a blob) is answered busy: the uplink is the readers'. Whole-blob swarms send
no reader requests and are not affected. With prefetch on, 16 lazy readers otherwise shared every
uplink (and the CPU) with the blob's other pieces (bench/lazyload.py, N=16: trace ~40 % slower).

A piece this node does not have yet but is fetching (a seed back-sourcing the task) is a
*demand*: a child's reader waits for it. With a demand handler (:meth:`PieceServer.serve_demands`,
the engine's), the request moves the piece to the front of the download and is answered as soon
as the piece is here, within :data:`DEFAULT_DEMAND_WAIT`; ``404`` after that, or at once when no
download here brings it.

How the bytes go out depends on the connection and the event loop (:class:`FileRegionSender`,
which the registry mirror uses too):

* asyncio: ``loop.sendfile`` on the transport;
* uvloop (no ``loop.sendfile``): once the response headers are flushed, ``os.sendfile`` on the
  connection's socket in a sender thread of our own, which polls while the client is slow;
* TLS, or sendfile turned off: file reads in a thread, written through the transport.

An optional :class:`~common.ratelimit.TokenBucket` caps the upload rate of the whole server; an
upload that makes no progress for the stall timeout, or (without a rate cap of our own) goes
slower than the minimum upload rate, is given up and its connection closed. Connections are
capped in all and per client, and must send their request headers within the header timeout
(:mod:`common.http_limits`).

The handler is a thin edge: parse, look up in the :class:`~peer.storage.PieceStore`, send, count.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import math
import os
import resource
import select
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import BinaryIO

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from common.clock import Clock, SystemClock
from common.errors import InvalidRange, RangeNotSatisfiable
from common.http import ByteRange, select_range, unsatisfied_content_range
from common.http_limits import ConnectionLimits, listen_limited
from common.pieces import MIB, PieceSpan
from common.ratelimit import TokenBucket
from peer.metrics import DaemonMetrics
from peer.storage.store import TASK_ID_RE, LocalTask, PieceStore
from peer.upload.announcements import ANNOUNCEMENTS_PATH, CHILD_HEADER, Announcements

log = logging.getLogger(__name__)

PIECE_DIGEST_HEADER = "X-Damselfly-Piece-Digest"
# A child's request header: "refuse" when a busy uplink should say so instead of queueing it.
WHEN_BUSY_HEADER = "X-Damselfly-When-Busy"
# The answer's header on such a refusal.
BUSY_HEADER = "X-Damselfly-Busy"
# Pieces sent at once to children that can fetch them elsewhere (see "Choking" above).
DEFAULT_SWARM_SLOTS = 4
# A child's request header: "reader" when a reader waits for the piece (see "Readers first").
PRIORITY_HEADER = "X-Damselfly-Priority"
# How long after sending a reader's piece other pieces that can go elsewhere are still refused:
# a cold start's reads come in bursts a few milliseconds apart.
READER_GRACE = 0.5
# A seed's super-seeding window (see above): about the time a child takes to receive a piece and
# announce it.
DEFAULT_SHARE_WINDOW = 0.5
# How long a request waits for a free upload slot before it is told to come back.
DEFAULT_SLOT_WAIT = 2.0
RETRY_AFTER_SECONDS = 1
# Read size of the chunked path (TLS connections, or sendfile turned off).
FALLBACK_CHUNK = MIB
# An upload that makes no progress for this long is given up and its connection closed.
DEFAULT_STALL_TIMEOUT = 30.0
# A request's headers must arrive, and an idle keep-alive connection is closed, within this: longer
# than aiohttp clients' 15 s keep-alive, so a child never reuses a connection the server is closing.
DEFAULT_HEADER_TIMEOUT = 20.0
# Connections the piece server holds besides one per upload slot (waiting for a slot, idle pools).
SPARE_CONNECTIONS = 256
# An upload must end within this plus its length at the minimum rate (a slow reader cannot keep
# an upload slot for minutes by reading a few bytes now and then).
UPLOAD_GRACE = 3.0
DEFAULT_MIN_UPLOAD_RATE = 256 * 1024
# Bytes an idle rate-limited server may send at once before the rate applies.
DEFAULT_RATE_BURST = 4 * MIB
# Unit of rate limiting and of the stall timeout on the event loop's own sendfile.
SEND_SLICE = MIB
# A region this small goes out by one non-blocking sendfile on the event loop when the socket takes
# it whole (the usual case for a Range read of a cached blob): a sender thread's hand-offs cost more
# than the send (``bench/range.py``). The file's pages are nearly always cached (just written or
# just read); an uncached region blocks the loop for one small disk read at most.
INLINE_SEND_LIMIT = 256 * 1024
# Sender threads of the uvloop sendfile path: one per upload slot, but never more than this.
MAX_SENDER_THREADS = 64
# A stalled sender thread wakes this often to notice that its upload was abandoned.
_ABORT_CHECK_INTERVAL = 0.1
# Longer numbers cannot be a piece of any content (and int() of huge strings is refused).
_MAX_NUMBER_DIGITS = 12
# How long a request for a piece still on its way here waits for it: less than a child's piece
# timeout (30 s by default), so the child hears "not here" before it gives up on its own.
DEFAULT_DEMAND_WAIT = 20.0

# (task id, piece number, timeout) -> whether the piece is here now; see the module docstring.
DemandHandler = Callable[[str, int, float], Awaitable[bool]]


class _SendPath(enum.Enum):
    LOOP = "loop.sendfile"  # the event loop's own sendfile (asyncio)
    THREAD = "thread sendfile"  # os.sendfile in a sender thread (uvloop has no loop.sendfile)
    CHUNKS = "chunks"  # pread + transport writes (TLS, or sendfile turned off)


def _pread_exactly(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise OSError(f"short read at {offset}: {len(data)} of {length} bytes")
    return data


def _sendfile_until_done(
    sock_fd: int, file_fd: int, offset: int, count: int, stall_timeout: float, aborted: threading.Event
) -> None:
    """Send file bytes [offset, offset+count) on a non-blocking socket; runs in a sender thread."""
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    end = offset + count
    deadline = time.monotonic() + stall_timeout
    while offset < end:
        if aborted.is_set():
            raise ConnectionAbortedError("upload abandoned")
        try:
            sent = os.sendfile(sock_fd, file_fd, offset, end - offset)
        except BlockingIOError:  # the socket buffer is full: wait for the client to read
            sent = -1
        if sent == 0:
            raise OSError(f"content file ends at {offset}, before {end}")
        if sent > 0:
            offset += sent
            deadline = time.monotonic() + stall_timeout
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"client read nothing for {stall_timeout:g} s")
        # POLLERR/POLLHUP wake us too: the next sendfile then raises the socket's error
        poller.poll(min(left, _ABORT_CHECK_INTERVAL) * 1000)


def _aborted(request: web.BaseRequest) -> bool:
    """Whether the request's connection was given up (an incomplete response)."""
    return request.transport is None or request.transport.is_closing()


def _sendfile_now(transport: asyncio.BaseTransport, file: BinaryIO, offset: int, count: int) -> int:
    """What one non-blocking sendfile on the loop sends of the region now (0 when the socket is full)."""
    sock = transport.get_extra_info("socket")
    try:
        return os.sendfile(sock.fileno(), file.fileno(), offset, count)
    except BlockingIOError:
        return 0


class _SenderJob:
    """One threaded send, on private duplicates of the socket and file descriptors.

    The duplicates keep both open for as long as the thread uses them, even if the handler has
    given up meanwhile (cancelled, server stopping) and aiohttp closed the connection: a
    descriptor number can then never be reused under the thread's feet.
    """

    def __init__(self, sock_fd: int, file_fd: int, offset: int, count: int, stall_timeout: float) -> None:
        self._sock_fd = os.dup(sock_fd)
        try:
            self._file_fd = os.dup(file_fd)
        except BaseException:
            os.close(self._sock_fd)
            raise
        self._offset = offset
        self._count = count
        self._stall_timeout = stall_timeout
        self._closed = False
        self.aborted = threading.Event()

    def run(self) -> None:
        try:
            _sendfile_until_done(
                self._sock_fd, self._file_fd, self._offset, self._count, self._stall_timeout, self.aborted
            )
        finally:
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._sock_fd)
            os.close(self._file_fd)


class FileRegionSender:
    """Sends regions of files as HTTP response bodies, zero-copy where the connection allows.

    One per server (the piece server and the registry mirror each have one): it owns the sender
    threads of the uvloop path and remembers whether the event loop has a sendfile of its own.
    :meth:`send` picks the way out per connection, as the module docstring describes. Slices of
    :data:`SEND_SLICE` bytes bound the stall timeout of the loop's sendfile and are the unit of
    the optional rate limit (a :class:`TokenBucket`, shared by all sends of this sender).
    """

    def __init__(
        self,
        *,
        stall_timeout: float,
        max_threads: int = MAX_SENDER_THREADS,
        use_sendfile: bool = True,
        bucket: TokenBucket | None = None,
        clock: Clock | None = None,
        min_rate: int = 0,
    ) -> None:
        if stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be positive, got {stall_timeout}")
        if min_rate < 0:
            raise ValueError(f"min_rate must be 0 (none) or positive, got {min_rate}")
        if max_threads < 1:
            raise ValueError(f"max_threads must be at least 1, got {max_threads}")
        self._stall_timeout = stall_timeout
        self._max_threads = max_threads
        self._use_sendfile = use_sendfile and hasattr(os, "sendfile")
        self._loop_has_sendfile = True  # cleared when the loop turns out to have none (uvloop)
        self._bucket = bucket
        self._min_rate = min_rate
        self._clock: Clock = clock or SystemClock()
        self._senders: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def uses_sendfile(self) -> bool:
        """Whether plain-TCP regions go out by sendfile (the loop's own, or in sender threads)."""
        return self._use_sendfile

    @property
    def sendfile_in_threads(self) -> bool:
        """True once the event loop turned out to have no sendfile (uvloop): threads send instead."""
        return self._use_sendfile and not self._loop_has_sendfile

    def close(self) -> None:
        """Let go of the sender threads (a later send starts new ones)."""
        senders, self._senders = self._senders, None
        if senders is not None:
            # cancelled sends have told their threads to stop; they do within a poll interval
            senders.shutdown(wait=False, cancel_futures=True)

    async def send(
        self, request: web.BaseRequest, writer: AbstractStreamWriter, file: BinaryIO, offset: int, count: int
    ) -> None:
        """Send bytes [offset, offset+count) of `file` on the request's connection.

        The response is prepared (its headers may still be buffered) and nothing else writes to
        the connection until this returns. Raises ConnectionError or OSError (TimeoutError for a
        stalled client) when the bytes cannot all go out: the response is then incomplete and
        its connection must be closed, never reused. Without a rate limit of our own, a send slower
        than the minimum rate (after :data:`UPLOAD_GRACE`) fails with TimeoutError.
        """
        if self._min_rate and self._bucket is None:
            async with asyncio.timeout(UPLOAD_GRACE + count / self._min_rate):
                await self._send(request, writer, file, offset, count)
        else:
            await self._send(request, writer, file, offset, count)

    async def _send(
        self, request: web.BaseRequest, writer: AbstractStreamWriter, file: BinaryIO, offset: int, count: int
    ) -> None:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection lost")
        path = self._path_for(transport)
        # An unlimited threaded send is one job: its thread watches progress itself.
        whole = path is _SendPath.THREAD and self._bucket is None
        end = offset + count
        if whole and count <= INLINE_SEND_LIMIT and not transport.get_write_buffer_size():
            offset += _sendfile_now(transport, file, offset, count)
        while offset < end:
            size = end - offset if whole else min(SEND_SLICE, end - offset)
            await self._throttle(size)
            if transport.is_closing():  # loop.sendfile would raise RuntimeError
                raise ConnectionResetError("connection lost")
            if path is _SendPath.LOOP:
                try:
                    async with asyncio.timeout(self._stall_timeout):
                        await asyncio.get_running_loop().sendfile(transport, file, offset, size, fallback=False)
                except NotImplementedError:  # the loop has no sendfile at all (uvloop)
                    self._loop_has_sendfile = False
                    path = _SendPath.THREAD
                    whole = self._bucket is None
                    size = end - offset if whole else size
                except asyncio.SendfileNotAvailableError:  # not for this transport or file
                    path = _SendPath.CHUNKS
            if path is _SendPath.THREAD:
                await self._send_in_thread(transport, writer, file, offset, size)
            elif path is _SendPath.CHUNKS:
                await self._send_chunks(writer, file, offset, size)
            offset += size

    def _path_for(self, transport: asyncio.BaseTransport) -> _SendPath:
        if not self._use_sendfile:
            return _SendPath.CHUNKS
        if transport.get_extra_info("sslcontext") is not None or transport.get_extra_info("socket") is None:
            return _SendPath.CHUNKS  # TLS encrypts in user space: there is no raw socket to send on
        return _SendPath.LOOP if self._loop_has_sendfile else _SendPath.THREAD

    async def _throttle(self, count: int) -> None:
        if self._bucket is not None:
            delay = self._bucket.reserve(count, self._clock.time())
            if delay > 0:
                await self._clock.sleep(delay)

    async def _send_in_thread(
        self, transport: asyncio.Transport, writer: AbstractStreamWriter, file: BinaryIO, offset: int, count: int
    ) -> None:
        """os.sendfile on the connection's socket in a sender thread; the event loop stays free.

        The transport's own buffer (the response headers) is flushed first, and nothing else
        writes to the connection until the send returns, so the bytes cannot interleave.
        """
        await self._flush(transport, writer)
        sock = transport.get_extra_info("socket")
        job = _SenderJob(sock.fileno(), file.fileno(), offset, count, self._stall_timeout)
        try:
            future = self._sender_pool().submit(job.run)
        except BaseException:
            job.close()
            raise
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            job.aborted.set()  # a running thread stops within a poll interval
            if future.cancel():  # it never started: its descriptors are still ours to close
                job.close()
            raise

    async def _flush(self, transport: asyncio.Transport, writer: AbstractStreamWriter) -> None:
        """Wait until the transport has handed everything it buffered to the kernel."""
        if not transport.get_write_buffer_size():
            return
        low, high = transport.get_write_buffer_limits()
        # With a zero high-water mark the protocol is paused until the buffer is empty, so the
        # writer's drain() waits exactly for that.
        transport.set_write_buffer_limits(high=0, low=0)
        try:
            async with asyncio.timeout(self._stall_timeout):
                await writer.drain()
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=high, low=low)
        if transport.get_write_buffer_size():
            raise ConnectionResetError("connection lost while flushing the response headers")

    def _sender_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._senders is None:
            # Own threads, so that slow clients cannot starve the default executor (file I/O).
            self._senders = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._max_threads, thread_name_prefix="file-sender"
            )
        return self._senders

    async def _send_chunks(self, writer: AbstractStreamWriter, file: BinaryIO, offset: int, count: int) -> None:
        fd = file.fileno()
        end = offset + count
        while offset < end:
            length = min(FALLBACK_CHUNK, end - offset)
            chunk = await asyncio.to_thread(_pread_exactly, fd, length, offset)
            async with asyncio.timeout(self._stall_timeout):
                await writer.write(chunk)
            offset += length


def max_connections_for_fds() -> int:
    """Half the process's file descriptors: the rest stay for disk, origins, parents and dfget."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, soft // 2) if soft != resource.RLIM_INFINITY else 1 << 20


class ShareHolds:
    """Super-seeding's book (see the module's docs): for each piece, the child it is held for and
    until when (infinity while a held piece is on its way). Pure, on a clock: the piece server
    keeps one, and bench/swarm_sim.py one per simulated seed."""

    def __init__(self, window: float, clock: Clock) -> None:
        self.window = window
        self._clock = clock
        # key -> (until when, child), in the order the holds were last set
        self._holds: OrderedDict[Hashable, tuple[float, str]] = OrderedDict()

    def sent_elsewhere(self, key: Hashable, child: str, *, until_sent: bool) -> bool:
        """True when the piece is held for another child; otherwise it is held for this one from
        now, for the window (`until_sent`: until :meth:`piece_left`, then the window)."""
        now = self._clock.time()
        holds = self._holds
        # (a held piece on its way stops this at the front, so entries behind it may be past their
        # time: the check below looks at that too; there are no more of them than uploads)
        while holds and next(iter(holds.values()))[0] <= now:
            holds.popitem(last=False)
        last = holds.get(key)
        if last is not None and last[1] != child and now < last[0]:
            return True
        holds[key] = (math.inf if until_sent else now + self.window, child)
        holds.move_to_end(key)
        return False

    def piece_left(self, key: Hashable, child: str, *, delivered: bool) -> None:
        """A held piece's send to `child` ended: others are sent elsewhere for the window from now
        if it got there, not at all if it did not (its transfer failed, or it was refused)."""
        last = self._holds.get(key)
        if last is None or last[1] != child:
            return
        if delivered:
            self._holds[key] = (self._clock.time() + self.window, child)
            self._holds.move_to_end(key)
        else:
            del self._holds[key]


class PieceServer:
    """aiohttp server of complete pieces with a bounded number of concurrent uploads.

    ``rate_limit`` caps the bytes per second of all uploads together (0: unlimited), with
    ``rate_burst`` bytes allowed at once. An upload that makes no progress for ``stall_timeout``
    seconds is given up and its connection closed.
    """

    def __init__(
        self,
        store: PieceStore,
        *,
        upload_slots: int,
        metrics: DaemonMetrics,
        slot_wait: float = DEFAULT_SLOT_WAIT,
        use_sendfile: bool = True,
        rate_limit: int = 0,
        rate_burst: int = DEFAULT_RATE_BURST,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        min_rate: int = DEFAULT_MIN_UPLOAD_RATE,
        clock: Clock | None = None,
        swarm_slots: int = DEFAULT_SWARM_SLOTS,
        share_window: float = 0.0,
    ) -> None:
        if upload_slots < 1:
            raise ValueError(f"upload_slots must be at least 1, got {upload_slots}")
        if rate_limit < 0:
            raise ValueError(f"rate_limit must be 0 (unlimited) or positive, got {rate_limit}")
        if stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be positive, got {stall_timeout}")
        self._store = store
        self._metrics = metrics
        self._upload_slots = upload_slots
        self._swarm_slots = swarm_slots  # 0: no choking
        self._clock = clock or SystemClock()
        # super-seeding; None (share_window 0): every child may get every piece from here
        self._holds = ShareHolds(share_window, self._clock) if share_window else None
        self._slot_wait = slot_wait
        self._slots = asyncio.Semaphore(upload_slots)
        clock = self._clock
        self._sender = FileRegionSender(
            stall_timeout=stall_timeout,
            max_threads=min(upload_slots, MAX_SENDER_THREADS),
            use_sendfile=use_sendfile,
            bucket=TokenBucket(rate_limit, rate_burst, clock.time()) if rate_limit else None,
            clock=clock,
            min_rate=min_rate,
        )
        max_connections = min(2 * upload_slots + SPARE_CONNECTIONS, max_connections_for_fds())
        self.limits = ConnectionLimits(header_timeout=DEFAULT_HEADER_TIMEOUT, max_connections=max_connections,
                                       max_per_client=min(max_connections, max(SPARE_CONNECTIONS, upload_slots)))
        self._uploads = 0
        self._reader_uploads = 0  # of those, pieces a reader waits for
        self._readers_until = 0.0  # until then other pieces that can go elsewhere are refused
        # The request tasks inside _upload: stop() finishes those aiohttp's shutdown leaves running.
        self._upload_tasks: set[asyncio.Task[object]] = set()
        self._runner: web.AppRunner | None = None
        self._demand: DemandHandler | None = None
        self._demand_wait = DEFAULT_DEMAND_WAIT
        self.app = web.Application()
        self.app.router.add_get("/pieces/{task_id}/{number}", self._get_piece, allow_head=False)
        self.announcements = Announcements(store)
        self.app.router.add_get(ANNOUNCEMENTS_PATH, self.announcements.handle, allow_head=False)
        self.app.router.add_get("/healthy", self._healthy, allow_head=False)

    def serve_demands(self, handler: DemandHandler, wait: float = DEFAULT_DEMAND_WAIT) -> None:
        """Answer requests for pieces still on their way here once they arrive (the engine's
        :meth:`~peer.download.engine.Engine.wait_demanded_piece`), waiting at most `wait`."""
        self._demand = handler
        self._demand_wait = wait

    @property
    def upload_slots(self) -> int:
        """The slot limit (announced to the scheduler)."""
        return self._upload_slots

    @property
    def uses_sendfile(self) -> bool:
        """Whether plain-TCP pieces go out by sendfile (the loop's own, or in sender threads)."""
        return self._sender.uses_sendfile

    @property
    def sendfile_in_threads(self) -> bool:
        """True once the event loop turned out to have no sendfile (uvloop): threads send instead."""
        return self._sender.sendfile_in_threads

    @property
    def uploads_in_progress(self) -> int:
        """Pieces being sent now (announced as the upload connection count)."""
        return self._uploads

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen on host:port (0 picks a free port) and return the bound port; HTTPS with `ssl_context`."""
        if self._runner is not None:
            raise RuntimeError("piece server already started")
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5.0,
                               keepalive_timeout=self.limits.header_timeout)
        bound = await listen_limited(runner, host, port, self.limits, ssl_context)
        self._runner = runner
        log.info("piece server listening on %s:%d (%s, %d upload slots)", host, bound,
                 "https" if ssl_context is not None else "http", self._upload_slots)
        return bound

    async def stop(self) -> None:
        """Stop listening and close connections (waits briefly for uploads in progress).

        No upload is left running when this returns, so the event loop may be closed right after.
        """
        runner, self._runner = self._runner, None
        await self.announcements.close()  # else each would hold the shutdown for its timeout
        if runner is not None:
            # Waits up to the shutdown timeout for requests in progress, then cancels the requests
            # of the connections that are still open.
            await runner.cleanup()
        # aiohttp's shutdown does not cancel the request of a connection that is already lost:
        # connection_lost() forgets its request task (web_protocol.py RequestHandler.connection_lost:
        # ``self._task_handler = None``) and Server.shutdown() then forgets the connection itself
        # (web_server.py: ``self._connections.clear()``). An upload can outlive its connection: on
        # uvloop a client that half-closes (EOF) has the transport closed while the sender thread goes
        # on sending on its duplicate of the socket, until the stall timeout. Left running, such a
        # task would be destroyed pending ("Task was destroyed but it is pending!") when the loop is
        # closed after stop(), so it is cancelled here (its sender thread is told to stop) and
        # waited for.
        leftovers = [upload for upload in self._upload_tasks if not upload.done()]
        for upload in leftovers:
            upload.cancel()
        if leftovers:
            await asyncio.wait(leftovers)
        self._sender.close()

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
        # A demand waits before taking an upload slot: the slot is for sending, not for the origin.
        demand = (digest is None and number >= 0 and self._demand is not None
                  and await self._demand(task_id, number, self._demand_wait))
        if demand:
            digest = task.piece_digest(number)
        if digest is None:
            return self._refuse(404, "not_found", f"piece {raw_number} of task {task_id} is not available")
        may_go_elsewhere = request.headers.get(WHEN_BUSY_HEADER) == "refuse"
        for_reader = demand or request.headers.get(PRIORITY_HEADER) == "reader"
        if may_go_elsewhere and not for_reader and self._serving_readers():
            return self._busy("pieces readers wait for are being sent; ask another parent or later")
        if self._swarm_slots and self._uploads >= self._swarm_slots and may_go_elsewhere:
            return self._busy(f"{self._uploads} pieces are being sent; ask another parent")
        span = task.span(number)
        try:  # a Range applies within the piece (resuming a piece, or a part of it)
            part = select_range(request.headers.get("Range"), span.length)
        except InvalidRange as exc:
            return self._refuse(400, "bad_request", str(exc))
        except RangeNotSatisfiable as exc:
            refusal = self._refuse(416, "bad_request", str(exc))
            refusal.headers["Content-Range"] = unsatisfied_content_range(span.length)
            return refusal
        child = request.headers.get(CHILD_HEADER) or request.remote or ""
        # Super-seeding (see above): a demand is held for the window from now, another piece a
        # child may fetch elsewhere until the window after it got to this child.
        holds = self._holds if demand or (may_go_elsewhere and not for_reader) else None
        held = holds is not None and not demand
        if holds is not None and holds.sent_elsewhere((task_id, number), child, until_sent=held):
            return self._busy(f"piece {number} was just sent to another child; it will have it soon")

        upload = asyncio.current_task()
        assert upload is not None  # aiohttp runs every request in a task of its own
        self._upload_tasks.add(upload)
        if for_reader:
            self._reader_uploads += 1
        delivered = False
        try:
            response: web.StreamResponse = await self._upload(request, task, span, digest, part)
            delivered = response.status == 200 and not _aborted(request)
            return response
        finally:
            self._upload_tasks.discard(upload)
            if for_reader:
                self._reader_uploads -= 1
                self._readers_until = self._clock.time() + READER_GRACE
            if held and holds is not None:
                holds.piece_left((task_id, number), child, delivered=delivered)

    def _serving_readers(self) -> bool:
        """Whether pieces readers wait for are being sent now, or were a moment ago."""
        return self._reader_uploads > 0 or self._clock.time() < self._readers_until

    async def _upload(
        self, request: web.Request, task: LocalTask, span: PieceSpan, digest: str, part: ByteRange | None
    ) -> web.StreamResponse:
        """Take an upload slot (or answer 503) and send the piece (or the requested part of it)."""
        if not await self._acquire_slot():
            response = self._refuse(503, "busy", "all upload slots are busy")
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            return response
        self._uploads += 1
        self._metrics.concurrent_uploads.inc()
        try:
            with task.reader():
                task.touch()
                return await self._send_piece(request, task, span, digest, part)
        finally:
            self._uploads -= 1
            self._metrics.concurrent_uploads.dec()
            self._slots.release()

    def _busy(self, message: str) -> web.Response:
        response = self._refuse(503, "refused_busy", message)
        response.headers[BUSY_HEADER] = "uplink"
        return response

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
        self, request: web.Request, task: LocalTask, span: PieceSpan, digest: str, part: ByteRange | None
    ) -> web.StreamResponse:
        try:
            # open() of a local file costs a lookup, not a disk read; the file is closed after the send
            file = open(task.content_path, "rb")  # noqa: ASYNC230, SIM115
        except FileNotFoundError:  # deleted since we looked it up
            return self._refuse(404, "not_found", f"task {task.task_id} not found")
        with file:
            response = web.StreamResponse(
                headers={PIECE_DIGEST_HEADER: digest, "Content-Type": "application/octet-stream",
                         "Accept-Ranges": "bytes"}
            )
            offset, length = span.offset, span.length
            if part is not None:
                response.set_status(206)
                response.headers["Content-Range"] = part.content_range
                offset, length = span.offset + part.start, part.length
            response.content_length = length
            try:
                writer = await response.prepare(request)
                if writer is None:
                    raise ConnectionResetError("response not prepared")
                if length:
                    await self._sender.send(request, writer, file, offset, length)
                # Like aiohttp's FileResponse after loop.sendfile: the body went around the
                # writer, so ending the response here (nothing left to write) completes it and
                # keeps the connection reusable.
                await response.write_eof()
                task.after_upload(file.fileno(), span)
            except (ConnectionError, OSError) as exc:
                # The peer went away or stalled (or read slower than the minimum rate), or the
                # disk failed mid-piece: the response cannot be completed, so the connection is
                # aborted (a reset, never a clean end that could pass for a complete body).
                self._metrics.upload_pieces.labels("failed").inc()
                log.debug("piece %d of task %s not sent: %s", span.number, task.task_id, exc)
                if request.transport is not None:
                    request.transport.abort()
                return response
        self._metrics.upload_traffic.inc(length)
        self._metrics.upload_pieces.labels("succeeded").inc()
        return response
