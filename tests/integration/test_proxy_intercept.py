"""HTTPS interception and the 429 limit of the dfdaemon proxy, with real processes and real clients.

The HTTPS origin is Debian's ``docker-registry`` serving, over TLS, the storage of the session's
plain ``registry`` (blobs are pushed to the plain one and read through the TLS one). Its
certificate (``localhost`` and ``127.0.0.1``) is signed by an "origin CA"; the dfdaemon signs the
certificates it mints with a separate "operator CA". A client that trusts only the operator CA
can therefore only succeed through interception, and one that trusts only the origin CA only
through a plain tunnel.

The seed back-sources from the TLS origin and trusts the origin CA through ``SSL_CERT_FILE``
(the dfdaemon's own ``proxy_upstream_ca_cert`` is for the proxy's requests, not the seed's).
"""

from __future__ import annotations

import hashlib
import http.client
import secrets
import ssl
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.errors import InvalidRequest
from common.launcher import LocalCluster, Node, free_port, sha256_file, tail, wait_until
from peer.proxy.server import P2PAdmission
from peer.proxy.tls import HostPattern, inner_url, origin_of
from tests.support.certs import TestCA
from tests.support.registry import REGISTRY_BINARY, Registry, push_random_blob

pytestmark = pytest.mark.integration

MIB = 1 << 20
P2P = 'damselfly_dfdaemon_proxy_requests_total{{route="p2p",status="{}"}}'
FORWARD_OK = 'damselfly_dfdaemon_proxy_requests_total{route="forward",status="2xx"}'
CONNECTS = 'damselfly_dfdaemon_proxy_requests_total{route="connect",status="2xx"}'
FROM_PEERS = 'damselfly_dfdaemon_download_traffic_bytes_total{type="remote_peer"}'
RATE_LIMITED = 'damselfly_dfdaemon_proxy_rate_limited_total{limit="concurrency"}'
OPERATOR_CA = "Damselfly test operator CA"
ORIGIN_CA = "Damselfly test origin CA"


# -- certificates ----------------------------------------------------------------------------------


@dataclass
class Pki:
    operator_ca: Path  # signs what the dfdaemon mints; the client trusts it
    operator_key: Path
    origin_ca: Path  # signs the TLS registry's certificate
    origin_cert: Path
    origin_key: Path
    stray_key: Path  # a key that belongs to no certificate here


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    operator = TestCA(directory / "operator", OPERATOR_CA)
    origin_ca = TestCA(directory / "origin", ORIGIN_CA)
    origin = origin_ca.issue("origin")  # localhost and 127.0.0.1
    stray = TestCA(directory / "stray", "stray")
    return Pki(operator.cert_path, operator.key_path, origin_ca.cert_path, origin.cert, origin.key, stray.key_path)


# -- an HTTPS registry over the plain registry's storage ----------------------------------------------


@dataclass
class TlsOrigin:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def url(self, host: str, path: str) -> str:
        return f"https://{host}:{self.port}{path}"


def _answers(origin: TlsOrigin, context: ssl.SSLContext) -> bool:
    if origin.process.poll() is not None:
        raise RuntimeError(f"the TLS registry exited:\n{tail(origin.log_path)}")
    connection = http.client.HTTPSConnection("127.0.0.1", origin.port, context=context, timeout=2)
    try:
        connection.request("GET", "/v2/")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


@pytest.fixture(scope="module")
def tls_origin(tmp_path_factory: pytest.TempPathFactory, registry: Registry, pki: Pki) -> Iterator[TlsOrigin]:
    if not Path(REGISTRY_BINARY).exists():
        pytest.skip(f"{REGISTRY_BINARY} is missing")
    workdir = tmp_path_factory.mktemp("tls-registry")
    port = free_port()
    (workdir / "config.yml").write_text("\n".join([
        "version: 0.1", "log:", "  level: info", "  accesslog:", "    disabled: true",
        "storage:", "  filesystem:", f"    rootdirectory: {registry.storage}",
        "  maintenance:", "    uploadpurging:", "      enabled: false",
        "http:", f"  addr: 127.0.0.1:{port}", f"  secret: {secrets.token_hex(16)}",
        "  tls:", f"    certificate: {pki.origin_cert}", f"    key: {pki.origin_key}", "",
    ]))
    log_path = workdir / "registry.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen([REGISTRY_BINARY, "serve", str(workdir / "config.yml")],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    origin = TlsOrigin(port, process, log_path)
    try:
        context = ssl.create_default_context(cafile=str(pki.origin_ca))
        wait_until(lambda: _answers(origin, context), 20, "the TLS registry to answer /v2/")
        yield origin
    finally:
        process.terminate()
        process.wait(timeout=10)


