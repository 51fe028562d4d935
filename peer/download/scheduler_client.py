"""The dfdaemon's side of the scheduler API: host announcements and typed AnnouncePeer sessions.

Each task is owned by one scheduler, chosen by rendezvous hashing of the task id over the
configured scheduler addresses; when the owner does not answer, the next one in rank order is
tried, so a dead scheduler only moves its own tasks.

A :class:`SchedulerSession` is one peer's ``AnnouncePeer`` stream with a method per report
(:meth:`~SchedulerSession.piece_finished`, :meth:`~SchedulerSession.reschedule`, ...): it builds
every scheduler message the peer sends, turns the scheduler's answers into small values
(:class:`Parents`, :class:`NeedBackToSource`, :class:`EmptyTask`), and failed calls into our
exceptions by their status code (:mod:`common.rpc`): :class:`~common.errors.SchedulerUnavailable`
when the scheduler is not there, :class:`~common.errors.HostNotFound` when it does not know this
host (it restarted: announce again and register again), another
:class:`~common.errors.DamselflyError` when it refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import grpc
from dragonfly_api import common_pb2, errordetails_pb2, scheduler_pb2, scheduler_pb2_grpc

from common import hashring
from common.download import DownloadRequest, duration
from common.errors import DamselflyError, DownloadFailed, HostNotFound, SchedulerUnavailable, TaskFailed
from common.hosts import HostType
from common.rpc import map_rpc_errors
from common.tls import TlsCredentials, open_channel

log = logging.getLogger(__name__)

_RPC_TIMEOUT = 5.0
_ANNOUNCE_RETRY = 1.0


def _details(message: str) -> str:
    """The scheduler's own words of an error made by common.rpc (``"CODE: details"``)."""
    return message.partition(": ")[2] or message


# How the scheduler ends a peer's stream, beyond common.rpc's table: FAILED_PRECONDITION says the
# task failed for everyone (the origin refused it; do not ask the origin another way),
# RESOURCE_EXHAUSTED that no parent came in time (the peer may still go to the origin itself).
_STREAM_ERRORS = {
    grpc.StatusCode.FAILED_PRECONDITION: lambda message: TaskFailed(_details(message)),
    grpc.StatusCode.RESOURCE_EXHAUSTED: lambda message: DownloadFailed(_details(message)),
}


# --------------------------------------------------------------------------------------------
# What the scheduler answers


@dataclass(frozen=True, slots=True)
class CandidateParent:
    """A parent the scheduler offers: where it is, and the piece digests the scheduler relays."""

    peer_id: str
    host_id: str
    ip: str
    grpc_port: int
    download_port: int
    is_seed: bool  # the scheduler's word (the host type it knows), not the parent's
    digests: tuple[tuple[int, str], ...]  # (piece number, digest) of its pieces that have one


@dataclass(frozen=True, slots=True)
class Parents:
    """Download from these parents (besides those already known)."""

    candidates: tuple[CandidateParent, ...]


@dataclass(frozen=True, slots=True)
class NeedBackToSource:
    """Download from the origin."""

    description: str


@dataclass(frozen=True, slots=True)
class EmptyTask:
    """The content is empty."""


Answer = Parents | NeedBackToSource | EmptyTask


def candidate_from_proto(peer: common_pb2.Peer) -> CandidateParent:
    host = peer.host
    return CandidateParent(
        peer_id=peer.id, host_id=host.id, ip=host.ip, grpc_port=host.port, download_port=host.download_port,
        is_seed=HostType.of(host.type).is_seed,
        digests=tuple((piece.number, piece.digest) for piece in peer.pieces if piece.digest),
    )


def answer_from_proto(response: scheduler_pb2.AnnouncePeerResponse) -> Answer:
    """The answer as a value; one Damselfly does not act on (metadata only) adds no parents."""
    kind = response.WhichOneof("response")
    if kind == "need_back_to_source_response":
        return NeedBackToSource(response.need_back_to_source_response.description)
    if kind == "empty_task_response":
        return EmptyTask()
    if kind == "normal_task_response":
        return Parents(tuple(candidate_from_proto(p) for p in response.normal_task_response.candidate_parents))
    return Parents(())


# --------------------------------------------------------------------------------------------
# One peer's stream


