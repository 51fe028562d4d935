"""Attacks on the scheduler by a hostile cluster member (issue 12), each shown refused.

A real scheduler, seed and dfdaemons run with mutual TLS (certificates of one test CA, roles in
their CNs: ``scheduler.damselfly``, ``seed.damselfly``, per-node ``<name>.peer.damselfly``). The
attacker is a script on the ``dragonfly-api`` stubs holding a valid shared ``peer.damselfly``
certificate: everything a rogue node of the cluster has. It tries what issue 12 reports worked:

- announce itself as a seed and wait for a trigger carrying a client's credentials;
- register a download it asked to back-source itself and report digests of its own bytes;
- speak for another peer on its own stream, or open a stream with another peer's message;
- overwrite a node's host record, delete the seed's, list the cluster's hosts;
- demote the task's parents with failure reports;
- register with a 1-byte piece length, report a piece beyond any sane count;
- open more AnnouncePeer streams than a client may hold.

Honest downloads afterwards must still be byte-exact (sha256) and come from the peers. The
plaintext variant of the seed attack shows the rule without identities: seeds are the
``--seed-peer`` addresses, and admin calls come from loopback.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from google.protobuf import empty_pb2

from common import ids
from common.digest import piece_digest
from common.launcher import LocalCluster, Node, free_port, sha256_file, tail
from common.pieces import piece_length_for
from tests.support.certs import Issued, TestCA
from tests.support.cluster import run_dfget
from tests.support.registry import Registry, push_random_blob

pytestmark = pytest.mark.integration

MIB = 1 << 20
RPC_TIMEOUT = 10.0
FROM_PEERS = 'damselfly_dfdaemon_download_traffic_bytes_total{type="remote_peer"}'
FROM_ORIGIN = 'damselfly_dfdaemon_download_traffic_bytes_total{type="back_to_source"}'
ATTACKER_HOST = "evil-host"
STREAM_LIMIT = 8  # --max-streams-per-client of the scheduler under attack


def tls_args(ca: TestCA, issued: Issued) -> list[str]:
    return ["--tls-ca-cert", str(ca.cert_path), "--tls-cert", str(issued.cert), "--tls-key", str(issued.key)]


class Attacker:
    """A client of the scheduler's gRPC API, with a certificate (mutual TLS) or without (plaintext)."""

    def __init__(self, port: int, ca: TestCA | None = None, issued: Issued | None = None) -> None:
        self.target = f"127.0.0.1:{port}"
        self.credentials = None if ca is None or issued is None else grpc.ssl_channel_credentials(
            ca.cert_path.read_bytes(), issued.key.read_bytes(), issued.cert.read_bytes())

    def channel(self) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.target)
        return grpc.aio.secure_channel(self.target, self.credentials)

    def unary(self, method: str, request: object) -> object:
        """Call `method`; its answer, or the status code it failed with."""

        async def go() -> object:
            async with self.channel() as channel:
                try:
                    rpc = getattr(scheduler_pb2_grpc.SchedulerStub(channel), method)
                    return await rpc(request, timeout=RPC_TIMEOUT)
                except grpc.aio.AioRpcError as exc:
                    return exc.code()

        return asyncio.run(go())

    def announce(self, host_id: str, *, port: int, seed: bool = False, hostname: str = ATTACKER_HOST,
                 ip: str = "127.0.0.1") -> object:
        host = common_pb2.Host(id=host_id, type=1 if seed else 0, hostname=hostname, ip=ip, port=port,
                               download_port=port)
        return self.unary("AnnounceHost", scheduler_pb2.AnnounceHostRequest(host=host))

    def stream(self, messages: list[scheduler_pb2.AnnouncePeerRequest]
               ) -> tuple[grpc.StatusCode, list[scheduler_pb2.AnnouncePeerResponse]]:
        """Send `messages` on one AnnouncePeer stream and close our side: the scheduler handles
        them in order and ends the stream. Its status code and the answers it sent."""

        async def go() -> tuple[grpc.StatusCode, list[scheduler_pb2.AnnouncePeerResponse]]:
            async with self.channel() as channel:
                call = scheduler_pb2_grpc.SchedulerStub(channel).AnnouncePeer(timeout=RPC_TIMEOUT * 3)
                received: list[scheduler_pb2.AnnouncePeerResponse] = []
                try:
                    for request in messages:
                        await call.write(request)
                    await call.done_writing()
                    while (answer := await call.read()) is not grpc.aio.EOF:
                        received.append(answer)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):  # it ended the stream first
                    pass
                return await call.code(), received

        return asyncio.run(go())

    def hold(self, messages: list[scheduler_pb2.AnnouncePeerRequest], release: threading.Event,
             answered: threading.Event) -> None:
        """Keep a stream open (a peer waiting for its download) until `release` is set."""

        async def go() -> None:
            async with self.channel() as channel:
                call = scheduler_pb2_grpc.SchedulerStub(channel).AnnouncePeer(timeout=RPC_TIMEOUT * 6)
                for request in messages:
                    await call.write(request)
                await call.read()
                answered.set()
                await asyncio.get_running_loop().run_in_executor(None, release.wait, RPC_TIMEOUT * 5)
                call.cancel()

        asyncio.run(go())


