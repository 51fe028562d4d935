"""Attacks on a dfdaemon (issue 12 items 2, 5, 7, 9, 10, 11), each shown refused.

Real processes: a scheduler, seeds and dfdaemons started by :class:`common.launcher.LocalCluster`,
Debian's docker-registry as the origin, the real dfget and curl, and, for the identity rules,
certificates of a test CA whose CNs carry the roles (:mod:`common.identity`). The attackers are
what issue 12 describes:

- a client of a node's upload gRPC port asking it to fetch a URL (the scheduler's metrics: SSRF
  with read-back), to delete a cached task, or to show a task's full URL;
- the same client calling the seed, from an address that is not the scheduler's (plaintext) or
  with a certificate that is not the scheduler's (mutual TLS);
- a rogue parent: a dfdaemon whose ``StatTask`` lies about the content length;
- a local user reading the cache or the socket;
- slowloris and half-sent requests against every HTTP listener, slow readers against the
  upload slots;
- a download that fails after the response started (item 9: the connection is aborted).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc

from common import ids
from common.launcher import LocalCluster, http_get, sha256_file, wait_until
from peer.download_socket import ERROR, decode_error
from tests.support.certs import Issued, TestCA
from tests.support.cluster import run_dfget, start_network
from tests.support.download_socket import download_socket_of, download_task, send_raw
from tests.support.registry import Registry, push_random_blob

pytestmark = pytest.mark.integration

MIB = 1 << 20
RPC_TIMEOUT = 10.0
FROM_PEERS = 'damselfly_dfdaemon_download_traffic_bytes_total{type="remote_peer"}'
FROM_ORIGIN = 'damselfly_dfdaemon_download_traffic_bytes_total{type="back_to_source"}'
GEOMETRY_REFUSALS = 'damselfly_dfdaemon_piece_failures_total{reason="geometry"}'
FAILED_UPLOADS = 'damselfly_dfdaemon_upload_pieces_total{result="failed"}'
SECRET = "s3cret-signature"
NOBODY = 65534  # uid and gid (nogroup) of Debian's unprivileged user
REPO = Path(__file__).resolve().parents[2]


def tls_args(ca: TestCA, issued: Issued) -> list[str]:
    return ["--tls-ca-cert", str(ca.cert_path), "--tls-cert", str(issued.cert), "--tls-key", str(issued.key)]


def upload_stub(
    port: int, credentials: grpc.ChannelCredentials | None = None
) -> tuple[grpc.Channel, dfdaemon_pb2_grpc.DfdaemonUploadStub]:
    target = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
    return channel, dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)


def status_of(call: Callable[[], object]) -> grpc.StatusCode | object:
    """What `call` returned, or the status code it failed with."""
    try:
        return call()
    except grpc.RpcError as exc:
        return exc.code()


def trigger(stub: dfdaemon_pb2_grpc.DfdaemonUploadStub, url: str, **download: object) -> object:
    """DownloadTask with `url`; the first response (or the status code it failed with)."""
    request = dfdaemon_pb2.DownloadTaskRequest(download=common_pb2.Download(url=url, **download))
    return status_of(lambda: next(iter(stub.DownloadTask(request, timeout=RPC_TIMEOUT))))


class SourceAddressRelay:
    """A TCP relay whose connections to the target leave from another loopback address.

    Every caller on this machine comes from 127.0.0.1, the scheduler's address too; through this
    relay an attacker's gRPC calls reach the seed from 127.0.0.2, an address that is not a
    configured scheduler's.
    """

    def __init__(self, target_port: int, source_ip: str = "127.0.0.2") -> None:
        self._target = ("127.0.0.1", target_port)
        self._source = source_ip
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target, source_address=(self._source, 0))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        self._listener.close()


# -- item 5: the upload gRPC service, plaintext ----------------------------------------------------


def test_upload_service_refuses_remote_downloads_deletes_and_hides_signed_urls(
    cluster: LocalCluster, registry: Registry, tmp_path: Path
) -> None:
    size = 8 * MIB
    digest, _ = push_random_blob(registry, "security/peer", size, seed=121)
    signed_url = registry.blob_url("security/peer", digest) + f"?X-Amz-Signature={SECRET}&X-Amz-Expires=300"
    seed, (node,) = start_network(cluster, ["node"])
    # The honest way still works: the scheduler (a configured --scheduler address) triggers the seed.
    result = run_dfget(node, signed_url, tmp_path / "blob")
    assert result.returncode == 0, result.stderr
    assert sha256_file(tmp_path / "blob") == digest
    assert node.metrics().get(FROM_PEERS, 0) == size and seed.metrics().get(FROM_ORIGIN, 0) >= size
    task_id = ids.task_id(signed_url)

    assert cluster.scheduler is not None
    internal = cluster.scheduler.url("metrics", "/metrics")  # SSRF with read-back, as reported
    channel, stub = upload_stub(node.ports["grpc"])
    with channel:
        # A normal node fetches nothing for a remote caller.
        assert trigger(stub, internal) == grpc.StatusCode.PERMISSION_DENIED
        assert status_of(lambda: stub.StatTask(dfdaemon_pb2.StatTaskRequest(task_id=ids.task_id(internal)),
                                               timeout=RPC_TIMEOUT)) == grpc.StatusCode.NOT_FOUND
        # Nobody deletes a node's cache over the network.
        deleted = status_of(lambda: stub.DeleteTask(dfdaemon_pb2.DeleteTaskRequest(task_id=task_id),
                                                    timeout=RPC_TIMEOUT))
        assert deleted == grpc.StatusCode.PERMISSION_DENIED
        assert http_get(node.url("upload", f"/pieces/{task_id}/0"))[0] == 200
        # StatTask serves the swarm without the signature the client's URL carried.
        task = stub.StatTask(dfdaemon_pb2.StatTaskRequest(task_id=task_id), timeout=RPC_TIMEOUT)
        assert task.content_length == size
        assert SECRET not in str(task) and "?" not in task.url, task.url

    # The seed obeys the scheduler only: the same call from another address is refused.
    relay = SourceAddressRelay(seed.ports["grpc"])
    try:
        channel, stub = upload_stub(relay.port)
        with channel:
            assert trigger(stub, internal) == grpc.StatusCode.PERMISSION_DENIED
            assert status_of(lambda: stub.StatTask(dfdaemon_pb2.StatTaskRequest(task_id=ids.task_id(internal)),
                                                   timeout=RPC_TIMEOUT)) == grpc.StatusCode.NOT_FOUND
    finally:
        relay.close()

    # Item 7 on the local socket: a caller-chosen 1-byte piece length is refused before any fetch.
    before = node.metrics().get(FROM_ORIGIN, 0)
    assert node.socket_path is not None
    with grpc.insecure_channel(f"unix://{node.socket_path}") as local:
        download = dfdaemon_pb2_grpc.DfdaemonDownloadStub(local)
        request = dfdaemon_pb2.DownloadTaskRequest(download=common_pb2.Download(
            url=registry.blob_url("security/peer", digest) + "?other", piece_length=1))
        refused = status_of(lambda: list(download.DownloadTask(request, timeout=RPC_TIMEOUT)))
    assert refused == grpc.StatusCode.INVALID_ARGUMENT
    # The download socket (dfget's way in) refuses it alike, and what is no request at all.
    assert download_task(node.socket_path, request)[0] == "INVALID_ARGUMENT"
    for garbage in (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"Q\x7f\xff\xff\xff", b"Q\x00\x00\x00\x04\xff\xff\xff\xff"):
        [(kind, payload)] = send_raw(node.socket_path, garbage)
        assert kind == ERROR and decode_error(payload)[0] == "INVALID_ARGUMENT", payload
    assert node.metrics().get(FROM_ORIGIN, 0) == before


# -- item 5: the upload gRPC service, mutual TLS ---------------------------------------------------


def test_with_mutual_tls_only_the_scheduler_identity_triggers_a_seed(
    cluster: LocalCluster, registry: Registry, tmp_path: Path
) -> None:
    ca = TestCA(tmp_path / "pki")
    size = 8 * MIB
    digest, _ = push_random_blob(registry, "security/mtls", size, seed=122)
    url = registry.blob_url("security/mtls", digest)
    seed = cluster.plan_dfdaemon("seed", seed=True)
    scheduler = cluster.start_scheduler(*tls_args(ca, ca.issue("scheduler", common_name="scheduler.damselfly")),
                                        seeds=[seed])
    cluster.start_dfdaemon("seed", *tls_args(ca, ca.issue("seed", common_name="seed.damselfly")), node=seed)
    node = cluster.start_dfdaemon("node", *tls_args(ca, ca.issue("node", common_name="node.peer.damselfly")))
    cluster.wait_ready(scheduler, seed, node)
    result = run_dfget(node, url, tmp_path / "blob")
    assert result.returncode == 0, result.stderr
    assert sha256_file(tmp_path / "blob") == digest
    assert node.metrics().get(FROM_PEERS, 0) == size  # the scheduler's trigger reached the seed

    internal = scheduler.url("metrics", "/metrics")
    for cn in ("peer.damselfly", "seed.damselfly", "admin.damselfly", "someone-else"):
        issued = ca.issue(cn.replace(".", "-"), common_name=cn)
        credentials = grpc.ssl_channel_credentials(ca.cert_path.read_bytes(), issued.key.read_bytes(),
                                                   issued.cert.read_bytes())
        channel, stub = upload_stub(seed.ports["grpc"], credentials)
        with channel:
            assert trigger(stub, internal) == grpc.StatusCode.PERMISSION_DENIED, cn
    # The control: the scheduler's identity is obeyed by the seed, and by nobody else.
    issued = ca.issue("scheduler-probe", common_name="scheduler.damselfly")
    credentials = grpc.ssl_channel_credentials(ca.cert_path.read_bytes(), issued.key.read_bytes(),
                                               issued.cert.read_bytes())
    channel, stub = upload_stub(node.ports["grpc"], credentials)
    with channel:
        assert trigger(stub, url) == grpc.StatusCode.PERMISSION_DENIED  # a normal node
    channel, stub = upload_stub(seed.ports["grpc"], credentials)
    with channel:
        answer = trigger(stub, url)
        assert isinstance(answer, dfdaemon_pb2.DownloadTaskResponse), answer
    assert seed.metrics().get(FROM_ORIGIN, 0) == size  # the internal URL was never fetched


# -- items 2 and 7, peer side: a parent's geometry -------------------------------------------------

ROGUE_BOOT = """
import sys
sys.path.insert(0, {repo!r})
from peer import services
from peer.download.engine import PIECE_LENGTH_HEADER

