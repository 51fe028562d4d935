"""What the registry mirror answers when a client names the registry only by ``?ns=``, when the
registry refuses, and when the node has the blob already; and that every error answer is logged.

One network for the module: scheduler, seed and one dfdaemon started *without*
``--registry-mirror``, so the upstream comes from each request (as containerd sends it).
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest

from common.launcher import LocalCluster, Node, wait_until
from tests.support.registry import Registry, push_random_blob

pytestmark = pytest.mark.integration

MIB = 1 << 20
LOCAL_PEER = 'damselfly_dfdaemon_download_traffic_bytes_total{type="local_peer"}'
CACHE_HITS = "damselfly_dfdaemon_cache_hits_total"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    cluster = LocalCluster(tmp_path_factory.mktemp("proxy-answers"))
    try:
        seed = cluster.plan_dfdaemon("seed", seed=True)
        cluster.start_scheduler(seeds=[seed])
        cluster.start_dfdaemon("seed", node=seed)
        daemon = cluster.start_dfdaemon("mirror")
        assert cluster.scheduler is not None
        cluster.wait_ready(cluster.scheduler, seed, daemon)
        yield daemon
    finally:
        cluster.stop()


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
            ) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def test_ns_of_a_plain_http_registry_goes_through_p2p(node: Node, registry: Registry) -> None:
    """containerd's ``?ns=127.0.0.1:PORT`` with no header: the registry speaks plain HTTP, not https."""
    digest, path = push_random_blob(registry, "answers/ns", 2 * MIB + 5, seed=81)
    target = f"/v2/answers/ns/blobs/{digest}?ns={registry.host}"
    status, headers, body = request(node.ports["proxy"], "GET", target)
    assert status == 200, body[:300]
    assert body == path.read_bytes()
    assert headers["x-dragonfly-task-id"], "through P2P, not a straight fallback"
    status, _, _ = request(node.ports["proxy"], "GET", f"/v2/?ns={registry.host}")
    assert status == 200, "non-blob requests reach the plain-HTTP registry too"


def test_blob_404_carries_the_registry_error_document(node: Node, registry: Registry) -> None:
    missing = "sha256:" + "7" * 64
    path = f"/v2/answers/missing/blobs/{missing}"
    expected_status, _, expected = request(registry.port, "GET", path)
    status, headers, body = request(node.ports["proxy"], "GET", path, {"X-Dragonfly-Registry": registry.url})
    assert (status, expected_status) == (404, 404)
    assert body == expected and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert int(headers["content-length"]) == len(expected)
    assert headers["content-type"].startswith("application/json")


def test_error_answers_are_logged_with_their_reason(node: Node, registry: Registry) -> None:
    missing = "sha256:" + "8" * 64
    request(node.ports["proxy"], "GET", f"/v2/answers/logged/blobs/{missing}", {"X-Dragonfly-Registry": registry.url})
    request(node.ports["proxy"], "GET", "/v2/answers/no-upstream/manifests/v1")  # no header, no ns, no default
    wanted = [f"answered 404 to GET /v2/answers/logged/blobs/{missing} (p2p)",
              "answered 400 to GET /v2/answers/no-upstream/manifests/v1 (other): no upstream registry"]
    wait_until(lambda: all(line in node.log_path.read_text() for line in wanted), 10,
               f"{wanted} in {node.log_path}")


def test_cache_hits_count_as_local_peer_traffic(node: Node, registry: Registry) -> None:
    size = 3 * MIB + 11
    digest, path = push_random_blob(registry, "answers/cached", size, seed=82)
    target = f"/v2/answers/cached/blobs/{digest}"
    upstream = {"X-Dragonfly-Registry": registry.url}
    status, _, body = request(node.ports["proxy"], "GET", target, upstream)
    assert (status, body) == (200, path.read_bytes())
    before = node.metrics()
    status, _, body = request(node.ports["proxy"], "GET", target, upstream)
    assert (status, body) == (200, path.read_bytes())
    status, _, body = request(node.ports["proxy"], "GET", target, {**upstream, "Range": "bytes=100-199"})
    assert (status, body) == (206, path.read_bytes()[100:200])
    after = node.metrics()
    assert after[CACHE_HITS] - before[CACHE_HITS] == 2
    assert after[LOCAL_PEER] - before[LOCAL_PEER] == size + 100, "bytes served from the cache, as dfget counts"
