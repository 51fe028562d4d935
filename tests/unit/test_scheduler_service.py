"""The gRPC service over real grpc.aio servers on 127.0.0.1 (scheduler and a fake seed)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from prometheus_client import generate_latest

from common.clock import SystemClock
from common.config import SchedulerConfig
from common.download import DownloadRequest, duration
from common.launcher import free_port
from scheduler.core import SchedulerCore
from scheduler.server import main
from scheduler.service import SchedulerService, download_from_proto, seed_download

TASK = "a" * 64
DIGEST = "xxh3:" + "0123456789abcdef" * 2
HEADERS = {"Authorization": "Bearer private-registry-token", "X-Trace": "7"}
DEADLINE = 10.0


class FakeSeed(dfdaemon_pb2_grpc.DfdaemonUploadServicer):  # type: ignore[misc]
    """Records DownloadTask triggers; fails them when told to."""

    def __init__(self, fail: bool = False) -> None:
        self.requests: asyncio.Queue[dfdaemon_pb2.DownloadTaskRequest] = asyncio.Queue()
        self.fail = fail

    async def DownloadTask(self, request: Any, context: Any) -> AsyncIterator[Any]:
        await self.requests.put(request)
        if self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "seed is out of disk")
        yield dfdaemon_pb2.DownloadTaskResponse(host_id="seed", task_id=request.download.url, peer_id="seed-peer")


async def start_seed(seed: FakeSeed) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    dfdaemon_pb2_grpc.add_DfdaemonUploadServicer_to_server(seed, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def seeded(seed: FakeSeed) -> AsyncIterator[tuple[Harness, str]]:
    """A scheduler with `seed` as its one seed peer; the harness and the seed's address."""
    seed_server, address = await start_seed(seed)
    try:
        async with Harness(seed_peer=(address,)) as h:
            yield h, address
    finally:
        await seed_server.stop(None)


class Harness:
    def __init__(self, **config: Any) -> None:
        self.core = SchedulerCore(SchedulerConfig(retry_interval=0.05, **config), SystemClock())
        self.service = SchedulerService(self.core)

    async def __aenter__(self) -> Harness:
        self.server = grpc.aio.server()
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(self.service, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.service.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.server.stop(None)
        await self.service.close()

    async def announce(self, name: str, ip: str, seed: bool = False) -> str:
        host = common_pb2.Host(id=f"{ip}-{name}", hostname=name, ip=ip, type=1 if seed else 0, port=4000,
                               download_port=4005)
        await self.stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host))
        return str(host.id)

    def metric(self, name: str, **labels: str) -> float:
        value = self.service.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def register(host_id: str, peer_id: str, url: str = "https://registry.local/v2/x/blobs/sha256:" + "1" * 64
             ) -> scheduler_pb2.AnnouncePeerRequest:
    download = common_pb2.Download(url=url, request_header=HEADERS, digest="sha256:" + "1" * 64)
    return scheduler_pb2.AnnouncePeerRequest(
        host_id=host_id, task_id=TASK, peer_id=peer_id,
        register_peer_request=scheduler_pb2.RegisterPeerRequest(download=download))


def message(host_id: str, peer_id: str, **kwargs: Any) -> scheduler_pb2.AnnouncePeerRequest:
    return scheduler_pb2.AnnouncePeerRequest(host_id=host_id, task_id=TASK, peer_id=peer_id, **kwargs)