honest = services.task_message

def lying(local, *, piece_digests):
    task = honest(local, piece_digests=piece_digests)
    if task.content_length:  # one piece short: every piece it keeps still matches its digest
        piece = int(task.request_header[PIECE_LENGTH_HEADER])
        task.content_length -= piece
        task.piece_count -= 1
        del task.pieces[-1:]
    return task

services.task_message = lying
from common.cli import main
sys.exit(main(sys.argv[sys.argv.index("common.cli") + 1:]))
"""


def rogue_python(directory: Path) -> str:
    """An interpreter stand-in that runs a dfdaemon whose StatTask lies (what a rogue node runs)."""
    boot = directory / "rogue_boot.py"
    boot.write_text(ROGUE_BOOT.format(repo=str(REPO)))
    wrapper = directory / "rogue-python"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {boot} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def test_a_parent_lying_about_the_content_length_is_not_believed(
    cluster: LocalCluster, registry: Registry, tmp_path: Path
) -> None:
    size = 20 * MIB  # five 4 MiB pieces
    digest, _ = push_random_blob(registry, "security/geometry", size, seed=123)
    url = registry.blob_url("security/geometry", digest)
    seed, () = start_network(cluster, [])
    honest_python, cluster.python = cluster.python, rogue_python(tmp_path)
    try:
        rogue = cluster.start_dfdaemon("rogue")
    finally:
        cluster.python = honest_python
    victim = cluster.start_dfdaemon("victim")
    cluster.wait_ready(rogue, victim)
    assert run_dfget(rogue, url, tmp_path / "rogue.blob").returncode == 0
    cluster.kill(seed, 15)  # SIGTERM: the seed leaves, the rogue is the only parent offered
    wait_until(lambda: not seed.alive, 30, "the seed to stop")

    result = run_dfget(victim, url, tmp_path / "victim.blob")
    assert result.returncode == 0, result.stderr
    assert sha256_file(tmp_path / "victim.blob") == digest
    metrics = victim.metrics()
    assert metrics.get(GEOMETRY_REFUSALS, 0) >= 1, "the victim never heard the rogue's claim"
    content = next((victim.data_dir or Path()).glob(f"tasks/*/{ids.task_id(url)}/content"))
    assert content.stat().st_size == size


# -- item 11: files, socket and data dir -----------------------------------------------------------


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory every local user may traverse (pytest's own tmp dirs are 0700 and would hide
    everything from another user whatever the daemon does)."""
    path = Path(tempfile.mkdtemp(prefix="damselfly-shared-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_another_local_user_reads_no_cache_file_and_the_socket_follows_its_group(
    registry: Registry, shared_tmp: Path, tmp_path: Path
) -> None:
    size = 4 * MIB
    digest, _ = push_random_blob(registry, "security/private", size, seed=124)
    url = registry.blob_url("security/private", digest)
    cluster = LocalCluster(shared_tmp / "cluster")
    try:
        # A data dir others may write is refused at start-up, naming the setting.
        unsafe = cluster.plan_dfdaemon("unsafe")
        assert unsafe.data_dir is not None
        unsafe.data_dir.mkdir(parents=True)
        unsafe.data_dir.chmod(0o777)
        cluster.start_dfdaemon("unsafe", node=unsafe)
        wait_until(lambda: not unsafe.alive, 30, "the daemon with a world-writable data dir to exit")
        assert "data_dir" in unsafe.log_path.read_text() and unsafe.data_dir.stat().st_mode & 0o777 == 0o777

        (shared_tmp / "cluster").chmod(0o755)
        _, (node,) = start_network(cluster, ["node"], "--socket-group", "nogroup")
        (shared_tmp / "cluster" / "node").chmod(0o755)  # the socket's directory, as /run/damselfly is
        assert run_dfget(node, url, tmp_path / "blob").returncode == 0
        assert node.data_dir is not None and node.socket_path is not None
        content = next(node.data_dir.glob(f"tasks/*/{ids.task_id(url)}/content"))
        # Another user reads no byte of a (possibly private) layer.
        read = as_nobody("cat", str(content))
        assert read.returncode != 0 and read.stdout == "" and "Permission denied" in read.stderr
        assert stat.S_IMODE(content.stat().st_mode) == 0o600
        for directory in (node.data_dir, content.parent, content.parent.parent):
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
        # Both sockets (gRPC, and the download socket dfget uses): 0660, group nogroup; nobody
        # (in nogroup) may connect, a user outside may not.
        for path in (node.socket_path, download_socket_of(node.socket_path)):
            info = path.stat()
            assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, NOBODY), path
            probe = f"import socket; socket.socket(socket.AF_UNIX).connect({str(path)!r})"
            assert as_nobody(sys.executable, "-c", probe).returncode == 0
            outsider = subprocess.run(["setpriv", f"--reuid={NOBODY}", "--regid=100", "--clear-groups",
                                       sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
            assert outsider.returncode != 0 and "Permission denied" in outsider.stderr, path
    finally:
        cluster.stop()


# -- item 10: exhaustion -------------------------------------------------------------------------


HALF_A_REQUEST = b"GET /healthy HTTP/1.1\r\nHost: x\r\nX-Slow: "


def half_sent(port: int, count: int, start: bytes = HALF_A_REQUEST) -> list[socket.socket]:
    """`count` connections that each send the start of a request and never finish it (those the
    server closes at once are in the list too: they count as closed)."""
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        held.append(sock)
        with contextlib.suppress(OSError):
            sock.sendall(start)
    return held


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server ended the connection (what it sent before, e.g. HTTP/2 SETTINGS, is skipped)."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def test_half_sent_requests_neither_exhaust_the_daemon_nor_stay_open(
    cluster: LocalCluster, registry: Registry, tmp_path: Path
) -> None:
    size = 4 * MIB
    digest, _ = push_random_blob(registry, "security/fds", size, seed=125)
    url = registry.blob_url("security/fds", digest)
    # The daemon gets 512 descriptors, like the node of the report got too few for 420 requests.
    wrapper = tmp_path / "limited-python"
    wrapper.write_text(f"#!/bin/sh\nexec prlimit --nofile=512:512 {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    _, () = start_network(cluster, [])
    honest_python, cluster.python = cluster.python, str(wrapper)
    try:
        node = cluster.start_dfdaemon("node")
    finally:
        cluster.python = honest_python
    cluster.wait_ready(node)

    started = time.monotonic()
    status_held = half_sent(node.ports["health"], 40) + half_sent(node.ports["metrics"], 40)
    # Half an HTTP/2 preface on the upload gRPC port: its handshake timeout (10 s) closes them.
    grpc_held = half_sent(node.ports["grpc"], 20, b"PRI * HTTP/2.0\r\n")
    held = half_sent(node.ports["upload"], 420) + status_held + grpc_held
    try:
        # The daemon still works for its users: dfget over the socket, byte-exact.
        result = run_dfget(node, url, tmp_path / "blob")
        assert result.returncode == 0, result.stderr
        assert sha256_file(tmp_path / "blob") == digest
        # The status listeners close what never became a request within their header timeout...
        wait_until(lambda: all(closed_by_server(sock) for sock in status_held), 15,
                   "the health and metrics listeners to close half-sent requests")
        assert time.monotonic() - started < 15
        assert http_get(node.url("health", "/healthy"))[0] == 200
        # ... and the gRPC port (10 s) and the piece server (20 s) too: slowloris holds nothing for minutes.
        wait_until(lambda: all(closed_by_server(sock) for sock in grpc_held), 20,
                   "the upload gRPC server to close half-sent handshakes")
        wait_until(lambda: all(closed_by_server(sock) for sock in held), 40,
                   "the piece server to close half-sent requests")
        assert node.alive
    finally:
        for sock in held:
            sock.close()


def test_slow_readers_are_cut_and_do_not_hold_the_upload_slots(
    cluster: LocalCluster, registry: Registry, tmp_path: Path
) -> None:
    size = 32 * MIB
    digest, _ = push_random_blob(registry, "security/slow", size, seed=126)
    url = registry.blob_url("security/slow", digest)
    _, (node,) = start_network(cluster, ["node"], "--upload-slots", "2", "--upload-min-rate", "16MiB")
    result = run_dfget(node, url, tmp_path / "blob", "--piece-length", "16MiB")
    assert result.returncode == 0, result.stderr
    task_id = ids.task_id(url)
    piece = f"/pieces/{task_id}/0"

    readers = []
    for _ in range(2):  # every upload slot, held by a reader that reads (almost) nothing
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", node.ports["upload"]))
        sock.sendall(f"GET {piece} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        readers.append(sock)
    try:
        wait_until(lambda: node.metrics().get("damselfly_dfdaemon_concurrent_uploads", 0) == 2, 10,
                   "the slow readers to take both upload slots")
        started = time.monotonic()
        # 3 s grace + 16 MiB at 16 MiB/s: the slots are free again within seconds, not a minute.
        wait_until(lambda: http_get(node.url("upload", piece), timeout=30)[0] == 200, 20,
                   "an honest piece request to be served")
        freed_after = time.monotonic() - started
        assert freed_after < 10, freed_after
        # Item 9: what a cut reader sees is an aborted response, never a complete one.
        for sock in readers:
            received = drain(sock)
            head, _, body = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 16777216" in head
            assert len(body) < 16 * MIB
        assert node.metrics().get(FAILED_UPLOADS, 0) >= 2
    finally:
        for sock in readers:
            sock.close()
    print(f"\nslow readers cut and slots free after {freed_after:.1f} s")


def drain(sock: socket.socket) -> bytes:
    """Everything the server sent until it ended the connection (a reset ends it too)."""
    sock.settimeout(10)
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    return b"".join(chunks)


# -- item 9: a download failing after the response started --------------------------------------


class FailingOrigin:
    """An HTTP origin of one blob whose first 4 MiB are served and whose later ranges fail once
    `fail` is set (before that, they wait): the failure lands after the client got bytes."""

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.fail = threading.Event()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(origin.content)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self) -> None:
                start, end = 0, len(origin.content) - 1
                header = self.headers.get("Range", "")
                if header.startswith("bytes="):
                    first, _, last = header[6:].partition("-")
                    start, end = int(first), int(last) if last else end
                if start >= 4 * MIB:
                    origin.fail.wait(60)
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if header else 200)
                self.send_header("Content-Length", str(end - start + 1))
                if header:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(origin.content)}")
                self.end_headers()
                self.wfile.write(origin.content[start:end + 1])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.fail.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_piece_failing_after_bytes_were_sent_aborts_the_response(cluster: LocalCluster, tmp_path: Path) -> None:
    content = os.urandom(12 * MIB)
    origin = FailingOrigin(content)
    try:
        scheduler = cluster.start_scheduler()  # no seed: the node itself back-sources
        node = cluster.start_dfdaemon("node")
        cluster.wait_ready(scheduler, node)
        url = f"http://127.0.0.1:{origin.port}/v2/security/abort/blobs/sha256:{'ab' * 32}"
        output = tmp_path / "partial"
        curl = subprocess.Popen(["curl", "-sS", "-x", f"http://127.0.0.1:{node.ports['proxy']}", "-o", str(output),
                                 "-w", "%{http_code}", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: output.exists() and output.stat().st_size > 0, 60, "the first bytes to reach curl")
            origin.fail.set()  # now the rest of the blob cannot be had
            out, err = curl.communicate(timeout=120)
        finally:
            if curl.poll() is None:
                curl.kill()
        received = output.read_bytes()
        print(f"\ncurl exit {curl.returncode}, status {out}, {len(received)} of {len(content)} bytes: {err.strip()}")
        assert out == "200"
        assert curl.returncode in (18, 56), (curl.returncode, err)  # partial file / connection reset
        assert 0 < len(received) < len(content)
        assert received == content[:len(received)]  # what came was right; the rest never pretended to be
    finally:
        origin.close()
