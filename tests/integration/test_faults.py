"""The fault suite: real processes on loopback, faults injected, every result checked by sha256.

Each test prints one line of figures (``FIGURES <scenario>: ...``) that docs/reliability.md
collects; run ``.venv/bin/pytest tests/integration/test_faults.py -s -q | grep FIGURES``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path

import grpc
import pytest
from aiohttp import web
from dragonfly_api import common_pb2, scheduler_pb2, scheduler_pb2_grpc

from common import ids
from common.launcher import LocalCluster, Node, http_get, sha256_file, wait_until
from common.pieces import piece_length_for
from tests.support.cluster import run_dfget, start_dfget, start_network
from tests.support.registry import Registry, push_random_blob, write_random_file
from tests.support.relay import ByteCountingRelay

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIB = 1 << 20
UPLOAD = "damselfly_dfdaemon_upload_traffic_bytes_total"
FROM_PEERS = 'damselfly_dfdaemon_download_traffic_bytes_total{type="remote_peer"}'
FROM_ORIGIN = 'damselfly_dfdaemon_download_traffic_bytes_total{type="back_to_source"}'
SEEDS_AVAILABLE = "damselfly_scheduler_seed_hosts_available"
DIGEST_FAILURES = 'damselfly_dfdaemon_piece_failures_total{reason="digest"}'


def figures(scenario: str, **values: object) -> None:
    print(f"\nFIGURES {scenario}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


def content_path(node: Node, url: str) -> Path:
    task_id = ids.task_id(url)
    assert node.data_dir is not None
    return node.data_dir / "tasks" / task_id[:3] / task_id / "content"


def corrupt_every_piece(path: Path, size: int) -> None:
    """Flip one byte in each piece of a cached content file (pieces of the default length)."""
    with open(path, "r+b") as file:
        for offset in range(100, size, piece_length_for(size)):
            file.seek(offset)
            byte = file.read(1)
            file.seek(offset)
            file.write(bytes([byte[0] ^ 0x5A]))


def offered_parent_hosts(scheduler: Node, url: str) -> set[str]:
    """Register a probe peer on the scheduler (as a dfdaemon would) and return the hosts offered."""

    async def probe() -> set[str]:
        address = f"127.0.0.1:{scheduler.ports['grpc']}"
        async with grpc.aio.insecure_channel(address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            host = common_pb2.Host(id="127.0.0.1-probe", hostname="probe", ip="127.0.0.1", port=1,
                                   download_port=1, network=common_pb2.Network(max_tx_bandwidth=1))
            await stub.AnnounceHost(scheduler_pb2.AnnounceHostRequest(host=host), timeout=5)
            register = scheduler_pb2.AnnouncePeerRequest(
                host_id=host.id, task_id=ids.task_id(url), peer_id="127.0.0.1-probe-1",
                register_peer_request=scheduler_pb2.RegisterPeerRequest(download=common_pb2.Download(url=url)))
            call = stub.AnnouncePeer(iter([register]))
            response = await asyncio.wait_for(call.read(), 10)
            call.cancel()
            if response is grpc.aio.EOF or not response.HasField("normal_task_response"):
                return set()
            return {peer.host.id for peer in response.normal_task_response.candidate_parents}

    return asyncio.run(probe())


def wait_processes(processes: list[tuple[Node, subprocess.Popen[str]]], timeout: float = 300) -> None:
    for node, process in processes:
        _, stderr = process.communicate(timeout=timeout)
        assert process.returncode == 0, f"{node.name}: {stderr}"


# -- 1. dead parent ---------------------------------------------------------------------------


def test_dead_parent_children_finish_and_scheduler_stops_offering_it(
    cluster: LocalCluster, registry: Registry, tmp_path: Path
) -> None:
    size = 256 * MIB
    digest, _ = push_random_blob(registry, "faults/dead", size, seed=101)
    url = registry.blob_url("faults/dead", digest)
    _, (parent, *children) = start_network(cluster, ["parent", "c1", "c2", "c3", "c4"],
                                           "--upload-rate-limit", "96MiB")
    assert run_dfget(parent, url, tmp_path / "parent.blob").returncode == 0

    downloads = [(node, start_dfget(node, url, tmp_path / f"{node.name}.blob")) for node in children]
    wait_until(lambda: parent.metrics().get(UPLOAD, 0) >= 32 * MIB, 120, "children to fetch from the parent")
    served_before_kill = parent.metrics().get(UPLOAD, 0)
    killed_at = time.monotonic()
    cluster.kill(parent, signal.SIGKILL)
    wait_processes(downloads)
    recovery = time.monotonic() - killed_at

    for node in children:
        assert sha256_file(tmp_path / f"{node.name}.blob") == digest, node.name
    assert cluster.scheduler is not None
    offered = offered_parent_hosts(cluster.scheduler, url)
    assert offered, "the scheduler offers the live peers"
    assert "127.0.0.1-parent" not in offered
    # Only verified, complete pieces are counted: bytes of transfers cut by the kill are not.
    duplicate = sum(n.metrics().get(FROM_PEERS, 0) + n.metrics().get(FROM_ORIGIN, 0) for n in children) - 4 * size
    figures("dead-parent", blob_mib=size // MIB, parent_served_mib=round(served_before_kill / MIB),
            children_done_after_kill_s=round(recovery, 1), duplicate_piece_mib=round(duplicate / MIB, 1),
            offered_after=sorted(offered))


# -- 2 and 3. corrupted piece, lying parent ---------------------------------------------------


def test_lying_parent_is_caught_and_no_longer_offered(
    cluster: LocalCluster, registry: Registry, tmp_path: Path
) -> None:
    """A parent whose cache bytes were changed serves wrong bytes for pieces it claims.

    Demotion takes reports from two different hosts, so two children meet the liar. Each child
    runs after its predecessor left: the liar is then its only normal parent, and normal parents
    go before the seed, so its first pieces come from the liar — no chance involved.
    """
    size = 32 * MIB
    digest, _ = push_random_blob(registry, "faults/liar", size, seed=102)
    url = registry.blob_url("faults/liar", digest)
    _, (liar, *children) = start_network(cluster, ["liar", "c1", "c2"])
    assert run_dfget(liar, url, tmp_path / "liar.blob").returncode == 0
    corrupt_every_piece(content_path(liar, url), size)

    caught = 0
    for index, node in enumerate(children):
        if index:  # the child before leaves (its daemon deletes its host on the way out)
            cluster.kill(children[index - 1], signal.SIGTERM)
        result = run_dfget(node, url, tmp_path / f"{node.name}.blob")
        assert result.returncode == 0, result.stderr
        assert sha256_file(tmp_path / f"{node.name}.blob") == digest
        found = node.metrics().get(DIGEST_FAILURES, 0)
        assert found >= 1, f"{node.name} did not detect a wrong piece from the liar"
        caught += int(found)
    assert cluster.scheduler is not None
    assert "127.0.0.1-liar" not in offered_parent_hosts(cluster.scheduler, url)
    figures("lying-parent", children=len(children), wrong_pieces_detected=int(caught),
            wrong_bytes_delivered=0)


def test_corrupted_piece_is_found_by_the_parent_on_restart(
    cluster: LocalCluster, registry: Registry, tmp_path: Path
) -> None:
    size = 16 * MIB
    digest, _ = push_random_blob(registry, "faults/rot", size, seed=103)
    url = registry.blob_url("faults/rot", digest)
    _, (node,) = start_network(cluster, ["rotten"])
    assert run_dfget(node, url, tmp_path / "first.blob").returncode == 0
    task_id = ids.task_id(url)
    piece_url = node.url("upload", f"/pieces/{task_id}/1")
    assert http_get(piece_url)[0] == 200
    corrupt_every_piece(content_path(node, url), size)

    cluster.kill(node, signal.SIGTERM)
    started = time.monotonic()
    cluster.restart(node)
    cluster.wait_ready(node)
    wait_until(lambda: http_get(piece_url)[0] == 404, 30, "the scrub to drop the corrupt piece")
    detected = time.monotonic() - started
    # Asked again, the node fetches the pieces afresh and serves the right bytes.
    result = run_dfget(node, url, tmp_path / "again.blob")
    assert result.returncode == 0, result.stderr
    assert sha256_file(tmp_path / "again.blob") == digest
    assert http_get(piece_url)[0] == 200
    figures("corrupted-piece", detected_after_restart_s=round(detected, 1),
            refetched_mib=round(node.metrics().get(FROM_PEERS, 0) / MIB + node.metrics().get(FROM_ORIGIN, 0) / MIB))


# -- 4. seed down ------------------------------------------------------------------------------


def test_without_seed_peers_back_source_and_the_seed_is_used_when_back(
    cluster: LocalCluster, registry: Registry, registry_relay: ByteCountingRelay, tmp_path: Path
) -> None:
    size = 16 * MIB
    first, _ = push_random_blob(registry, "faults/noseed", size, seed=104)
    second, _ = push_random_blob(registry, "faults/noseed", size, seed=105)
    seed = cluster.plan_dfdaemon("seed", seed=True)
    scheduler = cluster.start_scheduler(seeds=[seed])  # the default 30 s cool-down: the announce ends it
    peer = cluster.start_dfdaemon("peer")
    cluster.wait_ready(scheduler, peer)

    url = f"{registry_relay.url}/v2/faults/noseed/blobs/{first}"
    started = time.monotonic()
    assert run_dfget(peer, url, tmp_path / "first.blob").returncode == 0
    without_seed = time.monotonic() - started
    assert sha256_file(tmp_path / "first.blob") == first
    assert peer.metrics().get(FROM_ORIGIN, 0) == size
    assert registry_relay.bytes_from_target <= 1.05 * size

    cluster.start_dfdaemon("seed", node=seed)
    cluster.wait_ready(seed)
    # The first trigger failed and cooled the seed down; its announce ends that. Wait until the
    # scheduler offers it again, not on the cool-down being shorter than a restart.
    wait_until(lambda: scheduler.metrics().get(SEEDS_AVAILABLE, 0) >= 1, 30, "the scheduler to see the seed")
    url = f"{registry_relay.url}/v2/faults/noseed/blobs/{second}"
    assert run_dfget(peer, url, tmp_path / "second.blob").returncode == 0
    assert sha256_file(tmp_path / "second.blob") == second
    assert seed.metrics().get(FROM_ORIGIN, 0) == size, "the returning seed back-sourced the new task"
    assert peer.metrics().get(FROM_PEERS, 0) == size, "the peer got the new task from the seed"
    figures("seed-down", first_download_without_seed_s=round(without_seed, 2),
            origin_mib_total=round(registry_relay.bytes_from_target / MIB, 1))


def test_seed_killed_mid_back_source_peers_fetch_the_rest_once(
    cluster: LocalCluster, registry: Registry, tmp_path: Path
) -> None:
    size = 32 * MIB
    digest, _ = push_random_blob(registry, "faults/seeddeath", size, seed=106)
    # The origin link is slow enough that the seed is still back-sourcing when it dies.
    with ByteCountingRelay("127.0.0.1", registry.port, rate=8 * MIB) as relay:
        seed, nodes = start_network(cluster, ["a", "b", "c"])
        url = f"{relay.url}/v2/faults/seeddeath/blobs/{digest}"
        downloads = [(node, start_dfget(node, url, tmp_path / f"{node.name}.blob")) for node in nodes]
        wait_until(lambda: seed.metrics().get(FROM_ORIGIN, 0) >= size // 4
                   and sum(n.metrics().get(FROM_PEERS, 0) for n in nodes) > 0, 60,
                   "the seed to back-source a quarter of the blob and pass some on")
        killed_at = time.monotonic()
        cluster.kill(seed, signal.SIGKILL)
        # Without a new fetcher the peers would wait for pieces no parent ever announces.
        wait_processes(downloads, timeout=120)
        recovery = time.monotonic() - killed_at
        origin = relay.bytes_from_target

    for node in nodes:
        assert sha256_file(tmp_path / f"{node.name}.blob") == digest, node.name
    fetched = {node.name: node.metrics().get(FROM_ORIGIN, 0) for node in nodes}
    # One peer fetched what was lost (nothing else may reach the origin: the only seed is dead),
    # and the origin sent the blob about once, not once per peer.
    assert sum(1 for value in fetched.values() if value) == 1, fetched
    assert origin <= 2 * size, f"{origin / MIB:.1f} MiB from the origin for a {size // MIB} MiB blob"
    figures("seed-killed", blob_mib=size // MIB, done_after_kill_s=round(recovery, 1),
            origin_mib=round(origin / MIB, 1), peer_from_origin_mib=round(max(fetched.values()) / MIB, 1))


# -- 5. scheduler down and restarted ----------------------------------------------------------


def test_scheduler_restart_in_flight_downloads_finish_and_new_ones_work(
    cluster: LocalCluster, registry: Registry, tmp_path: Path
) -> None:
    size = 96 * MIB
    first, _ = push_random_blob(registry, "faults/sched", size, seed=106)
    second, _ = push_random_blob(registry, "faults/sched", 8 * MIB, seed=107)
    _, daemons = start_network(cluster, ["p1", "p2"], "--upload-rate-limit", "24MiB")
    url = registry.blob_url("faults/sched", first)
    downloads = [(node, start_dfget(node, url, tmp_path / f"{node.name}.blob")) for node in daemons]
    wait_until(lambda: sum(n.metrics().get(FROM_PEERS, 0) for n in daemons) >= 16 * MIB, 120,
               "downloads to be under way")
    assert cluster.scheduler is not None
    cluster.kill(cluster.scheduler, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_processes(downloads)
    finished_after = time.monotonic() - killed_at
    for node in daemons:
        assert sha256_file(tmp_path / f"{node.name}.blob") == first
    # Without the scheduler, the seed parent's own digests (it back-sourced the task) keep P2P
    # going: only a few pieces in flight at the kill may fall back to the origin.
    fallback = sum(n.metrics().get(FROM_ORIGIN, 0) for n in daemons)
    assert fallback <= size // 4, f"{fallback / MIB:.0f} MiB fell back to the origin"

    cluster.restart(cluster.scheduler)
    cluster.wait_ready(cluster.scheduler)
    restarted_at = time.monotonic()
    url = registry.blob_url("faults/sched", second)
    result = run_dfget(daemons[1], url, tmp_path / "second.blob")
    assert result.returncode == 0, result.stderr
    assert sha256_file(tmp_path / "second.blob") == second
    figures("scheduler-restart", in_flight_finished_after_kill_s=round(finished_after, 1),
            origin_fallback_mib=round(fallback / MIB, 1),
            new_download_after_restart_s=round(time.monotonic() - restarted_at, 2))


# -- 6. flaky origin ---------------------------------------------------------------------------


@dataclass
class FlakyOrigin:
    """An HTTP origin with Range support that fails each range a set number of times first."""

    path: Path
    faults: list[str]  # per attempt of one range: "500", "reset", "stall", then success
    port: int = 0
    attempts: dict[str, int] = field(default_factory=dict)
    served_ok: int = 0
    handlers: set[asyncio.Task[object]] = field(default_factory=set)  # requests in progress

    async def handle(self, request: web.Request) -> web.StreamResponse:
        handler = asyncio.current_task()
        assert handler is not None
        self.handlers.add(handler)
        try:
            return await self._answer(request)
        finally:
            self.handlers.discard(handler)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        size = self.path.stat().st_size
        key = request.headers.get("Range", "all")
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(size), "Accept-Ranges": "bytes"})
        attempt = self.attempts.get(key, 0)
        self.attempts[key] = attempt + 1
        fault = self.faults[attempt] if attempt < len(self.faults) else ""
        if fault == "500":
            return web.Response(status=500, text="origin hiccup")
        start, end = 0, size - 1
        if key.startswith("bytes="):
            first, _, last = key[6:].partition("-")
            start, end = int(first), min(int(last), size - 1)
        body = await asyncio.to_thread(_read_span, self.path, start, end - start + 1)
        response = web.StreamResponse(status=206 if key != "all" else 200, headers={
            "Content-Length": str(len(body)), "Content-Range": f"bytes {start}-{end}/{size}"})
        await response.prepare(request)
        if fault in ("reset", "stall"):
            await response.write(body[: len(body) // 2])
            if fault == "stall":
                await asyncio.sleep(3600)  # the client's read timeout must fire
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write(body)
        self.served_ok += 1
        return response


def _read_span(path: Path, start: int, length: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(start)
        return file.read(length)


@pytest.fixture
def flaky_origin(tmp_path: Path) -> Iterator[FlakyOrigin]:
    path = tmp_path / "origin.bin"
    write_random_file(path, 20 * MIB, seed=108)
    origin = FlakyOrigin(path, [])
    runner = asyncio.Runner()
    loop = runner.get_loop()
    ready = threading.Event()
    stop = asyncio.Event()

    async def serve() -> None:
        app = web.Application()
        app.router.add_route("*", "/{name}", origin.handle)
        app_runner = web.AppRunner(app)
        await app_runner.setup()
        await web.TCPSite(app_runner, "127.0.0.1", 0).start()
        origin.port = app_runner.addresses[0][1]
        ready.set()
        try:
            await stop.wait()
        finally:
            # aiohttp's shutdown neither cancels nor tracks a handler whose client already left
            # (a stalled one sleeps for an hour): cancel them here, and let the Runner close the
            # loop, so no pending task is left for the garbage collector to report during later
            # tests ("Task was destroyed but it is pending!").
            for handler in list(origin.handlers):
                handler.cancel()
            await asyncio.gather(*origin.handlers, return_exceptions=True)
            await app_runner.cleanup()

    def run() -> None:
        with runner:
            runner.run(serve())

    thread = threading.Thread(target=run, name="flaky-origin", daemon=True)
    thread.start()
    assert ready.wait(10), "the flaky origin did not start"
    try:
        yield origin
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        assert not thread.is_alive(), "the flaky origin did not stop"


def test_flaky_origin_is_retried_and_a_dead_one_fails_cleanly(
    cluster: LocalCluster, flaky_origin: FlakyOrigin, tmp_path: Path
) -> None:
    scheduler = cluster.start_scheduler()  # no seed: the peer back-sources itself
    peer = cluster.start_dfdaemon("peer", "--origin-read-timeout", "1s")
    cluster.wait_ready(scheduler, peer)
    expected = sha256_file(flaky_origin.path)

    flaky_origin.faults = ["500", "reset"]  # each range fails twice, the third try works
    started = time.monotonic()
    result = run_dfget(peer, f"http://127.0.0.1:{flaky_origin.port}/retried.bin", tmp_path / "retried.bin")
    assert result.returncode == 0, result.stderr
    assert sha256_file(tmp_path / "retried.bin") == expected
    retried = time.monotonic() - started
    attempts = sum(flaky_origin.attempts.values())

    flaky_origin.attempts.clear()
    flaky_origin.faults = ["stall"]
    result = run_dfget(peer, f"http://127.0.0.1:{flaky_origin.port}/stalled.bin", tmp_path / "stalled.bin")
    assert result.returncode == 0, result.stderr
    assert sha256_file(tmp_path / "stalled.bin") == expected

    flaky_origin.attempts.clear()
    flaky_origin.faults = ["500"] * 10
    dead_url = f"http://127.0.0.1:{flaky_origin.port}/dead.bin"
    result = run_dfget(peer, dead_url, tmp_path / "dead.bin")
    assert result.returncode != 0
    assert "500" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "dead.bin").exists()
    # Nothing half-written is served: no piece of the failed task is offered to peers.
    task_id = ids.task_id(dead_url)
    assert all(http_get(peer.url("upload", f"/pieces/{task_id}/{n}"))[0] == 404 for n in range(5))
    figures("flaky-origin", retried_download_s=round(retried, 2), origin_attempts=attempts,
            pieces=5, dead_origin_exit=result.returncode)


# -- 7. dfdaemon killed and restarted mid-download -------------------------------------------


def test_dfdaemon_killed_mid_download_resumes_with_its_pieces(
    cluster: LocalCluster, registry: Registry, tmp_path: Path
) -> None:
    size = 128 * MIB
    digest, _ = push_random_blob(registry, "faults/restart", size, seed=109)
    url = registry.blob_url("faults/restart", digest)
    _, (peer,) = start_network(cluster, ["peer"], seed_extra=("--upload-rate-limit", "32MiB"))
    first = start_dfget(peer, url, tmp_path / "first.blob")
    wait_until(lambda: peer.metrics().get(FROM_PEERS, 0) >= 48 * MIB, 120, "the download to be half done")
    cluster.kill(peer, signal.SIGKILL)
    first.communicate(timeout=60)
    assert first.returncode != 0
    assert not (tmp_path / "first.blob").exists()

    cluster.restart(peer)
    cluster.wait_ready(peer)
    started = time.monotonic()
    result = run_dfget(peer, url, tmp_path / "second.blob")
    assert result.returncode == 0, result.stderr
    assert sha256_file(tmp_path / "second.blob") == digest
    fetched_after_restart = peer.metrics().get(FROM_PEERS, 0) + peer.metrics().get(FROM_ORIGIN, 0)
    assert fetched_after_restart <= size - 40 * MIB, "the pieces completed before the kill were kept"
    figures("dfdaemon-restart", blob_mib=size // MIB,
            fetched_after_restart_mib=round(fetched_after_restart / MIB),
            resumed_download_s=round(time.monotonic() - started, 2))


# -- 9. load -----------------------------------------------------------------------------------


def _rss_and_fds(pid: int) -> tuple[int, int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    values = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith("Vm")}
    return int(values["VmRSS"]) * 1024, int(values["VmHWM"]) * 1024, len(os.listdir(f"/proc/{pid}/fd"))


def test_load_64_clients_range_reads(cluster: LocalCluster, registry: Registry) -> None:
    size = 64 * MIB
    digest, path = push_random_blob(registry, "faults/load", size, seed=110)
    blob = path.read_bytes()
    _, (node,) = start_network(cluster, ["loaded"])
    assert node.process is not None
    blob_path = f"/v2/faults/load/blobs/{digest}"
    headers = {"X-Dragonfly-Registry": registry.url}
    warm = HTTPConnection("127.0.0.1", node.ports["proxy"], timeout=60)
    warm.request("GET", blob_path, headers=headers)
    assert warm.getresponse().read() == blob
    warm.close()
    _, _, fds_before = _rss_and_fds(node.process.pid)

    duration = float(os.environ.get("DAMSELFLY_LOAD_SECONDS", "60"))
    deadline = time.monotonic() + duration
    errors: list[str] = []
    reads = [0] * 64

    def client(index: int) -> None:
        rng = random.Random(index)
        connection = HTTPConnection("127.0.0.1", node.ports["proxy"], timeout=30)
        try:
            while time.monotonic() < deadline and not errors:
                start = rng.randrange(0, size - MIB)
                connection.request("GET", blob_path, headers={**headers, "Range": f"bytes={start}-{start + MIB - 1}"})
                response = connection.getresponse()
                body = response.read()
                if response.status != 206 or body != blob[start:start + MIB]:
                    errors.append(f"client {index}: status {response.status}, {len(body)} bytes at {start}")
                reads[index] += 1
        except OSError as exc:
            errors.append(f"client {index}: {exc}")
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration + 60)
    assert not errors, errors[:5]
    _, peak_rss, fds_during = _rss_and_fds(node.process.pid)
    wait_until(lambda: _rss_and_fds(node.process.pid)[2] <= fds_before + 2, 30,  # type: ignore[union-attr]
               "connections to be closed")
    _, _, fds_after = _rss_and_fds(node.process.pid)
    assert peak_rss < 512 * MIB, f"peak RSS {peak_rss / MIB:.0f} MiB"
    figures("load", clients=64, seconds=duration, reads=sum(reads), mib_per_s=round(sum(reads) / duration, 1),
            errors=0, peak_rss_mib=round(peak_rss / MIB), fds_before=fds_before, fds_at_end=fds_during,
            fds_after=fds_after)
