"""The download engine: drives one task on this node from parents and/or the origin.

One :class:`Conductor` runs per task and node; concurrent requests for the same task join it.
A conductor registers with the scheduler that owns the task, then either

- fetches pieces from the candidate parents the scheduler gives it (several parents at once,
  up to ``concurrent_piece_count`` pieces in flight, each piece verified against the digest the
  back-sourcing peer reported, failures reported and failing parents dropped), or
- back-sources: ranged GETs to the origin in parallel, reporting each piece's digest so that
  children can verify what they get from this node.

When the scheduler does not answer, the conductor back-sources on its own (unless the request
forbids it). When parents run dry, it asks for new ones, then falls back to the origin for the
pieces still missing. The whole content's sha256 is checked when the digest is known.

The decisions — which piece next, from which parent, when to drop a parent, ask for others or
go back to source — are made by a pure :class:`~peer.download.policy.DownloadPolicy`. The
conductor is the loop around it: parent sessions, piece workers and the scheduler stream put
events in its queue; the loop feeds them to the policy and carries out the commands it returns
(start a piece transfer, report a failure, cancel a parent's session, send a reschedule).
Readers on the same event loop (the proxy, the gRPC services) tell it what they wait for through
:meth:`Conductor.prioritize`, :meth:`Conductor.add_range` and :meth:`Conductor.want_all`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from random import Random
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec

import aiohttp
import grpc
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc

from common import ids
from common.clock import Clock
from common.digest import parse_digest
from common.download import DownloadRequest
from common.errors import (
    ContentDigestMismatch,
    DamselflyError,
    DownloadFailed,
    IntegrityError,
    OriginError,
    OriginStatusError,
    ParentBusy,
    ParentError,
    SchedulerUnavailable,
    TaskFailed,
)
from common.tls import TlsCredentials, open_channel, url_scheme
from peer.download.geometry import KnownPiece, SchedulerView, claim_problem, origin_piece_length, view_from_task
from peer.download.piece_fetch import PieceFetcher
from peer.download.policy import (
    ORIGIN,
    BackToSource,
    Command,
    DownloadPolicy,
    DropParent,
    FetchFromOrigin,
    FetchPiece,
    Finished,
    GiveUp,
    ReportPieceFailed,
    Reschedule,
)
from peer.download.scheduler_client import (
    Answer,
    CandidateParent,
    EmptyTask,
    NeedBackToSource,
    Parents,
    SchedulerClient,
    SchedulerSession,
)
from peer.upload.announcements import CHILD_HEADER, announcements_path, follow_announcements
from peer.upload.piece_server import BUSY_HEADER, PRIORITY_HEADER, WHEN_BUSY_HEADER

if TYPE_CHECKING:
    from common.config import DfdaemonConfig
    from common.origin import OriginClient
    from peer.metrics import DaemonMetrics
    from peer.storage.gc import CacheCollector
    from peer.storage.store import LocalTask, PieceStore

log = logging.getLogger(__name__)
_P = ParamSpec("_P")

# common.v2.Task has no piece length nor response headers: StatTask carries them in
# `request_header` under these names (docs/protocol.md).
PIECE_LENGTH_HEADER = "X-Damselfly-Piece-Length"
RESPONSE_HEADER_PREFIX = "X-Damselfly-Response-"
_CHUNK = 1 << 20
# A policy wake-up may come this much after the time it asked for (timers are not re-armed for less).
WAKE_SLACK = 0.005
# Worker threads receiving pieces from parents (each blocks for one piece transfer at a time):
# enough for several tasks' concurrent pieces; more transfers wait for a free thread.
PIECE_THREADS = 64
# How long to keep asking the scheduler for a piece digest still in flight from the seed.
DIGEST_WAIT = 5.0
# After the final report, how long the scheduler may take to end the stream before we cancel it
# (cancelling it earlier could drop the report still queued behind it).
STREAM_END_GRACE = 5.0
ORIGIN_ATTEMPTS = 3
ORIGIN_BACKOFF = 0.5
# A lazy download (Range reads without prefetch) waits this long for the next read, which then
# joins it; a lazy back-sourcer (a seed triggered for Range reads) likewise for children's demands.
# Then it ends, and the next read or demand starts it again.
LAZY_IDLE = 30.0
# Lazy back-to-source requests a seed keeps, to start again on a demand after it ended.
LAZY_REQUESTS_KEPT = 1024


@dataclass
class Parent:
    """Where a candidate parent is, and the session that learns its pieces."""

    peer_id: str
    host_id: str
    ip: str
    grpc_port: int
    download_port: int
    is_seed: bool
    session: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class _Have:
    parent_id: str
    host_id: str
    number: int


@dataclass(frozen=True)
class _ParentInfo:
    parent_id: str
    task: common_pb2.Task


@dataclass(frozen=True)
class _ParentGone:
    parent_id: str
    reason: str


@dataclass(frozen=True)
class _PieceDone:
    number: int
    parent_id: str
    error: BaseException | None


@dataclass(frozen=True)
class _SchedulerMessage:
    answer: Answer | None  # None: the stream ended
    error: str = ""
    task_failed: bool = False  # the scheduler ended it because the task failed for everyone


@dataclass(frozen=True)
class _Wake:
    """Nothing happened, but look again (new priorities)."""


_Event = _Have | _ParentInfo | _ParentGone | _PieceDone | _SchedulerMessage | _Wake


class Conductor:
    """Downloads one task on this node; see the module docstring."""

    def __init__(self, engine: Engine, request: DownloadRequest, local: LocalTask) -> None:
        self.engine = engine
        self.request = request
        self.local = local
        self.task_id = local.task_id
        self.peer_id = ids.peer_id(engine.config.host_ip, engine.config.hostname)
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.content_known = asyncio.Event()
        self.clock = engine.clock
        self.policy = DownloadPolicy(
            peer_id=self.peer_id, clock=engine.clock, rng=engine.rng,
            concurrent_pieces=engine.config.concurrent_piece_count,
            schedule_timeout=engine.config.schedule_timeout,
            # Only a Range read with prefetch off fetches just the pieces it covers.
            want_everything=request.prefetch or request.byte_range is None,
            origin_allowed=not request.disable_back_to_source,
            read_lazily=request.byte_range is not None,
        )
        self._events: asyncio.Queue[_Event] = asyncio.Queue()
        # Every coroutine working for this download (parent sessions, piece fetches, the
        # scheduler reader) runs in this group: none outlives the download, and an unexpected
        # error in one fails the download instead of vanishing.
        self._workers: asyncio.TaskGroup | None = None
        self._parents: dict[str, Parent] = {}
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._digests: dict[int, str] = {}
        self._digest_refresh: asyncio.Task[None] | None = None
        self._wake_timer: asyncio.Handle | None = None  # see _wake_in
        self._wake_at = 0.0
        self._session: SchedulerSession | None = None
        self._stream_reader: asyncio.Task[None] | None = None
        self._back_to_source = False
        self._geometry_from_parent = False  # the content length came from a parent's StatTask
        # Why the scheduler refused the download (its words), when it did.
        self._refusal = ""
        # Range reads that came before the content's size was known (their pieces are unknown).
        self._ranges: list[DownloadRequest] = [request] if request.byte_range is not None else []
        # Set when a reader's pieces join: the origin fetcher looks at its queue again.
        self._origin_wake = asyncio.Event()
        self.started_at = self.clock.time()

    def prioritize(self, numbers: Iterable[int]) -> None:
        """Fetch these pieces before the others: a reader is waiting for them."""
        self.policy.prioritize(numbers)
        if self._back_to_source:
            self._origin_wake.set()
        else:
            self._events.put_nowait(_Wake())

    def fetches(self, number: int) -> bool:
        """Whether this download will bring piece `number` (its size is known and it is wanted)."""
        count = self.policy.piece_count
        return (count is not None and 0 <= number < count
                and (self.policy.want_everything or number in self.policy.wanted))

    @property
    def fetches_on_demand(self) -> bool:
        """A lazy back-to-source under way: it fetches from the origin whatever a child demands."""
        return self._back_to_source and not self.policy.want_everything and not self.done.done()

    def demand(self, number: int) -> bool:
        """A child waits for piece `number`: fetch it (first) if this download can; False if not."""
        count = self.policy.piece_count
        if count is None or not 0 <= number < count:
            return False
        if not self.fetches(number):
            if not self.fetches_on_demand:
                return False
            self.policy.want([number])
        self.prioritize([number])
        return True

    def add_range(self, request: DownloadRequest) -> bool:
        """Join a Range read to this download; False when it is over (start a new one)."""
        if self.done.done():
            return False
        if self.content_known.is_set():
            assert self.local.content_length is not None and self.local.piece_length is not None
            numbers = request.covering_pieces(self.local.content_length, self.local.piece_length)
            self.policy.want(numbers)
            self.prioritize(numbers)
        else:
            self._ranges.append(request)
        return True

    def want_all(self, *, whole_read: bool = False) -> None:
        """Fetch every piece after all (a whole read or a prefetch joined a Range read). A whole
        read (dfget, a pull) also ends the lazy reading: its pieces no longer wait for readers
        to go quiet."""
        changed = False
        if whole_read and self.policy.read_lazily:
            self.policy.whole_read_joined()
            changed = True
        if not self.policy.want_everything:
            self.policy.want_all()
            changed = True
        if changed:
            self._events.put_nowait(_Wake())
            self._origin_wake.set()

    def _on_content_known(self) -> None:
        """The size is known: tell the policy, and turn pending Range reads into wanted pieces."""
        assert self.local.content_length is not None and self.local.piece_length is not None
        self.content_known.set()
        if not self.policy.content_known:
            self.policy.content_info(self.local.piece_count, self.local.finished_pieces())
        for request in self._ranges:
            numbers = request.covering_pieces(self.local.content_length, self.local.piece_length)
            self.policy.want(numbers)
            self.policy.prioritize(numbers)
        self._ranges.clear()

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run to completion; the outcome is in :attr:`done`."""
        metrics = self.engine.metrics
        metrics.tasks.labels("started").inc()
        metrics.concurrent_downloads.inc()
        timeout = self.request.timeout or self.engine.config.download_timeout
        try:
            await asyncio.wait_for(self._run(), timeout)
        except BaseException as raised:  # every outcome must reach the waiters
            exc = _first_error(raised)
            error = self._describe_failure(exc, timeout)
            log.warning("task %s failed: %s", self.task_id, error)
            metrics.tasks.labels("failed").inc()
            with contextlib.suppress(DamselflyError):  # the task may be gone (deleted as corrupt)
                self.local.mark_failed(str(error))
            self._finish_stream(failed=str(error), error=exc)
            if not self.done.done():
                self.done.set_exception(error)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            metrics.tasks.labels("succeeded").inc()
            metrics.task_duration.observe(self.clock.time() - self.started_at)
            self._finish_stream(failed=None)
            if not self.done.done():
                self.done.set_result(None)
        finally:
            metrics.concurrent_downloads.dec()
            await self._shutdown_workers()
            await self._end_stream()

    def _describe_failure(self, exc: BaseException, timeout: float) -> DamselflyError:
        if isinstance(exc, DownloadFailed | IntegrityError | OriginError):
            return exc
        if isinstance(exc, TimeoutError):
            return DownloadFailed(f"download of {self.request.url} timed out after {timeout:.0f}s")
        if isinstance(exc, asyncio.CancelledError):
            return DownloadFailed(f"download of {self.request.url} was cancelled")
        if isinstance(exc, DamselflyError):
            return DownloadFailed(str(exc))
        log.exception("unexpected error in task %s", self.task_id, exc_info=exc)
        return DownloadFailed(f"internal error: {type(exc).__name__}: {exc}")

    async def _shutdown_workers(self) -> None:
        """Cancel every worker and wait until they are gone."""
        await asyncio.gather(*self._cancel_workers(), return_exceptions=True)

    async def _end_stream(self) -> None:
        """Let the scheduler end the stream after our last report; cancel it if it does not."""
        reader = self._stream_reader
        if reader is None or reader.done():
            return
        # A daemon stopping does not wait: its scheduler may be stopping too (a shutdown of both
        # otherwise took longer than a 10 s grace with downloads running, and was killed).
        if not self.engine.stopping:
            await asyncio.wait({reader}, timeout=STREAM_END_GRACE)
        if not reader.done():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    def _finish_stream(self, failed: str | None, error: BaseException | None = None) -> None:
        session = self._session
        if session is None:
            return
        if failed is None:
            if self._back_to_source:
                session.back_to_source_finished()
            else:
                session.finished()
        elif self._back_to_source:
            if isinstance(error, OriginError):
                # The origin's answer first: the scheduler decides on it whether to ask it again.
                status = error.status if isinstance(error, OriginStatusError) else None
                session.back_to_source_piece_failed(0, status, str(error))
            session.back_to_source_failed(failed)
        else:
            session.failed(failed)
        session.close()

    # -- the main flow ---------------------------------------------------------------------------

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as workers:
            self._workers = workers
            try:
                await self._download()
            finally:
                self._cancel_workers()  # parent sessions never end on their own; the group awaits them

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        assert self._workers is not None, "workers start only while the download runs"
        return self._workers.create_task(coroutine, name=f"{name}-{self.task_id[:12]}")

    def _cancel_workers(self) -> list[asyncio.Task[None]]:
        if self._wake_timer is not None:
            self._wake_timer.cancel()
            self._wake_timer = None
        tasks = [t for t in self._in_flight.values() if not t.done()]
        tasks += [p.session for p in self._parents.values() if p.session and not p.session.done()]
        if self._digest_refresh is not None and not self._digest_refresh.done():
            tasks.append(self._digest_refresh)
        for task in tasks:
            task.cancel()
        return tasks

    async def _download(self) -> None:
        self.local.touch()
        if self.local.state == "succeeded" and self._content_complete():
            self._on_content_known()
            self.engine.metrics.cache_hits.inc()
            self.engine.metrics.download_traffic.labels("local_peer").inc(self.local.content_length or 0)
            return
        if self.local.state != "running":
            self.local.mark_running()
        if self.local.content_length is not None:
            self._on_content_known()
        first = await self._register()
        if first is None and self._refusal and self.request.disable_back_to_source:
            # The scheduler's words name the cause (no parent, no seed, back-to-source disabled).
            raise DownloadFailed(f"cannot download {self.request.url}: {self._refusal}")
        if first is None:
            await self._back_source(self._refusal or "scheduler unreachable")
        elif isinstance(first, NeedBackToSource):
            await self._back_source(first.description or "scheduler said so")
        elif isinstance(first, EmptyTask):
            await self._set_content_info(0, {})
        else:
            self._report(SchedulerSession.download_started)
            self._add_parents(first.candidates)
            await self._download_from_parents()
        if self.policy.want_everything or self._content_complete():
            await self._verify_content()
            self.local.mark_succeeded()

    def _content_complete(self) -> bool:
        return self.local.content_length is not None and self.local.is_complete()

    async def _register(self) -> Answer | None:
        """Register on the owning scheduler: its first answer; None when no scheduler took us."""
        client = self.engine.scheduler
        if client is None:
            return None
        try:
            self._session, answer = await client.register(self.task_id, self.peer_id, self.request,
                                                          answer_within=self.engine.config.schedule_timeout)
        except TaskFailed:  # the origin refused the task: asking it again ourselves would not help
            raise
        except SchedulerUnavailable:  # none answered: the client logged which
            return None
        except DamselflyError as exc:  # one refused (no parent in time, say): the client logged it
            self._refusal = f"the scheduler refused it: {exc}"
            return None
        # The reader lives as long as the session, not as a worker: cancelling a read cancels
        # the whole AnnouncePeer call, so it ends only after the final report (_end_stream).
        self._stream_reader = asyncio.create_task(self._read_scheduler(self._session),
                                                  name=f"scheduler-{self.task_id[:12]}")
        return answer

    async def _read_scheduler(self, session: SchedulerSession) -> None:
        try:
            while True:
                answer = await session.receive()
                await self._events.put(_SchedulerMessage(answer))
                if answer is None:
                    return
        except DamselflyError as exc:  # the stream failed (the session mapped its status code)
            await self._events.put(_SchedulerMessage(None, str(exc), task_failed=isinstance(exc, TaskFailed)))

    def _report(self, report: Callable[Concatenate[SchedulerSession, _P], None], *args: _P.args,
                **kwargs: _P.kwargs) -> None:
        """Tell the scheduler, while its stream lives: `report` is a SchedulerSession method."""
        if self._session is not None and self.policy.scheduler_alive:
            report(self._session, *args, **kwargs)

    # -- from parents ----------------------------------------------------------------------------

    def _add_parents(self, candidates: Iterable[CandidateParent]) -> None:
        for candidate in candidates:
            if not self.policy.add_parent(candidate.peer_id, is_seed=candidate.is_seed):
                continue
            parent = Parent(peer_id=candidate.peer_id, host_id=candidate.host_id, ip=candidate.ip,
                            grpc_port=candidate.grpc_port, download_port=candidate.download_port,
                            is_seed=candidate.is_seed)
            self._parents[parent.peer_id] = parent
            for number, digest in candidate.digests:
                self._digests.setdefault(number, digest)
            parent.session = self._spawn(self._parent_session(parent), f"sync-{parent.peer_id}")
            log.debug("task %s: parent %s (%s:%d%s)", self.task_id, parent.peer_id, parent.ip,
                      parent.download_port, ", seed" if parent.is_seed else "")

    async def _parent_session(self, parent: Parent) -> None:
        """Learn a parent's task info, then every piece it has, as it gets them."""
        channel = self.engine.parent_channel(parent.ip, parent.grpc_port)
        stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)
        try:
            task = await stub.StatTask(dfdaemon_pb2.StatTaskRequest(task_id=self.task_id), timeout=10)
            await self._events.put(_ParentInfo(parent.peer_id, task))
            # Seeds are every node's parents: their announcements go over gRPC's shared
            # connection, not one connection per child and task (peer.upload.announcements).
            if not parent.is_seed and await self._follow_announcements(parent):
                return
            request = dfdaemon_pb2.SyncPiecesRequest(host_id=self.engine.host_id, task_id=self.task_id)
            async for piece in stub.SyncPieces(request):
                await self._events.put(_Have(parent.peer_id, parent.host_id, piece.number))
            await self._events.put(_ParentGone(parent.peer_id, ""))
        except grpc.aio.AioRpcError as exc:
            await self._events.put(_ParentGone(parent.peer_id, f"{exc.code().name}: {exc.details()}"))

    async def _follow_announcements(self, parent: Parent) -> bool:
        """A parent's pieces from its piece server's announcement stream
        (:mod:`peer.upload.announcements`), then _ParentGone; False at once when it has none
        (a Dragonfly dfdaemon: then SyncPieces)."""
        url = f"{self.engine.piece_scheme}://{parent.ip}:{parent.download_port}{announcements_path(self.task_id)}"

        async def have(number: int) -> None:
            await self._events.put(_Have(parent.peer_id, parent.host_id, number))

        reason = await follow_announcements(self.engine.announcement_http, url, self.engine.host_id, have)
        if reason is None:
            return False
        await self._events.put(_ParentGone(parent.peer_id, reason))
        return True

    async def _set_content_info(self, content_length: int, headers: Mapping[str, str], piece_length: int = 0) -> None:
        """Size the task; fails with DiskFull when the cache quota cannot take it.

        `piece_length` 0: this peer back-sources and chooses it (:func:`origin_piece_length`);
        otherwise a parent's claim that :func:`claim_problem` accepted.
        """
        if self.local.content_length is None:
            try:
                length = piece_length or origin_piece_length(content_length, self.request.piece_length,
                                                             lazy=self.request.byte_range is not None)
            except ValueError as exc:
                raise DownloadFailed(f"cannot download {self.request.url}: {exc}") from None
            collector = self.engine.collector
            if collector is not None:
                await collector.ensure_room(content_length - self.local.used_bytes)
            self.local.set_content_info(content_length, length, headers)
        self._on_content_known()

    async def _scheduler_view(self) -> SchedulerView | None:
        """The geometry the scheduler relays from the back-sourcer; None without a scheduler.

        Its piece digests are learnt on the way (they are the ones a piece is checked against).
        """
        if self.engine.scheduler is None:
            return None
        address = self._session.address if self._session is not None else None
        try:
            task = await self.engine.scheduler.stat_task(self.task_id, address)
        except DamselflyError as exc:
            log.info("task %s: the scheduler cannot confirm a parent's geometry (%s): bounds only",
                     self.task_id, exc)
            return None
        self._learn_digests(task)
        return view_from_task(task.content_length, (KnownPiece(p.number, p.offset, p.length) for p in task.pieces))

    def _missing(self) -> list[int]:
        """Wanted pieces not on disk yet (the store's word: transfers may have just ended)."""
        return [n for n in self.policy.wanted_pieces() if not self.local.has_piece(n)]

    async def _download_from_parents(self) -> None:
        """The loop: carry out the policy's commands, feed it events, until done or back-to-source."""
        while True:
            for command in self.policy.next_commands():
                if isinstance(command, Finished):
                    if self.policy.want_everything or not await self._more_reads():
                        return
                    break  # a read joined: decide again
                if isinstance(command, BackToSource):
                    await self._back_source(command.reason)
                    return
                if isinstance(command, GiveUp):
                    raise TaskFailed(command.reason)
                self._carry_out(command)
            # Time passing is an event too: a busy parent may be asked again, parents may stall.
            delay = 1.0
            wake = self.policy.next_wake()
            if wake is not None:
                delay = min(delay, max(0.0, wake - self.clock.time()))
            self._wake_in(delay)
            await self._handle(await self._events.get())
            # What queued meanwhile (announcements come in bursts, and more so when the CPU is
            # busy) is applied before the next decision: one decision for all of it.
            while not self._events.empty():
                await self._handle(self._events.get_nowait())

    def _wake_in(self, delay: float) -> None:
        """Queue a _Wake `delay` seconds from now, at the latest. One timer: it stays when it
        fires no later than that (an early wake costs one more look; arming a time-out around
        every wait for an event cost more than the decisions, bench/lazyload.py N=16)."""
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        timer = self._wake_timer
        # A timer that fired is None (see _wake): uvloop fires timers up to a millisecond before
        # the loop's clock reaches their time, and a fired timer taken for a pending one left a
        # download with nothing else to wake it waiting forever (a parent's backoff ending).
        if timer is not None and self._wake_at <= when + WAKE_SLACK:
            return
        if timer is not None:
            timer.cancel()
        self._wake_at = when
        # (uvloop answers a time already past with a plain Handle, which has no when())
        self._wake_timer = loop.call_at(when, self._wake)

    def _wake(self) -> None:
        self._wake_timer = None
        self._events.put_nowait(_Wake())

    async def _more_reads(self) -> bool:
        """A Range download without prefetch has what its reads wanted: stay (parents, their
        announcements and the scheduler stream with it) for LAZY_IDLE, so the next read of the
        blob joins at once instead of registering anew. True when a read wants more pieces."""
        deadline = self.clock.time() + LAZY_IDLE
        while self.policy.is_finished():
            remaining = deadline - self.clock.time()
            if remaining <= 0:
                return False
            try:
                event = await _next_event(self._events, remaining)
            except TimeoutError:
                return False
            await self._handle(event)
            if self.policy.task_failure or self.policy.back_to_source_reason:
                return True  # next_commands says what to do
        return True

    def _carry_out(self, command: Command) -> None:
        if isinstance(command, FetchPiece):
            parent = self._parents[command.parent_id]
            demand = command.number in self.policy.demanded
            self._in_flight[command.number] = self._spawn(self._fetch_piece(command.number, parent, demand),
                                                          f"piece-{command.number}")
        elif isinstance(command, ReportPieceFailed):
            self._report(SchedulerSession.piece_failed, command.number, command.parent_id, command.temporary)
        elif isinstance(command, DropParent):
            dropped = self._parents.pop(command.parent_id, None)
            if dropped is not None and dropped.session is not None and not dropped.session.done():
                dropped.session.cancel()
        elif isinstance(command, Reschedule):
            self._report(SchedulerSession.reschedule, command.description, command.blocked)
        elif isinstance(command, FetchFromOrigin):
            log.info("task %s: a reader waits for piece %d, which no parent has and no seed can be asked "
                     "for: fetching it from the origin", self.task_id, command.number)
            self._in_flight[command.number] = self._spawn(self._own_origin_piece(command.number),
                                                          f"origin-{command.number}")

    async def _handle(self, event: _Event) -> None:
        """Apply one event to the policy (and carry out what it answers at once)."""
        if isinstance(event, _Have):
            self.policy.parent_has(event.parent_id, event.number)
            self.local.note_announced(event.host_id, event.number)
        elif isinstance(event, _ParentInfo):
            if self.local.content_length is None:
                task = event.task
                piece_length = _int_or_zero(task.request_header.get(PIECE_LENGTH_HEADER, ""))
                problem = claim_problem(task.content_length, piece_length, await self._scheduler_view())
                if problem is not None:
                    # Only the back-sourcer defines the geometry: a parent that says otherwise lies
                    # (or is broken) and is not used for this task.
                    log.warning("task %s: parent %s announces a geometry the swarm does not have (%s); "
                                "not using it", self.task_id, event.parent_id, problem)
                    self.engine.metrics.piece_failures.labels("geometry").inc()
                    for command in self.policy.parent_ended(event.parent_id, f"bad geometry: {problem}"):
                        self._carry_out(command)
                    self._carry_out(DropParent(event.parent_id, problem))
                    return
                headers = {k[len(RESPONSE_HEADER_PREFIX):]: v for k, v in task.request_header.items()
                           if k.startswith(RESPONSE_HEADER_PREFIX)}
                await self._set_content_info(task.content_length, headers, piece_length)
                self._geometry_from_parent = True
            # The parent's own piece digests are not used: only those the scheduler relays count.
        elif isinstance(event, _ParentGone):
            if event.reason and event.parent_id in self._parents:
                log.info("task %s: parent %s gone: %s", self.task_id, event.parent_id, event.reason)
            for command in self.policy.parent_ended(event.parent_id, event.reason):
                self._carry_out(command)
        elif isinstance(event, _PieceDone):
            self._in_flight.pop(event.number, None)
            if event.error is None:
                self.policy.piece_succeeded(event.number, event.parent_id)
                return
            if isinstance(event.error, ParentBusy):
                self.policy.piece_busy(event.number, event.parent_id)
                return
            integrity = isinstance(event.error, IntegrityError)
            if event.number in self.policy.demanded and not integrity:
                # A seed that does not have an unannounced piece (yet) is no failing parent.
                log.debug("task %s: demand for piece %d not answered by %s: %s", self.task_id, event.number,
                          event.parent_id, event.error)
            elif event.parent_id in self.policy.parents:  # not dropped meanwhile
                self.engine.metrics.piece_failures.labels("digest" if integrity else "parent").inc()
                log.info("task %s: piece %d from %s failed: %s", self.task_id, event.number, event.parent_id,
                         event.error)
            for command in self.policy.piece_failed(event.number, event.parent_id, str(event.error),
                                                    integrity=integrity):
                self._carry_out(command)
        elif isinstance(event, _SchedulerMessage):
            self._on_scheduler(event)

    def _on_scheduler(self, event: _SchedulerMessage) -> None:
        answer = event.answer
        if event.task_failed:
            self.policy.scheduler_failed_task(event.error)
        elif answer is None:
            if self.policy.scheduler_alive:
                log.info("task %s: scheduler stream ended %s", self.task_id, event.error)
            self.policy.scheduler_lost()
        elif isinstance(answer, Parents):
            self._add_parents(answer.candidates)
        elif isinstance(answer, NeedBackToSource):
            self.policy.scheduler_says_back_to_source(answer.description)

    async def _fetch_piece(self, number: int, parent: Parent, demand: bool = False) -> None:
        await self._piece_transfer(number, parent.peer_id, self._fetch_piece_from(number, parent, demand))

    async def _own_origin_piece(self, number: int) -> None:
        """One piece from the origin for this node only (not reported: this node defines nothing)."""
        await self._piece_transfer(number, ORIGIN,
                                   self._origin_piece(number, dict(self.request.request_header), report=False))

    async def _piece_transfer(self, number: int, source: str, transfer: Coroutine[Any, Any, None]) -> None:
        """Run one piece's transfer from `source` (a parent, or ORIGIN) and queue its outcome."""
        error: BaseException | None = None
        try:
            await transfer
        except asyncio.CancelledError:
            raise
        except (DamselflyError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            if source == ORIGIN:
                log.info("task %s: piece %d from the origin failed: %s", self.task_id, number, exc)
            error = exc
        await self._events.put(_PieceDone(number, source, error))

    async def _fetch_piece_from(self, number: int, parent: Parent, demand: bool) -> None:
        """One piece from a parent, checked against its relayed digest, asked for once the parent
        answers (a `demand`, a piece the seed did not announce yet, has a digest only from then on)."""
        path = f"/pieces/{self.task_id}/{number}"
        started = self.clock.time()
        # A demand waits at the seed; other pieces may be had elsewhere when this parent is busy.
        headers = {CHILD_HEADER: self.engine.host_id}
        if not demand:
            headers[WHEN_BUSY_HEADER] = "refuse"
        if demand or self.policy.reader_waits_for(number):
            headers[PRIORITY_HEADER] = "reader"  # the parent's uplink serves it before others
        fetcher = self.engine.piece_fetcher
        if fetcher is not None:
            request = fetcher.request(parent.peer_id, parent.ip, parent.download_port, path, headers,
                                      timeout=self.engine.config.piece_timeout, busy_header=BUSY_HEADER)
            try:
                # The digest is asked for once the bytes are in: a demanded piece has one only
                # from the seed's answer on.
                digest = await self.local.write_piece_in_thread(
                    number, request.receive, executor=self.engine.piece_threads,
                    expected_digest=lambda: self._digest_of(number), parent_id=parent.peer_id)
            except asyncio.CancelledError:
                request.abort()  # the worker thread stops at once instead of at the piece timeout
                raise
            self._piece_received(number, parent, started, digest)
            return
        url = f"{self.engine.piece_scheme}://{parent.ip}:{parent.download_port}{path}"
        timeout = aiohttp.ClientTimeout(total=self.engine.config.piece_timeout)
        async with self.engine.http.get(url, timeout=timeout, headers=headers) as response:
            if response.status == 503 and response.headers.get(BUSY_HEADER):
                raise ParentBusy(parent.peer_id)
            if response.status != 200:
                reason = (await response.text())[:200].strip()
                raise ParentError(parent.peer_id, f"HTTP {response.status} for piece {number}: {reason}")
            # Asked once the parent answers: a demanded piece's digest exists only from then on,
            # and while the scheduler is away a seed parent's digests arrive meanwhile.
            expected = await self._digest_of(number)
            digest = await self.local.write_piece(number, response.content.iter_chunked(_CHUNK),
                                                  expected_digest=expected, parent_id=parent.peer_id)
        self._piece_received(number, parent, started, digest)

    def _piece_received(self, number: int, parent: Parent, started: float, digest: str) -> None:
        cost = self.clock.time() - started
        span = self.local.span(number)
        self.engine.metrics.download_traffic.labels("remote_peer").inc(span.length)
        self.engine.metrics.piece_duration.labels("remote_peer").observe(cost)
        self._report(SchedulerSession.piece_finished, number, offset=span.offset, length=span.length, digest=digest,
                     parent_id=parent.peer_id, cost=cost)

    async def _digest_of(self, number: int) -> str:
        """The digest the back-sourcing peer reported for a piece, as relayed by the scheduler
        (or, while the scheduler is unreachable, as a seed parent reports it)."""
        deadline = self.clock.time() + DIGEST_WAIT
        delay = 0.05
        while number not in self._digests:
            if self.engine.scheduler is None:
                raise DownloadFailed("no scheduler to relay piece digests")
            if self._digest_refresh is None or self._digest_refresh.done():
                self._digest_refresh = self._spawn(self._refresh_digests(), "digests")
            await asyncio.shield(self._digest_refresh)
            if number in self._digests:
                break
            if self.clock.time() > deadline:
                raise DownloadFailed(f"the scheduler has no digest for piece {number} yet")
            await self.clock.sleep(delay)
            delay = min(delay * 2, 0.5)
        return self._digests[number]

    async def _refresh_digests(self) -> None:
        """Ask the scheduler for the digests it relays; without a scheduler, ask the seed parents.

        A seed back-sources every task it holds, so the digests it reports are the ones it
        computed from the origin's bytes: the same the scheduler would relay. That a parent is a
        seed is the scheduler's word (its host type in the candidate list), so the trust stays
        anchored there; normal parents' digests are never used.
        """
        assert self.engine.scheduler is not None
        address = self._session.address if self._session is not None else None
        try:
            task = await self.engine.scheduler.stat_task(self.task_id, address)
        except SchedulerUnavailable as exc:
            log.info("task %s: scheduler cannot relay piece digests (%s); asking seed parents", self.task_id, exc)
            await self._digests_from_seeds()
            return
        self._learn_digests(task)

    async def _digests_from_seeds(self) -> None:
        for parent in [p for p in self._parents.values() if p.is_seed]:
            stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(self.engine.parent_channel(parent.ip, parent.grpc_port))
            try:
                task = await stub.StatTask(dfdaemon_pb2.StatTaskRequest(task_id=self.task_id), timeout=5)
            except grpc.aio.AioRpcError as exc:
                log.info("task %s: seed %s gives no digests: %s", self.task_id, parent.peer_id, exc.details())
                continue
            self._learn_digests(task)

    def _learn_digests(self, task: common_pb2.Task) -> None:
        for piece in task.pieces:
            if piece.digest:
                self._digests.setdefault(piece.number, piece.digest)

    # -- from the origin -------------------------------------------------------------------------

    async def _back_source(self, reason: str) -> None:
        """Fetch every missing piece from the origin."""
        if self.request.disable_back_to_source:
            raise DownloadFailed(f"cannot download {self.request.url}: {reason}, and back-to-source is disabled")
        log.info("task %s: back-to-source (%s)", self.task_id, reason)
        self._back_to_source = True
        # Cancel transfers from parents: the origin takes over every missing piece.
        await self._shutdown_workers()
        self._in_flight.clear()
        origin = self.engine.origin
        headers = dict(self.request.request_header)
        stat = None
        if self.local.content_length is None:
            with self._counting_origin_errors():
                stat = await origin.stat(self.request.url, headers)
            if stat.content_length is None:
                await self._back_source_stream(headers)
                return
            await self._set_content_info(stat.content_length, stat.headers)
        self._report(SchedulerSession.back_to_source_started, reason)
        missing = self._missing()
        if stat is not None and not stat.supports_range and len(missing) > 1:
            await self._back_source_stream(headers)
            return
        try:
            await self._fetch_from_origin(list(missing), headers)
        except BaseExceptionGroup as group:
            # The first failure cancelled the other fetches; it is the download's error.
            raise _first_error(group) from None

    async def _fetch_from_origin(self, queue: list[int], headers: dict[str, str]) -> None:
        """Fetch the pieces of `queue` from the origin, in the order and number the policy says:
        pieces readers wait for (also those that join meanwhile) first, the rest behind them.

        A lazy download (Range reads, no prefetch) also takes the pieces wanted meanwhile (new
        reads, children's demands) and waits :data:`LAZY_IDLE` for more before it ends.
        """
        limit = self.engine.config.back_to_source_concurrency
        running: dict[int, asyncio.Task[None]] = {}
        lazy = not self.policy.want_everything
        async with asyncio.TaskGroup() as fetches:
            while True:
                if not queue and not running and not (lazy and await self._more_wanted(queue)):
                    return
                self._origin_wake.clear()
                while (number := self.policy.next_origin_fetch(queue, running, limit)) is not None:
                    running[number] = fetches.create_task(self._origin_piece(number, headers),
                                                          name=f"origin-{number}-{self.task_id[:12]}")
                wake = asyncio.ensure_future(self._origin_wake.wait())
                # Pieces held back while readers are active may start once they went quiet.
                wake_at = self.policy.next_wake()
                timeout = None if wake_at is None else max(0.0, wake_at - self.clock.time())
                try:
                    await asyncio.wait([wake, *running.values()], timeout=timeout,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wake.cancel()
                for done in [n for n, task in running.items() if task.done()]:
                    del running[done]
                if self._origin_wake.is_set():
                    self._queue_wanted(queue, running)

    def _queue_wanted(self, queue: list[int], running: Mapping[int, object]) -> None:
        """Put pieces wanted since the queue was made (a read or a demand joined) at its end."""
        queued = set(queue)
        queue.extend(n for n in self._missing() if n not in queued and n not in running)

    async def _more_wanted(self, queue: list[int]) -> bool:
        """Wait up to LAZY_IDLE for pieces to be wanted; True when some were queued."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LAZY_IDLE):  # not wait_for: see _next_event
                await self._origin_wake.wait()
        self._queue_wanted(queue, {})
        return bool(queue)

    async def _origin_piece(self, number: int, headers: dict[str, str], *, report: bool = True) -> None:
        span = self.local.span(number)
        metrics = self.engine.metrics
        for attempt in range(1, ORIGIN_ATTEMPTS + 1):
            started = self.clock.time()
            try:
                with self._counting_origin_errors():
                    async with self.engine.origin.get(self.request.url, headers, start=span.offset,
                                                      length=span.length) as body:
                        digest = await self.local.write_piece(number, body.chunks(_CHUNK))
                break
            except OriginStatusError as exc:
                if exc.status < 500 or attempt == ORIGIN_ATTEMPTS:
                    raise
            except OriginError:
                if attempt == ORIGIN_ATTEMPTS:
                    raise
            await self.clock.sleep(ORIGIN_BACKOFF * 2 ** (attempt - 1))
        cost = self.clock.time() - started
        metrics.back_source_duration.observe(cost)
        self._origin_piece_done(number, digest, cost, report=report)

    @contextlib.contextmanager
    def _counting_origin_errors(self) -> Iterator[None]:
        """Count origin failures by kind (the status the origin answered, or the network)."""
        try:
            yield
        except OriginStatusError:
            self.engine.metrics.back_source_errors.labels("status").inc()
            raise
        except OriginError:
            self.engine.metrics.back_source_errors.labels("network").inc()
            raise

    def _origin_piece_done(self, number: int, digest: str, cost: float, *, report: bool = True) -> None:
        """Count a piece fetched from the origin and (unless `report` is off) report it with its digest."""
        span = self.local.span(number)
        metrics = self.engine.metrics
        metrics.download_traffic.labels("back_to_source").inc(span.length)
        metrics.piece_duration.labels("back_to_source").observe(cost)
        if report:
            self._report(SchedulerSession.back_to_source_piece_finished, number, offset=span.offset,
                         length=span.length, digest=digest, cost=cost)

    async def _back_source_stream(self, headers: dict[str, str]) -> None:
        """One plain GET, cut into pieces: for origins without Range or without a length."""
        started = self.clock.time()
        with self._counting_origin_errors():
            await self._back_source_stream_from(headers)
        self.engine.metrics.back_source_duration.observe(self.clock.time() - started)

    async def _back_source_stream_from(self, headers: dict[str, str]) -> None:
        async with self.engine.origin.get(self.request.url, headers) as body:
            if body.content_length is None:
                raise DownloadFailed(f"origin gives no length for {self.request.url}; cannot cut it into pieces")
            await self._set_content_info(body.content_length, dict(body.headers))
            self._report(SchedulerSession.back_to_source_started, "origin without Range support")
            chunks = body.chunks(_CHUNK)
            leftover = b""
            for number in range(self.local.piece_count):
                span = self.local.span(number)
                started = self.clock.time()
                piece_chunks, leftover = await _take(chunks, leftover, span.length)
                if self.local.has_piece(number):
                    continue

                async def replay(parts: list[bytes] = piece_chunks) -> AsyncIterator[bytes]:
                    for part in parts:
                        yield part

                digest = await self.local.write_piece(number, replay())
                self._origin_piece_done(number, digest, self.clock.time() - started)

    # -- the end ---------------------------------------------------------------------------------

    async def _confirm_geometry(self) -> None:
        """Without a content digest, a length a parent gave is checked once more at the end: the
        back-sourcer may have finished meanwhile, and a content cut short at a piece boundary would
        otherwise pass every piece check."""
        local = self.local
        if not self._geometry_from_parent or local.content_length is None or local.piece_length is None:
            return
        view = await self._scheduler_view()
        if view is None or view.content_length is None:
            return
        problem = claim_problem(local.content_length, local.piece_length, view)
        if problem is not None:
            await self.engine.store.delete(self.task_id)
            raise DownloadFailed(f"task {self.task_id}: the parents' geometry is not the back-sourcer's "
                                 f"({problem}); discarded")

    async def _verify_content(self) -> None:
        """Check the whole content's digest when it is known; a mismatch discards the content."""
        if not self._content_complete():
            raise DownloadFailed(f"task {self.task_id} ended with pieces missing")
        expected = self.request.content_digest
        if not expected:
            await self._confirm_geometry()
            return
        algorithm, _ = parse_digest(expected)
        if algorithm not in ("sha256", "sha512"):
            return
        actual = await asyncio.to_thread(self.local.content_digest, algorithm)
        if actual != expected:
            await self.engine.store.delete(self.task_id)
            raise ContentDigestMismatch(expected, actual)


async def _next_event(events: asyncio.Queue[_Event], timeout: float) -> _Event:  # noqa: ASYNC109
    """The next event, TimeoutError after `timeout`. Not ``asyncio.wait_for``: on Python 3.11 it
    returns an event that arrives as the task is cancelled and drops the cancellation (a daemon
    stopping had its parents' sessions end at once, and a download went on, past the grace)."""
    if not events.empty():
        return events.get_nowait()  # the common case under load: no timer to arm and cancel
    async with asyncio.timeout(timeout):
        return await events.get()


def _int_or_zero(text: str) -> int:
    """A header's decimal value; 0 when it is missing or no number (then no bound accepts it)."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 20 else 0


def _first_error(error: BaseException) -> BaseException:
    """The error that ended a task group (the first one raised), or `error` itself."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


async def _take(chunks: AsyncIterator[bytes], leftover: bytes, length: int) -> tuple[list[bytes], bytes]:
    """Exactly `length` bytes from a chunk stream, as a list of parts, plus what is left over."""
    parts: list[bytes] = []
    need = length
    if leftover:
        parts.append(leftover[:need])
        need -= len(parts[0])
        leftover = leftover[len(parts[0]):]
    while need > 0:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            raise DownloadFailed(f"origin body ended {need} bytes before the announced length") from None
        parts.append(chunk[:need])
        leftover = chunk[need:]
        need -= len(parts[-1])
    return parts, leftover


class Engine:
    """Owns the conductors of this node and the connections they share."""

    def __init__(self, *, config: DfdaemonConfig, store: PieceStore, scheduler: SchedulerClient | None,
                 origin: OriginClient, metrics: DaemonMetrics, host_id: str, clock: Clock, rng: Random,
                 collector: CacheCollector | None = None, tls: TlsCredentials | None = None) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng  # every conductor's policy draws from it (peer order, parent ties)
        self.tls = tls  # None: plaintext gRPC and http:// pieces (every node of a cluster agrees)
        self.piece_scheme = url_scheme(tls)
        self.store = store
        self.scheduler = scheduler
        self.origin = origin
        self.metrics = metrics
        self.host_id = host_id
        self.collector = collector
        self.stopping = False  # set by stop(): downloads end without waiting for their schedulers
        self._conductors: dict[str, Conductor] = {}
        # Lazy back-to-source requests (seed triggers for Range reads), most recent last.
        self._lazy_requests: OrderedDict[str, DownloadRequest] = OrderedDict()
        self._runners: set[asyncio.Task[None]] = set()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._http: aiohttp.ClientSession | None = None
        self._announcement_http: aiohttp.ClientSession | None = None
        # Plaintext pieces are received in worker threads (peer.download.piece_fetch); with TLS
        # through the aiohttp session.
        self.piece_fetcher = PieceFetcher() if tls is None else None
        self.piece_threads = ThreadPoolExecutor(max_workers=PIECE_THREADS, thread_name_prefix="piece-receive")

    @property
    def http(self) -> aiohttp.ClientSession:
        """Keep-alive HTTP pool for piece transfers from parents."""
        if self._http is None:
            self._http = self._parents_session(limit_per_host=self.config.concurrent_piece_count * 2)
        return self._http

    @property
    def announcement_http(self) -> aiohttp.ClientSession:
        """The parents' announcement streams: one long-lived connection per parent and task,
        kept out of the piece transfers' pool and its per-host limit."""
        if self._announcement_http is None:
            self._announcement_http = self._parents_session(limit_per_host=0)
        return self._announcement_http

    def _parents_session(self, *, limit_per_host: int) -> aiohttp.ClientSession:
        """An HTTP session to parents' piece servers (with this node's client certificate under TLS)."""
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=limit_per_host,
                                         ssl=self.tls.client_ssl_context() if self.tls is not None else True)
        return aiohttp.ClientSession(connector=connector, auto_decompress=False)

    def parent_channel(self, ip: str, port: int) -> grpc.aio.Channel:
        """One gRPC channel per parent dfdaemon, reused across tasks."""
        address = f"{ip}:{port}"
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self.tls)
        return channel

    async def check_digest(self, request: DownloadRequest, local: LocalTask) -> None:
        """Fail this request when its own digest differs from the content's (the content stays)."""
        wanted = request.digest.lower()
        if not wanted or wanted == local.digest:
            return  # the conductor verified local.digest already
        algorithm, _ = parse_digest(wanted)
        with local.reader():
            actual = await asyncio.to_thread(local.content_digest, algorithm)
        if actual != wanted:
            raise ContentDigestMismatch(wanted, actual)

    def download(self, request: DownloadRequest) -> Conductor:
        """The conductor of this request's task: the running one, or a new one."""
        task_id = request.task_id
        conductor = self._conductors.get(task_id)
        if conductor is not None and not conductor.done.done():
            if request.byte_range is not None:
                conductor.add_range(request)
            if request.byte_range is None or request.prefetch:
                conductor.want_all(whole_read=request.byte_range is None)
            return conductor
        if request.need_back_to_source and request.byte_range is not None and not request.prefetch:
            self._lazy_requests[task_id] = request
            self._lazy_requests.move_to_end(task_id)
            while len(self._lazy_requests) > LAZY_REQUESTS_KEPT:
                self._lazy_requests.popitem(last=False)
        elif request.byte_range is None or request.prefetch:
            self._lazy_requests.pop(task_id, None)
        local = self.store.create(task_id, url=request.url, digest=request.content_digest,
                                  tag=request.tag, application=request.application)
        conductor = Conductor(self, request, local)
        self._conductors[task_id] = conductor
        runner = asyncio.create_task(conductor.run(), name=f"task-{task_id[:12]}")
        self._runners.add(runner)
        runner.add_done_callback(self._runners.discard)
        conductor.done.add_done_callback(lambda _: self._forget(conductor))
        return conductor

    def _forget(self, conductor: Conductor) -> None:
        """A finished download leaves the table (its outcome stays with whoever awaits it)."""
        if self._conductors.get(conductor.task_id) is conductor:
            del self._conductors[conductor.task_id]
        if not conductor.done.cancelled():
            # Nobody may await the outcome (a seed trigger whose caller left): don't log it as lost.
            conductor.done.exception()

    async def wait_demanded_piece(self, task_id: str, number: int, timeout: float) -> bool:  # noqa: ASYNC109
        """A child asks for a piece this node has not got yet: move it first, wait for it.

        True once the piece is here (within `timeout`); False at once when no download here will
        bring it, or when it did not come in time. A lazy back-to-source (this seed fetches what
        children demand) takes the piece on, and starts again if it had ended.
        """
        conductor = self._conductors.get(task_id)
        if conductor is None or conductor.done.done():
            request = self._lazy_requests.get(task_id)
            if request is None:
                return False
            conductor = self.download(request)
        local = conductor.local
        if not local.has_piece(number):
            if not conductor.demand(number):
                return False
            with contextlib.suppress(TimeoutError, DamselflyError):  # late, failed or deleted: not here
                await local.wait_for_piece(number, timeout)
        return local.has_piece(number)

    async def wait_piece(self, request: DownloadRequest, number: int) -> Conductor:
        """Wait until piece `number` of the request's task is on this node; raises on failure.

        A download that ends without the piece (a Range read that fetched other pieces) is
        followed by a new one for this request.
        """
        for _ in range(3):
            conductor = self.download(request)
            local = conductor.local
            if local.has_piece(number):
                return conductor
            conductor.prioritize([number])
            piece = asyncio.ensure_future(local.wait_for_piece(number))
            try:
                await asyncio.wait([piece, conductor.done], return_when=asyncio.FIRST_COMPLETED)
            finally:
                piece.cancel()
            if local.has_piece(number):
                return conductor
            if conductor.done.done():
                conductor.done.result()  # raises the download's failure
        raise DownloadFailed(f"piece {number} of task {request.task_id} did not arrive")

    async def stop(self) -> None:
        """Cancel running downloads and close shared connections."""
        self.stopping = True
        for runner in list(self._runners):
            runner.cancel()
        await asyncio.gather(*self._runners, return_exceptions=True)
        for session in (self._http, self._announcement_http):
            if session is not None:
                await session.close()
        if self.piece_fetcher is not None:
            self.piece_fetcher.close()
        self.piece_threads.shutdown(wait=False, cancel_futures=True)
        await asyncio.gather(*(c.close() for c in self._channels.values()), return_exceptions=True)


async def progress(conductor: Conductor) -> AsyncIterator[tuple[int | None, int | None]]:
    """Progress of a download: first ``(content_length, None)``, then ``(None, piece)`` per piece.

    Ends when the download succeeded; raises its error when it failed.
    """
    waiter: asyncio.Future[Any] = asyncio.ensure_future(conductor.content_known.wait())
    await asyncio.wait([waiter, conductor.done], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if conductor.done.done() and not conductor.content_known.is_set():
        conductor.done.result()  # raises the failure
    yield conductor.local.content_length, None
    with contextlib.suppress(DamselflyError):
        async for number in conductor.local.subscribe():
            yield None, number
    await asyncio.shield(conductor.done)
