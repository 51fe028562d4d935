"""End to end: a real registry, a scheduler, a seed and dfdaemons as processes, real dfget.

What a broken implementation would miss is checked from outside: bytes by sha256, origin
traffic by a TCP relay in front of the registry (not our own metrics), who served whom by each
node's upload counter.
"""

from __future__ import annotations

import http.server
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.launcher import LocalCluster, sha256_file, wait_until
from tests.support.cluster import run_dfget, start_dfget, start_network
from tests.support.registry import Registry, push_random_blob
from tests.support.relay import ByteCountingRelay

pytestmark = pytest.mark.integration

MIB = 1 << 20
UPLOAD = "damselfly_dfdaemon_upload_traffic_bytes_total"
FROM_PEERS = 'damselfly_dfdaemon_download_traffic_bytes_total{type="remote_peer"}'
FROM_ORIGIN = 'damselfly_dfdaemon_download_traffic_bytes_total{type="back_to_source"}'


def test_eight_peers_pull_one_blob_and_the_origin_serves_it_once(
    cluster: LocalCluster, registry: Registry, registry_relay: ByteCountingRelay, tmp_path: Path
) -> None:
    size = 256 * MIB
    digest, _ = push_random_blob(registry, "p2p/eight", size, seed=8)
    url = f"{registry_relay.url}/v2/p2p/eight/blobs/{digest}"
    seed, daemons = start_network(cluster, [f"peer{i}" for i in range(1, 9)])
    registry_relay.reset()

    downloads = [start_dfget(node, url, tmp_path / f"{node.name}.blob") for node in daemons]
    for node, process in zip(daemons, downloads, strict=True):
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"{node.name}: {stderr}"

    for node in daemons:
        assert sha256_file(tmp_path / f"{node.name}.blob") == digest, node.name
    assert registry_relay.bytes_from_target <= 1.05 * size, (
        f"origin served {registry_relay.bytes_from_target} bytes for a {size}-byte blob")
    served_by_seed = seed.metrics().get(UPLOAD, 0)
    served_by_peers = sum(node.metrics().get(UPLOAD, 0) for node in daemons)
    received = sum(node.metrics().get(FROM_PEERS, 0) for node in daemons)
    print(f"\norigin served {registry_relay.bytes_from_target / MIB:.1f} MiB; seed uploaded "
          f"{served_by_seed / MIB:.0f} MiB, peers uploaded {served_by_peers / MIB:.0f} MiB to each other")
    assert received == 8 * size, "every byte came over P2P (no peer back-sourced)"
    assert served_by_peers > served_by_seed, (
        f"peers served {served_by_peers / MIB:.0f} MiB to each other, the seed {served_by_seed / MIB:.0f} MiB")


def test_origin_404_fails_cleanly(cluster: LocalCluster, registry: Registry, tmp_path: Path) -> None:
    _, (peer,) = start_network(cluster, ["peer1"])
    missing = "sha256:" + "0" * 64
    output = tmp_path / "missing.blob"
    result = run_dfget(peer, registry.blob_url("p2p/missing", missing), output)
    assert result.returncode != 0
    assert "404" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".missing")], "temp file left behind"


class _FailingOrigin(http.server.BaseHTTPRequestHandler):
    body = b"the origin is broken today\n"

    def do_HEAD(self) -> None:
        self.send_response(500)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()

    def do_GET(self) -> None:
        self.do_HEAD()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def failing_origin() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailingOrigin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/files/data.bin"
    server.shutdown()
    server.server_close()


def test_origin_500_fails_cleanly(cluster: LocalCluster, failing_origin: str, tmp_path: Path) -> None:
    _, (peer,) = start_network(cluster, ["peer1"])
    output = tmp_path / "broken.bin"
    result = run_dfget(peer, failing_origin, output)
    assert result.returncode != 0
    assert "500" in result.stderr
    assert not output.exists()


def test_wrong_digest_fails_and_keeps_the_good_blob(cluster: LocalCluster, registry: Registry, tmp_path: Path) -> None:
    digest, _ = push_random_blob(registry, "p2p/digest", 6 * MIB, seed=3)
    url = registry.blob_url("p2p/digest", digest)
    _, (peer,) = start_network(cluster, ["peer1"])
    wrong = "sha256:" + "ab" * 32
    output = tmp_path / "wrong.blob"
    result = run_dfget(peer, url, output, "--digest", wrong)
    assert result.returncode != 0
    assert "digest" in result.stderr
    assert not output.exists()
    # The same blob asked for with its right digest is served, from the cache.
    good = tmp_path / "good.blob"
    assert run_dfget(peer, url, good, "--digest", digest).returncode == 0
    assert sha256_file(good) == digest


def test_without_scheduler_the_peer_back_sources_unless_forbidden(
    cluster: LocalCluster, registry: Registry, registry_relay: ByteCountingRelay, tmp_path: Path
) -> None:
    size = 10 * MIB
    digest, _ = push_random_blob(registry, "p2p/alone", size, seed=5)
    url = f"{registry_relay.url}/v2/p2p/alone/blobs/{digest}"
    scheduler = cluster.start_scheduler()
    peer = cluster.start_dfdaemon("lonely")
    cluster.wait_ready(scheduler, peer)
    cluster.kill(scheduler)

    forbidden = run_dfget(peer, url, tmp_path / "forbidden.blob", "--disable-back-to-source")
    assert forbidden.returncode != 0
    assert "back-to-source is disabled" in forbidden.stderr
    assert not (tmp_path / "forbidden.blob").exists()

    registry_relay.reset()
    result = run_dfget(peer, url, tmp_path / "alone.blob")
    assert result.returncode == 0, result.stderr
    assert sha256_file(tmp_path / "alone.blob") == digest
    assert size <= registry_relay.bytes_from_target <= 1.05 * size


def test_children_finish_when_a_parent_is_killed_mid_transfer(
    cluster: LocalCluster, registry: Registry, tmp_path: Path
) -> None:
    size = 128 * MIB
    digest, _ = push_random_blob(registry, "p2p/killed", size, seed=11)
    url = registry.blob_url("p2p/killed", digest)
    # Uploads are rate-limited so that the kill lands while children are mid-transfer.
    _, (parent, *children) = start_network(cluster, ["peer1", "peer2", "peer3"], "--upload-rate-limit", "40MiB")
    first = run_dfget(parent, url, tmp_path / "parent.blob")
    assert first.returncode == 0, first.stderr

    downloads = [start_dfget(node, url, tmp_path / f"{node.name}.blob") for node in children]
    wait_until(lambda: parent.metrics().get(UPLOAD, 0) >= 8 * MIB, 120, "the parent to serve children")
    cluster.kill(parent, signal.SIGKILL)

    for node, process in zip(children, downloads, strict=True):
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"{node.name}: {stderr}"
        assert sha256_file(tmp_path / f"{node.name}.blob") == digest
    assert os.path.getsize(tmp_path / "parent.blob") == size
