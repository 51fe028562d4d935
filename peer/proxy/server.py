"""The registry mirror and HTTP proxy of a dfdaemon (``--proxy-listen``, port 4001 by default).

Three kinds of request arrive here:

1. **Registry mirror**, origin form (``GET /v2/<repo>/blobs/sha256:...``), from containerd
   ``hosts.toml``, docker ``registry-mirrors``, ``registries.conf`` mirrors and nydusd's backend
   ``mirrors``. The upstream registry is the ``X-Dragonfly-Registry`` header, else the ``ns``
   query parameter (containerd), else ``--registry-mirror``.
2. **Forward proxy**, absolute form (``GET http://host/...``), from nydusd's backend ``proxy``
   and ``HTTP_PROXY`` users; ``CONNECT host:port`` is tunnelled byte for byte, unless the host
   is one of ``proxy_intercept_hosts``: then TLS ends here and the requests inside are handled
   as absolute-form ``https://host:port/...`` ones (:mod:`peer.proxy.tls`).
3. Anything else gets a clear ``400``.

Every upstream, whichever way a client names it, must be one the operator allows
(:mod:`common.upstreams`: ``--registry-mirror``, ``proxy_intercept_hosts``,
``proxy_allowed_upstreams``); anything else gets ``403`` before a byte is sent to it, and so does
a redirect or a name that leads to a loopback, link-local or private address nobody listed. The
proxy is never an open forward proxy. Connections are capped per listener and per client, and
must send their headers within ``proxy_header_timeout`` (:mod:`common.http_limits`).

A ``GET`` whose URL matches a ``proxy_rule`` regex (default ``blobs/sha256.*``) goes through P2P
(``X-Dragonfly-Use-P2P: true/false`` overrides the rules); everything else is proxied straight
to the upstream, status and headers intact, streaming both ways.

A P2P request is answered from the pieces of its task as they are verified: the pieces covering a
``Range`` are fetched first and the response starts with the first of them, sent from the content
file with sendfile; the rest of the blob follows in the background. Range semantics are in
:mod:`common.http`. Before any byte is served, :class:`~peer.proxy.auth.BlobAccess` checks
that the registry lets this client read this blob. A download failure aborts the response
(the connection is closed: the client sees a short body, never wrong bytes).

Errors of the proxy itself carry ``X-Dragonfly-Error-Type: proxy``; among them ``429`` with
``Retry-After`` for P2P requests over ``proxy_p2p_concurrency`` or ``proxy_p2p_rate``
(:class:`P2PAdmission`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
import socket
import ssl
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, AbstractStreamWriter, ResolveResult
from aiohttp.resolver import DefaultResolver
from multidict import CIMultiDict
from yarl import URL

from common.clock import Clock, SystemClock
from common.download import MAX_PRIORITY, DownloadRequest
from common.errors import (
    DamselflyError,
    InvalidRange,
    InvalidRequest,
    OriginError,
    OriginStatusError,
    ProxyError,
    RangeNotSatisfiable,
)
from common.http import (
    HOP_BY_HOP,
    ByteRange,
    get_header,
    parse_range,
    redact_urls,
    select_range,
    unsatisfied_content_range,
)
from common.http_limits import ConnectionLimits, listen_limited
from common.origin import MAX_REDIRECTS, OriginClient, OriginResponseError
from common.pieces import pieces_covering
from common.ratelimit import TokenBucket
from common.units import parse_bool
from common.upstreams import UpstreamNotAllowed, UpstreamPolicy, origin_of, public_addresses
from peer.download.engine import Conductor
from peer.proxy.auth import BlobAccess
from peer.proxy.tls import Interceptor, inner_url, upstream_ssl_context
from peer.proxy.tls import origin_of as intercepted_origin
from peer.proxy.upstream import Probe, SchemeCache
from peer.upload.piece_server import FileRegionSender

if TYPE_CHECKING:
    from common.config import DfdaemonConfig
    from peer.download.engine import Engine
    from peer.metrics import DaemonMetrics
    from peer.storage.store import LocalTask

log = logging.getLogger(__name__)

HEADER_REGISTRY = "X-Dragonfly-Registry"
HEADER_USE_P2P = "X-Dragonfly-Use-P2P"
HEADER_TAG = "X-Dragonfly-Tag"
HEADER_APPLICATION = "X-Dragonfly-Application"
HEADER_PRIORITY = "X-Dragonfly-Priority"
HEADER_PREFETCH = "X-Dragonfly-Prefetch"
HEADER_FILTERED = "X-Dragonfly-Filtered-Query-Params"
HEADER_TASK_ID = "X-Dragonfly-Task-ID"
HEADER_ERROR_TYPE = "X-Dragonfly-Error-Type"
DOCKER_HUB = "docker.io"
DOCKER_HUB_REGISTRY = "https://registry-1.docker.io"
# Request headers a P2P download does not hand to the back-sourcing peer: ranges and validators
# are per request, the content is fetched as stored.
_NOT_FOR_P2P = HOP_BY_HOP | {"range", "if-range", "if-match", "if-none-match", "if-modified-since",
                             "if-unmodified-since", "accept-encoding", "content-length"}
# Origin response headers worth repeating on a P2P answer.
_ENTITY_HEADERS = ("Content-Type", "Docker-Content-Digest", "ETag", "Last-Modified")
_CHUNK = 1 << 20
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Pieces ahead of a whole-content reader that are fetched first, so it streams in order.
STREAM_WINDOW = 4
TUNNEL_BUFFER = 256 * 1024
# Upstream URLs remembered as checked (Proxy._check_url).
CHECKED_URLS = 1024
# Longer numbers in a header or a CONNECT port are refused before int() sees them.
_MAX_NUMBER_DIGITS = 12
# Error answers logged: bursts of up to ERROR_LOG_BURST lines, ERROR_LOG_RATE a second on average.
ERROR_LOG_BURST = 20
ERROR_LOG_RATE = 1.0
PING_TIMEOUT = 5.0  # seconds for a registry's /v2/ ping when probing its scheme


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message.rstrip() + "\n", headers={HEADER_ERROR_TYPE: "proxy"})


def _relay(exc: OriginResponseError) -> web.Response:
    """The registry's refusal as it sent it (a 401 keeps its WWW-Authenticate)."""
    headers = CIMultiDict((k, v) for k, v in exc.headers.items()
                          if k.lower() not in HOP_BY_HOP and k.lower() != "content-length")
    return web.Response(status=exc.status, body=exc.body, headers=headers)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    return value.strip() if value is not None else None


