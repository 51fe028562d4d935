"""Ordinary failures, with real processes (issue 13, defects 1, 2, 6 and 7).

A download whose origin answers 404, refuses the connection or does not exist costs the origin at
most 3 requests however long the peers wait, fails quickly with the origin's answer, and leaves no
ERROR-level noise in the daemons' logs. ``--disable-back-to-source`` keeps this peer off the
origin, not the seeds. A second scheduler on a taken port refuses to start.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from common.config import split_address
from common.launcher import LocalCluster, Node, free_port, tail
from tests.support.cluster import run_dfget, start_network
from tests.support.registry import Registry, push_random_blob

pytestmark = pytest.mark.integration

MAX_ORIGIN_REQUESTS = 3
NETWORK_ERRORS = 'damselfly_dfdaemon_back_to_source_errors_total{kind="network"}'
FROM_ORIGIN = 'damselfly_dfdaemon_download_traffic_bytes_total{type="back_to_source"}'
# What an ordinary failure must not leave in a log (asyncio's and grpc's complaints included).
NOISE = (" ERROR ", "Traceback", "Task was destroyed", "aclose()", "AbortError", "never retrieved")


class CountingOrigin:
    """A loopback HTTP origin that answers 404 to everything and counts the requests it gets."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def _missing(self) -> None:
                with origin._lock:
                    origin.requests[self.path] += 1
                body = b"no such file\n"
                self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _missing

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def count(self, path: str) -> int:
        with self._lock:
            return self.requests[path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def origin() -> Iterator[CountingOrigin]:
    server = CountingOrigin()
    try:
        yield server
    finally:
        server.close()


def network_errors(*nodes: Node) -> float:
    """Origin attempts that never reached an origin (refused, unknown host), on these nodes."""
    return sum(node.metrics().get(NETWORK_ERRORS, 0.0) for node in nodes)


def timed_dfget(node: Node, url: str, output: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = run_dfget(node, url, output, *extra, timeout=120)
    return result, time.monotonic() - started


def assert_quiet(cluster: LocalCluster) -> None:
    """Stop every node, then: no ERROR-level line, no traceback, in any log."""
    cluster.stop()
    for node in cluster.nodes:
        noisy = [line for line in node.log_path.read_text(errors="replace").splitlines()
                 if any(mark in line for mark in NOISE)]
        assert noisy == [], f"{node.name} logged noise after ordinary failures:\n{tail(node.log_path, 60)}"


def test_failing_origins_cost_at_most_three_requests_and_fail_with_their_answer(
    cluster: LocalCluster, origin: CountingOrigin, tmp_path: Path
) -> None:
    seed, (peer,) = start_network(cluster, ["peer"])
    output = tmp_path / "out.bin"

    # 404: the seed asks once, the task fails for the waiting peer at once with the origin's words.
    url = f"{origin.url}/storm-404.bin"
    result, elapsed = timed_dfget(peer, url, output)
    assert result.returncode != 0
    assert origin.count("/storm-404.bin") <= MAX_ORIGIN_REQUESTS
    assert f"origin answered 404 Not Found for {url}" in result.stderr
    assert "scheduler" not in result.stderr
    assert elapsed < 10, f"dfget took {elapsed:.1f}s to fail"
    assert not output.exists()

    # The same URL again, at once: the task stays failed; nobody asks the origin again yet.
    before = origin.count("/storm-404.bin")
    result, elapsed = timed_dfget(peer, url, output)
    assert result.returncode != 0
    assert f"origin answered 404 Not Found for {url}" in result.stderr
    assert "asked again after" in result.stderr
    assert elapsed < 5
    assert origin.count("/storm-404.bin") == before

    # Connection refused, then an unknown host: a few attempts with back-off, then the answer.
    refused_url = f"http://127.0.0.1:{free_port()}/refused.bin"
    unknown_url = "http://no-such-host.invalid/unknown.bin"
    for bad_url, words in ((refused_url, "Connect call failed"), (unknown_url, "no-such-host.invalid")):
        attempts_before = network_errors(seed, peer)
        result, elapsed = timed_dfget(peer, bad_url, output)
        assert result.returncode != 0
        assert words in result.stderr and "after 3 attempts" in result.stderr, result.stderr
        assert elapsed < 30, f"dfget of {bad_url} took {elapsed:.1f}s to fail"
        attempts = network_errors(seed, peer) - attempts_before
        assert 1 <= attempts <= MAX_ORIGIN_REQUESTS, f"{attempts:.0f} origin attempts for {bad_url}"

    assert sum(origin.requests.values()) <= MAX_ORIGIN_REQUESTS
    assert_quiet(cluster)


def test_disable_back_to_source_still_lets_the_seed_fetch(
    cluster: LocalCluster, registry: Registry, tmp_path: Path
) -> None:
    digest, _ = push_random_blob(registry, "failures/seeded", 6 << 20, seed=31)
    _, (peer,) = start_network(cluster, ["peer"])
    output = tmp_path / "seeded.bin"

    result = run_dfget(peer, registry.blob_url("failures/seeded", digest), output, "--disable-back-to-source",
                       "--digest", digest)
    assert result.returncode == 0, result.stderr
    assert peer.metrics()[FROM_ORIGIN] == 0  # every byte came from the seed
    assert_quiet(cluster)


def test_disable_back_to_source_without_seed_names_the_reason(
    cluster: LocalCluster, registry: Registry, tmp_path: Path
) -> None:
    digest, _ = push_random_blob(registry, "failures/unseeded", 1 << 20, seed=32)
    scheduler = cluster.start_scheduler()
    peer = cluster.start_dfdaemon("peer")
    cluster.wait_ready(scheduler, peer)

    result, elapsed = timed_dfget(peer, registry.blob_url("failures/unseeded", digest), tmp_path / "x.bin",
                                  "--disable-back-to-source")
    assert result.returncode != 0
    assert "back-to-source is disabled" in result.stderr
    assert "no seed peer is available" in result.stderr
    assert "unreachable" not in result.stderr  # the scheduler was up all along
    assert elapsed < 30
    assert peer.metrics()[FROM_ORIGIN] == 0
    assert_quiet(cluster)


def test_second_scheduler_on_the_same_port_refuses(cluster: LocalCluster) -> None:
    first = cluster.start_scheduler()
    cluster.wait_ready(first)
    listen = f"127.0.0.1:{cluster.scheduler_ports['grpc']}"
    second = subprocess.run(
        [sys.executable, "-m", "common.cli", "scheduler", "--listen", listen,
         "--metrics-listen", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60,
    )
    assert second.returncode != 0
    assert f"--listen {listen} is in use" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.alive
    assert first.get("metrics", "/ready")[0] == 200


@pytest.mark.parametrize("flag", ["--grpc-listen", "--upload-listen", "--proxy-listen", "--metrics-listen",
                                  "--health-listen", "--socket"])
def test_dfdaemon_bind_errors_name_the_flag(cluster: LocalCluster, flag: str) -> None:
    node = cluster.plan_dfdaemon("peer")
    address = node.args[node.args.index(flag) + 1]
    with contextlib.ExitStack() as stack:
        if flag == "--socket":  # a live daemon's socket: it must not be taken over
            Path(address).parent.mkdir(parents=True, exist_ok=True)
            taken = stack.enter_context(socket.socket(socket.AF_UNIX))
            taken.bind(address)
        else:
            taken = stack.enter_context(socket.socket())
            taken.bind(split_address(address))
        taken.listen()
        result = subprocess.run([sys.executable, "-m", "common.cli", "dfdaemon", *node.args],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"damselfly dfdaemon: error: {flag} {address} is in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_download_socket_name_that_cannot_be_taken_stops_the_dfdaemon(cluster: LocalCluster) -> None:
    """dfget would talk to whatever answers at <socket>.stream: a dfdaemon that cannot listen there
    does not start (as for its gRPC socket), rather than leave the name to someone else."""
    node = cluster.plan_dfdaemon("peer")
    grpc_socket = Path(node.args[node.args.index("--socket") + 1])
    occupied = Path(f"{grpc_socket}.stream")
    (occupied / "not-a-socket").mkdir(parents=True)  # a directory the daemon will not remove
    result = subprocess.run([sys.executable, "-m", "common.cli", "dfdaemon", *node.args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"damselfly dfdaemon: error: --socket {occupied} cannot be listened on" in result.stderr
    assert "Traceback" not in result.stderr
    assert not grpc_socket.exists(), "the gRPC socket was left behind"