class SchedulerSession:
    """One peer's ``AnnouncePeer`` stream on one scheduler: typed reports out, typed answers in.

    Reports are queued (they never block); after :meth:`close` or :meth:`cancel` they are dropped.
    """

    def __init__(self, stub: scheduler_pb2_grpc.SchedulerStub, address: str, host_id: str, task_id: str,
                 peer_id: str) -> None:
        self.address = address
        self.host_id = host_id
        self.task_id = task_id
        self.peer_id = peer_id
        self._outbox: asyncio.Queue[scheduler_pb2.AnnouncePeerRequest | None] = asyncio.Queue()
        self._closed = False
        self._call = stub.AnnouncePeer(self._requests())

    async def _requests(self) -> AsyncIterator[scheduler_pb2.AnnouncePeerRequest]:
        while True:
            request = await self._outbox.get()
            if request is None:
                return
            yield request

    def _send(self, request: scheduler_pb2.AnnouncePeerRequest) -> None:
        if not self._closed:
            request.host_id, request.task_id, request.peer_id = self.host_id, self.task_id, self.peer_id
            self._outbox.put_nowait(request)

    # -- answers -------------------------------------------------------------------------------

    async def register(self, download: DownloadRequest, answer_within: float) -> Answer:
        """Register the peer for `download`; the scheduler's first answer, within `answer_within` s.

        Raises HostNotFound (NOT_FOUND: the scheduler does not know this host),
        SchedulerUnavailable (no answer in time, the stream closed without one, or the scheduler
        is unreachable) or another DamselflyError (it refused); the stream is over then.
        """
        self._send(scheduler_pb2.AnnouncePeerRequest(
            register_peer_request=scheduler_pb2.RegisterPeerRequest(download=download.to_proto())))
        try:
            with map_rpc_errors(unreachable=SchedulerUnavailable,
                                overrides={**_STREAM_ERRORS,
                                           grpc.StatusCode.NOT_FOUND: lambda _: HostNotFound(self.host_id)}):
                # Not asyncio.wait_for: on Python 3.11 it drops a cancellation that races the answer.
                async with asyncio.timeout(answer_within):
                    response = await self._call.read()
        except TimeoutError:
            self.cancel()
            raise SchedulerUnavailable(f"no answer in {answer_within:.0f}s") from None
        except DamselflyError:
            self.cancel()
            raise
        if response is grpc.aio.EOF:
            self.cancel()
            raise SchedulerUnavailable("closed the stream without an answer")
        return answer_from_proto(cast(scheduler_pb2.AnnouncePeerResponse, response))

    async def receive(self) -> Answer | None:
        """The next answer, or None when the scheduler ended the stream normally.

        Raises a DamselflyError when the stream failed (SchedulerUnavailable when the scheduler
        went away, TaskFailed when it failed the task); the caller decides what that means.
        """
        try:
            with map_rpc_errors(unreachable=SchedulerUnavailable, overrides=_STREAM_ERRORS):
                response = await self._call.read()
        except DamselflyError:
            self.cancel()
            raise
        if response is grpc.aio.EOF:
            self.cancel()
            return None
        return answer_from_proto(cast(scheduler_pb2.AnnouncePeerResponse, response))

    # -- reports -------------------------------------------------------------------------------

    def download_started(self) -> None:
        """The peer starts downloading from parents."""
        self._send(scheduler_pb2.AnnouncePeerRequest(
            download_peer_started_request=scheduler_pb2.DownloadPeerStartedRequest()))

    def back_to_source_started(self, description: str) -> None:
        """The peer starts downloading from the origin, and why."""
        self._send(scheduler_pb2.AnnouncePeerRequest(
            download_peer_back_to_source_started_request=scheduler_pb2.DownloadPeerBackToSourceStartedRequest(
                description=description)))

    def piece_finished(self, number: int, *, offset: int, length: int, digest: str, parent_id: str,
                       cost: float) -> None:
        """A piece arrived from a parent and matched its digest."""
        piece = common_pb2.Piece(number=number, parent_id=parent_id, offset=offset, length=length, digest=digest,
                                 traffic_type=common_pb2.REMOTE_PEER, cost=duration(cost))
        self._send(scheduler_pb2.AnnouncePeerRequest(
            download_piece_finished_request=scheduler_pb2.DownloadPieceFinishedRequest(piece=piece)))

    def back_to_source_piece_finished(self, number: int, *, offset: int, length: int, digest: str,
                                      cost: float) -> None:
        """A piece arrived from the origin; its digest is the one the scheduler relays to others."""
        piece = common_pb2.Piece(number=number, offset=offset, length=length, digest=digest,
                                 traffic_type=common_pb2.BACK_TO_SOURCE, cost=duration(cost))
        self._send(scheduler_pb2.AnnouncePeerRequest(
            download_piece_back_to_source_finished_request=scheduler_pb2.DownloadPieceBackToSourceFinishedRequest(
                piece=piece)))

    def back_to_source_piece_failed(self, number: int, status: int | None, message: str) -> None:
        """The origin refused piece `number` with HTTP `status`, or could not be reached (None).

        Sent before :meth:`back_to_source_failed`: the status is what the scheduler decides on
        (a 404 is final, a refused connection is retried later).
        """
        failed = scheduler_pb2.DownloadPieceBackToSourceFailedRequest(piece_number=number)
        if status is not None:
            failed.backend.CopyFrom(errordetails_pb2.Backend(message=message, status_code=status))
        else:
            failed.unknown.CopyFrom(errordetails_pb2.Unknown(message=message))
        self._send(scheduler_pb2.AnnouncePeerRequest(download_piece_back_to_source_failed_request=failed))

    def piece_failed(self, number: int, parent_id: str, temporary: bool) -> None:
        """A piece from `parent_id` failed; not `temporary`: that parent should not be offered again."""
        self._send(scheduler_pb2.AnnouncePeerRequest(
            download_piece_failed_request=scheduler_pb2.DownloadPieceFailedRequest(
                piece_number=number, parent_id=parent_id, temporary=temporary)))

    def reschedule(self, description: str, blocked: Iterable[str] = ()) -> None:
        """Ask for other parents than the `blocked` ones."""
        self._send(scheduler_pb2.AnnouncePeerRequest(
            reschedule_peer_request=scheduler_pb2.ReschedulePeerRequest(
                candidate_parents=[common_pb2.Peer(id=peer_id) for peer_id in blocked], description=description)))

    def finished(self) -> None:
        """The download from parents succeeded."""
        self._send(scheduler_pb2.AnnouncePeerRequest(
            download_peer_finished_request=scheduler_pb2.DownloadPeerFinishedRequest()))

    def back_to_source_finished(self) -> None:
        """The download from the origin succeeded."""
        self._send(scheduler_pb2.AnnouncePeerRequest(
            download_peer_back_to_source_finished_request=scheduler_pb2.DownloadPeerBackToSourceFinishedRequest()))

    def failed(self, description: str) -> None:
        """The download from parents failed."""
        self._send(scheduler_pb2.AnnouncePeerRequest(
            download_peer_failed_request=scheduler_pb2.DownloadPeerFailedRequest(description=description)))

    def back_to_source_failed(self, description: str) -> None:
        """The download from the origin failed."""
        self._send(scheduler_pb2.AnnouncePeerRequest(
            download_peer_back_to_source_failed_request=scheduler_pb2.DownloadPeerBackToSourceFailedRequest(
                description=description)))

    # -- the end -------------------------------------------------------------------------------

    def close(self) -> None:
        """Half-close: tell the scheduler we sent everything."""
        if not self._closed:
            self._closed = True
            self._outbox.put_nowait(None)

    def cancel(self) -> None:
        """Abort the stream (the scheduler sees the peer leave without finishing).

        The request generator is ended too: grpc cancels its consumer only when the call was
        still running, and a consumer left waiting on the outbox is destroyed pending at exit.
        """
        if not self._closed:
            self._closed = True
            self._outbox.put_nowait(None)
        self._call.cancel()


