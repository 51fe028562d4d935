"""The registry mirror / HTTP proxy of a real dfdaemon, with real clients and a real registry.

One network for the module (scheduler, seed, two dfdaemons as processes): ``plain`` mirrors the
open ``registry``, ``private`` mirrors ``auth_registry`` (htpasswd). Clients are the real tools
where they exist here (skopeo, curl, aria2c); nydusd's read pattern is replayed with keep-alive
connections. Every byte is compared with what was pushed.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import random
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.launcher import LocalCluster, Node, sha256_file, wait_until
from tests.support.registry import Registry, push_image, push_random_blob, write_layer_tar

pytestmark = pytest.mark.integration

MIB = 1 << 20
P2P_OK = 'damselfly_dfdaemon_proxy_requests_total{route="p2p",status="2xx"}'
CONNECTS = 'damselfly_dfdaemon_proxy_requests_total{route="connect",status="2xx"}'


@dataclass
class Network:
    cluster: LocalCluster
    seed: Node
    plain: Node  # mirror of `registry`
    private: Node  # mirror of `auth_registry`

    @staticmethod
    def proxy(node: Node) -> str:
        return f"127.0.0.1:{node.ports['proxy']}"


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory, registry: Registry,
            auth_registry: Registry) -> Iterator[Network]:
    cluster = LocalCluster(tmp_path_factory.mktemp("proxy-cluster"))
    try:
        seed = cluster.plan_dfdaemon("seed", seed=True)
        cluster.start_scheduler(seeds=[seed])
        cluster.start_dfdaemon("seed", node=seed)
        plain = cluster.start_dfdaemon("plain", "--registry-mirror", registry.url)
        private = cluster.start_dfdaemon("private", "--registry-mirror", auth_registry.url)
        assert cluster.scheduler is not None
        cluster.wait_ready(cluster.scheduler, seed, plain, private)
        yield Network(cluster, seed, plain, private)
    finally:
        cluster.stop()


def request(node: Node, method: str, path: str, headers: dict[str, str] | None = None,
            timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", node.ports["proxy"], timeout=timeout)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        connection.close()


def test_nydusd_read_pattern_is_answered_byte_for_byte(network: Network, registry: Registry) -> None:
    """200 random closed ranges of 1 KiB-2 MiB over a 64 MiB blob, 8 keep-alive connections at once."""
    size = 64 * MIB
    digest, path = push_random_blob(registry, "proxy/nydus", size, seed=64)
    blob = path.read_bytes()
    rng = random.Random(200)
    ranges = []
    for _ in range(200):
        length = rng.randint(1024, 2 * MIB)
        start = rng.randrange(0, size - length + 1)
        ranges.append((start, start + length - 1))
    target = f"/v2/proxy/nydus/blobs/{digest}"

    def reader(share: list[tuple[int, int]]) -> list[str]:
        problems = []
        connection = http.client.HTTPConnection("127.0.0.1", network.plain.ports["proxy"], timeout=60)
        try:
            for start, end in share:
                connection.request("GET", target, headers={"Range": f"bytes={start}-{end}"})
                response = connection.getresponse()
                body = response.read()
                if response.status != 206 or response.getheader("Content-Range") != f"bytes {start}-{end}/{size}":
                    problems.append(f"{start}-{end}: {response.status} {response.getheader('Content-Range')}")
                elif body != blob[start:end + 1]:
                    problems.append(f"{start}-{end}: {len(body)} bytes that differ from the blob")
        finally:
            connection.close()
        return problems

    with ThreadPoolExecutor(8) as pool:
        problems = [p for share in pool.map(reader, [ranges[i::8] for i in range(8)]) for p in share]
    assert not problems, problems[:5]
    assert network.plain.metrics().get(P2P_OK, 0) >= 200


def test_range_forms_head_and_errors(network: Network, registry: Registry) -> None:
    size = 9 * MIB + 4321  # three pieces of 4 MiB, the last one short
    digest, path = push_random_blob(registry, "proxy/forms", size, seed=9)
    blob = path.read_bytes()
    target = f"/v2/proxy/forms/blobs/{digest}"
    node = network.plain

    status, headers, body = request(node, "GET", target)
    assert (status, len(body), hashlib.sha256(body).hexdigest()) == (200, size, digest.split(":")[1])
    assert headers["x-dragonfly-task-id"]

    status, headers, body = request(node, "GET", target, {"Range": f"bytes={size - 100}-"})
    assert (status, headers["content-range"], body) == (206, f"bytes {size - 100}-{size - 1}/{size}", blob[-100:])

    status, headers, body = request(node, "GET", target, {"Range": "bytes=-5000000"})
    assert (status, body) == (206, blob[-5000000:])
    assert headers["content-range"] == f"bytes {size - 5000000}-{size - 1}/{size}"

    status, headers, body = request(node, "GET", target, {"Range": f"bytes=4194300-{size + 99}"})
    assert (status, body) == (206, blob[4194300:])  # a last position past the end is clamped

    for bad in (f"bytes={size}-", "bytes=-0", f"bytes={size + 5}-{size + 9}"):
        status, headers, body = request(node, "GET", target, {"Range": bad})
        assert (status, headers["content-range"]) == (416, f"bytes */{size}"), bad
        assert headers["x-dragonfly-error-type"] == "proxy"
    for malformed in ("bytes=5-1", "bytes=abc", "items=0-1", "bytes="):
        status, headers, _ = request(node, "GET", target, {"Range": malformed})
        assert (status, headers["content-range"]) == (416, f"bytes */{size}"), malformed

    status, _, body = request(node, "GET", target, {"Range": "bytes=0-9,20-29"})
    assert (status, body) == (200, blob), "a multi-range request gets the whole blob (documented)"

    status, headers, body = request(node, "HEAD", target)
    assert (status, int(headers["content-length"]), body) == (200, size, b"")

    missing = "sha256:" + "0" * 64
    status, headers, _ = request(node, "GET", f"/v2/proxy/forms/blobs/{missing}")
    assert status == 404, "the registry's 404 reaches the client"


def test_curl_and_aria2c_download_byte_exact(network: Network, registry: Registry, tmp_path: Path) -> None:
    size = 24 * MIB + 17
    digest, _ = push_random_blob(registry, "proxy/tools", size, seed=24)
    url = f"http://{network.proxy(network.plain)}/v2/proxy/tools/blobs/{digest}"
    subprocess.run(["curl", "-fsS", "-o", str(tmp_path / "curl.bin"), url], check=True, timeout=120)
    assert sha256_file(tmp_path / "curl.bin") == digest
    subprocess.run(["aria2c", "-q", "-x", "8", "-s", "8", "-k", "1M", "--allow-overwrite=true",
                    "-d", str(tmp_path), "-o", "aria.bin", url], check=True, timeout=120)
    assert sha256_file(tmp_path / "aria.bin") == digest


def _registries_conf(tmp_path: Path, location: str, mirror: str) -> Path:
    conf = tmp_path / "registries.conf"
    conf.write_text(
        'unqualified-search-registries = []\n\n'
        '[[registry]]\n'
        f'location = "{location}"\n'
        'insecure = true\n\n'
        '[[registry.mirror]]\n'
        f'location = "{mirror}"\n'
        'insecure = true\n'
    )
    return conf


def _skopeo_copy(conf: Path, image: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["skopeo", "--registries-conf", str(conf), "copy", "--src-tls-verify=false", *extra,
         f"docker://{image}", f"dir:{out}"], capture_output=True, text=True, timeout=180)


def _check_copied_layers(out: Path, layers: list[Path]) -> None:
    for layer in layers:
        digest = hashlib.sha256(layer.read_bytes()).hexdigest()
        copied = out / digest
        assert copied.exists(), f"layer {digest} missing from {sorted(p.name for p in out.iterdir())}"
        assert sha256_file(copied) == f"sha256:{digest}"


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_skopeo_pulls_through_the_mirror(network: Network, registry: Registry, tmp_path: Path) -> None:
    layers = [write_layer_tar(tmp_path / f"layer{i}.tar.gz", {f"f{i}": random.Random(i).randbytes(3 * MIB)})
              for i in range(3)]
    push_image(registry, "proxy/skopeo", "v1", layers)
    before = network.plain.metrics().get(P2P_OK, 0)
    # The primary location does not exist: only the mirror can answer.
    conf = _registries_conf(tmp_path, "registry.invalid:5000", network.proxy(network.plain))
    result = _skopeo_copy(conf, "registry.invalid:5000/proxy/skopeo:v1", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    _check_copied_layers(tmp_path / "out", layers)
    assert network.plain.metrics().get(P2P_OK, 0) >= before + 4, "config and layers came through P2P"


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_skopeo_with_credentials_through_the_mirror(network: Network, auth_registry: Registry,
                                                    tmp_path: Path) -> None:
    assert auth_registry.credentials is not None
    user, password = auth_registry.credentials
    layers = [write_layer_tar(tmp_path / f"layer{i}.tar.gz", {f"p{i}": random.Random(50 + i).randbytes(2 * MIB)})
              for i in range(2)]
    push_image(auth_registry, "proxy/private-image", "v1", layers, auth=auth_registry.credentials)
    # containers/image hands --src-creds only to the registry it names, never to its mirrors:
    # name the dfdaemon itself (mirror mode, upstream from --registry-mirror).
    conf = _registries_conf(tmp_path, "registry.invalid:5001", network.proxy(network.private))
    image = f"{network.proxy(network.private)}/proxy/private-image:v1"
    denied = _skopeo_copy(conf, image, tmp_path / "denied")
    assert denied.returncode != 0 and "unauthorized" in denied.stderr, denied.stderr
    result = _skopeo_copy(conf, image, tmp_path / "out", "--src-creds", f"{user}:{password}")
    assert result.returncode == 0, result.stderr
    _check_copied_layers(tmp_path / "out", layers)


def test_private_blob_cached_on_the_node_needs_valid_credentials(network: Network,
                                                                 auth_registry: Registry) -> None:
    assert auth_registry.credentials is not None
    digest, path = push_random_blob(auth_registry, "proxy/secret", 6 * MIB, seed=77,
                                    auth=auth_registry.credentials)
    target = f"/v2/proxy/secret/blobs/{digest}"
    good = {"Authorization": auth_registry.basic_auth()}
    status, _, body = request(network.private, "GET", target, good)
    assert status == 200 and body == path.read_bytes()

    wrong = "Basic " + base64.b64encode(b"damselfly:not-the-password").decode()
    for headers in ({}, {"Authorization": wrong}, {"Authorization": wrong, "Range": "bytes=0-99"}):
        status, answer, body = request(network.private, "GET", target, headers)
        assert status == 401, headers
        assert answer["www-authenticate"].lower().startswith("basic"), "the registry's challenge is relayed"
        assert path.read_bytes()[:100] not in body

    status, _, body = request(network.private, "GET", target, {**good, "Range": "bytes=10-19"})
    assert (status, body) == (206, path.read_bytes()[10:20])


def test_forward_proxy_and_connect_tunnel(network: Network, registry: Registry, tmp_path: Path) -> None:
    digest, _ = push_random_blob(registry, "proxy/forward", 5 * MIB + 1, seed=5)
    url = registry.blob_url("proxy/forward", digest)
    proxy = f"http://{network.proxy(network.plain)}"
    headers = tmp_path / "headers.txt"
    subprocess.run(["curl", "-fsS", "-x", proxy, "-D", str(headers), "-o", str(tmp_path / "forward.bin"), url],
                   check=True, timeout=60)
    assert sha256_file(tmp_path / "forward.bin") == digest
    assert "x-dragonfly-task-id" in headers.read_text().lower(), "the blob went through P2P"

    before = network.plain.metrics().get(CONNECTS, 0)
    subprocess.run(["curl", "-fsS", "-p", "-x", proxy, "-o", str(tmp_path / "tunnel.bin"), url],
                   check=True, timeout=60)
    assert sha256_file(tmp_path / "tunnel.bin") == digest
    # Counted when the tunnel ends, which is after curl has its bytes and hangs up.
    wait_until(lambda: network.plain.metrics().get(CONNECTS, 0) == before + 1, 10, "the tunnel to be counted")

    status, headers_seen, _ = request(network.plain, "GET", "/not-a-registry-path")
    assert (status, headers_seen["x-dragonfly-error-type"]) == (400, "proxy")


def test_upstream_from_header_and_ns_parameter(network: Network, registry: Registry) -> None:
    """What nydusd mirrors (X-Dragonfly-Registry) and containerd (?ns=) send choose the upstream."""
    digest, path = push_random_blob(registry, "proxy/upstream", 1 * MIB + 3, seed=31)
    target = f"/v2/proxy/upstream/blobs/{digest}"
    # `private` mirrors auth_registry by default; the header sends it to `registry` instead.
    status, headers, body = request(network.private, "GET", target, {"X-Dragonfly-Registry": registry.url})
    assert (status, body) == (200, path.read_bytes())
    assert headers["x-dragonfly-task-id"]
    # ns naming the default registry's host keeps its scheme (plain http here); ns is not forwarded.
    status, _, body = request(network.plain, "GET", f"{target}?ns={registry.host}", {"Range": "bytes=0-9"})
    assert (status, body) == (206, path.read_bytes()[:10])
    status, _, body = request(network.plain, "GET", "/v2/", {"X-Dragonfly-Registry": registry.url})
    assert status == 200, "non-blob requests go straight to the upstream"


def test_without_prefetch_only_the_covering_pieces_are_fetched(network: Network, registry: Registry) -> None:
    size = 32 * MIB  # 4 MiB pieces
    digest, path = push_random_blob(registry, "proxy/no-prefetch", size, seed=32)
    blob = path.read_bytes()
    target = f"/v2/proxy/no-prefetch/blobs/{digest}"

    def fetched() -> float:
        metrics = network.plain.metrics()
        return sum(metrics.get(f'damselfly_dfdaemon_download_traffic_bytes_total{{type="{kind}"}}', 0)
                   for kind in ("back_to_source", "remote_peer"))

    before = fetched()
    headers = {"X-Dragonfly-Prefetch": "false", "Range": f"bytes={5 * MIB}-{5 * MIB + 999}"}
    status, _, body = request(network.plain, "GET", target, headers)
    assert (status, body) == (206, blob[5 * MIB:5 * MIB + 1000])
    assert fetched() - before <= 4 * MIB, "one piece, not the blob"
    # A later read elsewhere in the blob starts a new partial download for its own pieces.
    headers["Range"] = f"bytes={20 * MIB - 10}-{20 * MIB + 10}"
    status, _, body = request(network.plain, "GET", target, headers)
    assert (status, body) == (206, blob[20 * MIB - 10:20 * MIB + 11])
    assert fetched() - before <= 12 * MIB
