"""The scheduler's PreheatFile over real grpc.aio servers on 127.0.0.1 (the scheduler and fake seeds)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from dragonfly_api import dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from common import hashring, ids
from common.clock import SystemClock
from common.config import SchedulerConfig
from common.launcher import free_port
from common.preheat import RESULT_KEY, SEED_KEY
from scheduler.core import SchedulerCore
from scheduler.preheat import PreheatingSchedulerService

HEADERS = {"Authorization": "Basic dXNlcjpwYXNz"}
CACHED = "1" * 64  # blobs whose digest starts so are already on the fake seeds
MISSING = "4" * 64  # the origin has no such blob
BROKEN = "8" * 64  # the seed fails with INTERNAL


def blob_url(hex_digest: str) -> str:
    return f"http://registry.local:5000/v2/team/app/blobs/sha256:{hex_digest}"


class FakeSeed(dfdaemon_pb2_grpc.DfdaemonUploadServicer):  # type: ignore[misc]
    """Answers DownloadTask as a dfdaemon does: started (finished when cached), then done."""

    def __init__(self) -> None:
        self.requests: list[dfdaemon_pb2.DownloadTaskRequest] = []

    async def DownloadTask(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.requests.append(request)
        if request.download.url.endswith(MISSING):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"origin answered 404 for {request.download.url}: Not Found")
        if request.download.url.endswith(BROKEN):
            await context.abort(grpc.StatusCode.INTERNAL, "disk on fire")
        started = dfdaemon_pb2.DownloadTaskStartedResponse(content_length=10,
                                                           is_finished=CACHED in request.download.url)
        yield dfdaemon_pb2.DownloadTaskResponse(download_task_started_response=started)


@contextlib.asynccontextmanager
async def scheduler_with(seed_addresses: list[str]) -> AsyncIterator[tuple[PreheatingSchedulerService, Any]]:
    core = SchedulerCore(SchedulerConfig(seed_peer=tuple(seed_addresses)), SystemClock())
    service = PreheatingSchedulerService(core)
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield service, scheduler_pb2_grpc.SchedulerStub(channel)
    finally:
        await channel.close()
        await server.stop(None)
        await service.close()


@contextlib.asynccontextmanager
async def fake_seeds(count: int) -> AsyncIterator[list[tuple[FakeSeed, str]]]:
    servers, seeds = [], []
    for _ in range(count):
        seed, server = FakeSeed(), grpc.aio.server()
        dfdaemon_pb2_grpc.add_DfdaemonUploadServicer_to_server(seed, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        seeds.append((seed, f"127.0.0.1:{port}"))
    try:
        yield seeds
    finally:
        for server in servers:
            await server.stop(None)


async def preheat_file(stub: Any, url: str, **fields: Any) -> dict[str, str]:
    call = stub.PreheatFile(scheduler_pb2.PreheatFileRequest(url=url, header=HEADERS, **fields), timeout=10)
    await call
    return dict(await call.trailing_metadata() or ())


async def test_each_blob_goes_to_the_seed_owning_its_task() -> None:
    async with fake_seeds(2) as seeds, scheduler_with([a for _, a in seeds]) as (_, stub):
        addresses = [address for _, address in seeds]
        for hex_digest in ("2" * 64, "3" * 64, "5" * 64, "6" * 64, CACHED):
            url = blob_url(hex_digest)
            metadata = await preheat_file(stub, url)
            owner = hashring.choose(addresses, ids.task_id(url))
            assert metadata[SEED_KEY] == owner
            assert metadata[RESULT_KEY] == ("cached" if hex_digest == CACHED else "fetched")
            seed = next(seed for seed, address in seeds if address == owner)
            request = seed.requests[-1].download
            assert (request.url, dict(request.request_header)) == (url, HEADERS), "credentials reach the seed"
            assert not request.need_back_to_source, "a blob another peer holds may come over P2P"
        assert sum(len(seed.requests) for seed, _ in seeds) == 5


async def test_a_seed_that_is_down_is_cooled_down_and_the_next_one_asked() -> None:
    async with fake_seeds(1) as seeds:
        (seed, live), dead = seeds[0], f"127.0.0.1:{free_port()}"
        # a blob whose task the dead seed owns
        url = next(blob_url(f"{n:064x}") for n in range(1000)
                   if hashring.rank([live, dead], ids.task_id(blob_url(f"{n:064x}")))[0] == dead)
        async with scheduler_with([dead, live]) as (service, stub):
            metadata = await preheat_file(stub, url)
            assert metadata[SEED_KEY] == live and len(seed.requests) == 1
            assert service.core.available_seeds() == [live], "the dead seed cools down like after a trigger"


async def test_a_seed_failure_names_the_seed_and_the_blob() -> None:
    async with fake_seeds(1) as seeds, scheduler_with([seeds[0][1]]) as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await preheat_file(stub, blob_url(MISSING))
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = failed.value.details() or ""
    assert details.startswith(f"seed {seeds[0][1]}: origin answered 404 for {blob_url(MISSING)}"), details


async def test_any_other_seed_failure_is_the_preheat_failing_not_the_scheduler_down() -> None:
    async with fake_seeds(1) as seeds, scheduler_with([seeds[0][1]]) as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await preheat_file(stub, blob_url(BROKEN))
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert failed.value.details() == f"seed {seeds[0][1]}: disk on fire"


@pytest.mark.parametrize(("seeds", "fields", "code", "message"), [
    ([], {}, grpc.StatusCode.FAILED_PRECONDITION, "no seed peer is available"),
    ([f"127.0.0.1:{free_port()}"], {}, grpc.StatusCode.FAILED_PRECONDITION, "every seed peer is down"),
    (["127.0.0.1:1"], {"scope": "all_peers"}, grpc.StatusCode.INVALID_ARGUMENT, "scope 'all_peers'"),
])
async def test_refusals(seeds: list[str], fields: dict[str, Any], code: grpc.StatusCode, message: str) -> None:
    async with scheduler_with(seeds) as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await preheat_file(stub, blob_url("7" * 64), **fields)
    assert refused.value.code() == code
    assert message in (refused.value.details() or "")
