"""OriginClient against small loopback fakes: Bearer token caching and expiry (injected clock),
refused tokens, HEAD fallbacks, header hygiene, bad ranges and timeouts."""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from common.clock import ManualClock
from common.errors import OriginError, OriginUnreachable
from common.origin import DEFAULT_TOKEN_TTL, TOKEN_EXPIRY_MARGIN, OriginClient, OriginResponseError
from tests.support.servers import read_request_head, serve_app, serve_raw

BLOB = b"damselfly" * 1000
BLOB_PATH = "/v2/team/app/blobs/sha256:" + "a" * 64
SCOPE = "repository:team/app:pull"


class FakeBearerRegistry:
    """A registry that only serves blobs to Bearer tokens its own token endpoint issued."""

    def __init__(self, users: dict[str, str], expires_in: int | None = 300) -> None:
        self.users = users
        self.expires_in = expires_in
        self.valid: set[str] = set()
        self.token_requests: list[tuple[str | None, list[str]]] = []
        self.blob_requests: list[dict[str, str]] = []
        self._serial = itertools.count()
        self.base = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self.token)
        app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", self.blob)
        return app

    async def token(self, request: web.Request) -> web.StreamResponse:
        user = None
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(name) != password:
                raise web.HTTPUnauthorized()
            user = name
        self.token_requests.append((user, request.query.getall("scope", [])))
        assert request.query["service"] == "fake-registry"
        token = f"token-{next(self._serial)}-{user}"
        self.valid.add(token)
        document: dict[str, object] = {"token": token}
        if self.expires_in is not None:
            document["expires_in"] = self.expires_in
        return web.json_response(document)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        self.blob_requests.append(dict(request.headers))
        auth = request.headers.get("Authorization", "")
        if not (auth.startswith("Bearer ") and auth[7:] in self.valid):
            challenge = f'Bearer realm="{self.base}/token",service="fake-registry",scope="{SCOPE}"'
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                status=401, headers={"WWW-Authenticate": challenge},
            )
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(BLOB)), "Accept-Ranges": "bytes"})
        return web.Response(body=BLOB)


@pytest.fixture
async def bearer_registry() -> AsyncIterator[FakeBearerRegistry]:
    fake = FakeBearerRegistry({"alice": "wonderland"})
    async with serve_app(fake.app()) as base:
        fake.base = base
        yield fake


ALICE = {"Authorization": "Basic " + base64.b64encode(b"alice:wonderland").decode()}


async def read_all(client: OriginClient, url: str, headers: dict[str, str]) -> bytes:
    async with client.get(url, headers) as body:
        return b"".join([chunk async for chunk in body.chunks()])


async def test_token_is_fetched_once_and_reused(bearer_registry: FakeBearerRegistry) -> None:
    url = bearer_registry.base + BLOB_PATH
    async with OriginClient(clock=ManualClock()) as client:
        for _ in range(3):
            assert await read_all(client, url, ALICE) == BLOB
        assert (await client.stat(url, ALICE)).content_length == len(BLOB)
    assert bearer_registry.token_requests == [("alice", [SCOPE])]
    # Only the first request took a 401; the others carried the cached token at once.
    bearer = [h for h in bearer_registry.blob_requests if h.get("Authorization", "").startswith("Bearer ")]
    assert len(bearer_registry.blob_requests) - len(bearer) == 1


async def test_token_is_renewed_when_it_expires(bearer_registry: FakeBearerRegistry) -> None:
    url = bearer_registry.base + BLOB_PATH
    clock = ManualClock()
    async with OriginClient(clock=clock) as client:
        await read_all(client, url, ALICE)
        clock.advance(300 - TOKEN_EXPIRY_MARGIN - 1)
        await read_all(client, url, ALICE)
        assert len(bearer_registry.token_requests) == 1
        clock.advance(2)
        await read_all(client, url, ALICE)
        assert len(bearer_registry.token_requests) == 2


async def test_token_without_expires_in_lives_the_default(bearer_registry: FakeBearerRegistry) -> None:
    bearer_registry.expires_in = None
    url = bearer_registry.base + BLOB_PATH
    clock = ManualClock()
    async with OriginClient(clock=clock) as client:
        await read_all(client, url, ALICE)
        clock.advance(DEFAULT_TOKEN_TTL - TOKEN_EXPIRY_MARGIN + 1)
        await read_all(client, url, ALICE)
    assert len(bearer_registry.token_requests) == 2


async def test_tokens_are_cached_per_credential(bearer_registry: FakeBearerRegistry) -> None:
    bearer_registry.users["bob"] = "builder"
    bob = {"Authorization": "Basic " + base64.b64encode(b"bob:builder").decode()}
    url = bearer_registry.base + BLOB_PATH
    async with OriginClient() as client:
        await read_all(client, url, ALICE)
        await read_all(client, url, bob)
        await read_all(client, url, {})  # anonymous: a token of its own, never alice's
        await read_all(client, url, bob)
    assert [user for user, _ in bearer_registry.token_requests] == ["alice", "bob", None]


async def test_revoked_token_is_replaced(bearer_registry: FakeBearerRegistry) -> None:
    url = bearer_registry.base + BLOB_PATH
    async with OriginClient() as client:
        await read_all(client, url, ALICE)
        bearer_registry.valid.clear()
        assert await read_all(client, url, ALICE) == BLOB
    assert len(bearer_registry.token_requests) == 2