# -- the Damselfly network -------------------------------------------------------------------------


@dataclass
class Network:
    cluster: LocalCluster
    seed: Node
    intercepting: Node  # intercepts localhost:<TLS origin port>
    limited: Node  # mirror of `registry`, one P2P request at a time


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory, registry: Registry, tls_origin: TlsOrigin,
            pki: Pki) -> Iterator[Network]:
    cluster = LocalCluster(tmp_path_factory.mktemp("intercept-cluster"))
    try:
        seed = cluster.plan_dfdaemon("seed", seed=True)
        cluster.start_scheduler(seeds=[seed])
        with pytest.MonkeyPatch.context() as env:
            env.setenv("SSL_CERT_FILE", str(pki.origin_ca))  # only the seed's process gets it
            cluster.start_dfdaemon("seed", node=seed)
        intercepting = cluster.start_dfdaemon(
            "intercepting", "--proxy-intercept-hosts", f"localhost:{tls_origin.port}",
            "--proxy-ca-cert", str(pki.operator_ca), "--proxy-ca-key", str(pki.operator_key),
            "--proxy-upstream-ca-cert", str(pki.origin_ca))
        limited = cluster.start_dfdaemon("limited", "--registry-mirror", registry.url,
                                         "--proxy-p2p-concurrency", "1")
        assert cluster.scheduler is not None
        cluster.wait_ready(cluster.scheduler, seed, intercepting, limited)
        yield Network(cluster, seed, intercepting, limited)
    finally:
        cluster.stop()


def _proxy(node: Node) -> str:
    return f"http://127.0.0.1:{node.ports['proxy']}"


def _counted(node: Node, name: str, value: float) -> None:
    """Wait until the node's counter `name` reaches `value`: a request is counted when its handler
    returns, which can be just after the client has read the last byte."""
    wait_until(lambda: node.metrics().get(name, 0) >= value, 10, f"{name} to reach {value}")


def _curl(node: Node, url: str, ca: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-fsS", "--noproxy", "", "-x", _proxy(node), "--cacert", str(ca),
                           "-o", str(out), *extra, url], capture_output=True, text=True, timeout=120)


def test_intercepted_host_blob_goes_through_p2p(network: Network, registry: Registry, tls_origin: TlsOrigin,
                                                pki: Pki, tmp_path: Path) -> None:
    digest, path = push_random_blob(registry, "intercept/blob", 9 * MIB + 7, seed=443)
    url = tls_origin.url("localhost", f"/v2/intercept/blob/blobs/{digest}")
    node = network.intercepting
    before = node.metrics()

    # The client trusts only the operator CA: the origin's own certificate would be refused.
    result = _curl(node, url, pki.operator_ca, tmp_path / "blob", "-D", str(tmp_path / "headers"))
    assert result.returncode == 0, f"{result.stderr}\n{tail(node.log_path)}"
    assert sha256_file(tmp_path / "blob") == digest
    assert "x-dragonfly-task-id:" in (tmp_path / "headers").read_text().lower(), "the blob went through P2P"
    _counted(node, P2P.format("2xx"), before[P2P.format("2xx")] + 1)
    after = node.metrics()
    assert after[FROM_PEERS] - before[FROM_PEERS] >= path.stat().st_size, "the bytes came from the seed"

    result = _curl(node, url, pki.operator_ca, tmp_path / "range", "-r", "1000-1999")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "range").read_bytes() == path.read_bytes()[1000:2000]
    _counted(node, P2P.format("2xx"), before[P2P.format("2xx")] + 2)

    # Not a blob: straight to the origin, over TLS verified with proxy_upstream_ca_cert.
    result = _curl(node, tls_origin.url("localhost", "/v2/"), pki.operator_ca, tmp_path / "v2")
    assert result.returncode == 0, f"{result.stderr}\n{tail(node.log_path)}"
    _counted(node, FORWARD_OK, before[FORWARD_OK] + 1)
    _counted(node, CONNECTS, before[CONNECTS] + 3)  # each curl's intercepted CONNECT, once it closed


