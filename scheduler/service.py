"""The gRPC edge of the scheduler: protobuf in, core events; core decisions, protobuf out.

:class:`SchedulerService` implements ``scheduler.v2.Scheduler`` on ``grpc.aio``. It holds no
policy: every message becomes a call on :class:`~scheduler.core.SchedulerCore`, with the caller's
identity (:func:`common.identity.grpc_identity` and the address it came from) as an input, and every
decision it returns is sent on the right peer's stream (one outgoing queue per peer), or, for a
seed trigger, executed as a ``DfdaemonUpload.DownloadTask`` call drained in the background. It
counts metrics on the way. RPCs Damselfly does not serve answer ``UNIMPLEMENTED``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import grpc
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from google.protobuf import empty_pb2, timestamp_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.download import DownloadRequest, seconds
from common.errors import DamselflyError, InvalidRequest, QuotaExceeded
from common.identity import grpc_identity
from common.rpc import status_of
from common.tls import TlsCredentials, open_channel
from scheduler.core import (
    Caller,
    Candidate,
    Code,
    Decision,
    FailPeer,
    SchedulerCore,
    SendEmpty,
    SendNeedBackToSource,
    SendNormal,
    TriggerSeed,
    ip_of_grpc_peer,
    stream_message_problem,
)
from scheduler.resource import DownloadSpec, HostInfo, PieceRecord

log = logging.getLogger(__name__)

PREFIX = "damselfly_scheduler"
DECISION_KINDS = ("normal", "back_to_source", "seed_trigger", "failed", "empty")
TRAFFIC_TYPES = ("back_to_source", "remote_peer", "local_peer")
# (method, code) pairs the service can answer with: created at zero so that error rates exist
# (and dashboards show 0, not "no data") before the first error. Others appear when they happen.
EXPECTED_GRPC_ERRORS = (
    *(("AnnouncePeer", code.value) for code in Code),
    *((method, "NOT_FOUND") for method in ("StatPeer", "DeletePeer", "StatTask", "DeleteTask")),
    ("AnnounceHost", "INVALID_ARGUMENT"),
    *((method, "PERMISSION_DENIED") for method in ("AnnounceHost", "ListHosts", "DeleteHost", "DeleteTask",
                                                   "DeletePeer", "PreheatFile", "PreheatImage")),
)
_SCHEDULE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
# The seed's DownloadTask stream lasts as long as its download; give up on it after this long.
SEED_TRIGGER_TIMEOUT = 6 * 3600.0

# RPCs of scheduler.v2.Scheduler that Damselfly does not serve.
UNIMPLEMENTED_RPCS = (
    "AnnounceCachePeer", "StatCachePeer", "DeleteCachePeer", "StatCacheTask", "DeleteCacheTask",
    "AnnouncePersistentPeer", "StatPersistentPeer", "DeletePersistentPeer", "UploadPersistentTaskStarted",
    "UploadPersistentTaskFinished", "UploadPersistentTaskFailed", "StatPersistentTask", "DeletePersistentTask",
    "AnnouncePersistentCachePeer", "StatPersistentCachePeer", "DeletePersistentCachePeer",
    "UploadPersistentCacheTaskStarted", "UploadPersistentCacheTaskFinished", "UploadPersistentCacheTaskFailed",
    "StatPersistentCacheTask", "DeletePersistentCacheTask", "StatImage", "StatFile",
)
# PreheatImage and PreheatFile are served by scheduler.preheat.PreheatingSchedulerService.

T = TypeVar("T")


# Errors of a seed trigger that mean the seed is down (it goes on cool-down), not that its download failed.
SEED_DOWN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class SchedulerMetrics:
    """Metric families of the scheduler, in their own registry. Labels never carry ids or URLs."""

    def __init__(self, core: SchedulerCore, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.peers_registered = Counter(f"{PREFIX}_peers_registered", "Peers registered, by priority and host type",
                                        ["priority", "host_type"], registry=r)
        self.decisions = Counter(f"{PREFIX}_schedule_decisions", "Scheduling decisions, by kind", ["kind"],
                                 registry=r)
        self.schedule_duration = Histogram(f"{PREFIX}_schedule_duration_seconds",
                                           "Time the core took to schedule a register or a reschedule",
                                           buckets=_SCHEDULE_BUCKETS, registry=r)
        self.piece_reports = Counter(f"{PREFIX}_piece_reports", "Finished pieces reported, by traffic type",
                                     ["type"], registry=r)
        self.piece_bytes = Counter(f"{PREFIX}_piece_bytes", "Bytes of finished pieces reported, by traffic type",
                                   ["type"], registry=r)
        self.grpc_errors = Counter(f"{PREFIX}_grpc_errors", "gRPC calls that ended with an error, by method and code",
                                   ["method", "code"], registry=r)
        self.hosts = Gauge(f"{PREFIX}_hosts", "Hosts known", registry=r)
        self.peers = Gauge(f"{PREFIX}_peers", "Peers known", registry=r)
        self.tasks = Gauge(f"{PREFIX}_tasks", "Tasks known", registry=r)
        self.waiting = Gauge(f"{PREFIX}_waiting_peers", "Peers waiting for a parent", registry=r)
        self.seed_hosts = Gauge(f"{PREFIX}_seed_hosts_available",
                                "Announced seed hosts that new tasks may be triggered on (not cooling down)",
                                registry=r)
        self.seed_hosts.set_function(lambda: core.available_seed_host_count)
        self.hosts.set_function(lambda: core.host_count)
        self.peers.set_function(lambda: core.peer_count)
        self.tasks.set_function(lambda: core.task_count)
        self.waiting.set_function(lambda: core.waiting_count)
        for kind in DECISION_KINDS:
            self.decisions.labels(kind)
        for traffic in TRAFFIC_TYPES:
            self.piece_reports.labels(traffic)
            self.piece_bytes.labels(traffic)
        for method, code in EXPECTED_GRPC_ERRORS:
            self.grpc_errors.labels(method, code)


class _End:
    """Sentinel: the peer's side of the stream is done."""


