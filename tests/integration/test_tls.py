"""A cluster with mutual TLS on: members download through P2P, everyone else is refused.

Scheduler, seed and two dfdaemons run as real processes, each with its own certificate from one
test CA (IP SAN 127.0.0.1). The blob must reach both dfdaemons byte-exact and entirely from
peers: that needs the seed trigger (scheduler → seed gRPC), the AnnouncePeer streams
(dfdaemon → scheduler), SyncPieces (dfdaemon → parent gRPC) and the piece GETs (HTTPS) to work
over mTLS. Then, from outside, every port is probed by a client without a certificate, in
plaintext and with a certificate from another CA, and each is refused; a member's certificate is
the control that the same requests succeed otherwise.
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from dragonfly_api import dfdaemon_pb2, dfdaemon_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from common import ids
from common.launcher import LocalCluster, sha256_file
from tests.support.certs import Issued, TestCA
from tests.support.cluster import run_dfget
from tests.support.registry import Registry, push_random_blob

pytestmark = pytest.mark.integration

MIB = 1 << 20
RPC_TIMEOUT = 10.0
FROM_PEERS = 'damselfly_dfdaemon_download_traffic_bytes_total{type="remote_peer"}'
FROM_ORIGIN = 'damselfly_dfdaemon_download_traffic_bytes_total{type="back_to_source"}'


def tls_args(ca: TestCA, issued: Issued) -> list[str]:
    return ["--tls-ca-cert", str(ca.cert_path), "--tls-cert", str(issued.cert), "--tls-key", str(issued.key)]


def grpc_credentials(ca: TestCA, issued: Issued | None) -> grpc.ChannelCredentials:
    """Trusts `ca`; presents `issued` as the client certificate (none when None)."""
    if issued is None:
        return grpc.ssl_channel_credentials(ca.cert_path.read_bytes())
    return grpc.ssl_channel_credentials(ca.cert_path.read_bytes(), issued.key.read_bytes(), issued.cert.read_bytes())


def call(port: int, credentials: grpc.ChannelCredentials | None, rpc: Callable[[grpc.Channel], object]) -> object:
    """Run `rpc` on a channel to 127.0.0.1:port; the gRPC status code when it fails."""
    target = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
    with channel:
        try:
            return rpc(channel)
        except grpc.RpcError as exc:
            return exc.code()


def https_get(port: int, path: str, context: ssl.SSLContext | None) -> tuple[int, bytes]:
    """GET over HTTPS with `context` (plain HTTP when None); raises OSError when refused."""
    if context is None:
        connection: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", port, timeout=RPC_TIMEOUT)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=RPC_TIMEOUT, context=context)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def client_context(ca: TestCA, issued: Issued | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert_path))
    if issued is not None:
        context.load_cert_chain(issued.cert, issued.key)
    return context


@pytest.fixture
def pki(tmp_path: Path) -> tuple[TestCA, TestCA]:
    """The cluster's CA and an unrelated one."""
    return TestCA(tmp_path / "pki"), TestCA(tmp_path / "rogue-pki", name="rogue-ca")