def test_unlisted_host_is_tunnelled_unchanged(network: Network, registry: Registry, tls_origin: TlsOrigin,
                                              pki: Pki) -> None:
    digest, path = push_random_blob(registry, "intercept/tunnelled", 2 * MIB + 3, seed=80)
    node = network.intercepting
    before = node.metrics()
    # 127.0.0.1 is the same origin under a name that is not listed: a byte-for-byte tunnel.
    context = ssl.create_default_context(cafile=str(pki.origin_ca))
    connection = http.client.HTTPSConnection("127.0.0.1", node.ports["proxy"], context=context, timeout=60)
    try:
        connection.set_tunnel("127.0.0.1", tls_origin.port)
        connection.request("GET", f"/v2/intercept/tunnelled/blobs/{digest}")
        response = connection.getresponse()
        body = response.read()
        assert connection.sock is not None
        peer = connection.sock.getpeercert()
    finally:
        connection.close()
    assert (response.status, hashlib.sha256(body).digest()) == (200, hashlib.sha256(path.read_bytes()).digest())
    assert response.getheader("X-Dragonfly-Task-ID") is None
    issuer = {key: value for rdn in peer["issuer"] for key, value in rdn}
    assert issuer["organizationName"] == ORIGIN_CA, "the client saw the origin's own certificate"
    _counted(node, CONNECTS, before[CONNECTS] + 1)  # when the server has seen the tunnel close
    assert node.metrics()[P2P.format("2xx")] == before[P2P.format("2xx")]


@pytest.mark.parametrize(("flags", "key", "reason"), [
    (("--proxy-ca-cert", "{missing}", "--proxy-ca-key", "{operator_key}"), "proxy_ca_cert", "is not a file"),
    (("--proxy-ca-key", "{operator_key}"), "proxy_ca_cert", "needed by proxy_intercept_hosts"),
    (("--proxy-ca-cert", "{operator_ca}", "--proxy-ca-key", "{stray_key}"), "proxy_ca_key", "is not the key"),
    (("--proxy-ca-cert", "{origin_cert}", "--proxy-ca-key", "{origin_key}"), "proxy_ca_cert", "not a CA"),
])
def test_interception_with_a_bad_ca_fails_at_start_up(pki: Pki, tmp_path: Path, flags: tuple[str, ...], key: str,
                                                      reason: str) -> None:
    node = LocalCluster(tmp_path / "cluster").plan_dfdaemon("bad")
    paths = {"missing": tmp_path / "no-such-ca.pem", "operator_key": pki.operator_key,
             "operator_ca": pki.operator_ca, "stray_key": pki.stray_key, "origin_cert": pki.origin_cert,
             "origin_key": pki.origin_key}
    arguments = [flag.format(**paths) for flag in flags]
    result = subprocess.run([sys.executable, "-m", "common.cli", "dfdaemon", *node.args,
                             "--proxy-intercept-hosts", "registry.example.com", *arguments],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"config {key}: " in result.stderr and reason in result.stderr, result.stderr


def _get(node: Node, target: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", node.ports["proxy"], timeout=60)
    try:
        connection.request("GET", target)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def test_p2p_requests_over_the_concurrency_limit_get_429(network: Network, registry: Registry) -> None:
    node = network.limited
    big, big_path = push_random_blob(registry, "limit/big", 64 * MIB, seed=641)
    small, small_path = push_random_blob(registry, "limit/small", 1 * MIB, seed=642)
    before = node.metrics()

    # Hold the only slot: a whole 64 MiB blob, headers read, body not, so its sender is stuck.
    held = http.client.HTTPConnection("127.0.0.1", node.ports["proxy"], timeout=60)
    try:
        held.request("GET", f"/v2/limit/big/blobs/{big}")
        response = held.getresponse()
        assert response.status == 200

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: _get(node, f"/v2/limit/small/blobs/{small}"), range(8)))
        statuses = [status for status, _, _ in answers]
        assert statuses == [429] * 8, statuses
        for _, headers, _ in answers:
            assert headers["x-dragonfly-error-type"] == "proxy"
            assert int(headers["retry-after"]) >= 1
        assert _get(node, "/v2/")[0] == 200, "requests that do not go through P2P are not limited"

        assert hashlib.sha256(response.read()).digest() == hashlib.sha256(big_path.read_bytes()).digest()
        # Same connection: the server finished the first request (and freed its slot) before this one.
        held.request("GET", f"/v2/limit/small/blobs/{small}")
        response = held.getresponse()
        assert (response.status, response.read()) == (200, small_path.read_bytes())
    finally:
        held.close()

    # A free-for-all burst: whatever is refused is a 429, nothing fails.
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _get(node, f"/v2/limit/small/blobs/{small}"), range(16)))
    assert {status for status, _, _ in answers} <= {200, 429}
    assert all(body == small_path.read_bytes() for status, _, body in answers if status == 200)

    after = node.metrics()
    refused = 8 + sum(status == 429 for status, _, _ in answers)
    assert after[RATE_LIMITED] == before[RATE_LIMITED] + refused
    assert after[P2P.format("4xx")] == before[P2P.format("4xx")] + refused
    assert after[P2P.format("5xx")] == before[P2P.format("5xx")]


