"""The origin client against the real docker-registry (plain, htpasswd, token auth) and against
loopback servers that redirect, cut bodies short, or refuse connections."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from common.errors import OriginError, OriginStatusError, OriginUnreachable
from common.origin import OriginBody, OriginClient, OriginResponseError
from tests.support.registry import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    Registry,
    free_port,
    push_image,
    push_random_blob,
    skopeo_available,
    write_layer_tar,
)
from tests.support.relay import ByteCountingRelay
from tests.support.servers import read_request_head, serve_app, serve_raw

pytestmark = pytest.mark.integration

MiB = 1 << 20
UNKNOWN_DIGEST = "sha256:" + "0" * 64


@pytest.fixture
async def client() -> AsyncIterator[OriginClient]:
    async with OriginClient(connect_timeout=5, sock_read_timeout=10) as origin:
        yield origin


async def drain(body: OriginBody) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    async for chunk in body.chunks(256 * 1024):
        hasher.update(chunk)
        size += len(chunk)
    return f"sha256:{hasher.hexdigest()}", size


def file_range(path: Path, start: int, length: int) -> bytes:
    with path.open("rb") as stream:
        stream.seek(start)
        return stream.read(length)


async def test_stat_and_whole_blob_match_the_digest(registry: Registry, client: OriginClient) -> None:
    size = 5 * MiB + 123
    digest, _ = push_random_blob(registry, "origin/whole", size, seed=11)
    url = registry.blob_url("origin/whole", digest)

    stat = await client.stat(url, {})
    assert stat.content_length == size
    assert stat.supports_range
    assert stat.headers["Docker-Content-Digest"] == digest

    async with client.get(url, {}) as body:
        assert body.status == 200
        assert body.content_length == size
        assert await drain(body) == (digest, size)


@pytest.mark.parametrize(
    ("start", "length"),
    [(0, 1), (0, MiB), (MiB - 1, 2), (3 * MiB + 7, MiB), (4 * MiB, None), (4 * MiB + 100, 10 * MiB)],
    ids=["first-byte", "first-mib", "across-boundary", "middle", "open-ended", "past-the-end"],
)
async def test_ranged_get_returns_exactly_the_range(
    registry: Registry, client: OriginClient, start: int, length: int | None
) -> None:
    size = 4 * MiB + 4096
    digest, path = push_random_blob(registry, "origin/ranged", size, seed=12)
    end = size if length is None else min(start + length, size)
    expected = file_range(path, start, end - start)

    async with client.get(registry.blob_url("origin/ranged", digest), {}, start=start, length=length) as body:
        assert body.status == 206
        assert body.content_length == len(expected)
        received = b"".join([chunk async for chunk in body.chunks()])
    assert received == expected


async def test_unknown_blob_is_a_404(registry: Registry, client: OriginClient) -> None:
    url = registry.blob_url("origin/missing", UNKNOWN_DIGEST)
    with pytest.raises(OriginStatusError) as raised:
        await client.stat(url, {})
    assert raised.value.status == 404
    with pytest.raises(OriginStatusError) as raised:
        async with client.get(url, {}):
            pass
    assert raised.value.status == 404
    assert "BLOB_UNKNOWN" in str(raised.value)  # the registry's error code is in the message


async def test_basic_auth_registry(auth_registry: Registry, client: OriginClient) -> None:
    digest, _ = push_random_blob(auth_registry, "origin/private", MiB, seed=13)
    url = auth_registry.blob_url("origin/private", digest)

    with pytest.raises(OriginStatusError) as raised:
        await client.stat(url, {})
    assert raised.value.status == 401
    assert isinstance(raised.value, OriginResponseError)
    assert raised.value.www_authenticate == 'Basic realm="damselfly-test"'  # kept for relaying

    with pytest.raises(OriginStatusError) as raised:
        async with client.get(url, {"Authorization": "Basic d3Jvbmc6d3Jvbmc="}):  # wrong:wrong
            pass
    assert raised.value.status == 401

    async with client.get(url, {"Authorization": auth_registry.basic_auth()}) as body:
        assert await drain(body) == (digest, MiB)


async def test_configured_credentials_answer_a_basic_challenge(auth_registry: Registry) -> None:
    digest, _ = push_random_blob(auth_registry, "origin/private", MiB, seed=13)
    assert auth_registry.credentials is not None
    async with OriginClient(credentials={auth_registry.host: auth_registry.credentials}) as client:
        stat = await client.stat(auth_registry.blob_url("origin/private", digest), {})
        assert stat.content_length == MiB
        async with client.get(auth_registry.blob_url("origin/private", digest), {}) as body:
            assert await drain(body) == (digest, MiB)


async def test_bearer_token_flow_against_real_token_auth(
    token_registry: Registry, client: OriginClient
) -> None:
    tokens = token_registry.token_server
    assert tokens is not None
    digest, path = push_random_blob(token_registry, "origin/token", 2 * MiB, seed=14)
    url = token_registry.blob_url("origin/token", digest)
    caller = {"Authorization": token_registry.basic_auth()}
    tokens.reset_counts()

    stat = await client.stat(url, caller)
    assert stat.content_length == 2 * MiB
    async with client.get(url, caller) as body:
        assert await drain(body) == (digest, 2 * MiB)
    async with client.get(url, caller, start=MiB, length=100) as body:
        assert b"".join([c async for c in body.chunks()]) == file_range(path, MiB, 100)
    # One token for the repository, reused by every later request (the cache works).
    assert tokens.issued == 1
    assert tokens.requests == [("damselfly", ["repository:origin/token:pull"])]


async def test_bearer_without_credentials_relays_the_challenge(
    token_registry: Registry, client: OriginClient
) -> None:
    digest, _ = push_random_blob(token_registry, "origin/token", 2 * MiB, seed=14)
    with pytest.raises(OriginResponseError) as raised:
        async with client.get(token_registry.blob_url("origin/token", digest), {}):
            pass
    assert raised.value.status == 401
    challenge = raised.value.www_authenticate or ""
    assert challenge.startswith("Bearer realm=")
    assert 'scope="repository:origin/token:pull"' in challenge


async def test_bearer_with_configured_credentials(token_registry: Registry) -> None:
    digest, _ = push_random_blob(token_registry, "origin/token", 2 * MiB, seed=14)
    assert token_registry.credentials is not None
    url = token_registry.blob_url("origin/token", digest)
    async with (
        OriginClient(credentials={token_registry.host: token_registry.credentials}) as client,
        client.get(url, {}) as body,
    ):
        assert await drain(body) == (digest, 2 * MiB)


async def test_body_cut_by_the_network_is_origin_unreachable(
    registry: Registry, client: OriginClient
) -> None:
    size = 3 * MiB
    digest, _ = push_random_blob(registry, "origin/cut", size, seed=15)
    with ByteCountingRelay("127.0.0.1", registry.port, cut_after=MiB) as relay:
        url = f"{relay.url}/v2/origin/cut/blobs/{digest}"
        with pytest.raises(OriginUnreachable, match=r"connection closed after \d+ of 3145728 bytes"):
            async with client.get(url, {}) as body:
                await drain(body)


async def test_short_body_is_origin_unreachable(client: OriginClient) -> None:
    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 400)
        await writer.drain()

    async with serve_raw(short) as base:
        with pytest.raises(OriginUnreachable, match="connection closed after 400 of 1000 bytes"):
            async with client.get(f"{base}/file", {}) as body:
                await drain(body)


async def test_reset_before_answer_is_origin_unreachable(client: OriginClient) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.transport.abort()

    async with serve_raw(reset) as base:
        with pytest.raises(OriginUnreachable, match=f"{base}/file"):
            await client.stat(f"{base}/file", {})


async def test_connection_refused_is_origin_unreachable(client: OriginClient) -> None:
    url = f"http://127.0.0.1:{free_port()}/v2/x/blobs/{UNKNOWN_DIGEST}"
    with pytest.raises(OriginUnreachable, match="cannot connect"):
        async with client.get(url, {}):
            pass


async def test_redirect_to_storage_is_followed_without_the_authorization(client: OriginClient) -> None:
    content = bytes(range(256)) * 4096
    seen: dict[str, dict[str, str]] = {}

    async def storage(request: web.Request) -> web.StreamResponse:
        seen["storage"] = dict(request.headers)
        return web.Response(body=content, headers={"Accept-Ranges": "bytes"})

    storage_app = web.Application()
    storage_app.router.add_get("/bucket/blob", storage)
    async with serve_app(storage_app) as storage_url:

        async def registry_blob(request: web.Request) -> web.StreamResponse:
            seen["registry"] = dict(request.headers)
            raise web.HTTPTemporaryRedirect(f"{storage_url}/bucket/blob")

        registry_app = web.Application()
        registry_app.router.add_get("/v2/demo/blobs/{digest}", registry_blob)
        async with serve_app(registry_app) as registry_url:
            url = f"{registry_url}/v2/demo/blobs/sha256:{hashlib.sha256(content).hexdigest()}"
            async with client.get(url, {"Authorization": "Basic c2VjcmV0OnNlY3JldA=="}) as body:
                assert body.url == f"{storage_url}/bucket/blob"
                assert await drain(body) == (f"sha256:{hashlib.sha256(content).hexdigest()}", len(content))

    assert seen["registry"]["Authorization"] == "Basic c2VjcmV0OnNlY3JldA=="
    assert "Authorization" not in seen["storage"]


async def test_redirect_loop_gives_up(client: OriginClient) -> None:
    hops = 0

    async def loop(request: web.Request) -> web.StreamResponse:
        nonlocal hops
        hops += 1
        raise web.HTTPFound(f"/hop/{hops}")

    app = web.Application()
    app.router.add_get("/hop/{n}", loop)
    async with serve_app(app) as base:
        with pytest.raises(OriginStatusError, match="more than 5 redirects"):
            await client.stat(f"{base}/hop/0", {})
    assert hops == 6


async def test_origin_ignoring_range_is_an_error(client: OriginClient) -> None:
    async def whole(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"0123456789")

    app = web.Application()
    app.router.add_get("/file", whole)
    async with serve_app(app) as base:
        with pytest.raises(OriginError, match="ignored the Range"):
            async with client.get(f"{base}/file", {}, start=5, length=2):
                pass
        async with client.get(f"{base}/file", {}, start=0, length=100) as body:  # covers all: fine
            assert b"".join([c async for c in body.chunks()]) == b"0123456789"


def test_relay_counts_bytes_exactly(registry: Registry, registry_relay: ByteCountingRelay) -> None:
    digest, _ = push_random_blob(registry, "origin/relay", MiB, seed=16)
    request = f"GET /v2/origin/relay/blobs/{digest} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    received = 0
    with socket.create_connection(("127.0.0.1", registry_relay.port), timeout=10) as sock:
        sock.sendall(request)
        while data := sock.recv(65536):
            received += len(data)
    assert received > MiB
    assert registry_relay.wait_for(lambda r: r.bytes_from_target == received, timeout=5)
    assert registry_relay.bytes_to_target == len(request)
    assert registry_relay.connections == 1
    registry_relay.reset()
    counts = (registry_relay.bytes_from_target, registry_relay.bytes_to_target, registry_relay.connections)
    assert counts == (0, 0, 0)


async def test_origin_traffic_through_the_relay_is_one_copy(
    registry: Registry, registry_relay: ByteCountingRelay, client: OriginClient
) -> None:
    size = 8 * MiB
    digest, _ = push_random_blob(registry, "origin/relay", size, seed=17)
    url = f"{registry_relay.url}/v2/origin/relay/blobs/{digest}"
    async with client.get(url, {}) as body:
        assert await drain(body) == (digest, size)
    assert size < registry_relay.bytes_from_target < size + 4096
    # Piecewise ranged reads add headers only.
    registry_relay.reset()
    for start in range(0, size, 2 * MiB):
        async with client.get(url, {}, start=start, length=2 * MiB) as body:
            await drain(body)
    assert size < registry_relay.bytes_from_target < size + 4 * 4096
    assert registry_relay.connections == 0  # keep-alive: the first read's pooled connection is reused


@pytest.mark.skipif(not skopeo_available(), reason="skopeo is not installed")
@pytest.mark.parametrize("oci", [False, True], ids=["docker-schema2", "oci"])
def test_pushed_image_is_pullable_by_skopeo(auth_registry: Registry, tmp_path: Path, oci: bool) -> None:
    layer = write_layer_tar(tmp_path / "layer.tar.gz", {"etc/hello": b"hello\n"})
    _, big_layer = push_random_blob(auth_registry, "origin/image", 2 * MiB, seed=18)
    manifest = push_image(auth_registry, "origin/image", f"t{int(oci)}", [layer, big_layer], oci=oci)
    creds = ":".join(auth_registry.credentials or ())
    source = f"docker://{auth_registry.host}/origin/image:t{int(oci)}"
    copied = subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", "--src-creds", creds, source, f"dir:{tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "out" / "manifest.json").read_bytes() == _manifest_bytes(auth_registry, manifest)
    assert hashlib.sha256((tmp_path / "out" / "manifest.json").read_bytes()).hexdigest() == manifest[7:]


def _manifest_bytes(registry: Registry, digest: str) -> bytes:
    request = urllib.request.Request(
        registry.manifest_url("origin/image", digest),
        headers={"Authorization": registry.basic_auth(), "Accept": f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        data: bytes = reply.read()
    return data
