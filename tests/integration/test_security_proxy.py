"""Attacks on the registry mirror / proxy of issue 12, run as an attacker would, and refused.

One network for the module: a scheduler, a seed and two dfdaemons as real processes, started
with ``LocalCluster(allowed_upstreams=())`` so each allows only what its flags say, like a node in
production. The origin is a real ``docker-registry`` with htpasswd auth holding a private blob;
``owner`` has pulled it with credentials. Every daemon lists the same few test servers in
``--proxy-allowed-upstreams`` (as a chart would list the cluster's registries); ``bystander``
also has ``*`` (any public host) and tight connection limits. The attackers' servers are
one-file HTTP servers on loopback (:class:`TinyServer`): a "registry" that answers 200 to
everything, a redirector, a server that keeps a secret. Each test says which item of the issue
it covers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from common.errors import OriginError
from common.launcher import LocalCluster, Node, wait_until
from common.origin import OriginClient
from tests.support.cluster import run_dfget
from tests.support.registry import Registry, push_random_blob

pytestmark = pytest.mark.integration

MIB = 1 << 20
PRIVATE_SIZE = 6 * MIB  # two pieces: enough for P2P to matter, small enough to stay quick
LIAR_BODY = b"not your blob, but 200 all the same\n"
SECRET = b"secret only reachable on this host\n"
OLD = b"old version " * 1000
NEW = b"new version " * 1000


@dataclass
class Seen:
    """One request a TinyServer received."""

    method: str
    path: str
    headers: dict[str, str]


class TinyServer:
    """A one-file HTTP server on loopback: `answer(handler) -> (status, headers, body)`; records requests."""

    def __init__(self, answer: Callable[[Seen], tuple[int, dict[str, str], bytes]]) -> None:
        self.seen: list[Seen] = []
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
                server_self.seen.append(seen)
                status, headers, body = answer(seen)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _serve

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _ranged(seen: Seen, content: bytes) -> tuple[int, dict[str, str], bytes]:
    """`content`, or the one range the request asks for (what back-source needs)."""
    header = seen.headers.get("range", "")
    if header.startswith("bytes="):
        first_text, _, last_text = header[6:].partition("-")
        first = int(first_text)
        last = min(int(last_text) if last_text else len(content) - 1, len(content) - 1)
        return 206, {"Content-Range": f"bytes {first}-{last}/{len(content)}", "Accept-Ranges": "bytes"}, \
            content[first:last + 1]
    return 200, {"Accept-Ranges": "bytes"}, content


@dataclass
class Network:
    cluster: LocalCluster
    registry: Registry
    seed: Node
    owner: Node  # pulled the private blob with credentials
    bystander: Node  # never pulled it; '*' allowed, tight connection limits
    digest: str
    private: bytes
    servers: dict[str, TinyServer] = field(default_factory=dict)


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory, auth_registry: Registry) -> Iterator[Network]:
    digest, path = push_random_blob(auth_registry, "secure/private", PRIVATE_SIZE, seed=12)
    servers: dict[str, TinyServer] = {}
    # The attacker's "registry": 200 to every HEAD and GET (unlisted, and a listed twin).
    servers["liar"] = TinyServer(lambda seen: (200, {"Docker-Content-Digest": digest}, LIAR_BODY))
    servers["listed_liar"] = TinyServer(lambda seen: (200, {"Docker-Content-Digest": digest}, LIAR_BODY))
    servers["secret"] = TinyServer(lambda seen: (200, {}, SECRET))  # a private service, never listed
    secret_url = servers["secret"].url
    servers["redirector"] = TinyServer(lambda seen: (307, {"Location": f"{secret_url}/secret"}, b""))
    servers["storage"] = TinyServer(lambda seen: _ranged(seen, NEW))  # object storage, other origin
    storage_url = servers["storage"].url
    servers["cdn_redirector"] = TinyServer(lambda seen: (307, {"Location": f"{storage_url}/object"}, b""))
    servers["versioned"] = TinyServer(lambda seen: _ranged(seen, OLD if "versionId=old" in seen.path else NEW))
    # Object storage whose HEAD works but whose GET is refused: the download of the shared task fails.
    servers["expired"] = TinyServer(lambda seen: (200, {"Accept-Ranges": "bytes"}, NEW) if seen.method == "HEAD"
                                    else (403, {}, b"<Error><Code>AccessDenied</Code></Error>"))
    listed = ",".join(f"127.0.0.1:{servers[name].port}" for name in
                      ("listed_liar", "redirector", "storage", "cdn_redirector", "versioned", "expired"))
    cluster = LocalCluster(tmp_path_factory.mktemp("security-proxy"), allowed_upstreams=())
    try:
        seed = cluster.plan_dfdaemon("seed", seed=True)
        cluster.start_scheduler(seeds=[seed])
        cluster.start_dfdaemon("seed", "--proxy-allowed-upstreams", listed, node=seed)
        owner = cluster.start_dfdaemon("owner", "--registry-mirror", auth_registry.url,
                                       "--proxy-allowed-upstreams", listed)
        bystander = cluster.start_dfdaemon(
            "bystander", "--registry-mirror", auth_registry.url, "--proxy-allowed-upstreams", f"*,{listed}",
            "--proxy-header-timeout", "2s", "--proxy-max-connections-per-client", "16")
        assert cluster.scheduler is not None
        cluster.wait_ready(cluster.scheduler, seed, owner, bystander)
        network = Network(cluster, auth_registry, seed, owner, bystander, digest, path.read_bytes(), servers)
        # The owner pulls the private blob with its credentials: it is now cached in the swarm.
        status, _, body = request(owner, "GET", f"/v2/secure/private/blobs/{digest}",
                                  {"Authorization": auth_registry.basic_auth()})
        assert (status, hashlib.sha256(body).hexdigest()) == (200, digest.split(":")[1])
        yield network
    finally:
        cluster.stop()
        for server in servers.values():
            server.close()


def request(node: Node, method: str, target: str, headers: dict[str, str] | None = None,
            timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", node.ports["proxy"], timeout=timeout)
    try:
        connection.request(method, target, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def connect(node: Node, authority: str) -> bytes:
    """A raw CONNECT; what the proxy answers (its status line and anything after it)."""
    with socket.create_connection(("127.0.0.1", node.ports["proxy"]), timeout=10) as sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        if answer.startswith(b"HTTP/1.1 200"):
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # what a gRPC client would send next
            answer += sock.recv(65536)
        return answer


# -- item 1: the access check asks only registries the operator allows ------------------------------


def test_a_registry_named_by_the_client_unlocks_no_private_blob(network: Network) -> None:
    """Issue 12 item 1: ``X-Dragonfly-Registry`` / ``?ns=`` / an absolute URL naming a fake registry
    that answers 200 to every HEAD: 403 on the node that holds the blob, and the fake is never asked."""
    liar = network.servers["liar"]
    target = f"/v2/anything/blobs/{network.digest}"
    attempts = [
        (target, {"X-Dragonfly-Registry": liar.url}),
        (f"{target}?ns=127.0.0.1:{liar.port}", {}),
        (f"{liar.url}{target}", {}),  # absolute form: the forward proxy
    ]
    for node in (network.owner, network.bystander):  # without '*', and with it (loopback is never '*')
        for path, headers in attempts:
            status, answer_headers, body = request(node, "GET", path, headers)
            assert status == 403, (node.name, path, status, body[:200])
            assert answer_headers.get("x-dragonfly-error-type") == "proxy"
            assert network.private[:4096] not in body
    assert liar.seen == []  # not even a HEAD or a scheme probe reached it


def test_a_blob_cached_from_one_registry_is_not_served_for_another(network: Network) -> None:
    """Issue 12 item 1, second half: even a registry the operator listed by mistake, answering 200
    to everything, gets its own task: the private blob cached from the real registry is not served."""
    liar = network.servers["listed_liar"]
    status, _, body = request(network.bystander, "GET", f"/v2/anything/blobs/{network.digest}",
                              {"X-Dragonfly-Registry": liar.url}, timeout=120)
    assert status != 200 or hashlib.sha256(body).hexdigest() != network.digest.split(":")[1]
    assert network.private[:4096] not in body
    assert any(seen.method == "GET" for seen in liar.seen)  # it was asked: its own (wrong) bytes, refused
    # The real registry still decides for its own blobs: no credentials, no blob (held-up behaviour).
    status, _, body = request(network.bystander, "GET", f"/v2/secure/private/blobs/{network.digest}")
    assert status == 401 and network.private[:4096] not in body


# -- item 6: no open forward proxy -------------------------------------------------------------------


def test_connect_to_internal_ports_is_refused(network: Network) -> None:
    """Issue 12 item 6: raw CONNECT to the scheduler's gRPC port and a node's piece server, by
    address and by a name that resolves to loopback: 403, no tunnel."""
    assert network.cluster.scheduler is not None
    scheduler = network.cluster.scheduler.ports["grpc"]
    for node in (network.owner, network.bystander):
        for authority in (f"127.0.0.1:{scheduler}", f"localhost:{scheduler}",
                          f"127.0.0.1:{network.seed.ports['upload']}", f"[::1]:{scheduler}",
                          "169.254.169.254:80"):
            answer = connect(node, authority)
            assert answer.startswith(b"HTTP/1.1 403"), (node.name, authority, answer[:200])


def test_forward_requests_to_internal_addresses_are_refused(network: Network) -> None:
    """Issue 12 item 6: absolute-form GETs of the scheduler's and the seed's metrics (by address,
    and by a name that resolves to loopback under ``*``): 403, nothing read back."""
    assert network.cluster.scheduler is not None
    targets = [f"http://127.0.0.1:{network.cluster.scheduler.ports['metrics']}/metrics",
               f"http://localhost:{network.seed.ports['metrics']}/metrics",
               f"http://127.0.0.1:{network.seed.ports['upload']}/"]
    for node in (network.owner, network.bystander):
        for target in targets:
            status, _, body = request(node, "GET", target)
            assert status == 403, (node.name, target, status, body[:200])
            assert b"damselfly_" not in body


def test_redirects_to_a_private_address_are_refused(network: Network, tmp_path: Path) -> None:
    """Issue 12 item 6: a listed upstream redirecting to a private service (an unlisted loopback
    port): refused on the straight path, on the access check of the P2P path, and on back-source
    (dfget); the secret server is never asked."""
    redirector = network.servers["redirector"]
    secret = network.servers["secret"]
    blob = f"{redirector.url}/v2/x/blobs/sha256:{'0' * 64}"
    status, _, body = request(network.bystander, "GET", blob, {"X-Dragonfly-Use-P2P": "false"})
    assert status == 403 and SECRET not in body, (status, body[:200])
    status, _, body = request(network.bystander, "GET", blob)  # P2P: the access check's HEAD
    assert status == 403 and SECRET not in body, (status, body[:200])
    result = run_dfget(network.owner, f"{redirector.url}/file", tmp_path / "out", timeout=120)
    assert result.returncode != 0
    assert not (tmp_path / "out").exists()
    assert secret.seen == []


def test_a_registry_redirect_to_object_storage_is_followed(network: Network) -> None:
    """Issue 12 item 6, what must keep working: a listed registry sending the blob to another origin
    the operator lists (object storage). The CDN case (any public host) is in the unit tests."""
    # The proxy follows a redirect of a blob request (clients of a mirror expect bytes).
    status, _, body = request(network.bystander, "GET", f"{network.servers['cdn_redirector'].url}/v2/c/blobs/file",
                              {"X-Dragonfly-Use-P2P": "false"})
    assert (status, body) == (200, NEW)


# -- item 8: a client cannot re-key a URL ----------------------------------------------------------


def test_filtered_query_params_from_a_client_do_not_rekey_a_url(network: Network) -> None:
    """Issue 12 item 8: an attacker fetches ``?versionId=old`` through P2P claiming ``versionId`` is a
    filtered parameter; the next client asking for the URL without it must get the current content."""
    url = f"{network.servers['versioned'].url}/artifact.bin"
    status, _, body = request(network.bystander, "GET", f"{url}?versionId=old",
                              {"X-Dragonfly-Use-P2P": "true", "X-Dragonfly-Filtered-Query-Params": "versionId"})
    assert (status, body) == (200, OLD)
    for node in (network.bystander, network.owner):
        status, _, body = request(node, "GET", url, {"X-Dragonfly-Use-P2P": "true"})
        assert (status, body == NEW) == (200, True), (node.name, status, body[:40])


def test_p2p_error_answers_carry_no_signatures(network: Network) -> None:
    """Issue 12 item 12 (the proxy's share of the URL disclosure): presigned URLs of one object that
    differ only in their signature are one task, so a P2P error answer, which may be about a
    download another client started, names URLs without query string or user info."""
    url = f"{network.servers['expired'].url}/bucket/layer.bin"
    p2p = {"X-Dragonfly-Use-P2P": "true"}
    for node, signature in ((network.bystander, "alice-signature-0123"), (network.owner, "bob-signature-4567")):
        status, _, body = request(node, "GET", f"{url}?X-Amz-Signature={signature}", p2p)
        assert status == 502, (status, body[:300])
        assert b"/bucket/layer.bin" in body  # still says which object failed
        assert b"signature-" not in body and b"X-Amz" not in body, body[:300]


# -- item 12: Cookie never crosses origins ---------------------------------------------------------


def test_cookie_and_authorization_stay_with_the_first_origin(network: Network, tmp_path: Path) -> None:
    """Issue 12 item 12: a redirect to another origin (object storage) gets neither the client's
    ``Cookie`` nor its ``Authorization``: straight through the proxy, and on back-source (dfget)."""
    redirector = network.servers["cdn_redirector"]
    storage = network.servers["storage"]
    storage.seen.clear()
    redirector.seen.clear()
    credentials = {"Cookie": "session=alice-secret", "Authorization": "Basic YWxpY2U6czNjcmV0"}
    status, _, body = request(network.bystander, "GET", f"{redirector.url}/v2/c/blobs/cookie",
                              {"X-Dragonfly-Use-P2P": "false", **credentials})
    assert (status, body) == (200, NEW)
    output = tmp_path / "cookie.bin"
    result = run_dfget(network.owner, f"{redirector.url}/cookie-dfget", output,
                       *[arg for name, value in credentials.items() for arg in ("-H", f"{name}: {value}")],
                       timeout=120)
    assert result.returncode == 0, result.stderr
    assert output.read_bytes() == NEW
    assert any(seen.headers.get("cookie") == "session=alice-secret" for seen in redirector.seen)  # sent there
    assert storage.seen, "the redirect was not followed"
    leaked = [seen for seen in storage.seen if "cookie" in seen.headers or "authorization" in seen.headers]
    assert leaked == []


# -- item 10: the proxy listener's limits -----------------------------------------------------------


def test_slowloris_connections_are_closed_and_capped_per_client(network: Network) -> None:
    """Issue 12 item 10: 24 connections from one address sending half a request: the 8 over the
    per-client cap (16) are closed at once, the rest after the 2 s header timeout; a client from
    another address is served meanwhile."""
    node = network.bystander
    sockets: list[socket.socket] = []
    started = time.monotonic()
    for _ in range(24):
        sock = socket.socket()
        sock.bind(("127.0.0.9", 0))
        sock.connect(("127.0.0.1", node.ports["proxy"]))
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: slow\r\nX-Slow: ")
        sock.setblocking(False)
        sockets.append(sock)
    closed_at: dict[int, float] = {}

    def all_closed() -> bool:
        for index, sock in enumerate(sockets):
            if index in closed_at:
                continue
            try:
                if sock.recv(1024) == b"":
                    closed_at[index] = time.monotonic() - started
            except BlockingIOError:
                pass
            except ConnectionError:
                closed_at[index] = time.monotonic() - started
        return len(closed_at) == len(sockets)

    wait_until(lambda: len(closed_at) >= 8 or all_closed(), 5, "the connections over the cap to be closed")
    status, _, _ = request(node, "GET", "/v2/")  # from 127.0.0.1: not this client's cap
    assert status == 401  # the registry's own answer: served
    wait_until(all_closed, 20, "every half-sent request to be closed by the header timeout")
    for sock in sockets:
        sock.close()
    early = sorted(closed_at.values())[:8]
    late = sorted(closed_at.values())[8:]
    print(f"slowloris: 8 over the cap closed after {max(early):.2f}s, 16 slow ones after "
          f"{min(late):.2f}-{max(late):.2f}s (header timeout 2s)")
    assert max(early) < 1.5
    assert min(late) >= 1.5 and max(late) < 10


def test_finished_tunnels_leave_the_clients_cap_free(network: Network) -> None:
    """Issue 12 item 10: more CONNECT tunnels than the per-client cap (16), one after the other, each
    used and closed: the client's next request is still served (a tunnel takes its connection from
    aiohttp, so the cap must learn by itself that it closed)."""
    node = network.bystander
    authority = f"127.0.0.1:{network.servers['versioned'].port}"  # a listed upstream
    for tunnel in range(20):
        with socket.socket() as sock:
            sock.settimeout(10)
            sock.bind(("127.0.0.8", 0))
            sock.connect(("127.0.0.1", node.ports["proxy"]))
            sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            answer = b""
            while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), (tunnel, answer[:200])
            sock.sendall(f"GET /object HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode())
            sock.shutdown(socket.SHUT_WR)
            answer = answer.partition(b"\r\n\r\n")[2]
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.") and answer.endswith(NEW), (tunnel, answer[:200])  # from the upstream
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind(("127.0.0.8", 0))
        sock.connect(("127.0.0.1", node.ports["proxy"]))
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 401")  # the registry's own answer: served


def test_the_token_cache_stays_bounded(network: Network, token_registry: Registry) -> None:
    """Issue 12 item 10: fresh scopes on every request (a new repository each time) against a real
    token-auth registry: tokens are fetched for each, but the cache keeps at most its bound."""
    digest = f"sha256:{'1' * 64}"
    basic = token_registry.basic_auth()

    async def scatter() -> tuple[int, int]:
        async with OriginClient(max_cached_tokens=8) as origin:
            for index in range(30):
                # 404 for a blob nobody pushed: only the tokens fetched on the way matter.
                with contextlib.suppress(OriginError):
                    await origin.stat(f"{token_registry.url}/v2/lru/repo{index}/blobs/{digest}",
                                      {"Authorization": basic})
            return origin.token_fetches, origin.cached_tokens

    fetched, cached = asyncio.run(scatter())
    assert fetched == 30
    assert cached == 8
