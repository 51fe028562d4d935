"""The peer's typed scheduler session and client, over grpc.aio servers on 127.0.0.1.

A scripted fake scheduler checks what each session method puts on the wire and how each answer
or status code comes back; the real SchedulerService checks the two ends agree (a host the
scheduler does not know is NOT_FOUND, and the peer announces it again and registers again).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from dragonfly_api import common_pb2, errordetails_pb2, scheduler_pb2, scheduler_pb2_grpc
from google.protobuf import empty_pb2

from common.clock import SystemClock
from common.config import SchedulerConfig
from common.download import DownloadRequest, duration
from common.errors import (
    DamselflyError,
    DownloadFailed,
    HostNotFound,
    InvalidRequest,
    SchedulerUnavailable,
    TaskFailed,
)
from common.launcher import free_port
from peer.download.scheduler_client import (
    CandidateParent,
    EmptyTask,
    NeedBackToSource,
    Parents,
    SchedulerClient,
    SchedulerSession,
    answer_from_proto,
)
from scheduler.core import SchedulerCore
from scheduler.service import SchedulerService

DOWNLOAD = DownloadRequest(url="https://registry.local/v2/x/blobs/sha256:" + "1" * 64)
TASK = DOWNLOAD.task_id
DIGEST = "xxh3:" + "0123456789abcdef" * 2
DEADLINE = 10.0
Response = scheduler_pb2.AnnouncePeerResponse


def host(name: str, ip: str, host_type: int = 0) -> common_pb2.Host:
    return common_pb2.Host(id=f"{ip}-{name}", hostname=name, ip=ip, type=host_type, port=4000, download_port=4005)


def normal(*peers: common_pb2.Peer) -> Response:
    return Response(normal_task_response=scheduler_pb2.NormalTaskResponse(candidate_parents=peers))


def back_to_source(description: str = "no parent") -> Response:
    return Response(need_back_to_source_response=scheduler_pb2.NeedBackToSourceResponse(description=description))


PARENT = common_pb2.Peer(id="parent-1", host=host("seed", "10.0.0.7", host_type=1), pieces=[
    common_pb2.Piece(number=0, digest=DIGEST), common_pb2.Piece(number=1, digest=""),
    common_pb2.Piece(number=2, digest=DIGEST)])
PARENT_VALUE = CandidateParent(peer_id="parent-1", host_id="10.0.0.7-seed", ip="10.0.0.7", grpc_port=4000,
                               download_port=4005, is_seed=True, digests=((0, DIGEST), (2, DIGEST)))


# --------------------------------------------------------------------------------------------
# Answers as values


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        (normal(PARENT), Parents((PARENT_VALUE,))),
        (normal(common_pb2.Peer(id="p2", host=host("n", "10.0.0.8"))),
         Parents((CandidateParent("p2", "10.0.0.8-n", "10.0.0.8", 4000, 4005, False, ()),))),
        (normal(), Parents(())),
        (back_to_source("no seed"), NeedBackToSource("no seed")),
        (Response(empty_task_response=scheduler_pb2.EmptyTaskResponse()), EmptyTask()),
        (Response(), Parents(())),  # an answer Damselfly does not act on brings nothing new
    ],
    ids=["normal", "normal-peer", "no-parents", "back-to-source", "empty", "other"],
)
def test_answer_from_proto(response: Response, answer: object) -> None:
    assert answer_from_proto(response) == answer


# --------------------------------------------------------------------------------------------
# A scripted scheduler

Reply = Response | grpc.StatusCode | None  # None: send nothing


class FakeScheduler(scheduler_pb2_grpc.SchedulerServicer):  # type: ignore[misc]
    """Answers each register with the next of `registers` (the last repeats), other requests by kind."""

    def __init__(self, registers: list[Reply], replies: dict[str, Reply] | None = None) -> None:
        self.registers = list(registers)
        self.replies = replies or {}
        self.requests: list[scheduler_pb2.AnnouncePeerRequest] = []
        self.announced: list[str] = []
        self.ended = asyncio.Event()

    @property
    def register_count(self) -> int:
        return sum(r.WhichOneof("request") == "register_peer_request" for r in self.requests)

    async def AnnounceHost(self, request: Any, context: Any) -> empty_pb2.Empty:
        self.announced.append(request.host.id)
        return empty_pb2.Empty()

    async def AnnouncePeer(self, request_iterator: Any, context: Any) -> AsyncIterator[Response]:
        async for request in request_iterator:
            self.requests.append(request)
            kind = request.WhichOneof("request")
            if kind == "register_peer_request":
                reply = self.registers.pop(0) if len(self.registers) > 1 else self.registers[0]
            else:
                reply = self.replies.get(kind)
            if isinstance(reply, grpc.StatusCode):
                await context.abort(reply, f"told to answer {reply.name}")
            if reply is not None:
                yield reply
        self.ended.set()


@asynccontextmanager
async def serving(servicer: Any) -> AsyncIterator[str]:
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@asynccontextmanager
async def client_of(*addresses: str, me: common_pb2.Host | None = None) -> AsyncIterator[SchedulerClient]:
    client = SchedulerClient(list(addresses), me or host("node", "10.0.0.9"), announce_interval=60.0)
    try:
        yield client
    finally:
        await client.stop()


# --------------------------------------------------------------------------------------------
# What each report puts on the wire


def _request(**message: Any) -> scheduler_pb2.AnnouncePeerRequest:
    return scheduler_pb2.AnnouncePeerRequest(host_id="10.0.0.9-node", task_id=TASK, peer_id="me", **message)


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        (lambda s: s.download_started(),
         _request(download_peer_started_request=scheduler_pb2.DownloadPeerStartedRequest())),
        (lambda s: s.back_to_source_started("no parent"),
         _request(download_peer_back_to_source_started_request=scheduler_pb2.DownloadPeerBackToSourceStartedRequest(
             description="no parent"))),
        (lambda s: s.piece_finished(3, offset=12, length=4, digest=DIGEST, parent_id="parent-1", cost=1.5),
         _request(download_piece_finished_request=scheduler_pb2.DownloadPieceFinishedRequest(piece=common_pb2.Piece(
             number=3, parent_id="parent-1", offset=12, length=4, digest=DIGEST,
             traffic_type=common_pb2.REMOTE_PEER, cost=duration(1.5))))),
        (lambda s: s.back_to_source_piece_finished(3, offset=12, length=4, digest=DIGEST, cost=0.25),
         _request(download_piece_back_to_source_finished_request=scheduler_pb2.DownloadPieceBackToSourceFinishedRequest(
             piece=common_pb2.Piece(number=3, offset=12, length=4, digest=DIGEST,
                                    traffic_type=common_pb2.BACK_TO_SOURCE, cost=duration(0.25))))),
        (lambda s: s.piece_failed(3, "parent-1", False),
         _request(download_piece_failed_request=scheduler_pb2.DownloadPieceFailedRequest(
             piece_number=3, parent_id="parent-1", temporary=False))),
        (lambda s: s.reschedule("parents have no more pieces for us", ("bad-1", "bad-2")),
         _request(reschedule_peer_request=scheduler_pb2.ReschedulePeerRequest(
             candidate_parents=[common_pb2.Peer(id="bad-1"), common_pb2.Peer(id="bad-2")],
             description="parents have no more pieces for us"))),
        (lambda s: s.finished(),
         _request(download_peer_finished_request=scheduler_pb2.DownloadPeerFinishedRequest())),
        (lambda s: s.back_to_source_finished(),
         _request(download_peer_back_to_source_finished_request=(
             scheduler_pb2.DownloadPeerBackToSourceFinishedRequest()))),
        (lambda s: s.failed("timed out"),
         _request(download_peer_failed_request=scheduler_pb2.DownloadPeerFailedRequest(description="timed out"))),
        (lambda s: s.back_to_source_failed("origin 404"),
         _request(download_peer_back_to_source_failed_request=scheduler_pb2.DownloadPeerBackToSourceFailedRequest(
             description="origin 404"))),
        (lambda s: s.back_to_source_piece_failed(0, 404, "origin answered 404 Not Found for u"),
         _request(download_piece_back_to_source_failed_request=scheduler_pb2.DownloadPieceBackToSourceFailedRequest(
             piece_number=0, backend=errordetails_pb2.Backend(message="origin answered 404 Not Found for u",
                                                              status_code=404)))),
        (lambda s: s.back_to_source_piece_failed(0, None, "cannot connect to u"),
         _request(download_piece_back_to_source_failed_request=scheduler_pb2.DownloadPieceBackToSourceFailedRequest(
             piece_number=0, unknown=errordetails_pb2.Unknown(message="cannot connect to u")))),
    ],
    ids=["started", "b2s-started", "piece", "b2s-piece", "piece-failed", "reschedule", "finished",
         "b2s-finished", "failed", "b2s-failed", "b2s-piece-status", "b2s-piece-unreached"],
)
async def test_report_on_the_wire(report: Callable[[SchedulerSession], None],
                                  expected: scheduler_pb2.AnnouncePeerRequest) -> None:
    scheduler = FakeScheduler([normal()])
    async with serving(scheduler) as address, client_of(address) as client:
        session = client.open_session(address, TASK, "me")
        assert await session.register(DOWNLOAD, DEADLINE) == Parents(())
        report(session)
        session.close()
        report(session)  # after close: dropped
        await asyncio.wait_for(scheduler.ended.wait(), DEADLINE)
    register, *rest = scheduler.requests
    assert register == _request(register_peer_request=scheduler_pb2.RegisterPeerRequest(download=DOWNLOAD.to_proto()))
    assert rest == [expected]


# --------------------------------------------------------------------------------------------
# Register: answers and status codes


@pytest.mark.parametrize(
    ("registers", "outcome", "registered", "announced"),
    [
        ([normal(PARENT)], Parents((PARENT_VALUE,)), 1, 0),
        ([back_to_source("no seed")], NeedBackToSource("no seed"), 1, 0),
        # the scheduler restarted and forgot this host: announce it, register again
        ([grpc.StatusCode.NOT_FOUND, back_to_source()], NeedBackToSource("no parent"), 2, 1),
        ([grpc.StatusCode.NOT_FOUND], HostNotFound, 2, 1),  # once only
        ([grpc.StatusCode.FAILED_PRECONDITION], TaskFailed, 1, 0),  # the task failed for everyone
        ([grpc.StatusCode.RESOURCE_EXHAUSTED], DownloadFailed, 1, 0),  # no parent in time
        ([grpc.StatusCode.INVALID_ARGUMENT], InvalidRequest, 1, 0),
        ([grpc.StatusCode.UNAVAILABLE], SchedulerUnavailable, 1, 0),
        ([None], SchedulerUnavailable, 1, 0),  # silent past answer_within
    ],
    ids=["parents", "back-to-source", "forgot-host", "unknown-host", "task-failed", "no-parent", "invalid",
         "unavailable", "silent"],
)
async def test_register(registers: list[Reply], outcome: Any, registered: int, announced: int) -> None:
    scheduler = FakeScheduler(registers)
    async with serving(scheduler) as address, client_of(address) as client:
        if isinstance(outcome, type):
            with pytest.raises(outcome):
                await client.register(TASK, "me", DOWNLOAD, answer_within=0.5)
        else:
            session, answer = await client.register(TASK, "me", DOWNLOAD, answer_within=0.5)
            assert answer == outcome
            assert session.address == address
            session.close()
    assert (scheduler.register_count, scheduler.announced) == (registered, ["10.0.0.9-node"] * announced)


@pytest.mark.parametrize(
    ("first", "tried_second", "outcome"),
    [
        (grpc.StatusCode.UNAVAILABLE, True, NeedBackToSource("no parent")),  # not there: the next one
        (None, True, NeedBackToSource("no parent")),  # silent: the next one
        (grpc.StatusCode.FAILED_PRECONDITION, False, DownloadFailed),  # refused: the answer stands
    ],
    ids=["unavailable", "silent", "refused"],
)
async def test_register_fails_over_in_rank_order(first: Reply, tried_second: bool, outcome: Any) -> None:
    owner, other = FakeScheduler([first]), FakeScheduler([back_to_source()])
    async with serving(owner) as owner_address, serving(other) as other_address, \
            client_of(owner_address, other_address) as client:
        task = next(t for t in (f"{n:064x}" for n in range(100)) if client.ranked(t)[0] == owner_address)
        if isinstance(outcome, type):
            with pytest.raises(outcome):
                await client.register(task, "me", DOWNLOAD, answer_within=0.5)
        else:
            _, answer = await client.register(task, "me", DOWNLOAD, answer_within=0.5)
            assert answer == outcome
    assert owner.register_count == 1
    assert other.register_count == (1 if tried_second else 0)


async def test_register_with_no_scheduler_listening_is_unavailable() -> None:
    async with client_of(f"127.0.0.1:{free_port()}") as client:
        with pytest.raises(SchedulerUnavailable, match="no scheduler answered"):
            await client.register(TASK, "me", DOWNLOAD, answer_within=DEADLINE)


# --------------------------------------------------------------------------------------------
# Answers after the first one


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        (normal(PARENT), Parents((PARENT_VALUE,))),
        (back_to_source("parents gone"), NeedBackToSource("parents gone")),
        (grpc.StatusCode.ABORTED, DownloadFailed),  # the scheduler removed the peer
        (grpc.StatusCode.NOT_FOUND, DamselflyError),  # peer unknown (no host override after register)
        (grpc.StatusCode.UNAVAILABLE, SchedulerUnavailable),
    ],
    ids=["parents", "back-to-source", "aborted", "not-found", "unavailable"],
)
async def test_receive(reply: Reply, outcome: Any) -> None:
    scheduler = FakeScheduler([normal()], replies={"reschedule_peer_request": reply})
    async with serving(scheduler) as address, client_of(address) as client:
        session, _ = await client.register(TASK, "me", DOWNLOAD, answer_within=DEADLINE)
        session.reschedule("need more")
        if isinstance(outcome, type):
            with pytest.raises(outcome) as raised:
                await asyncio.wait_for(session.receive(), DEADLINE)
            assert not isinstance(raised.value, HostNotFound)
        else:
            assert await asyncio.wait_for(session.receive(), DEADLINE) == outcome
            session.close()
            assert await asyncio.wait_for(session.receive(), DEADLINE) is None  # the scheduler ended it


# --------------------------------------------------------------------------------------------
# Against the real scheduler service


@asynccontextmanager
async def real_scheduler() -> AsyncIterator[tuple[SchedulerService, str]]:
    service = SchedulerService(SchedulerCore(SchedulerConfig(retry_interval=0.05), SystemClock()))
    async with serving(service) as address:
        service.start()
        try:
            yield service, address
        finally:
            await service.close()


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_unannounced_host_gets_not_found_and_the_peer_announces_it() -> None:
    async with real_scheduler() as (service, address), client_of(address) as client:
        assert "10.0.0.9-node" not in service.core.hosts  # never announced (or the scheduler restarted)
        session, answer = await client.register(TASK, "p1", DOWNLOAD, answer_within=DEADLINE)
        assert isinstance(answer, NeedBackToSource)  # no seed, no parent: the first peer back-sources
        registry = service.metrics.registry
        assert registry.get_sample_value("damselfly_scheduler_grpc_errors_total",
                                         {"method": "AnnouncePeer", "code": "NOT_FOUND"}) == 1
        assert "10.0.0.9-node" in service.core.hosts and client.reachable
        session.close()


async def test_two_sessions_relay_a_digest_through_the_scheduler() -> None:
    async with real_scheduler() as (service, address), \
            client_of(address, me=host("a", "10.0.0.1")) as a, client_of(address, me=host("b", "10.0.0.2")) as b:
        await a.announce_host(address)
        await b.announce_host(address)
        source, first = await a.register(TASK, "pa", DOWNLOAD, answer_within=DEADLINE)
        assert isinstance(first, NeedBackToSource)
        source.back_to_source_started(first.description)
        source.back_to_source_piece_finished(0, offset=0, length=1024, digest=DIGEST, cost=0.01)
        await until(lambda: [p.digest for p in service.core.stat_task(TASK).pieces] == [DIGEST], "the digest")

        child, answer = await b.register(TASK, "pb", DOWNLOAD, answer_within=DEADLINE)
        assert answer == Parents((CandidateParent("pa", "10.0.0.1-a", "10.0.0.1", 4000, 4005, False,
                                                  ((0, DIGEST),)),))
        child.download_started()
        child.piece_finished(0, offset=0, length=1024, digest=DIGEST, parent_id="pa", cost=0.01)
        child.finished()
        child.close()
        source.back_to_source_finished()
        source.close()
        assert await asyncio.wait_for(source.receive(), DEADLINE) is None
        assert await asyncio.wait_for(child.receive(), DEADLINE) is None
        assert service.core.stat_peer("pa").state == "Succeeded"
        assert service.core.stat_peer("pb").state == "Succeeded"


def _request_consumers() -> list[asyncio.Task[Any]]:
    """grpc's tasks that feed a call's request iterator (one per live AnnouncePeer stream)."""
    return [t for t in asyncio.all_tasks() if "_consume_request_iterator" in repr(t.get_coro())]


async def test_an_origin_404_fails_every_waiting_peer_with_its_answer() -> None:
    answer = "origin answered 404 Not Found for https://registry.local/x"
    async with real_scheduler() as (service, address), \
            client_of(address, me=host("a", "10.0.0.1")) as a, client_of(address, me=host("b", "10.0.0.2")) as b:
        await a.announce_host(address)
        await b.announce_host(address)
        source, first = await a.register(TASK, "pa", DOWNLOAD, answer_within=DEADLINE)
        assert isinstance(first, NeedBackToSource)  # no seed: a goes to the origin
        source.back_to_source_started(first.description)
        waiting = asyncio.ensure_future(b.register(TASK, "pb", DOWNLOAD, answer_within=DEADLINE))
        await until(lambda: "pb" in service.core.peers, "b to wait")
        source.back_to_source_piece_failed(0, 404, answer)
        source.back_to_source_failed(answer)
        source.close()
        with pytest.raises(TaskFailed) as raised:
            await asyncio.wait_for(waiting, DEADLINE)
        assert str(raised.value) == answer  # the origin's words, without the status code's name
        with pytest.raises(TaskFailed, match="asked again after"):  # a later download: no new attempt
            await b.register(TASK, "pc", DOWNLOAD, answer_within=DEADLINE)
        assert service.core.stat_task(TASK).state == "Failed"
        # The failed streams' request iterators ended with them (nothing left pending at exit).
        await until(lambda: not _request_consumers(), "the request consumers to end")