_END = _End()
_Outgoing = scheduler_pb2.AnnouncePeerResponse | FailPeer | _End


@dataclass
class _Stream:
    queue: asyncio.Queue[Any]
    caller: Caller
    peer_id: str = ""  # the peer it registered: the only one it may speak for


def caller_of(context: grpc.aio.ServicerContext) -> Caller:
    """Who is calling: the identity its certificate proves (None in plaintext) and its IP."""
    return Caller(grpc_identity(context), ip_of_grpc_peer(context.peer() or ""))


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):  # type: ignore[misc]
    """``scheduler.v2.Scheduler`` over a :class:`SchedulerCore`."""

    def __init__(self, core: SchedulerCore, metrics: SchedulerMetrics | None = None,
                 tls: TlsCredentials | None = None) -> None:
        self.core = core
        self._tls = tls  # for channels to seeds; None: plaintext
        self.metrics = metrics or SchedulerMetrics(core)
        self._streams: dict[str, _Stream] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._channels: dict[str, grpc.aio.Channel] = {}

    # ----------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> None:
        """Start the periodic retry (every retry_interval) and GC (every gc_interval) loops."""
        config = self.core.config
        self._spawn(self._every(config.retry_interval, self.core.tick))
        self._spawn(self._every(config.gc_interval, self.core.gc))

    async def close(self) -> None:
        """Stop background work and close the channels to seeds."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def _every(self, interval: float, step: Callable[[], list[Decision]]) -> None:
        while True:
            await self.core.clock.sleep(interval)
            try:
                self._dispatch(step())
            except Exception:  # a bug in one round must not stop the loop
                log.exception("periodic %s failed", getattr(step, "__name__", step))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ----------------------------------------------------------------------------------------
    # AnnouncePeer

    async def AnnouncePeer(
        self, request_iterator: AsyncIterator[scheduler_pb2.AnnouncePeerRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.AnnouncePeerResponse]:
        stream = _Stream(asyncio.Queue(), caller_of(context))
        try:
            self.core.open_stream(stream.caller)
        except QuotaExceeded as exc:
            self.metrics.grpc_errors.labels("AnnouncePeer", grpc.StatusCode.RESOURCE_EXHAUSTED.name).inc()
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(str(exc))
            return
        reader = asyncio.get_running_loop().create_task(self._read(request_iterator, stream))
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, _End):
                    return
                if isinstance(item, FailPeer):
                    # End the stream with the status by returning, not by context.abort(): an abort
                    # raises out of this generator, and grpc logs that as an error with a traceback.
                    code = grpc.StatusCode[item.code.value]
                    self.metrics.grpc_errors.labels("AnnouncePeer", code.name).inc()
                    context.set_code(code)
                    context.set_details(item.message)
                    return
                yield item
        finally:
            reader.cancel()
            self.core.close_stream(stream.caller)
            if stream.peer_id and self._streams.get(stream.peer_id) is stream:
                del self._streams[stream.peer_id]
                self._dispatch(self.core.stream_closed(stream.peer_id))

    async def _read(self, requests: AsyncIterator[scheduler_pb2.AnnouncePeerRequest], stream: _Stream) -> None:
        try:
            async for request in requests:
                is_register = request.WhichOneof("request") == "register_peer_request"
                problem = stream_message_problem(stream.peer_id, request.peer_id, is_register)
                if problem:  # one stream speaks for the peer it registered, never for another
                    stream.queue.put_nowait(FailPeer(request.peer_id, Code.PERMISSION_DENIED, problem))
                    return
                if stream.peer_id:
                    self._dispatch(self._handle(request, stream.caller))
                    continue
                decisions = self._handle(request, stream.caller)
                if not self.core.owns_peer(request.peer_id, stream.caller):
                    # Refused: the answer goes on this stream, never on the stream of a peer
                    # with that id (it may be someone else's).
                    mine = [d for d in decisions if isinstance(d, FailPeer) and d.peer_id == request.peer_id]
                    self._dispatch([d for d in decisions if d not in mine])
                    stream.queue.put_nowait(mine[0] if mine else FailPeer(
                        request.peer_id, Code.FAILED_PRECONDITION, f"peer {request.peer_id} was not registered"))
                    return
                stream.peer_id = request.peer_id
                self._streams[request.peer_id] = stream
                self._dispatch(decisions)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:  # the peer went away
            log.debug("AnnouncePeer stream of %s broke: %s", stream.peer_id, exc.code())
        except grpc.aio.AbortError:  # we ended the stream (a FailPeer decision)
            log.debug("AnnouncePeer stream of %s aborted", stream.peer_id)
        except Exception:
            log.exception("AnnouncePeer stream of %s failed", stream.peer_id)
        stream.queue.put_nowait(_END)

    def _handle(self, request: scheduler_pb2.AnnouncePeerRequest, caller: Caller) -> list[Decision]:
        core, peer_id = self.core, request.peer_id
        kind = request.WhichOneof("request")
        if kind == "register_peer_request":
            download = request.register_peer_request.download
            host = core.hosts.get(request.host_id)
            host_type = "seed" if host is not None and host.info.is_seed else "normal"
            self.metrics.peers_registered.labels(_priority_label(download.priority), host_type).inc()
            with self.metrics.schedule_duration.time():
                return core.register_peer(request.host_id, request.task_id, peer_id, download_from_proto(download),
                                          caller)
        if kind == "download_peer_started_request":
            return core.download_started(peer_id)
        if kind == "download_peer_back_to_source_started_request":
            return core.back_to_source_started(peer_id)
        if kind == "reschedule_peer_request":
            message = request.reschedule_peer_request
            with self.metrics.schedule_duration.time():
                return core.reschedule(peer_id, [p.id for p in message.candidate_parents], message.description)
        if kind == "download_peer_finished_request":
            return core.peer_finished(peer_id)
        if kind == "download_peer_back_to_source_finished_request":
            return core.back_to_source_finished(peer_id)
        if kind == "download_peer_failed_request":
            return core.peer_failed(peer_id, request.download_peer_failed_request.description)
        if kind == "download_peer_back_to_source_failed_request":
            return core.back_to_source_failed(peer_id, request.download_peer_back_to_source_failed_request.description)
        if kind == "download_piece_finished_request":
            piece = request.download_piece_finished_request.piece
            traffic = piece.traffic_type if piece.HasField("traffic_type") else common_pb2.REMOTE_PEER
            self._count_piece(traffic, piece.length)
            return core.piece_finished(peer_id, piece.number, piece.offset, piece.length, piece.parent_id,
                                       seconds(piece.cost))
        if kind == "download_piece_back_to_source_finished_request":
            piece = request.download_piece_back_to_source_finished_request.piece
            self._count_piece(common_pb2.BACK_TO_SOURCE, piece.length)
            return core.back_to_source_piece_finished(peer_id, piece.number, piece.offset, piece.length,
                                                      piece.digest, seconds(piece.cost))
        if kind == "download_piece_failed_request":
            failed = request.download_piece_failed_request
            return core.piece_failed(peer_id, failed.piece_number, failed.parent_id, failed.temporary)
        if kind == "download_piece_back_to_source_failed_request":
            # The origin's answer (its HTTP status, when it gave one) decides whether it is asked
            # again; the download's failure report follows.
            failed_piece = request.download_piece_back_to_source_failed_request
            status = failed_piece.backend.status_code if failed_piece.HasField("backend") else None
            return core.back_to_source_piece_failed(peer_id, failed_piece.piece_number, status or None)
        return []

    def _count_piece(self, traffic: int, length: int) -> None:
        name = common_pb2.TrafficType.Name(traffic).lower()
        if name in TRAFFIC_TYPES:
            self.metrics.piece_reports.labels(name).inc()
            self.metrics.piece_bytes.labels(name).inc(length)

    # ----------------------------------------------------------------------------------------
    # Decisions

    def _dispatch(self, decisions: Iterable[Decision]) -> None:
        for decision in decisions:
            if isinstance(decision, TriggerSeed):
                self.metrics.decisions.labels("seed_trigger").inc()
                self._spawn(self._trigger_seed(decision))
                continue
            stream = self._streams.get(decision.peer_id)
            if isinstance(decision, FailPeer):
                self.metrics.decisions.labels("failed").inc()
                if stream is not None:
                    stream.queue.put_nowait(decision)
                continue
            if isinstance(decision, SendNormal):
                self.metrics.decisions.labels("normal").inc()
            elif isinstance(decision, SendNeedBackToSource):
                self.metrics.decisions.labels("back_to_source").inc()
            else:
                self.metrics.decisions.labels("empty").inc()
            if stream is not None:
                stream.queue.put_nowait(response_to_proto(decision))

    async def _trigger_seed(self, trigger: TriggerSeed) -> None:
        try:
            download = seed_download(trigger.download)
        except InvalidRequest as exc:
            # A URL or digest a seed refuses (INVALID_ARGUMENT) is not sent to be refused.
            log.warning("seed trigger of task %s on %s not sent: %s", trigger.task_id, trigger.address, exc)
            self.metrics.grpc_errors.labels("SeedTrigger", grpc.StatusCode.INVALID_ARGUMENT.name).inc()
            return
        channel = self._channels.get(trigger.address)
        if channel is None:
            channel = open_channel(trigger.address, self._tls)
            self._channels[trigger.address] = channel
        stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)
        request = dfdaemon_pb2.DownloadTaskRequest(download=download.to_proto())
        try:
            call = stub.DownloadTask(request, timeout=SEED_TRIGGER_TIMEOUT)
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            log.warning("seed trigger of task %s on %s failed: %s %s", trigger.task_id, trigger.address,
                        exc.code().name, exc.details())
            self.metrics.grpc_errors.labels("SeedTrigger", exc.code().name).inc()
            if exc.code() not in SEED_DOWN_CODES:
                # The seed answered: the download itself failed (an origin 404, say). The seed is
                # fine; its peer's own failure report already told the waiting children.
                return
            # A channel that failed to connect backs off for longer and longer; the seed may be
            # back before the cool-down ends, so the next trigger gets a fresh channel.
            stale = self._channels.pop(trigger.address, None)
            if stale is not None:
                await stale.close()
            self._dispatch(self.core.seed_trigger_failed(trigger.address, trigger.task_id))

    # ----------------------------------------------------------------------------------------
    # Unary RPCs

    async def StatPeer(
        self, request: scheduler_pb2.StatPeerRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Peer:
        info = await self._call(context, "StatPeer", lambda: self.core.stat_peer(request.peer_id))
        return common_pb2.Peer(
            id=info.id,
            state=info.state,
            host=host_to_proto(info.host),
            pieces=[piece_to_proto(p) for p in info.pieces],
            task=common_pb2.Task(id=info.task_id),
            priority=cast(common_pb2.Priority, info.download.priority),
            range=common_pb2.Range(start=info.download.range_start, length=info.download.range_length),
            need_back_to_source=info.download.need_back_to_source,
            created_at=self._timestamp(info.created_at),
            updated_at=self._timestamp(info.updated_at),
        )

    async def DeletePeer(
        self, request: scheduler_pb2.DeletePeerRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        caller = caller_of(context)
        self._dispatch(await self._call(context, "DeletePeer", lambda: self.core.delete_peer(request.peer_id, caller)))
        return empty_pb2.Empty()

    async def StatTask(
        self, request: scheduler_pb2.StatTaskRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Task:
        info = await self._call(context, "StatTask", lambda: self.core.stat_task(request.task_id))
        download = info.download
        # Request headers stay out: they may carry the registry credentials of one client. So does
        # the URL's query (presigned URLs carry their signature there), except for admins.
        url = download.url if caller_of(context).is_admin else _without_query(download.url)
        return common_pb2.Task(
            id=info.id,
            type=cast(common_pb2.TaskType, download.task_type),
            url=url,
            digest=download.digest,
            tag=download.tag,
            application=download.application,
            filtered_query_params=download.filtered_query_params,
            content_length=info.content_length or 0,
            piece_count=info.piece_count or 0,
            pieces=[piece_to_proto(p) for p in info.pieces],
            state=info.state,
            peer_count=info.peer_count,
            has_available_peer=info.has_available_peer,
            created_at=self._timestamp(info.created_at),
            updated_at=self._timestamp(info.updated_at),
        )

    async def DeleteTask(
        self, request: scheduler_pb2.DeleteTaskRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        caller = caller_of(context)
        self._dispatch(await self._call(context, "DeleteTask", lambda: self.core.delete_task(request.task_id, caller)))
        return empty_pb2.Empty()

    async def AnnounceHost(
        self, request: scheduler_pb2.AnnounceHostRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        host = request.host
        if not host.id or not host.ip:
            await self._abort_with(context, "AnnounceHost", InvalidRequest("host id and ip are required"))
        caller = caller_of(context)
        self._dispatch(await self._call(context, "AnnounceHost",
                                        lambda: self.core.announce_host(host_from_proto(host), caller)))
        return empty_pb2.Empty()

    async def ListHosts(
        self, request: scheduler_pb2.ListHostsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListHostsResponse:
        caller = caller_of(context)
        hosts = await self._call(context, "ListHosts", lambda: self.core.list_hosts(caller))
        return scheduler_pb2.ListHostsResponse(hosts=[host_to_proto(h) for h in hosts])

    async def DeleteHost(
        self, request: scheduler_pb2.DeleteHostRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        caller = caller_of(context)
        self._dispatch(await self._call(context, "DeleteHost", lambda: self.core.delete_host(request.host_id, caller)))
        return empty_pb2.Empty()

    async def _call(self, context: grpc.aio.ServicerContext, method: str, fn: Callable[[], T]) -> T:
        """Run a core query; its errors end the call with their status (unknown ids: NOT_FOUND)."""
        try:
            return fn()
        except DamselflyError as exc:
            await self._abort_with(context, method, exc)
            raise AssertionError("unreachable") from None

    async def _abort_with(self, context: grpc.aio.ServicerContext, method: str, error: DamselflyError) -> None:
        """End the call with `error`'s status code (common.rpc) and its message."""
        await self._abort(context, method, status_of(error), str(error))

    async def _abort(
        self, context: grpc.aio.ServicerContext, method: str, code: grpc.StatusCode, message: str
    ) -> None:
        self.metrics.grpc_errors.labels(method, code.name).inc()
        await context.abort(code, message)

    def _timestamp(self, monotonic: float) -> timestamp_pb2.Timestamp:
        wall = time.time() - (self.core.clock.time() - monotonic)
        stamp = timestamp_pb2.Timestamp()
        stamp.FromNanoseconds(int(wall * 1e9))
        return stamp