# -- the pure parts, table-driven --------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "host", "port", "matches"), [
    ("registry.example.com", "registry.example.com", 443, True),
    ("registry.example.com", "REGISTRY.example.com.", 5000, True),
    ("registry.example.com", "other.example.com", 443, False),
    ("*.example.com", "a.b.example.com", 443, True),
    ("*.example.com", "example.com", 443, False),
    ("*.example.com", "badexample.com", 443, False),
    ("localhost:5000", "localhost", 5000, True),
    ("localhost:5000", "localhost", 5001, False),
    ("[::1]:443", "::1", 443, True),
])
def test_host_patterns(pattern: str, host: str, port: int, matches: bool) -> None:
    assert HostPattern.parse(pattern).matches(host, port) is matches


@pytest.mark.parametrize(("host", "port", "method", "target", "url"), [
    ("registry.example.com", 443, "GET", "/v2/a/blobs/sha256:1?x=1", "https://registry.example.com/v2/a/blobs/sha256:1?x=1"),
    ("localhost", 5000, "HEAD", "/v2/", "https://localhost:5000/v2/"),
    ("::1", 8443, "GET", "/v2/", "https://[::1]:8443/v2/"),
    ("localhost", 5000, "GET", "https://localhost:5000/v2/x", "https://localhost:5000/v2/x"),
    ("localhost", 5000, "GET", "https://elsewhere:5000/v2/x", None),
    ("localhost", 5000, "CONNECT", "localhost:5000", None),
])
def test_inner_url(host: str, port: int, method: str, target: str, url: str | None) -> None:
    origin = origin_of(host, port)
    if url is None:
        with pytest.raises(InvalidRequest):
            inner_url(origin, method, target)
    else:
        assert inner_url(origin, method, target) == url


@pytest.mark.parametrize(("concurrency", "rate", "steps", "expected"), [
    # steps: (time, "admit" | "release"); expected: what each admit answered
    (1, 0.0, [(0, "admit"), (0, "admit"), (0, "release"), (0, "admit")], [None, ("concurrency", 1), None]),
    (0, 2.0, [(0, "admit"), (0, "admit"), (0, "admit"), (0.5, "admit"), (0.6, "admit")],
     [None, None, ("rate", 1), None, ("rate", 1)]),
    (0, 0.25, [(0, "admit"), (1, "admit"), (4, "admit")], [None, ("rate", 3), None]),
    (0, 0.0, [(0, "admit")] * 50, [None] * 50),
])
def test_p2p_admission(concurrency: int, rate: float, steps: list[tuple[float, str]],
                       expected: list[tuple[str, int] | None]) -> None:
    admission = P2PAdmission(concurrency, rate, now=0.0)
    answers = []
    for now, step in steps:
        if step == "admit":
            answers.append(admission.admit(now))
        else:
            admission.release()
    assert answers == expected