def _flag(value: str | None, default: bool) -> bool:
    """A boolean header: `default` when absent or empty, false when it is not a boolean."""
    if value is None or not value.strip():
        return default
    try:
        return parse_bool(value)
    except ValueError:
        return False


# Seconds a client refused by the concurrency limit is told to wait (Retry-After).
CONCURRENCY_RETRY_AFTER = 1
# Which limit refused a request: the label of the rate-limited counter.


class P2PAdmission:
    """May one more P2P proxy request start? At most `concurrency` at once (0: no limit), and
    `rate` a second on average in bursts of up to one second's worth (0: no limit).

    Pure policy: the caller passes the time, and releases each request it was admitted.
    """

    def __init__(self, concurrency: int, rate: float, now: float) -> None:
        self.concurrency = concurrency
        self.rate = rate
        self.active = 0
        self._bucket = TokenBucket(rate, max(1.0, rate), now) if rate else None

    def admit(self, now: float) -> tuple[str, int] | None:
        """None: admitted, call :meth:`release` when done. Else the limit hit and the seconds to wait."""
        if self.concurrency and self.active >= self.concurrency:
            return "concurrency", CONCURRENCY_RETRY_AFTER
        if self._bucket is not None:
            wait = self._bucket.take(1, now)
            if wait:
                return "rate", max(1, math.ceil(wait))
        self.active += 1
        return None

    def release(self) -> None:
        """An admitted request is over."""
        self.active -= 1


class ErrorAnswerLog:
    """Which 4xx/5xx answers get a log line: all of them, up to a rate (pure; the caller passes the time).

    A line that is let through after some were held back says how many (so nothing is silently lost).
    """

    def __init__(self, now: float, rate: float = ERROR_LOG_RATE, burst: int = ERROR_LOG_BURST) -> None:
        self._bucket = TokenBucket(rate, burst, now)
        self.suppressed = 0  # answers not logged since the last line

    def admit(self, now: float) -> int | None:
        """None: do not log this one. Else log it, with the number held back before it."""
        if self._bucket.take(1, now):
            self.suppressed += 1
            return None
        held, self.suppressed = self.suppressed, 0
        return held