# --------------------------------------------------------------------------------------------
# All schedulers


class SchedulerClient:
    """Channels to all schedulers, host announcements, and per-peer sessions."""

    def __init__(self, addresses: Sequence[str], host: common_pb2.Host, announce_interval: float,
                 tls: TlsCredentials | None = None) -> None:
        self.addresses = list(addresses)
        self.host = host
        self.announce_interval = announce_interval
        self._channels = {address: open_channel(address, tls) for address in self.addresses}
        self._stubs = {a: scheduler_pb2_grpc.SchedulerStub(c) for a, c in self._channels.items()}
        self._announced: set[str] = set()
        self._announcer: asyncio.Task[None] | None = None

    @property
    def reachable(self) -> bool:
        """True when at least one scheduler accepted our last host announcement."""
        return bool(self._announced)

    def ranked(self, task_id: str) -> list[str]:
        """Scheduler addresses in preference order for a task."""
        return hashring.rank(self.addresses, task_id)

    async def start(self) -> None:
        """Announce the host now (best effort) and keep announcing it in the background."""
        await asyncio.gather(*(self.announce_host(a) for a in self.addresses))
        self._announcer = asyncio.create_task(self._announce_loop(), name="announce-host")

    async def stop(self) -> None:
        """Stop announcing, tell every scheduler this host leaves, close channels."""
        if self._announcer is not None:
            self._announcer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._announcer
        request = scheduler_pb2.DeleteHostRequest(host_id=self.host.id)
        for address, stub in self._stubs.items():
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.DeleteHost(request, timeout=2.0)
                log.debug("host deleted on scheduler %s", address)
        await asyncio.gather(*(c.close() for c in self._channels.values()))

    def update_host(self, host: common_pb2.Host) -> None:
        """Use this host description from the next announcement on (upload counts change)."""
        self.host = host

    async def announce_host(self, address: str) -> bool:
        """Announce this host to one scheduler; False when it does not answer."""
        interval = duration(self.announce_interval)
        try:
            with map_rpc_errors(unreachable=SchedulerUnavailable):
                await self._stubs[address].AnnounceHost(
                    scheduler_pb2.AnnounceHostRequest(host=self.host, interval=interval), timeout=_RPC_TIMEOUT
                )
        except DamselflyError as exc:
            if address in self._announced or not isinstance(exc, SchedulerUnavailable):
                log.warning("announcing host to scheduler %s failed: %s", address, exc)
            self._announced.discard(address)
            return False
        if address not in self._announced:
            log.info("host %s announced to scheduler %s", self.host.id, address)
        self._announced.add(address)
        return True

    async def _announce_loop(self) -> None:
        while True:
            # Schedulers that did not answer are retried sooner than the regular interval.
            missing = [a for a in self.addresses if a not in self._announced]
            await asyncio.sleep(_ANNOUNCE_RETRY if missing else self.announce_interval)
            targets = missing or self.addresses
            await asyncio.gather(*(self.announce_host(a) for a in targets))

    def open_session(self, address: str, task_id: str, peer_id: str) -> SchedulerSession:
        """Open an AnnouncePeer stream for one peer on one scheduler."""
        return SchedulerSession(self._stubs[address], address, self.host.id, task_id, peer_id)

    async def register(self, task_id: str, peer_id: str, download: DownloadRequest,
                       answer_within: float) -> tuple[SchedulerSession, Answer]:
        """Register a peer on the scheduler that owns the task: its session and first answer.

        Schedulers are tried in rank order while they are unreachable or silent for
        `answer_within` seconds. Raises SchedulerUnavailable when none answered, or the error of
        the first one that refused.
        """
        errors: list[str] = []
        for address in self.ranked(task_id):
            try:
                return await self._register_on(address, task_id, peer_id, download, answer_within)
            except SchedulerUnavailable as exc:
                errors.append(f"{address}: {exc}")
            except DamselflyError as exc:
                log.warning("scheduler %s refused task %s: %s", address, task_id, exc)
                raise
        log.info("task %s: no scheduler answered (%s)", task_id, "; ".join(errors))
        raise SchedulerUnavailable("no scheduler answered: " + "; ".join(errors))

    async def _register_on(self, address: str, task_id: str, peer_id: str, download: DownloadRequest,
                           answer_within: float) -> tuple[SchedulerSession, Answer]:
        session = self.open_session(address, task_id, peer_id)
        try:
            return session, await session.register(download, answer_within)
        except HostNotFound:
            if not await self.announce_host(address):
                raise
        # The scheduler restarted and forgot this host; it knows it again: register once more.
        session = self.open_session(address, task_id, peer_id)
        return session, await session.register(download, answer_within)

    async def stat_task(self, task_id: str, address: str | None = None) -> common_pb2.Task:
        """The scheduler's view of a task (relayed piece digests); raises SchedulerUnavailable."""
        errors: list[str] = []
        for candidate in [address] if address else self.ranked(task_id):
            try:
                with map_rpc_errors(unreachable=SchedulerUnavailable):
                    task = await self._stubs[candidate].StatTask(
                        scheduler_pb2.StatTaskRequest(host_id=self.host.id, task_id=task_id), timeout=_RPC_TIMEOUT
                    )
                return cast(common_pb2.Task, task)
            except DamselflyError as exc:
                errors.append(f"{candidate}: {exc}")
        raise SchedulerUnavailable("StatTask failed on every scheduler: " + "; ".join(errors))
