"""The dfdaemon's side of the scheduler API: host announcements and AnnouncePeer streams.

Each task is owned by one scheduler, chosen by rendezvous hashing of the task id over the
configured scheduler addresses; when the owner does not answer, the next one in rank order is
tried, so a dead scheduler only moves its own tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import grpc
from dragonfly_api import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from google.protobuf import duration_pb2

from common import hashring
from common.errors import SchedulerUnavailable
from common.tls import TlsCredentials, open_channel

log = logging.getLogger(__name__)

# gRPC codes that mean "this scheduler is not there", as opposed to "it refused the request".
UNAVAILABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                               grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN})
_RPC_TIMEOUT = 5.0
_ANNOUNCE_RETRY = 1.0


class AnnounceStream:
    """One AnnouncePeer stream: queue requests to the scheduler, read its answers."""

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

    def send(self, **message: Any) -> None:
        """Queue one request; `message` names the oneof field, e.g. register_peer_request=..."""
        if not self._closed:
            self._outbox.put_nowait(scheduler_pb2.AnnouncePeerRequest(
                host_id=self.host_id, task_id=self.task_id, peer_id=self.peer_id, **message
            ))

    async def receive(self) -> scheduler_pb2.AnnouncePeerResponse | None:
        """The next answer, or None when the scheduler ended the stream normally.

        Raises grpc.aio.AioRpcError when the stream failed; the caller decides what that means.
        """
        response = await self._call.read()
        if response is grpc.aio.EOF:
            return None
        return cast(scheduler_pb2.AnnouncePeerResponse, response)

    def close(self) -> None:
        """Half-close: tell the scheduler we sent everything."""
        if not self._closed:
            self._closed = True
            self._outbox.put_nowait(None)

    def cancel(self) -> None:
        """Abort the stream (the scheduler sees the peer leave without finishing)."""
        self._closed = True
        self._call.cancel()


class SchedulerClient:
    """Channels to all schedulers, host announcements, and per-task streams."""

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
        interval = duration_pb2.Duration()
        interval.FromTimedelta(datetime.timedelta(seconds=self.announce_interval))
        try:
            await self._stubs[address].AnnounceHost(
                scheduler_pb2.AnnounceHostRequest(host=self.host, interval=interval), timeout=_RPC_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            if address in self._announced or exc.code() not in UNAVAILABLE_CODES:
                log.warning("announcing host to scheduler %s failed: %s", address, exc.details())
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

    def open_stream(self, address: str, task_id: str, peer_id: str) -> AnnounceStream:
        """Open an AnnouncePeer stream for one peer on one scheduler."""
        return AnnounceStream(self._stubs[address], address, self.host.id, task_id, peer_id)

    async def stat_task(self, task_id: str, address: str | None = None) -> common_pb2.Task:
        """The scheduler's view of a task (relayed piece digests); raises SchedulerUnavailable."""
        errors: list[str] = []
        for candidate in [address] if address else self.ranked(task_id):
            try:
                task = await self._stubs[candidate].StatTask(
                    scheduler_pb2.StatTaskRequest(host_id=self.host.id, task_id=task_id), timeout=_RPC_TIMEOUT
                )
                return cast(common_pb2.Task, task)
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{candidate}: {exc.code().name} {exc.details()}")
        raise SchedulerUnavailable("StatTask failed on every scheduler: " + "; ".join(errors))
