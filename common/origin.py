"""Back-to-source clients: plain HTTP(S) with Range, and OCI registries with Bearer/Basic auth.

Seeds and peers read the origin through one :class:`OriginClient`. It streams: a body is handed
out chunk by chunk (:meth:`OriginBody.chunks`) and never held whole in memory.

What it takes care of, so callers do not have to:

- **Auth.** The caller's ``Authorization`` header goes to the origin host as it is. On a
  ``401`` with a ``Bearer realm=...,service=...,scope=...`` challenge (OCI registries), a token is
  fetched from the realm (with the caller's ``Basic`` credentials, or the ones configured for
  that registry host, or anonymously), cached per (registry host, scope, credential) until its
  ``expires_in``, and the request is retried with it. On a ``Basic`` challenge the configured
  credentials are sent. A ``401`` that persists raises :class:`OriginResponseError` with the
  origin's headers (``WWW-Authenticate``) kept, so a registry mirror can relay it unchanged.
- **Redirects** (registries sending blobs to object storage) are followed, at most
  :data:`MAX_REDIRECTS`; ``Authorization`` and ``Cookie`` are never sent to another origin, and
  with an :class:`~common.upstreams.UpstreamPolicy` a redirect goes only where it allows (never to
  a loopback, link-local or private address it does not list).
- **Tokens** are cached in a bounded LRU (:data:`MAX_CACHED_TOKENS`): a client naming fresh
  scopes on every request cannot grow the daemon's memory.
- **Ranges** are checked: a ranged request must come back ``206`` with the requested
  ``Content-Range`` (or ``200`` when the range covers the whole content), and a body that ends
  before its announced length raises :class:`~common.errors.OriginUnreachable`.
- **Errors** from aiohttp, sockets and timeouts become :mod:`common.errors` exceptions in one
  place (:func:`translate_errors`).

Content is fetched as stored (``Accept-Encoding: identity``, no automatic decompression), so byte
offsets and digests refer to the bytes the origin holds.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import ssl
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from yarl import URL

from common.clock import Clock, SystemClock
from common.errors import InvalidRequest, OriginError, OriginStatusError, OriginUnreachable
from common.http import HOP_BY_HOP, credential_key, get_header
from common.upstreams import UpstreamNotAllowed, UpstreamPolicy, public_addresses

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_SOCK_READ_TIMEOUT = 60.0
DEFAULT_CONNECTIONS_PER_HOST = 32
DEFAULT_CHUNK_SIZE = 1 << 20
DEFAULT_TOKEN_TTL = 60.0  # seconds, when the token server gives no expires_in (distribution spec)
TOKEN_EXPIRY_MARGIN = 5.0  # renew a token this long before it expires, so it does not expire in flight
MAX_REDIRECTS = 5
MAX_ERROR_BODY = 64 * 1024  # bytes of an error body kept for relaying and messages
# Tokens (and scope hints) kept per client: (registry, scope, credential) keys are chosen by
# clients, so the cache is an LRU of this many entries, not a dict that grows with every scope.
MAX_CACHED_TOKENS = 4096
# Headers that carry a credential: sent to the request's own origin only, never across a redirect.
_CREDENTIAL_HEADERS = ("authorization", "cookie")

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Headers of the caller that must not be forwarded: hop-by-hop ones, and the ones this client sets.
_DROPPED_HEADERS = HOP_BY_HOP | {"content-length", "range", "if-range", "accept-encoding", "authorization"}
_V2_REPOSITORY = re.compile(r"^/v2/(?P<name>.+?)/(?:blobs|manifests|tags)/")
_CHALLENGE_TOKEN = re.compile(
    r'\s*,?\s*(?:(?P<key>[A-Za-z][\w-]*)\s*=\s*(?P<value>"(?:[^"\\]|\\.)*"|[^,\s"]*)|(?P<scheme>[A-Za-z][\w-]*))'
)
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)


class OriginResponseError(OriginStatusError):
    """An :class:`OriginStatusError` that keeps the origin's response headers and the start of
    its body, so a proxy can relay them unchanged (``WWW-Authenticate`` on a ``401``, the
    registry's JSON error document)."""

    def __init__(
        self, url: str, status: int, reason: str = "", *, headers: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> None:
        super().__init__(url, status, reason)
        self.headers: dict[str, str] = dict(headers or {})
        self.body = body

    @property
    def www_authenticate(self) -> str | None:
        """The origin's ``WWW-Authenticate`` challenge, if it sent one."""
        return get_header(self.headers, "WWW-Authenticate")


@dataclass(frozen=True)
class OriginStat:
    """What the origin says about a URL without sending its content."""

    content_length: int | None
    headers: dict[str, str]
    supports_range: bool
    final_url: str  # after redirects


@dataclass(frozen=True)
class Challenge:
    """One parsed ``WWW-Authenticate`` challenge."""

    scheme: str  # lower case: "bearer", "basic"
    params: dict[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def scopes(self) -> list[str]:
        """Bearer scopes; a challenge may name several, separated by spaces."""
        return self.params.get("scope", "").split()


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value (``Bearer realm="...",service="...",scope="..."``).

    Lenient: text that is neither a scheme nor a ``key=value`` parameter is skipped.
    """
    challenges: list[Challenge] = []
    for match in _CHALLENGE_TOKEN.finditer(header):
        if match["scheme"]:
            challenges.append(Challenge(match["scheme"].lower(), {}))
        elif challenges:
            value = match["value"]
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            challenges[-1].params[match["key"].lower()] = value
    return challenges


def parse_content_range(value: str) -> tuple[int | None, int | None, int | None]:
    """``(first, last, total)`` of ``bytes first-last/total``; ``None`` for ``*`` parts.

    Raises ValueError when the header is not a byte Content-Range.
    """
    match = _CONTENT_RANGE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a byte Content-Range")
    first = int(match[1]) if match[1] is not None else None
    last = int(match[2]) if match[2] is not None else None
    total = int(match[3]) if match[3] != "*" else None
    if first is not None and last is not None and last < first:
        raise ValueError(f"{value!r} ends before it starts")
    return first, last, total


def range_header(start: int, length: int | None) -> str | None:
    """The ``Range`` value for ``length`` bytes from ``start`` (``None``: no header needed)."""
    if start < 0:
        raise InvalidRequest(f"range start {start} is negative")
    if length is not None and length <= 0:
        raise InvalidRequest(f"range length {length} must be positive")
    if length is None:
        return None if start == 0 else f"bytes={start}-"
    return f"bytes={start}-{start + length - 1}"


def basic_authorization(username: str, password: str) -> str:
    """An ``Authorization`` value for HTTP Basic."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


@contextmanager
def translate_errors(url: str) -> Iterator[None]:
    """Turn aiohttp, socket and timeout errors into :mod:`common.errors` exceptions naming `url`."""
    try:
        yield
    except aiohttp.InvalidURL as exc:
        raise InvalidRequest(f"URL {url!r} is not valid: {exc}") from exc
    except aiohttp.ClientPayloadError as exc:
        raise OriginUnreachable(
            f"{url}: connection broke while reading the body ({exc}); retry, or use another source"
        ) from exc
    except aiohttp.ConnectionTimeoutError as exc:
        raise OriginUnreachable(
            f"cannot connect to {url}: timed out ({exc}); check that the origin is up and reachable "
            "(a dfdaemon waits origin_connect_timeout)"
        ) from exc
    except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
        raise OriginUnreachable(
            f"{url}: timed out: the origin sent nothing within the read timeout ({exc or 'no data'}); check the "
            "origin's health, or raise the dfdaemon's origin_read_timeout"
        ) from exc
    except aiohttp.ClientConnectorError as exc:
        raise OriginUnreachable(
            f"cannot connect to {url}: {exc.os_error or exc}; check the URL and that the origin is up"
        ) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise OriginUnreachable(f"{url}: {type(exc).__name__}: {exc}; retry, or use another source") from exc


class OriginBody:
    """An open response body; iterate :meth:`chunks` once to stream it."""

    def __init__(self, url: str, response: aiohttp.ClientResponse, content_length: int | None) -> None:
        self.url = url  # the final URL, after redirects
        self.status = response.status
        self.headers: dict[str, str] = _flat_headers(response)
        self.content_length = content_length  # bytes this body holds, when known
        self.received = 0
        self._response = response
        self._started = False

    @property
    def complete(self) -> bool:
        """Whether the whole body was read."""
        return self._response.content.is_eof() and (
            self.content_length is None or self.received == self.content_length
        )

    async def chunks(self, size: int = DEFAULT_CHUNK_SIZE) -> AsyncIterator[bytes]:
        """The body in chunks of at most `size` bytes, as they arrive.

        Raises OriginUnreachable if the connection ends before ``content_length`` bytes.
        """
        if self._started:
            raise RuntimeError("OriginBody.chunks() can be iterated only once")
        self._started = True
        expected = self.content_length
        with translate_errors(self.url):
            try:
                async for chunk in self._response.content.iter_chunked(size):
                    self.received += len(chunk)
                    yield chunk
            except aiohttp.ClientPayloadError as exc:
                raise self._short_body() from exc
        if expected is not None and self.received < expected:
            raise self._short_body()

    def _short_body(self) -> OriginUnreachable:
        return OriginUnreachable(
            f"{self.url}: connection closed after {self.received} of {self.content_length} bytes; "
            "retry the remaining range or use another source"
        )


@dataclass(frozen=True)
class _CachedToken:
    value: str
    expires_at: float


class OriginClient:
    """Async client of the origins, with a keep-alive connection pool and a token cache.

    `ssl_context` sets which CAs HTTPS origins are checked against (default: the system store).
    `credentials` maps a registry host (``registry.example.com`` or ``host:port``) to
    ``(username, password)``, used when the caller sends none. Pass `session` to share a pool;
    otherwise the client opens one on first use and :meth:`close` closes it.
    """

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        sock_read_timeout: float = DEFAULT_SOCK_READ_TIMEOUT,
        connections_per_host: int = DEFAULT_CONNECTIONS_PER_HOST,
        credentials: Mapping[str, tuple[str, str]] | None = None,
        clock: Clock | None = None,
        ssl_context: ssl.SSLContext | None = None,
        upstreams: UpstreamPolicy | None = None,
        max_cached_tokens: int = MAX_CACHED_TOKENS,
    ) -> None:
        self._session = session
        self._upstreams = upstreams  # None: redirects may go anywhere (command-line tools, tests)
        self._max_cached_tokens = max_cached_tokens
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_connect=connect_timeout, sock_read=sock_read_timeout
        )
        self._connections_per_host = connections_per_host
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._credentials = {
            host.lower(): basic_authorization(*pair) for host, pair in (credentials or {}).items()
        }
        self._clock: Clock = clock or SystemClock()
        self._tokens: OrderedDict[tuple[str, str, str], _CachedToken] = OrderedDict()
        # One lock per key while requests wait on a fetch, with how many use it (then dropped).
        self._token_locks: dict[tuple[str, str, str], tuple[asyncio.Lock, int]] = {}
        # Which scopes a repository (or path) on a host was last challenged with, so the next
        # request to it carries a cached token straight away instead of taking a 401 first.
        self._scope_hints: OrderedDict[tuple[str, str], tuple[str, ...]] = OrderedDict()
        self.token_fetches = 0  # how many tokens were fetched from realms (metrics, tests)

    async def close(self) -> None:
        """Close the connection pool, if this client opened it."""
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> OriginClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            if not self._owns_session:
                raise RuntimeError("OriginClient is closed")
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=self._connections_per_host, ssl=self._ssl)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, auto_decompress=False
            )
        return self._session

    async def stat(self, url: str, headers: Mapping[str, str] | None = None) -> OriginStat:
        """Length and headers of `url`: HEAD, falling back to ``GET`` of ``bytes=0-0``."""
        head_headers: dict[str, str] = {}
        response = await self._request("HEAD", url, headers or {}, None)
        try:
            final_url = str(response.url)
            if response.status in (401, 404, 407, 410) or (response.status >= 500 and response.status != 501):
                raise await _status_error(url, response)
            if 200 <= response.status < 300:
                head_headers = _flat_headers(response)
                length = _int_header(head_headers, "Content-Length")
                accept = (get_header(head_headers, "Accept-Ranges") or "").lower()
                if length is not None and accept == "bytes":
                    return OriginStat(length, head_headers, True, final_url)
                if length is not None and accept == "none":
                    return OriginStat(length, head_headers, False, final_url)
        finally:
            response.close()
        # HEAD gave no length, no range support information, or was refused (405, 403 of a URL
        # signed for GET): ask for the first byte, which tells both.
        response = await self._request("GET", url, headers or {}, "bytes=0-0")
        try:
            final_url = str(response.url)
            got = _flat_headers(response)
            if response.status == 206:
                try:
                    _, _, total = parse_content_range(get_header(got, "Content-Range") or "")
                except ValueError as exc:
                    raise OriginError(f"{url}: bad Content-Range in the answer to bytes=0-0: {exc}") from None
                return OriginStat(total, {**head_headers, **_entity_headers(got)}, True, final_url)
            if response.status == 200:
                length = _int_header(got, "Content-Length")
                return OriginStat(length, {**got, **head_headers}, False, final_url)
            raise await _status_error(url, response)
        finally:
            response.close()  # never drain a whole 200 body just to learn its length

    @asynccontextmanager
    async def get(
        self, url: str, headers: Mapping[str, str] | None = None, *, start: int = 0, length: int | None = None
    ) -> AsyncIterator[OriginBody]:
        """Open `length` bytes of `url` from `start` (all of it by default) for streaming.

        The body is checked against the request: a ``206`` must carry the requested
        ``Content-Range``; a ``200`` is accepted only when the range covers the whole content.
        Caller's ``Range``, ``Accept-Encoding`` and hop-by-hop headers are replaced.
        """
        requested = range_header(start, length)
        response = await self._request("GET", url, headers or {}, requested)
        try:
            final_url = str(response.url)
            if response.status not in (200, 206):
                raise await _status_error(url, response)
            body_length = _check_range(url, response, start, length)
            body = OriginBody(final_url, response, body_length)
            yield body
        except BaseException:
            response.close()
            raise
        if body.complete:
            response.release()  # back to the pool for the next request
        else:
            response.close()  # unread bytes left: the connection cannot be reused

    async def _request(
        self, method: str, url: str, headers: Mapping[str, str], range_value: str | None
    ) -> aiohttp.ClientResponse:
        """Send one request, answering auth challenges and following redirects.

        Returns a response that is not a redirect and not a 401 we could answer.
        """
        base = {k: v for k, v in headers.items() if k.lower() not in _DROPPED_HEADERS}
        cross_origin = {k: v for k, v in base.items() if k.lower() not in _CREDENTIAL_HEADERS}
        base["Accept-Encoding"] = "identity"
        if range_value is not None:
            base["Range"] = range_value
        caller_auth = get_header(headers, "Authorization")
        origin = _origin_of(url)
        hint_key = _hint_key(url)
        authorization = caller_auth
        if caller_auth is None or caller_auth.lower().startswith("basic "):
            # A token cached for this repository, fetched with the same credential, saves a 401.
            credential = caller_auth or self._credentials_for(url)
            cached = self._cached_token(origin, self._scope_hints.get(hint_key, ()), credential)
            authorization = f"Bearer {cached}" if cached else caller_auth
        answered: set[str] = set()  # challenge schemes already answered on this request
        current = url
        redirects = 0
        session = self._get_session()
        while True:
            same_origin = _origin_of(current) == origin
            send = dict(base if same_origin else cross_origin)
            if same_origin and authorization:
                send["Authorization"] = authorization
            with translate_errors(current):
                response = await session.request(
                    method, URL(current, encoded=True), headers=send, allow_redirects=False,
                    timeout=self._timeout, auto_decompress=False,
                )
            if response.status in _REDIRECT_STATUSES:
                location = response.headers.get("Location")
                response.close()
                if not location:
                    raise OriginResponseError(url, response.status, f"{current} redirects without a Location")
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise OriginResponseError(url, response.status, f"more than {MAX_REDIRECTS} redirects")
                target = urljoin(current, location)
                await self._check_redirect(current, target)
                current = target
                continue
            if response.status != 401 or not same_origin:
                return response
            next_auth = await self._answer_challenge(
                current, response, caller_auth, authorization, answered, hint_key
            )
            if next_auth is None:
                return response  # a 401 we cannot answer: the caller raises it with its headers
            response.close()
            authorization = next_auth

    async def _answer_challenge(
        self, url: str, response: aiohttp.ClientResponse, caller_auth: str | None, sent: str | None,
        answered: set[str], hint_key: tuple[str, str],
    ) -> str | None:
        """The Authorization value to retry with after a 401, or None to give up."""
        if caller_auth is not None and caller_auth.lower().startswith("bearer "):
            return None  # the caller's own token was refused: it must renew it (relay the 401)
        basic = caller_auth or self._credentials_for(url)
        for challenge in parse_challenges(response.headers.get("WWW-Authenticate", "")):
            if challenge.scheme in answered:
                continue
            if challenge.scheme == "bearer" and challenge.realm:
                answered.add("bearer")
                scopes = tuple(challenge.scopes)
                self._remember(self._scope_hints, hint_key, scopes)
                token = await self._fetch_token(url, challenge, basic, sent)
                return f"Bearer {token}" if token else None
            if challenge.scheme == "basic" and basic is not None and basic != sent:
                answered.add("basic")
                return basic
        return None

    def _credentials_for(self, url: str) -> str | None:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        return self._credentials.get(parts.netloc.lower()) or self._credentials.get(host)

    def _cached_token(self, origin: str, scopes: tuple[str, ...], credential: str | None) -> str | None:
        if not scopes:
            return None
        key = (origin, " ".join(scopes), credential_key(credential))
        entry = self._tokens.get(key)
        if entry is None or entry.expires_at <= self._clock.time():
            return None
        self._tokens.move_to_end(key)
        return entry.value

    async def _fetch_token(
        self, url: str, challenge: Challenge, basic: str | None, refused: str | None
    ) -> str | None:
        """A Bearer token for the challenge's scopes, other than the `refused` Authorization.

        One fetch per key at a time: parallel ranged reads of a new blob all take a 401 at once,
        and the first fetch answers them all.
        """
        scopes = tuple(challenge.scopes)
        key = (_origin_of(url), " ".join(scopes), credential_key(basic))
        lock, users = self._token_locks.get(key, (asyncio.Lock(), 0))
        self._token_locks[key] = (lock, users + 1)
        try:
            async with lock:
                entry = self._tokens.get(key)
                fresh = entry is not None and entry.expires_at > self._clock.time()
                if entry is not None and fresh and f"Bearer {entry.value}" != refused:
                    return entry.value  # fetched by a concurrent request while we waited
                self._tokens.pop(key, None)  # the registry refused what we had (or we had nothing)
                return await self._fetch_token_from_realm(url, challenge, key, basic)
        finally:
            lock, users = self._token_locks[key]
            if users > 1:
                self._token_locks[key] = (lock, users - 1)
            else:
                del self._token_locks[key]  # nobody else waits on it: not one lock per key forever

    async def _fetch_token_from_realm(
        self, url: str, challenge: Challenge, key: tuple[str, str, str], basic: str | None
    ) -> str | None:
        scopes = challenge.scopes
        realm = challenge.realm
        if urlsplit(realm).scheme not in ("http", "https"):
            raise OriginError(f"{url}: token realm {realm!r} is not an http(s) URL")
        query = [("service", challenge.params["service"])] if "service" in challenge.params else []
        query += [("scope", scope) for scope in scopes]
        headers = {"Accept": "application/json"}
        if basic is not None:
            headers["Authorization"] = basic
        session = self._get_session()
        with translate_errors(realm):
            async with session.get(
                URL(realm).extend_query(query), headers=headers, allow_redirects=False, timeout=self._timeout
            ) as reply:
                if reply.status in (401, 403):
                    return None  # wrong or missing credentials: the registry's 401 is relayed
                if reply.status != 200:
                    raise OriginError(f"{url}: token server {realm} answered {reply.status}")
                try:
                    document = await reply.json(content_type=None)
                except ValueError:
                    document = None
        self.token_fetches += 1
        if not isinstance(document, dict):
            raise OriginError(f"{url}: token server {realm} answered something other than a JSON object")
        token = document.get("token") or document.get("access_token")
        if not isinstance(token, str) or not token:
            raise OriginError(f"{url}: token server {realm} answered no token")
        ttl = _token_ttl(document.get("expires_in"))
        self._remember(self._tokens, key, _CachedToken(token, self._clock.time() + max(ttl - TOKEN_EXPIRY_MARGIN,
                                                                                        ttl / 2)))
        return token

    def _remember(self, cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        """Put `key` in an LRU cache, dropping the least recently used entry beyond the bound."""
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > self._max_cached_tokens:
            cache.popitem(last=False)

    @property
    def cached_tokens(self) -> int:
        """Tokens held now (bounded by max_cached_tokens)."""
        return len(self._tokens)

    async def _check_redirect(self, source: str, target: str) -> None:
        """Raise :class:`~common.upstreams.UpstreamNotAllowed` unless the policy lets a redirect go there.

        A host name is resolved here: one that resolves only to private addresses is refused
        unless the policy names it (the connection itself resolves it again; a name that changes
        its answers in between is outside what this check can see).
        """
        policy = self._upstreams
        if policy is None or _origin_of(source) == _origin_of(target):
            return
        policy.check_redirect(source, target)
        parts = urlsplit(target)
        host = (parts.hostname or "").lower()
        if policy.names(host, parts.port or {"http": 80, "https": 443}.get(parts.scheme)):
            return
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise OriginUnreachable(f"cannot resolve {host}, the target of a redirect from {source}: {exc}") from exc
        try:
            public_addresses(policy, host, parts.port, [str(info[4][0]) for info in infos])
        except UpstreamNotAllowed as exc:
            raise UpstreamNotAllowed(f"redirect from {source[:200]} refused: {exc}") from None


def _token_ttl(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return DEFAULT_TOKEN_TTL


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


def _hint_key(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    match = _V2_REPOSITORY.match(parts.path)
    return _origin_of(url), match["name"] if match else parts.path


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = get_header(headers, name)
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _flat_headers(response: aiohttp.ClientResponse) -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in response.headers.items():
        # Repeated headers are joined as RFC 9110 allows (WWW-Authenticate stays parseable).
        flat[key] = f"{flat[key]}, {value}" if key in flat else value
    return flat


def _entity_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Headers of a ranged answer that also describe the whole content."""
    return {k: v for k, v in headers.items() if k.lower() not in ("content-length", "content-range")}


async def _status_error(url: str, response: aiohttp.ClientResponse) -> OriginResponseError:
    body = b""
    if response.method != "HEAD":
        try:
            body = await response.content.read(MAX_ERROR_BODY)
        except (TimeoutError, aiohttp.ClientError, OSError):
            body = b""
    reason = response.reason or ""
    detail = _registry_error_message(body)
    if detail:
        reason = f"{reason}: {detail}" if reason else detail
    return OriginResponseError(url, response.status, reason, headers=_flat_headers(response), body=body)


def _registry_error_message(body: bytes) -> str:
    """The message of a registry's ``{"errors": [{"code", "message"}]}`` document, if that is what it is."""
    if not body.startswith(b"{"):
        return ""
    try:
        document = json.loads(body)
        errors = document.get("errors") or []
        return "; ".join(f"{e.get('code', '')} {e.get('message', '')}".strip() for e in errors)[:300]
    except (ValueError, AttributeError, TypeError):
        return ""


def _check_range(url: str, response: aiohttp.ClientResponse, start: int, length: int | None) -> int | None:
    """Verify the answer covers the requested range; the body's length when known."""
    announced = response.content_length
    if response.status == 200:
        if start == 0 and (length is None or (announced is not None and announced <= length)):
            return announced
        raise OriginError(
            f"{url}: asked for {length or 'all'} bytes from {start} but the origin ignored the Range "
            "and answered 200 with the whole content; it does not support ranged reads"
        )
    header = response.headers.get("Content-Range")
    if header is None:
        raise OriginError(f"{url}: 206 answer without Content-Range")
    try:
        first, last, total = parse_content_range(header)
    except ValueError as exc:
        raise OriginError(f"{url}: 206 answer with a bad Content-Range: {exc}") from None
    if first is None or last is None:
        raise OriginError(f"{url}: 206 answer with Content-Range {header!r} naming no range")
    wanted_last = None if length is None else start + length - 1
    clamped = total is not None and last == total - 1 and (wanted_last is None or wanted_last >= last)
    if first != start or (last != wanted_last and not clamped) or (wanted_last is None and total is None):
        raise OriginError(
            f"{url}: asked for bytes {start}-{'' if wanted_last is None else wanted_last} but the origin "
            f"answered Content-Range {header!r}"
        )
    size = last - first + 1
    if announced is not None and announced != size:
        raise OriginError(
            f"{url}: Content-Range {header!r} announces {size} bytes but Content-Length is {announced}"
        )
    return size