def test_mtls_cluster_serves_members_and_refuses_everyone_else(
    cluster: LocalCluster, registry: Registry, pki: tuple[TestCA, TestCA], tmp_path: Path
) -> None:
    ca, rogue_ca = pki
    size = 24 * MIB
    digest, blob_path = push_random_blob(registry, "tls/mtls", size, seed=12)
    url = registry.blob_url("tls/mtls", digest)

    seed = cluster.plan_dfdaemon("seed", seed=True)
    scheduler = cluster.start_scheduler(*tls_args(ca, ca.issue("scheduler", common_name="scheduler.damselfly")),
                                        seeds=[seed])
    cluster.start_dfdaemon("seed", *tls_args(ca, ca.issue("seed", common_name="seed.damselfly")), node=seed)
    peers = [cluster.start_dfdaemon(name, *tls_args(ca, ca.issue(name))) for name in ("peer1", "peer2")]
    cluster.wait_ready(scheduler, seed, *peers)  # a dfdaemon is ready once it announced itself over mTLS

    # Members: byte-exact, every byte from peers (the seed was triggered, pieces went over HTTPS).
    for node in peers:
        output = tmp_path / f"{node.name}.blob"
        result = run_dfget(node, url, output)
        assert result.returncode == 0, f"{node.name}: {result.stderr}"
        assert sha256_file(output) == digest, node.name
        metrics = node.metrics()
        assert metrics.get(FROM_PEERS, 0) == size, f"{node.name} got {metrics.get(FROM_PEERS)} bytes from peers"
        assert metrics.get(FROM_ORIGIN, 0) == 0, f"{node.name} back-sourced"
    assert seed.metrics().get(FROM_ORIGIN, 0) >= size

    task_id = ids.task_id(url)
    member = ca.issue("probe-member")
    rogue = rogue_ca.issue("probe-rogue")
    rogue_creds = grpc.ssl_channel_credentials(ca.cert_path.read_bytes(), rogue.key.read_bytes(),
                                               rogue.cert.read_bytes())  # trusts us, but is not one of us
    outsiders: dict[str, grpc.ChannelCredentials | None] = {
        "no certificate": grpc_credentials(ca, None),
        "plaintext": None,
        "another CA": rogue_creds,
    }
    refused = grpc.StatusCode.UNAVAILABLE  # the handshake fails: no RPC ever reaches a handler

    # The scheduler.
    def scheduler_stat(channel: grpc.Channel) -> object:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        return stub.StatTask(scheduler_pb2.StatTaskRequest(task_id=task_id), timeout=RPC_TIMEOUT)

    scheduler_port = scheduler.ports["grpc"]
    task = call(scheduler_port, grpc_credentials(ca, member), scheduler_stat)
    assert getattr(task, "content_length", None) == size, task
    for who, credentials in outsiders.items():
        assert call(scheduler_port, credentials, scheduler_stat) == refused, f"scheduler let in: {who}"

    # A dfdaemon's upload gRPC port: StatTask and SyncPieces.
    peer = peers[0]

    def peer_stat(channel: grpc.Channel) -> object:
        stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)
        return stub.StatTask(dfdaemon_pb2.StatTaskRequest(task_id=task_id), timeout=RPC_TIMEOUT)

    def peer_sync(channel: grpc.Channel) -> object:
        stub = dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)
        request = dfdaemon_pb2.SyncPiecesRequest(host_id="probe", task_id=task_id, interested_piece_numbers=[0])
        return [piece.number for piece in stub.SyncPieces(request, timeout=RPC_TIMEOUT)]

    stat = call(peer.ports["grpc"], grpc_credentials(ca, member), peer_stat)
    assert getattr(stat, "content_length", None) == size, stat
    first = stat.pieces[0]  # type: ignore[attr-defined]
    assert call(peer.ports["grpc"], grpc_credentials(ca, member), peer_sync) == [0]
    for who, credentials in outsiders.items():
        assert call(peer.ports["grpc"], credentials, peer_stat) == refused, f"StatTask let in: {who}"
        assert call(peer.ports["grpc"], credentials, peer_sync) == refused, f"SyncPieces let in: {who}"

    # The piece server: HTTPS, client certificate required.
    piece_path = f"/pieces/{task_id}/0"
    with blob_path.open("rb") as file:
        file.seek(first.offset)
        expected = file.read(first.length)
    assert https_get(peer.ports["upload"], piece_path, client_context(ca, member)) == (200, expected)
    https_outsiders: dict[str, ssl.SSLContext | None] = {"no certificate": client_context(ca, None),
                                                         "plaintext": None,
                                                         "another CA": client_context(ca, rogue)}
    for who, context in https_outsiders.items():
        with pytest.raises(OSError):  # ssl.SSLError, or the connection closed on us
            status, _ = https_get(peer.ports["upload"], piece_path, context)
            pytest.fail(f"piece server answered {status} to: {who}")
    assert all(node.alive for node in cluster.nodes), "a probe crashed a node"