def _unimplemented(name: str) -> Callable[..., Awaitable[None]]:
    async def handler(self: SchedulerService, request: Any, context: grpc.aio.ServicerContext) -> None:
        await self._abort(context, name, grpc.StatusCode.UNIMPLEMENTED,
                          f"Scheduler.{name} is not implemented by the Damselfly scheduler")

    handler.__name__ = name
    return handler


for _name in UNIMPLEMENTED_RPCS:
    setattr(SchedulerService, _name, _unimplemented(_name))


# --------------------------------------------------------------------------------------------
# Conversions


def _without_query(url: str) -> str:
    """`url` without its query and fragment (where signatures and tokens travel)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _priority_label(priority: int) -> str:
    try:
        return str(common_pb2.Priority.Name(priority)).lower()
    except ValueError:
        return "unknown"


def host_from_proto(host: common_pb2.Host) -> HostInfo:
    """A host as the core sees it (the message is kept for ListHosts and candidates)."""
    network = host.network
    return HostInfo(
        id=host.id,
        ip=host.ip,
        hostname=host.hostname,
        type=host.type,
        port=host.port,
        download_port=host.download_port,
        proxy_port=host.proxy_port,
        idc=network.idc,
        location=network.location,
        upload_slots=network.max_tx_bandwidth,
        uploads_in_progress=network.upload_tcp_connection_count,
        raw=host,
    )


def host_to_proto(info: HostInfo) -> common_pb2.Host:
    if isinstance(info.raw, common_pb2.Host):
        return info.raw
    return common_pb2.Host(
        id=info.id, type=info.type, hostname=info.hostname, ip=info.ip, port=info.port,
        download_port=info.download_port, proxy_port=info.proxy_port,
        network=common_pb2.Network(idc=info.idc, location=info.location, max_tx_bandwidth=info.upload_slots,
                                   upload_tcp_connection_count=info.uploads_in_progress),
    )


def download_from_proto(download: common_pb2.Download) -> DownloadSpec:
    has_range = download.HasField("range")
    return DownloadSpec(
        url=download.url,
        digest=download.digest,
        tag=download.tag,
        application=download.application,
        priority=download.priority,
        filtered_query_params=tuple(download.filtered_query_params),
        request_header=dict(download.request_header),
        piece_length=download.piece_length if download.HasField("piece_length") else 0,
        range_start=download.range.start if has_range else 0,
        range_length=download.range.length if has_range else 0,
        need_back_to_source=download.need_back_to_source,
        disable_back_to_source=download.disable_back_to_source,
        task_type=download.type,
        ranged=has_range, prefetch=download.prefetch or not has_range,
    )


def seed_download(spec: DownloadSpec) -> DownloadRequest:
    """The download a seed is triggered with, in the form every dfdaemon entry point takes.

    The core has already made it a back-to-source (of the whole content, or, `lazy`, of what
    children will demand: a Range read of nothing, prefetch off; for a Range read with prefetch, a
    Range read of nothing with prefetch: the whole content in the small pieces of a lazily read
    blob). Raises InvalidRequest for
    a URL or digest no dfdaemon accepts. (The task type is not carried: ``AnnouncePeer`` only
    serves standard tasks.)
    """
    return DownloadRequest(
        url=spec.url, digest=spec.digest, tag=spec.tag, application=spec.application, priority=spec.priority,
        filtered_query_params=spec.filtered_query_params, request_header=spec.request_header,
        piece_length=spec.piece_length or None, need_back_to_source=spec.need_back_to_source,
        disable_back_to_source=spec.disable_back_to_source,
        byte_range=(0, 0) if spec.ranged else None, prefetch=spec.prefetch,
    )


def piece_to_proto(piece: PieceRecord) -> common_pb2.Piece:
    return common_pb2.Piece(number=piece.number, offset=piece.offset, length=piece.length, digest=piece.digest)


def candidate_to_proto(candidate: Candidate) -> common_pb2.Peer:
    return common_pb2.Peer(
        id=candidate.peer_id,
        state=candidate.state,
        host=host_to_proto(candidate.host),
        pieces=[piece_to_proto(p) for p in candidate.pieces],
        task=common_pb2.Task(id=candidate.task_id),
    )


def response_to_proto(decision: SendNormal | SendNeedBackToSource | SendEmpty) -> scheduler_pb2.AnnouncePeerResponse:
    if isinstance(decision, SendNormal):
        return scheduler_pb2.AnnouncePeerResponse(normal_task_response=scheduler_pb2.NormalTaskResponse(
            candidate_parents=[candidate_to_proto(c) for c in decision.candidates]))
    if isinstance(decision, SendNeedBackToSource):
        return scheduler_pb2.AnnouncePeerResponse(need_back_to_source_response=scheduler_pb2.NeedBackToSourceResponse(
            description=decision.description))
    return scheduler_pb2.AnnouncePeerResponse(empty_task_response=scheduler_pb2.EmptyTaskResponse())