def register(task_id: str, peer_id: str, url: str, host_id: str = ATTACKER_HOST, **download: Any
             ) -> scheduler_pb2.AnnouncePeerRequest:
    return scheduler_pb2.AnnouncePeerRequest(
        host_id=host_id, task_id=task_id, peer_id=peer_id,
        register_peer_request=scheduler_pb2.RegisterPeerRequest(download=common_pb2.Download(url=url, **download)))


def message(task_id: str, peer_id: str, **kind: Any) -> scheduler_pb2.AnnouncePeerRequest:
    return scheduler_pb2.AnnouncePeerRequest(host_id=ATTACKER_HOST, task_id=task_id, peer_id=peer_id, **kind)


def blob_piece_digests(path: Path) -> list[str]:
    size = path.stat().st_size
    length = piece_length_for(size)
    with path.open("rb") as file:
        return [piece_digest(file.read(length)) for _ in range(-(-size // length))]


# --------------------------------------------------------------------------------------------
# A seed the scheduler did not choose


class TriggerRecorder(dfdaemon_pb2_grpc.DfdaemonUploadServicer):  # type: ignore[misc]
    """A fake seed's DfdaemonUpload: records every DownloadTask (and its headers) it is sent."""

    def __init__(self) -> None:
        self.triggers: list[dfdaemon_pb2.DownloadTaskRequest] = []

    async def DownloadTask(self, request: dfdaemon_pb2.DownloadTaskRequest, context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[dfdaemon_pb2.DownloadTaskResponse]:
        self.triggers.append(request)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the attacker keeps the credentials")
        yield dfdaemon_pb2.DownloadTaskResponse()  # pragma: no cover - unreachable


class FakeSeed:
    """The attacker's gRPC server on a loopback port, in a thread with its own event loop."""

    def __init__(self, server_credentials: grpc.ServerCredentials | None) -> None:
        self.recorder = TriggerRecorder()
        self.port = free_port()
        self._credentials = server_credentials
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop: asyncio.Event | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        server = grpc.aio.server()
        dfdaemon_pb2_grpc.add_DfdaemonUploadServicer_to_server(self.recorder, server)
        address = f"127.0.0.1:{self.port}"
        if self._credentials is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, self._credentials)
        await server.start()
        self._stop = asyncio.Event()
        self._started.set()
        await self._stop.wait()
        await server.stop(None)

    def __enter__(self) -> FakeSeed:
        self._thread.start()
        assert self._started.wait(10), "the fake seed did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.mark.parametrize("mode", ["mtls", "plaintext"])
def test_a_client_announcing_itself_as_a_seed_gets_no_trigger_and_no_credentials(
    mode: str, cluster: LocalCluster, auth_registry: Registry, tmp_path: Path
) -> None:
    """No seed configured: without the fix the attacker would be the only seed, and the trigger
    of the honest download (with its Authorization header) would go to it."""
    ca = TestCA(tmp_path / "pki") if mode == "mtls" else None
    digest, blob_path = push_random_blob(auth_registry, f"security/fake-seed-{mode}", 6 * MIB, seed=31)
    url = auth_registry.blob_url(f"security/fake-seed-{mode}", digest)
    server_args = [] if ca is None else tls_args(ca, ca.issue("scheduler", common_name="scheduler.damselfly"))
    scheduler = cluster.start_scheduler(*server_args)
    node_args = [] if ca is None else tls_args(ca, ca.issue("node1", common_name="node1.peer.damselfly"))
    node = cluster.start_dfdaemon("node1", *node_args)
    cluster.wait_ready(scheduler, node)

    evil_cert = None if ca is None else ca.issue("evil", common_name="peer.damselfly")
    attacker = Attacker(scheduler.ports["grpc"], ca, evil_cert)
    server_credentials = None if ca is None or evil_cert is None else grpc.ssl_server_credentials(
        [(evil_cert.key.read_bytes(), evil_cert.cert.read_bytes())])
    with FakeSeed(server_credentials) as fake:
        answer = attacker.announce("evil-seed", port=fake.port, seed=True)
        assert answer == grpc.StatusCode.PERMISSION_DENIED, answer

        output = tmp_path / "blob"
        result = run_dfget(node, url, output, "--header", f"Authorization: {auth_registry.basic_auth()}")
        assert result.returncode == 0, result.stderr
        assert sha256_file(output) == digest
        assert fake.recorder.triggers == [], "a trigger (with the client's credentials) reached the attacker"
    assert node.metrics().get(FROM_ORIGIN, 0) == blob_path.stat().st_size  # no seed: it fetched itself

    # ListHosts: admins only. With TLS a peer certificate is refused; in plaintext there is no
    # identity, and loopback (where the attacker is too) is the admin.
    hosts = attacker.unary("ListHosts", scheduler_pb2.ListHostsRequest())
    if mode == "mtls":
        assert hosts == grpc.StatusCode.PERMISSION_DENIED, hosts
    else:
        assert isinstance(hosts, scheduler_pb2.ListHostsResponse)
        assert [h.hostname for h in hosts.hosts] == ["node1"]  # the seed it tried to be is not there


# --------------------------------------------------------------------------------------------
# A rogue member against a cluster with a seed (one cluster for the module: each test its own blob)


@dataclass
class MtlsCluster:
    cluster: LocalCluster
    registry: Registry
    scheduler: Node
    seed: Node
    node1: Node
    node2: Node
    attacker: Attacker  # peer.damselfly: a shared certificate any node of the cluster could hold
    admin: Attacker  # admin.damselfly
    ca: TestCA

    def blob(self, name: str, seed: int, size: int = 12 * MIB) -> tuple[str, Path, str, str]:
        """Push a blob; its digest, file, URL and task id."""
        digest, path = push_random_blob(self.registry, f"security/{name}", size, seed=seed)
        url = self.registry.blob_url(f"security/{name}", digest)
        return digest, path, url, ids.task_id(url)

    def stat_task(self, task_id: str) -> common_pb2.Task:
        task = self.admin.unary("StatTask", scheduler_pb2.StatTaskRequest(task_id=task_id))
        assert isinstance(task, common_pb2.Task), task
        return task

    def download(self, node: Node, url: str, digest: str, output: Path) -> None:
        result = run_dfget(node, url, output)
        assert result.returncode == 0, result.stderr
        assert sha256_file(output) == digest


@pytest.fixture(scope="module")
def mtls(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MtlsCluster]:
    root = tmp_path_factory.mktemp("security-scheduler")
    ca = TestCA(root / "pki")
    cluster = LocalCluster(root / "cluster")
    try:
        seed = cluster.plan_dfdaemon("seed", seed=True)
        scheduler = cluster.start_scheduler(
            *tls_args(ca, ca.issue("scheduler", common_name="scheduler.damselfly")),
            "--max-streams-per-client", str(STREAM_LIMIT), seeds=[seed])
        cluster.start_dfdaemon("seed", *tls_args(ca, ca.issue("seed", common_name="seed.damselfly")), node=seed)
        node1, node2 = (cluster.start_dfdaemon(
            name, *tls_args(ca, ca.issue(name, common_name=f"{name}.peer.damselfly")))
                        for name in ("node1", "node2"))
        cluster.wait_ready(scheduler, seed, node1, node2)
        port = scheduler.ports["grpc"]
        attacker = Attacker(port, ca, ca.issue("evil", common_name="peer.damselfly"))
        assert attacker.announce(ATTACKER_HOST, port=free_port()) == empty_pb2.Empty()
        yield MtlsCluster(cluster, registry, scheduler, seed, node1, node2, attacker,
                          Attacker(port, ca, ca.issue("ops", common_name="admin.damselfly")), ca)
        assert all(node.alive for node in cluster.nodes), "an attack crashed a node"
    except BaseException:
        for node in cluster.nodes:
            print(f"\n----- {node.name} ({node.log_path}) -----\n{tail(node.log_path, 40)}")
        raise
    finally:
        cluster.stop()


def test_a_peer_nobody_sent_to_the_origin_cannot_define_piece_digests(mtls: MtlsCluster, tmp_path: Path) -> None:
    """It asks to back-source itself, reports digests of its own bytes and success: none of it
    defines the task; the seed's fetch does, and a node gets the origin's bytes."""
    digest, path, url, task_id = mtls.blob("digests", seed=32)
    size = path.stat().st_size
    length = piece_length_for(size)
    forged = [piece_digest(bytes([n]) * length) for n in range(-(-size // length))]
    reports = [message(task_id, "evil-source", download_piece_back_to_source_finished_request=(
        scheduler_pb2.DownloadPieceBackToSourceFinishedRequest(piece=common_pb2.Piece(
            number=n, offset=n * length, length=min(length, size - n * length), digest=forged[n],
            traffic_type=common_pb2.BACK_TO_SOURCE))))
        for n in range(len(forged))]
    code, answers = mtls.attacker.stream([
        register(task_id, "evil-source", url, need_back_to_source=True),
        message(task_id, "evil-source", download_peer_back_to_source_started_request=(
            scheduler_pb2.DownloadPeerBackToSourceStartedRequest())),
        *reports,
        message(task_id, "evil-source", download_peer_back_to_source_finished_request=(
            scheduler_pb2.DownloadPeerBackToSourceFinishedRequest())),
    ])
    assert answers and answers[0].HasField("need_back_to_source_response"), (code, answers)
    assert not {p.digest for p in mtls.stat_task(task_id).pieces} & set(forged), "the attacker's digests define it"

    mtls.download(mtls.node1, url, digest, tmp_path / "blob")
    assert [p.digest for p in mtls.stat_task(task_id).pieces] == blob_piece_digests(path)  # the seed's


def test_a_stream_speaks_only_for_the_peer_it_registered(mtls: MtlsCluster) -> None:
    """A spoofed failure of another peer, on the attacker's own stream or as the first message of
    a fresh one, and a registration taking the victim's peer id over: all refused, the victim intact."""
    _, _, url, task_id = mtls.blob("streams", seed=33, size=1 * MIB)
    victim_cert = mtls.ca.issue("victim", common_name="victim.peer.damselfly")
    victim = Attacker(mtls.scheduler.ports["grpc"], mtls.ca, victim_cert)
    assert victim.announce("victim-host", port=free_port(), hostname="victim") == empty_pb2.Empty()

    def victim_state() -> str:
        peer = mtls.admin.unary("StatPeer", scheduler_pb2.StatPeerRequest(task_id=task_id, peer_id="victim-peer"))
        assert isinstance(peer, common_pb2.Peer), peer
        return peer.state

    spoofed_failure = message(task_id, "victim-peer", download_peer_failed_request=(
        scheduler_pb2.DownloadPeerFailedRequest(description="spoofed")))
    release, answered = threading.Event(), threading.Event()
    holder = threading.Thread(target=victim.hold, args=(
        [register(task_id, "victim-peer", url, host_id="victim-host")], release, answered))
    holder.start()
    try:
        assert answered.wait(RPC_TIMEOUT), "the victim was not scheduled"
        before = victim_state()
        code, _ = mtls.attacker.stream([register(task_id, "evil-2", url), spoofed_failure])
        assert code == grpc.StatusCode.PERMISSION_DENIED, code
        code, _ = mtls.attacker.stream([spoofed_failure])
        assert code == grpc.StatusCode.PERMISSION_DENIED, code
        code, _ = mtls.attacker.stream([register(task_id, "victim-peer", url)])  # take its id over
        assert code == grpc.StatusCode.PERMISSION_DENIED, code
        assert victim_state() == before != "Failed"
    finally:
        release.set()
        holder.join(RPC_TIMEOUT)


def test_host_records_are_their_owners_and_admin_calls_need_the_admin_role(mtls: MtlsCluster) -> None:
    """Overwrite a node's host record, register on it, delete the seed's, list the cluster's, delete
    a task: all refused for a peer certificate; the admin still sees the records unchanged."""
    _, _, url, task_id = mtls.blob("hosts", seed=34, size=1 * MIB)
    attacker = mtls.attacker
    hosts = mtls.admin.unary("ListHosts", scheduler_pb2.ListHostsRequest())
    assert isinstance(hosts, scheduler_pb2.ListHostsResponse), hosts
    by_name = {h.hostname: h for h in hosts.hosts}
    node1_host, seed_host = by_name["node1"], by_name["seed"]
    answer = attacker.announce(node1_host.id, port=free_port(), hostname="node1", ip="127.0.0.2")
    assert answer == grpc.StatusCode.PERMISSION_DENIED, answer
    code, _ = attacker.stream([register(task_id, "evil-3", url, host_id=node1_host.id)])
    assert code == grpc.StatusCode.PERMISSION_DENIED, code
    for method, request in [("DeleteHost", scheduler_pb2.DeleteHostRequest(host_id=seed_host.id)),
                            ("ListHosts", scheduler_pb2.ListHostsRequest()),
                            ("DeleteTask", scheduler_pb2.DeleteTaskRequest(task_id=task_id))]:
        assert attacker.unary(method, request) == grpc.StatusCode.PERMISSION_DENIED, method
    hosts = mtls.admin.unary("ListHosts", scheduler_pb2.ListHostsRequest())
    assert isinstance(hosts, scheduler_pb2.ListHostsResponse), hosts
    after = {h.hostname: h for h in hosts.hosts}
    assert after["node1"] == node1_host and after["seed"] == seed_host


def test_failure_reports_of_one_identity_do_not_demote_parents(mtls: MtlsCluster, tmp_path: Path) -> None:
    """The attacker reports every parent it is offered as failed, from several peers of its own:
    the parents stay available, and the next node gets the blob from peers only."""
    digest, path, url, task_id = mtls.blob("demote", seed=35)
    mtls.download(mtls.node1, url, digest, tmp_path / "node1.blob")  # the seed and node1 hold it
    for attempt in range(4):
        peer_id = f"evil-demoter-{attempt}"
        _, answers = mtls.attacker.stream([register(task_id, peer_id, url)])
        parents = [p.id for a in answers if a.HasField("normal_task_response")
                   for p in a.normal_task_response.candidate_parents]
        assert parents, f"attempt {attempt}: no parent offered any more, the attacker's reports demoted them"
        mtls.attacker.stream([register(task_id, peer_id, url), *[
            message(task_id, peer_id, download_piece_failed_request=scheduler_pb2.DownloadPieceFailedRequest(
                piece_number=0, parent_id=parent, temporary=False)) for parent in parents]])
    assert mtls.stat_task(task_id).has_available_peer, "the attacker demoted every parent"
    mtls.download(mtls.node2, url, digest, tmp_path / "node2.blob")
    metrics = mtls.node2.metrics()
    size = path.stat().st_size
    assert metrics.get(FROM_PEERS, 0) == size and metrics.get(FROM_ORIGIN, 0) == 0, metrics


def test_caller_chosen_piece_geometry_is_refused(mtls: MtlsCluster) -> None:
    """A 1-byte piece length (3000 origin requests for a 3000-byte blob), a piece number that would
    make the scheduler allocate a bitmap of 2^32 pieces (512 MiB)."""
    _, _, url, task_id = mtls.blob("geometry", seed=36, size=3000)
    code, _ = mtls.attacker.stream([register(task_id, "evil-tiny", url, piece_length=1)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT, code
    code, _ = mtls.attacker.stream([register(task_id, "evil-huge", url), message(
        task_id, "evil-huge", download_piece_finished_request=scheduler_pb2.DownloadPieceFinishedRequest(
            piece=common_pb2.Piece(number=(1 << 32) - 1, offset=0, length=1)))])
    assert code == grpc.StatusCode.INVALID_ARGUMENT, code


def test_a_client_holds_no_more_streams_than_its_limit(mtls: MtlsCluster, tmp_path: Path) -> None:
    digest, _, url, task_id = mtls.blob("streams-limit", seed=37, size=1 * MIB)

    async def open_streams() -> list[grpc.StatusCode | None]:
        async with mtls.attacker.channel() as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            calls = [stub.AnnouncePeer(timeout=RPC_TIMEOUT) for _ in range(STREAM_LIMIT + 1)]
            codes: list[grpc.StatusCode | None] = []
            for index, call in enumerate(calls):  # every one answers: a schedule, or the end of the stream
                try:
                    await call.write(register(task_id, f"evil-stream-{index}", url))
                    answer = await asyncio.wait_for(call.read(), RPC_TIMEOUT)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):  # ended before we wrote
                    answer = grpc.aio.EOF
                codes.append(await call.code() if answer is grpc.aio.EOF else None)
            for call in calls:
                call.cancel()
            return codes

    codes = asyncio.run(open_streams())
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 1 and codes.count(None) == STREAM_LIMIT, codes
    mtls.download(mtls.node1, url, digest, tmp_path / "blob")  # honest nodes are not affected


def test_stat_task_shows_members_no_url_query(mtls: MtlsCluster) -> None:
    """A presigned URL's signature is in its query: StatTask shows it to admins only."""
    signed = f"{mtls.registry.url}/files/report.bin?X-Amz-Signature=s3cret-signature&X-Amz-Expires=600"
    task_id = ids.task_id(signed)
    code, answers = mtls.attacker.stream([register(task_id, "evil-signed", signed, need_back_to_source=True)])
    assert answers, (code, answers)  # registered (and no seed sent to fetch it): the task exists
    task = mtls.attacker.unary("StatTask", scheduler_pb2.StatTaskRequest(task_id=task_id))
    assert isinstance(task, common_pb2.Task), task
    assert task.url == f"{mtls.registry.url}/files/report.bin"
    assert mtls.stat_task(task_id).url == signed