class Proxy:
    """The mirror / proxy server of one dfdaemon; see the module docstring."""

    def __init__(self, *, engine: Engine, origin: OriginClient, config: DfdaemonConfig,
                 metrics: DaemonMetrics, clock: Clock | None = None) -> None:
        self._engine = engine
        self._config = config
        self._metrics = metrics
        self._rules = [re.compile(rule) for rule in config.proxy_rule]
        self._default_registry = config.registry_mirror.rstrip("/")
        self._runner: web.ServerRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        # Both raise ConfigError naming the key when a CA file is unusable: the daemon fails at start-up.
        self._interceptor = Interceptor.from_config(config)
        self._upstream_ssl = upstream_ssl_context(config.proxy_upstream_ca_cert)
        self.upstreams = upstream_policy(config)
        # The access check goes through the proxy's own pool, not `origin` (the back-source
        # client): the same CAs as straight-through requests, and the same allow-list (its
        # resolver refuses private addresses nobody listed).
        del origin
        self.access = BlobAccess(OriginClient(session=self.session, upstreams=self.upstreams),
                                 config.proxy_auth_ttl)
        self.limits = ConnectionLimits(header_timeout=config.proxy_header_timeout,
                                       max_connections=config.proxy_max_connections,
                                       max_per_client=config.proxy_max_connections_per_client)
        self._clock: Clock = clock or SystemClock()
        self._admission = P2PAdmission(config.proxy_p2p_concurrency, config.proxy_p2p_rate, self._clock.time())
        self._sender = FileRegionSender(stall_timeout=config.piece_timeout)
        self._tunnels: set[asyncio.Task[Any]] = set()
        self._schemes = SchemeCache(self._ping, self._clock)
        self._error_log = ErrorAnswerLog(self._clock.time())
        self._checked_urls: OrderedDict[str, None] = OrderedDict()  # see _check_url

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks a free port); the bound port."""
        # aiohttp's keepalive timeout is the header timeout (common.http_limits): it never cuts a
        # request being answered, a CONNECT tunnel included.
        server = web.Server(self._handle, keepalive_timeout=self.limits.header_timeout)
        runner = web.ServerRunner(server, access_log=None, shutdown_timeout=2.0)
        bound = await listen_limited(runner, host, port, self.limits)
        self._runner = runner
        log.info("registry mirror / proxy listening on %s:%d%s", host, bound,
                 f" (default registry {self._default_registry})" if self._default_registry else "")
        return bound

    async def stop(self) -> None:
        """Stop listening; close tunnels and upstream connections."""
        runner, self._runner = self._runner, None
        for tunnel in list(self._tunnels):
            tunnel.cancel()
        if self._interceptor is not None:
            self._interceptor.close()
        if runner is not None:
            await runner.cleanup()
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._sender.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        """Keep-alive pool for straight-through requests."""
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self._config.piece_timeout * 2)
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=64, ssl=self._upstream_ssl,
                                             resolver=GuardedResolver(self.upstreams))
            self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False, connector=connector)
        return self._session

    # -- dispatch --------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest, origin: str | None = None) -> web.StreamResponse:
        """Answer one request; `origin` (``https://host:port``) when it came inside an intercepted CONNECT."""
        route = "other"
        url = ""
        response: web.StreamResponse
        try:
            if request.method == "CONNECT" and origin is None:
                route = "connect"
                response = await self._connect(request)
            else:
                url, route = await self._upstream_url(request) if origin is None else self._inner_url(request, origin)
                self._check_url(url)
                if self._use_p2p(request, url):
                    route = "p2p"
                    response = await self._admitted_p2p(request, url)
                else:
                    response = await self._straight(request, url)
        except _Relayed as exc:
            response = exc.response
        except ProxyError as exc:
            response = _error(exc.status, str(exc))
        self._metrics.count_proxy_request(route, response.status)
        if response.status >= 400:
            self._log_error_answer(request, route, url, response)
        return response

    def _log_error_answer(self, request: web.BaseRequest, route: str, url: str,
                          response: web.StreamResponse) -> None:
        """One line per 4xx/5xx answer (rate-limited): a client that falls back to the registry on
        an error must not do so silently. 5xx at WARNING, 4xx (401 token dances, 404s) at INFO."""
        held = self._error_log.admit(self._clock.time())
        if held is None:
            return
        if response.headers.get(HEADER_ERROR_TYPE) == "proxy" and isinstance(response, web.Response):
            reason = (response.text or "").strip()
        else:
            reason = f"upstream {url} answered {response.status}"
        more = f" ({held} more error answers not logged)" if held else ""
        level = logging.WARNING if response.status >= 500 else logging.INFO
        log.log(level, "answered %d to %s %s (%s): %s%s", response.status, request.method,
                request.raw_path[:300], route, reason[:500], more)

    def _check_url(self, url: str) -> None:
        """A 400 for a URL without a usable host, a 403 for an upstream the operator did not allow.

        Both depend on the URL and the configuration only: a URL that passed is remembered (the
        last CHECKED_URLS of them), as nydusd asks for the same blob URL on every Range read.
        """
        if url in self._checked_urls:
            self._checked_urls.move_to_end(url)
            return
        _check_upstream(url)
        self._allow(url)
        self._checked_urls[url] = None
        if len(self._checked_urls) > CHECKED_URLS:
            self._checked_urls.popitem(last=False)

    def _allow(self, url: str) -> None:
        """403 unless the operator allows `url`'s upstream."""
        try:
            self.upstreams.check_url(url)
        except UpstreamNotAllowed as exc:
            raise ProxyError(403, str(exc)) from None

    @staticmethod
    def _inner_url(request: web.BaseRequest, origin: str) -> tuple[str, str]:
        """Inside an intercepted CONNECT: the request as the absolute-form ``https://`` one it stands for."""
        try:
            return inner_url(origin, request.method, request.raw_path), "forward"
        except InvalidRequest as exc:
            raise ProxyError(400, str(exc)) from None

    async def _upstream_url(self, request: web.BaseRequest) -> tuple[str, str]:
        """The URL to fetch and the route name (``mirror`` or ``forward``)."""
        target = request.message.url
        if target.is_absolute():
            if target.scheme not in ("http", "https"):
                raise ProxyError(400, f"cannot proxy {target.scheme!r} URLs")
            return str(target), "forward"
        if not request.path.startswith("/v2/") and request.path != "/v2":
            raise ProxyError(400, f"{request.path!r} is not a registry API path (/v2/...); send absolute URLs "
                                  "(forward proxy) or CONNECT for anything else")
        query = [(k, v) for k, v in parse_qsl(request.query_string, keep_blank_values=True) if k != "ns"]
        registry = await self._registry_for(_header(request.headers, HEADER_REGISTRY), request.query.get("ns"))
        parts = urlsplit(registry)
        return urlunsplit((parts.scheme, parts.netloc, request.raw_path.split("?", 1)[0], urlencode(query), "")), \
            "mirror"

    async def _registry_for(self, header: str | None, namespace: str | None) -> str:
        if header:
            registry = header if "://" in header else f"https://{header}"
            try:
                parts = urlsplit(registry)
            except ValueError:  # bad IPv6 brackets, a netloc that changes under NFKC
                parts = urlsplit("")
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ProxyError(400, f"{HEADER_REGISTRY} {header!r} is not a registry URL")
            return registry.rstrip("/")
        if namespace:
            default_host = urlsplit(self._default_registry).netloc if self._default_registry else ""
            if namespace == default_host:
                return self._default_registry  # keeps its scheme (a plain-http registry)
            if namespace == DOCKER_HUB:
                return DOCKER_HUB_REGISTRY
            if not re.fullmatch(r"[A-Za-z0-9.-]+(:\d+)?", namespace):
                raise ProxyError(400, f"ns {namespace!r} is not a registry host")
            # Checked before the scheme probe: no request goes to a host that is not allowed.
            host, _, port = namespace.partition(":")
            try:
                _check_host(host)
            except ValueError as exc:
                raise ProxyError(400, f"ns {namespace[:200]!r} is not a registry host: {exc}") from None
            try:
                self.upstreams.check_destination(None, host, int(port) if port else None)
            except UpstreamNotAllowed as exc:
                raise ProxyError(403, str(exc)) from None
            # No scheme in ns: ask the registry's /v2/ ping (a plain-HTTP registry is not https).
            return f"{await self._schemes.scheme(namespace)}://{namespace}"
        if self._default_registry:
            return self._default_registry
        raise ProxyError(400, f"no upstream registry: send {HEADER_REGISTRY}, ?ns=, or start the dfdaemon "
                              "with --registry-mirror")

    async def _ping(self, url: str) -> Probe:
        """How ``GET url`` (a registry's ``/v2/``) went: answered, not TLS at all, or unreachable."""
        try:
            async with self.session.get(url, allow_redirects=False,
                                        timeout=aiohttp.ClientTimeout(total=PING_TIMEOUT)):
                return Probe.ANSWERED
        except aiohttp.ClientConnectorCertificateError:
            return Probe.UNREACHABLE  # a TLS server whose certificate is not trusted: never downgrade
        except (aiohttp.ClientConnectorSSLError, aiohttp.ClientSSLError, ssl.SSLError):
            return Probe.NOT_TLS
        except (aiohttp.ClientError, OSError, TimeoutError):
            return Probe.UNREACHABLE

    def _use_p2p(self, request: web.BaseRequest, url: str) -> bool:
        forced = _header(request.headers, HEADER_USE_P2P)
        if forced:
            return _flag(forced, False) and request.method == "GET"
        return request.method == "GET" and any(rule.search(url) for rule in self._rules)

    # -- straight through ------------------------------------------------------------------------

    async def _straight(self, request: web.BaseRequest, url: str) -> web.StreamResponse:
        headers = CIMultiDict((k, v) for k, v in request.headers.items()
                              if k.lower() not in HOP_BY_HOP and not k.lower().startswith("x-dragonfly-"))
        has_body = request.can_read_body
        if not has_body:
            headers.popall("Content-Length", None)
        # A blob's redirect to object storage is followed here: clients of a mirror expect bytes.
        follow = request.method in ("GET", "HEAD") and "/blobs/" in url
        upstream = await self._send_upstream(request, url, headers, has_body, follow)
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, value)
            if request.method == "HEAD" or upstream.status in (204, 304):
                await response.prepare(request)
                await response.write_eof()
                return response
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_chunked(_CHUNK):
                    await response.write(chunk)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.info("straight-through %s %s broke: %s", request.method, url, exc)
                _abort(request)
                return response
            await response.write_eof()
            return response

    async def _send_upstream(self, request: web.BaseRequest, url: str, headers: CIMultiDict[str], has_body: bool,
                             follow: bool) -> aiohttp.ClientResponse:
        """Send the request; with `follow`, follow redirects the allow-list permits (credentials
        stay with the first origin: Authorization and Cookie are dropped across origins)."""
        current = url
        first_origin = origin_of(url)
        for _ in range(MAX_REDIRECTS + 1):
            try:
                upstream = await self.session.request(
                    request.method, URL(current, encoded=True), headers=headers,
                    data=request.content if has_body else None, allow_redirects=False, auto_decompress=False)
            except UpstreamNotAllowed as exc:
                raise ProxyError(403, str(exc)) from None
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise ProxyError(502, f"upstream {current}: {type(exc).__name__}: {exc}") from None
            location = upstream.headers.get("Location")
            if not follow or upstream.status not in _REDIRECTS or not location:
                return upstream
            upstream.close()
            target = urljoin(current, location)
            try:
                self.upstreams.check_redirect(current, target)
                target_origin = origin_of(target)
            except (UpstreamNotAllowed, ValueError) as exc:
                raise ProxyError(403, str(exc)) from None
            if target_origin != first_origin:
                headers = CIMultiDict((k, v) for k, v in headers.items()
                                      if k.lower() not in ("authorization", "cookie"))
            current = target
        raise ProxyError(502, f"upstream {url}: more than {MAX_REDIRECTS} redirects")

    # -- through P2P -----------------------------------------------------------------------------

    def _download_request(self, request: web.BaseRequest, url: str) -> DownloadRequest:
        headers = request.headers
        priority_text = _header(headers, HEADER_PRIORITY) or "0"
        if not _small_number(priority_text) or int(priority_text) > MAX_PRIORITY:
            raise ProxyError(400, f"{HEADER_PRIORITY} {priority_text!r} is not 0-{MAX_PRIORITY}")
        # The operator's list only: a client's X-Dragonfly-Filtered-Query-Params would let it
        # re-key a URL for everyone (an old ?versionId= served as the current content).
        filtered = self._config.proxy_filtered_query_params
        forwarded = {k: v for k, v in headers.items()
                     if k.lower() not in _NOT_FOR_P2P and not k.lower().startswith("x-dragonfly-")}
        prefetch = _flag(_header(headers, HEADER_PREFETCH), self._config.prefetch)
        try:
            return DownloadRequest(url=url, request_header=forwarded, tag=_header(headers, HEADER_TAG) or "",
                                   application=_header(headers, HEADER_APPLICATION) or "",
                                   priority=int(priority_text), filtered_query_params=filtered,
                                   byte_range=_engine_range(headers.get("Range")), prefetch=prefetch)
        except InvalidRequest as exc:
            raise ProxyError(400, str(exc)) from None

    async def _admitted_p2p(self, request: web.BaseRequest, url: str) -> web.StreamResponse:
        """:meth:`_p2p` within the limits of proxy_p2p_concurrency and proxy_p2p_rate, else 429."""
        refused = self._admission.admit(self._clock.time())
        if refused is not None:
            limit, retry_after = refused
            self._metrics.proxy_rate_limited.labels(limit).inc()
            response = _error(429, f"too many P2P requests ({limit} limit); retry in {retry_after}s")
            response.headers["Retry-After"] = str(retry_after)
            return response
        try:
            return await self._p2p(request, url)
        finally:
            self._admission.release()

    async def _p2p(self, request: web.BaseRequest, url: str) -> web.StreamResponse:
        download = self._download_request(request, url)
        task_id = download.task_id
        range_header = request.headers.get("Range")
        if range_header is not None:
            self._metrics.range_requests.inc()
        try:
            await self.access.check(url, request.headers.get("Authorization"))
        except OriginResponseError:
            # The check is a HEAD, whose answer has no body: ask with the client's own GET, so the
            # client gets the registry's whole answer (its JSON error document, WWW-Authenticate).
            return await self._straight(request, url)
        except OriginStatusError as exc:
            raise ProxyError(exc.status if exc.status >= 400 else 502, str(exc)) from None
        except UpstreamNotAllowed as exc:
            raise ProxyError(403, f"cannot check access to {url}: {exc}") from None
        except OriginError as exc:
            raise ProxyError(502, f"cannot check access to {url}: {exc}") from None

        conductor: Conductor | None = None
        local = self._engine.store.get(task_id)
        if local is None or local.content_length is None or local.piece_length is None:
            conductor = self._engine.download(download)
            local = conductor.local
            await self._wait_content_known(conductor)
        assert local.content_length is not None and local.piece_length is not None
        total = local.content_length
        try:
            chosen = select_range(range_header, total)
        except (InvalidRange, RangeNotSatisfiable) as exc:
            response = _error(416, str(exc))
            response.headers["Content-Range"] = unsatisfied_content_range(total)
            response.headers[HEADER_TASK_ID] = task_id
            return response
        start, end = (chosen.start, chosen.end) if chosen is not None else (0, total - 1)
        numbers = pieces_covering(start, end - start + 1, total, local.piece_length)
        if all(local.has_piece(n) for n in numbers):
            self._metrics.count_cache_hit(end - start + 1)  # every byte is on this node already
        elif conductor is None:
            conductor = self._engine.download(download)
        return await self._send_content(request, local, download, conductor, chosen)

    async def _wait_content_known(self, conductor: Conductor) -> None:
        known: asyncio.Future[Any] = asyncio.ensure_future(conductor.content_known.wait())
        try:
            await asyncio.wait([known, conductor.done], return_when=asyncio.FIRST_COMPLETED)
        finally:
            known.cancel()
        if conductor.content_known.is_set():
            return
        exc = conductor.done.exception()
        if isinstance(exc, OriginResponseError):
            raise _Relayed(_relay(exc))
        # The task may have been started for another client's URL (other signatures): no query strings.
        if isinstance(exc, OriginStatusError):
            raise ProxyError(exc.status if exc.status >= 400 else 502, redact_urls(str(exc)))
        raise ProxyError(502, f"download failed: {redact_urls(str(exc))}")

    async def _send_content(self, request: web.BaseRequest, local: LocalTask, download: DownloadRequest,
                            conductor: Conductor | None, chosen: ByteRange | None) -> web.StreamResponse:
        total = local.content_length
        piece_length = local.piece_length
        assert total is not None and piece_length is not None
        start, end = (chosen.start, chosen.end) if chosen is not None else (0, total - 1)
        numbers = pieces_covering(start, end - start + 1, total, piece_length)
        if conductor is not None and chosen is not None:
            conductor.prioritize(numbers)
        response = web.StreamResponse(status=206 if chosen is not None else 200)
        for name in _ENTITY_HEADERS:
            value = get_header(local.response_headers, name)
            if value is not None:
                response.headers[name] = value
        response.headers.setdefault("Content-Type", "application/octet-stream")
        response.headers["Accept-Ranges"] = "bytes"
        response.headers[HEADER_TASK_ID] = local.task_id
        if chosen is not None:
            response.headers["Content-Range"] = chosen.content_range
        response.content_length = end - start + 1
        wait = self._config.schedule_timeout + self._config.piece_timeout
        with local.reader():
            local.touch()
            # The status line goes out only once the first piece is here: a failure before it
            # is still a clean 5xx (nydusd then falls back to the registry).
            if len(numbers):
                try:
                    await self._wait_piece(local, download, numbers[0], wait)
                except DamselflyError as exc:
                    raise ProxyError(502, f"download failed: {redact_urls(str(exc))}") from None
                except TimeoutError:
                    raise ProxyError(504, f"piece {numbers[0]} did not arrive within {wait:.0f}s") from None
            try:
                file = open(local.content_path, "rb")  # noqa: ASYNC230, SIM115 - a lookup, not a read
            except OSError as exc:
                raise ProxyError(503, f"task {local.task_id} is gone: {exc.strerror}") from None
            with file:
                writer = await response.prepare(request)
                try:
                    if writer is None:
                        raise ConnectionResetError("response not prepared")
                    await self._stream(request, writer, file, local, download, conductor, numbers, start, end,
                                       wait)
                    await response.write_eof()
                except (DamselflyError, ConnectionError, OSError, TimeoutError) as exc:
                    log.info("task %s: response aborted: %s", local.task_id, exc)
                    _abort(request)
        return response

    async def _wait_piece(self, local: LocalTask, download: DownloadRequest, number: int, wait: float) -> None:
        if not local.has_piece(number):
            # Raises the download's failure; starts a new download when one ended without the
            # piece (a Range read without prefetch fetched other pieces).
            async with asyncio.timeout(wait):
                await self._engine.wait_piece(download, number)

    async def _stream(self, request: web.BaseRequest, writer: AbstractStreamWriter, file: BinaryIO,
                      local: LocalTask, download: DownloadRequest, conductor: Conductor | None, numbers: range,
                      start: int, end: int, wait: float) -> None:
        """Send bytes [start, end] as their pieces arrive, runs of present pieces at once."""
        index = 0
        while index < len(numbers):
            if conductor is not None and len(numbers) > 1:
                conductor.prioritize(numbers[index:index + STREAM_WINDOW])
            await self._wait_piece(local, download, numbers[index], wait)
            run_end = index + 1
            while run_end < len(numbers) and local.has_piece(numbers[run_end]):
                run_end += 1
            first = local.span(numbers[index])
            last = local.span(numbers[run_end - 1])
            offset = max(start, first.offset)
            stop = min(end + 1, last.end)
            await self._sender.send(request, writer, file, offset, stop - offset)
            index = run_end

    # -- CONNECT ---------------------------------------------------------------------------------

    async def _connect(self, request: web.BaseRequest) -> web.StreamResponse:
        """Tunnel the connection to host:port byte for byte."""
        authority = request.raw_path
        host, sep, port_text = authority.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not _small_number(port_text) or not 0 < int(port_text) < 65536:
            raise ProxyError(400, f"CONNECT needs host:port, got {authority!r}")
        try:
            _check_host(host)
        except ValueError as exc:
            raise ProxyError(400, f"CONNECT host {host[:200]!r} is not a host name: {exc}") from None
        try:
            self.upstreams.check_destination(None, host, int(port_text))
        except UpstreamNotAllowed as exc:
            raise ProxyError(403, f"CONNECT refused: {exc}") from None
        if self._interceptor is not None and self._interceptor.intercepts(host, int(port_text)):
            return await self._intercept(request, host, int(port_text))
        try:
            async with asyncio.timeout(10):
                address = await self._connect_address(host, int(port_text))
                upstream_reader, upstream_writer = await asyncio.open_connection(address, int(port_text))
        except UpstreamNotAllowed as exc:
            raise ProxyError(403, f"CONNECT refused: {exc}") from None
        except (OSError, TimeoutError) as exc:
            raise ProxyError(502, f"cannot connect to {authority}: {exc}") from None
        try:
            transport, response = await _accept_connect(request)
        except ProxyError:
            upstream_writer.close()
            raise
        # From here the client connection is a byte pipe: take it from aiohttp's HTTP parser.
        client_reader = asyncio.StreamReader(limit=TUNNEL_BUFFER)
        protocol = asyncio.StreamReaderProtocol(client_reader)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        client_writer = asyncio.StreamWriter(transport, protocol, client_reader, asyncio.get_running_loop())
        transport.resume_reading()
        pumps = [asyncio.create_task(_pump(client_reader, upstream_writer)),
                 asyncio.create_task(_pump(upstream_reader, client_writer))]
        self._tunnels.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tunnels.difference_update(pumps)
            for pump in pumps:
                pump.cancel()
            upstream_writer.close()
            transport.close()
        return response

    async def _connect_address(self, host: str, port: int) -> str:
        """The address a CONNECT to host:port dials: resolved here, so a name that resolves to a
        private address the allow-list does not name is refused (UpstreamNotAllowed)."""
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return public_addresses(self.upstreams, host.lower(), port, [str(info[4][0]) for info in infos])[0]

    async def _intercept(self, request: web.BaseRequest, host: str, port: int) -> web.StreamResponse:
        """Answer the CONNECT, end TLS here with a certificate minted for `host`, and handle the requests
        inside as absolute-form ``https://host:port/...`` ones (peer/proxy/tls.py)."""
        assert self._interceptor is not None
        try:
            context = await self._interceptor.server_context(host)
        except (ValueError, ssl.SSLError, OSError) as exc:
            raise ProxyError(502, f"cannot mint a certificate for {host}: {exc}") from None
        transport, response = await _accept_connect(request)
        origin = intercepted_origin(host, port)
        await self._interceptor.serve(transport, context, lambda inner: self._handle(inner, origin))
        return response