async def test_wrong_credentials_relay_the_registry_challenge(bearer_registry: FakeBearerRegistry) -> None:
    wrong = {"Authorization": "Basic " + base64.b64encode(b"alice:nope").decode()}
    async with OriginClient() as client:
        with pytest.raises(OriginResponseError) as raised:
            await read_all(client, bearer_registry.base + BLOB_PATH, wrong)
    assert raised.value.status == 401
    assert raised.value.www_authenticate == (
        f'Bearer realm="{bearer_registry.base}/token",service="fake-registry",scope="{SCOPE}"'
    )
    assert b"UNAUTHORIZED" in raised.value.body


async def test_callers_refused_bearer_is_relayed_not_replaced(bearer_registry: FakeBearerRegistry) -> None:
    async with OriginClient() as client:
        with pytest.raises(OriginResponseError) as raised:
            await client.stat(bearer_registry.base + BLOB_PATH, {"Authorization": "Bearer stale"})
    assert raised.value.status == 401
    assert raised.value.www_authenticate is not None
    assert bearer_registry.token_requests == []  # the caller renews its own token


async def test_configured_credentials_are_used_for_their_host_only(
    bearer_registry: FakeBearerRegistry,
) -> None:
    host = bearer_registry.base.removeprefix("http://")
    async with OriginClient(credentials={host: ("alice", "wonderland")}) as client:
        assert await read_all(client, bearer_registry.base + BLOB_PATH, {}) == BLOB
    assert bearer_registry.token_requests == [("alice", [SCOPE])]
    async with OriginClient(credentials={"elsewhere:5000": ("alice", "wonderland")}) as client:
        await read_all(client, bearer_registry.base + BLOB_PATH, {})
    assert bearer_registry.token_requests[-1] == (None, [SCOPE])


async def test_headers_sent_to_the_origin() -> None:
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        return web.Response(body=b"0123456789"[2:5], status=206, headers={"Content-Range": "bytes 2-4/10"})

    app = web.Application()
    app.router.add_get("/file", handler)
    async with serve_app(app) as base, OriginClient() as client:
        caller = {"Range": "bytes=7-", "Connection": "upgrade", "Accept-Encoding": "gzip", "X-Trace": "t1"}
        async with client.get(f"{base}/file", caller, start=2, length=3) as body:
            assert b"".join([c async for c in body.chunks()]) == b"234"
    (headers,) = seen
    assert headers["Range"] == "bytes=2-4"
    assert headers["Accept-Encoding"] == "identity"  # bytes as stored: offsets and digests hold
    assert headers["X-Trace"] == "t1"
    assert headers.get("Connection", "keep-alive").lower() == "keep-alive"


async def test_stat_falls_back_to_a_one_byte_get() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == "HEAD":
            raise web.HTTPMethodNotAllowed("HEAD", ["GET"])
        assert request.headers["Range"] == "bytes=0-0"
        return web.Response(body=b"x", status=206, headers={"Content-Range": "bytes 0-0/123456"})

    app = web.Application()
    app.router.add_route("*", "/file", handler)
    async with serve_app(app) as base, OriginClient() as client:
        stat = await client.stat(f"{base}/file", {})
    assert stat.content_length == 123456
    assert stat.supports_range


async def test_stat_of_an_origin_without_ranges() -> None:
    async def whole(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"z" * 5000)

    app = web.Application()
    app.router.add_get("/file", whole)
    async with serve_app(app) as base, OriginClient() as client:
        stat = await client.stat(f"{base}/file", {})
    assert (stat.content_length, stat.supports_range) == (5000, False)


@pytest.mark.parametrize(
    "content_range", ["bytes 3-4/10", "bytes 2-5/10", "bytes 2-4", None], ids=["wrong-start", "wrong-end",
                                                                            "malformed", "missing"]
)
async def test_wrong_content_range_is_an_origin_error(content_range: str | None) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Range": content_range} if content_range else {}
        return web.Response(body=b"234", status=206, headers=headers)

    app = web.Application()
    app.router.add_get("/file", handler)
    async with serve_app(app) as base, OriginClient() as client:
        with pytest.raises(OriginError, match="Content-Range"):
            async with client.get(f"{base}/file", {}, start=2, length=3):
                pass


async def test_stalled_origin_times_out() -> None:
    release = asyncio.Event()

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        await writer.drain()
        await release.wait()

    async with serve_raw(stall) as base, OriginClient(sock_read_timeout=0.2) as client:
        try:
            with pytest.raises(OriginUnreachable, match="timed out"):
                async with client.get(f"{base}/file", {}) as body:
                    async for _ in body.chunks():
                        pass
        finally:
            release.set()


async def test_server_error_keeps_status_and_registry_message() -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        return web.json_response({"errors": [{"code": "UNKNOWN", "message": "disk on fire"}]}, status=503)

    app = web.Application()
    app.router.add_get("/v2/x/blobs/{digest}", broken)
    async with serve_app(app) as base, OriginClient() as client:
        with pytest.raises(OriginResponseError) as raised:
            async with client.get(f"{base}/v2/x/blobs/sha256:{'b' * 64}", {}):
                pass
    assert raised.value.status == 503
    assert "disk on fire" in str(raised.value)


async def test_parallel_requests_share_one_token_fetch(bearer_registry: FakeBearerRegistry) -> None:
    url = bearer_registry.base + BLOB_PATH
    async with OriginClient() as client:
        bodies = await asyncio.gather(*(read_all(client, url, ALICE) for _ in range(8)))
    assert bodies == [BLOB] * 8
    assert len(bearer_registry.token_requests) == 1