async def until(condition: Any, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_back_to_source_digest_relay_and_unimplemented() -> None:
    async with Harness() as h:
        host = await h.announce("node1", "10.0.0.1")
        call = h.stub.AnnouncePeer()
        await call.write(register(host, "p1"))
        answer = await asyncio.wait_for(call.read(), DEADLINE)
        assert answer.WhichOneof("response") == "need_back_to_source_response"
        await call.write(message(host, "p1", download_peer_back_to_source_started_request=(
            scheduler_pb2.DownloadPeerBackToSourceStartedRequest())))
        piece = common_pb2.Piece(number=0, offset=0, length=1024, digest=DIGEST,
                                 traffic_type=common_pb2.BACK_TO_SOURCE)
        await call.write(message(host, "p1", download_piece_back_to_source_finished_request=(
            scheduler_pb2.DownloadPieceBackToSourceFinishedRequest(piece=piece))))

        # another peer gets p1 as a parent, with the relayed digest
        host2 = await h.announce("node2", "10.0.0.2")
        call2 = h.stub.AnnouncePeer()
        await call2.write(register(host2, "p2"))
        answer2 = await asyncio.wait_for(call2.read(), DEADLINE)
        parents = answer2.normal_task_response.candidate_parents
        assert [p.id for p in parents] == ["p1"]
        assert parents[0].host.ip == "10.0.0.1" and parents[0].host.download_port == 4005
        assert [(p.number, p.digest) for p in parents[0].pieces] == [(0, DIGEST)]

        await call.write(message(host, "p1", download_peer_back_to_source_finished_request=(
            scheduler_pb2.DownloadPeerBackToSourceFinishedRequest())))
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK

        task = await h.stub.StatTask(scheduler_pb2.StatTaskRequest(task_id=TASK))
        assert [(p.number, p.offset, p.length, p.digest) for p in task.pieces] == [(0, 0, 1024, DIGEST)]
        assert (task.content_length, task.piece_count, task.state) == (1024, 1, "Succeeded")
        assert not task.request_header  # credentials are not handed out
        peer = await h.stub.StatPeer(scheduler_pb2.StatPeerRequest(peer_id="p1"))
        assert peer.state == "Succeeded"

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await h.stub.StatTask(scheduler_pb2.StatTaskRequest(task_id="nope"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

        with pytest.raises(grpc.aio.AioRpcError) as unimplemented:
            await h.stub.StatCacheTask(scheduler_pb2.StatCacheTaskRequest(task_id=TASK))
        assert unimplemented.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "StatCacheTask" in (unimplemented.value.details() or "")

        hosts = await h.stub.ListHosts(scheduler_pb2.ListHostsRequest())
        assert sorted(x.id for x in hosts.hosts) == [host, host2]

        call2.cancel()
        assert h.metric("damselfly_scheduler_schedule_decisions_total", kind="back_to_source") == 1
        assert h.metric("damselfly_scheduler_schedule_decisions_total", kind="normal") == 1
        assert h.metric("damselfly_scheduler_piece_bytes_total", type="back_to_source") == 1024
        assert h.metric("damselfly_scheduler_peers_registered_total", priority="level0", host_type="normal") == 2
        assert h.metric("damselfly_scheduler_hosts") == 2
        assert h.metric("damselfly_scheduler_grpc_errors_total", method="StatCacheTask",
                        code="UNIMPLEMENTED") == 1
        text = generate_latest(h.service.metrics.registry).decode()
        assert TASK not in text and "p1" not in text


async def test_register_on_unannounced_host_is_not_found() -> None:
    async with Harness() as h:
        call = h.stub.AnnouncePeer()
        await call.write(register("ghost", "p1"))
        assert await asyncio.wait_for(call.code(), DEADLINE) == grpc.StatusCode.NOT_FOUND
        assert h.metric("damselfly_scheduler_grpc_errors_total", method="AnnouncePeer", code="NOT_FOUND") == 1


@pytest.mark.parametrize(
    ("host", "code"),
    [
        (common_pb2.Host(id="", ip="10.0.0.1"), grpc.StatusCode.INVALID_ARGUMENT),  # InvalidRequest
        (common_pb2.Host(id="h", ip=""), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_bad_host_announcement_is_invalid_argument(host: common_pb2.Host, code: grpc.StatusCode) -> None:
    async with Harness() as h:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await h.stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host))
        assert refused.value.code() == code
        assert h.metric("damselfly_scheduler_grpc_errors_total", method="AnnounceHost", code=code.name) == 1


@pytest.mark.parametrize(
    ("method", "request_message"),
    [
        ("StatPeer", scheduler_pb2.StatPeerRequest(peer_id="nope")),
        ("DeletePeer", scheduler_pb2.DeletePeerRequest(peer_id="nope")),
        ("StatTask", scheduler_pb2.StatTaskRequest(task_id="nope")),
        ("DeleteTask", scheduler_pb2.DeleteTaskRequest(task_id="nope")),
    ],
)
async def test_unknown_ids_are_not_found(method: str, request_message: Any) -> None:
    async with Harness() as h:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await getattr(h.stub, method)(request_message)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert h.metric("damselfly_scheduler_grpc_errors_total", method=method, code="NOT_FOUND") == 1


async def test_seed_trigger_reaches_the_seed_with_request_headers() -> None:
    seed = FakeSeed()
    async with seeded(seed) as (h, _):
        host = await h.announce("node1", "10.0.0.1")
        call = h.stub.AnnouncePeer()
        await call.write(register(host, "p1"))
        request = await asyncio.wait_for(seed.requests.get(), DEADLINE)
        assert dict(request.download.request_header) == HEADERS
        assert request.download.need_back_to_source is True
        assert request.download.digest == "sha256:" + "1" * 64
        assert h.metric("damselfly_scheduler_schedule_decisions_total", kind="seed_trigger") == 1
        call.cancel()


def test_seed_trigger_carries_the_registered_download_through_the_one_conversion() -> None:
    registered = common_pb2.Download(
        url="https://registry.local/v2/x/blobs/sha256:" + "1" * 64, digest="sha256:" + "1" * 64, tag="t",
        application="app", priority=common_pb2.LEVEL3, filtered_query_params=["sig"], request_header=HEADERS,
        piece_length=8 << 20, disable_back_to_source=False, range=common_pb2.Range(start=10, length=20),
        prefetch=True, timeout=duration(30.0), output_path="/tmp/not-for-the-seed",
    )
    # what the core makes of it for a trigger: a back-to-source of the whole content, as a Range
    # read of nothing with prefetch (a blob read in Range reads is cut in small pieces)
    spec = dataclasses.replace(download_from_proto(registered), need_back_to_source=True, range_start=0,
                               range_length=0)
    sent = seed_download(spec).to_proto()
    assert DownloadRequest.from_proto(sent) == DownloadRequest(
        url=registered.url, digest=registered.digest, tag="t", application="app", priority=3,
        filtered_query_params=("sig",), request_header=HEADERS, piece_length=8 << 20, need_back_to_source=True,
        byte_range=(0, 0), prefetch=True,
    )
    assert (sent.range.start, sent.range.length) == (0, 0)
    assert not sent.HasField("timeout") and not sent.output_path


def test_a_lazy_read_triggers_a_seed_that_fetches_what_is_demanded() -> None:
    # A Range read without prefetch: the seed is asked for a Range of nothing, prefetch off (it
    # fetches the pieces children demand, in 1 MiB pieces), not for the whole content.
    registered = common_pb2.Download(url="https://registry.local/v2/x/blobs/sha256:" + "1" * 64,
                                     range=common_pb2.Range(start=10, length=20))
    spec = download_from_proto(registered)
    assert spec.lazy and spec.range_length == 20
    assert not download_from_proto(common_pb2.Download(url=registered.url)).lazy
    assert not download_from_proto(common_pb2.Download(url=registered.url, range=registered.range, prefetch=True)).lazy
    sent = seed_download(dataclasses.replace(spec, need_back_to_source=True, range_start=0, range_length=0)).to_proto()
    request = DownloadRequest.from_proto(sent)
    assert request.byte_range == (0, 0) and not request.prefetch and request.need_back_to_source
    assert request.covering_pieces(100 << 20, 1 << 20) == range(0)
    # with prefetch: the whole content, as a Range read (so in a lazily read blob's small pieces)
    spec = download_from_proto(common_pb2.Download(url=registered.url, range=registered.range, prefetch=True))
    request = DownloadRequest.from_proto(seed_download(spec).to_proto())
    assert request.byte_range == (0, 0) and request.prefetch


async def test_seed_trigger_for_a_url_no_dfdaemon_takes_is_not_sent() -> None:
    seed = FakeSeed()
    async with seeded(seed) as (h, _):
        host = await h.announce("node1", "10.0.0.1")
        call = h.stub.AnnouncePeer()
        await call.write(register(host, "p1", url="s3://bucket/blob"))
        await until(lambda: h.metric("damselfly_scheduler_grpc_errors_total", method="SeedTrigger",
                                     code="INVALID_ARGUMENT") == 1, "the trigger to be refused")
        assert seed.requests.empty()
        call.cancel()


async def test_failed_seed_trigger_sends_the_peer_back_to_source() -> None:
    seed = FakeSeed(fail=True)
    async with seeded(seed) as (h, address):
        host = await h.announce("node1", "10.0.0.1")
        call = h.stub.AnnouncePeer()
        await call.write(register(host, "p1"))
        answer = await asyncio.wait_for(call.read(), DEADLINE)
        assert answer.WhichOneof("response") == "need_back_to_source_response"
        assert address not in h.core.available_seeds()  # cooling down
        call.cancel()
        await until(lambda: h.core.stat_peer("p1").state == "Failed", "the closed stream to fail the peer")


def test_main_rejects_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--retry-interval", "soon"]) == 2
    assert "retry_interval" in capsys.readouterr().err


async def test_serve_answers_grpc_and_http_then_stops() -> None:
    import aiohttp

    from scheduler.server import serve

    grpc_port, http_port = free_port(), free_port()
    config = SchedulerConfig(listen=f"127.0.0.1:{grpc_port}", metrics_listen=f"127.0.0.1:{http_port}")
    server = asyncio.create_task(serve(config))
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{http_port}/ready") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            deadline = asyncio.get_running_loop().time() + DEADLINE
            while not await ready():
                assert not server.done(), server
                assert asyncio.get_running_loop().time() < deadline, "scheduler never became ready"
                await asyncio.sleep(0.02)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                host = common_pb2.Host(id="10.0.0.1-n", ip="10.0.0.1", hostname="n", port=4000)
                await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host))
            async with http.get(f"http://127.0.0.1:{http_port}/metrics") as response:
                assert "damselfly_scheduler_hosts 1.0" in await response.text()
            async with http.get(f"http://127.0.0.1:{http_port}/healthy") as response:
                assert response.status == 200
    finally:
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server