class _Relayed(ProxyError):
    """A registry answer to pass on as it is (raised from deep in the P2P path)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status, "relayed")
        self.response = response


async def _accept_connect(request: web.BaseRequest) -> tuple[asyncio.Transport, web.StreamResponse]:
    """Answer a CONNECT with 200 and flush it; the connection is ours from then on."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ProxyError(400, "client went away")
    response = web.StreamResponse(status=200, reason="Connection Established")
    response.force_close()
    writer = await response.prepare(request)
    if writer is not None:
        await writer.drain()
    return transport, response


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(TUNNEL_BUFFER):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


def _small_number(text: str) -> bool:
    """ASCII digits, few enough for int() (which refuses over 4300 digits, and takes other scripts)."""
    return text.isascii() and text.isdigit() and len(text) <= _MAX_NUMBER_DIGITS


def upstream_policy(config: DfdaemonConfig) -> UpstreamPolicy:
    """The proxy's allow-list: --registry-mirror, proxy_intercept_hosts and proxy_allowed_upstreams."""
    entries = [config.registry_mirror] if config.registry_mirror else []
    return UpstreamPolicy([*entries, *config.proxy_intercept_hosts, *config.proxy_allowed_upstreams],
                          public_redirects=config.upstream_redirects_public)


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the addresses the allow-list lets the proxy reach (a name
    that resolves to loopback or a private address is refused unless listed)."""

    def __init__(self, policy: UpstreamPolicy) -> None:
        self._policy = policy
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET,
                      ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        kept = public_addresses(self._policy, host.lower(), port or None, [r["host"] for r in results])
        return [r for r in results if r["host"] in kept]

    async def close(self) -> None:
        await self._inner.close()


def _check_host(host: str) -> None:
    """ValueError unless a resolver can take `host`: an IP address, or labels IDNA can encode."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        host.encode("idna")  # UnicodeError (a ValueError): an empty label, or one over 63 characters


def _check_upstream(url: str) -> None:
    """A 400 unless `url` has a host and port an upstream connection can use.

    Otherwise urllib, yarl and the resolvers raise ValueError (UnicodeError for a label over 63
    characters, bad IPv6 brackets, a netloc that changes under NFKC, a port out of range) deep
    inside the request, where it would become a 500.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
        if not parts.hostname:
            raise ValueError("no host")
        _check_host(parts.hostname)
    except ValueError as exc:
        raise ProxyError(400, f"{url[:200]!r} has no usable host: {exc}") from None


def _abort(request: web.BaseRequest) -> None:
    """Close the client connection: a response that cannot be completed must not look complete."""
    if request.transport is not None:
        request.transport.abort()


def _engine_range(header: str | None) -> tuple[int, int | None] | None:
    """A single Range as the engine takes it ((start, length), -N for a suffix); None: all of it."""
    if header is None:
        return None
    try:
        specs = parse_range(header)
    except InvalidRange:
        return None
    if len(specs) != 1:
        return None
    spec = specs[0]
    if spec.first is None:
        return (-spec.last, None) if spec.last else None
    return spec.first, None if spec.last is None else spec.last - spec.first + 1


