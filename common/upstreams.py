"""Which upstreams a dfdaemon may reach on a client's behalf: the operator's allow-list.

Any client of the registry mirror / proxy names where a request goes (``X-Dragonfly-Registry``,
``?ns=``, an absolute-form URL, ``CONNECT host:port``). Left open, that makes the node an open
forward proxy into its own network (its scheduler's gRPC port, the cloud metadata address) and
lets a client choose the "registry" that decides whether it may read a private blob. So the
proxy reaches only the upstreams the operator allows: ``--registry-mirror``, the hosts of
``proxy_intercept_hosts``, and ``proxy_allowed_upstreams``. An entry is

- ``host`` or ``host:port`` (no port: any port of that host), or a URL ``scheme://host[:port]``
  (that scheme; its port, or the scheme's default one);
- ``*.example.com``: any host under that domain (not the domain itself);
- ``*``: any host whose addresses are all public.

Loopback, link-local, private (RFC 1918, unique-local), multicast, unspecified and reserved
addresses are refused unless an entry names the host or domain itself: ``*`` never reaches them.
Names are checked again when they are resolved (:func:`public_addresses`), so a public-looking
name that resolves to ``127.0.0.1`` is refused too.

Redirects: registries send blob downloads to a CDN or object storage (Docker Hub to Cloudflare,
ECR to S3, GCR to Google Cloud Storage), on hosts nobody can list in advance. A redirect is the
choice of an allowed upstream, not of the client, so by default it may go to the same origin, to
an allowed upstream, or to any *public* address; a redirect to a loopback, link-local or private
address is refused unless that host is listed. ``upstream_redirects_public = false`` makes every
redirect target need an entry.

:class:`UpstreamPolicy` is the pure decision; the proxy and the origin client apply it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from common.errors import UpstreamNotAllowed

ANY_PUBLIC_HOST = "*"
DEFAULT_PORTS = {"http": 80, "https": 443}
# Docker Hub's name in image references and ns= is not the host its API is served from.
_ALIASES = {"docker.io": ("registry-1.docker.io",), "index.docker.io": ("registry-1.docker.io",)}
ALLOWED_UPSTREAMS_KEY = "proxy_allowed_upstreams"

__all__ = ["UpstreamEntry", "UpstreamNotAllowed", "UpstreamPolicy", "is_public_address", "origin_of",
           "public_addresses"]


@dataclass(frozen=True, slots=True)
class UpstreamEntry:
    """One allow-list entry: a host (or ``*.domain``, or ``*``), optionally a scheme and a port."""

    host: str  # lower case; "*" or "*.domain" for patterns
    port: int | None  # None: any port
    scheme: str | None  # None: any scheme

    @classmethod
    def parse(cls, text: str) -> UpstreamEntry:
        """An entry from its text; ValueError saying what is wrong."""
        raw = text.strip()
        scheme: str | None = None
        if "://" in raw:
            parts = urlsplit(raw)
            if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
                raise ValueError(f"{text!r} is not an http(s) URL with a host")
            if parts.path not in ("", "/") or parts.query:
                raise ValueError(f"{text!r}: give the registry's scheme://host[:port] only, without a path")
            scheme = parts.scheme
            host = parts.hostname
            port: int | None = parts.port or DEFAULT_PORTS[scheme]
        else:
            host, port = _split_host_port(raw, text)
        host = host.lower()
        if host.startswith("*.") and not host[2:].rstrip("."):
            raise ValueError(f"{text!r}: '*.' needs a domain after it")
        host = host.rstrip(".")
        if not host:
            raise ValueError(f"{text!r} names no host")
        if host != ANY_PUBLIC_HOST:
            pattern = host[2:] if host.startswith("*.") else host
            if "*" in pattern or not pattern:
                raise ValueError(f"{text!r}: a wildcard is allowed only as '*' or a leading '*.'")
            try:
                ipaddress.ip_address(pattern)
            except ValueError:
                pattern.encode("idna")  # UnicodeError (a ValueError) for an empty or overlong label
        return cls(host, port, scheme)

    def matches(self, scheme: str | None, host: str, port: int | None) -> bool:
        """Whether a destination (host lower case; scheme None for CONNECT) is this entry's."""
        if self.scheme is not None and scheme is not None and scheme != self.scheme:
            return False
        if self.port is not None and port != self.port:
            return False
        if self.host == ANY_PUBLIC_HOST:
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host

    @property
    def names_host(self) -> bool:
        """Whether the entry names a host or domain (its private addresses are then allowed)."""
        return self.host != ANY_PUBLIC_HOST


def _split_host_port(raw: str, text: str) -> tuple[str, int | None]:
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r}: unclosed '['")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: text after ']' must be :PORT")
    elif raw.count(":") == 1:
        host, _, port_text = raw.partition(":")
    else:
        host, port_text = raw, ""  # a bare host, or an IPv6 address without brackets
    if not port_text:
        return host, None
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: port {port_text!r} is not 1-65535")
    return host, int(port_text)


def is_public_address(address: str) -> bool:
    """Whether an IP address is a public unicast one (not loopback, link-local, private, ...)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]").split("%", 1)[0]))
    except ValueError:
        return None


def origin_of(url: str) -> tuple[str, str, int]:
    """(scheme, lower-case host, port) of an http(s) URL; ValueError when it has none."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"{url[:200]!r} is not an http(s) URL with a host")
    return parts.scheme, parts.hostname.lower(), parts.port or DEFAULT_PORTS[parts.scheme]


class UpstreamPolicy:
    """The allow-list; `public_redirects` lets redirects go to any public address."""

    def __init__(self, entries: Iterable[str], *, public_redirects: bool = True) -> None:
        parsed: list[UpstreamEntry] = []
        for text in entries:
            if not text.strip():
                continue
            entry = UpstreamEntry.parse(text)
            parsed.append(entry)
            for alias in _ALIASES.get(entry.host, ()):
                parsed.append(UpstreamEntry(alias, entry.port, entry.scheme))
        self.entries = tuple(parsed)
        self.public_redirects = public_redirects

    def __repr__(self) -> str:
        shown = ", ".join(f"{e.scheme + '://' if e.scheme else ''}{e.host}{f':{e.port}' if e.port else ''}"
                          for e in self.entries)
        return f"UpstreamPolicy([{shown}], public_redirects={self.public_redirects})"

    def _match(self, scheme: str | None, host: str, port: int | None) -> UpstreamEntry | None:
        """The most specific matching entry: one naming the host beats ``*``."""
        found = [e for e in self.entries if e.matches(scheme, host, port)]
        named = [e for e in found if e.names_host]
        best = named or found
        return best[0] if best else None

    def names(self, host: str, port: int | None, scheme: str | None = None) -> bool:
        """Whether an entry names this host (or its domain): its private addresses may be reached."""
        entry = self._match(scheme, host.lower(), port)
        return entry is not None and entry.names_host

    def check_destination(self, scheme: str | None, host: str, port: int | None) -> None:
        """Raise :class:`UpstreamNotAllowed` unless a client may make the proxy reach host:port."""
        host = host.lower().strip("[]")
        entry = self._match(scheme, host, port)
        shown = f"{host}:{port}" if port else host
        if entry is None:
            raise UpstreamNotAllowed(
                f"upstream {shown} is not allowed: the proxy reaches only --registry-mirror, proxy_intercept_hosts "
                f"and {ALLOWED_UPSTREAMS_KEY}; ask the operator to list it there")
        literal = _ip_literal(host)
        if not entry.names_host and literal is not None and not is_public_address(literal):
            raise UpstreamNotAllowed(
                f"upstream {shown} is a loopback, link-local or private address; '*' in {ALLOWED_UPSTREAMS_KEY} "
                "covers public addresses only: list the address itself to allow it")

    def check_url(self, url: str) -> None:
        """:meth:`check_destination` of an http(s) URL."""
        try:
            scheme, host, port = origin_of(url)
        except ValueError as exc:
            raise UpstreamNotAllowed(str(exc)) from None
        self.check_destination(scheme, host, port)

    def check_redirect(self, source: str, target: str) -> None:
        """Raise :class:`UpstreamNotAllowed` unless a redirect from `source` may go to `target`.

        The same origin, an allowed upstream, or (with `public_redirects`) a host that is not a
        private IP literal; names that resolve to private addresses are caught at resolution.
        """
        try:
            source_origin = origin_of(source)
            scheme, host, port = origin_of(target)
        except ValueError as exc:
            raise UpstreamNotAllowed(f"redirect from {source[:200]} refused: {exc}") from None
        if (scheme, host, port) == source_origin:
            return
        entry = self._match(scheme, host, port)
        literal = _ip_literal(host)
        if entry is not None and (entry.names_host or literal is None or is_public_address(literal)):
            return
        if self.public_redirects and (literal is None or is_public_address(literal)):
            return
        raise UpstreamNotAllowed(
            f"redirect from {source[:200]} to {scheme}://{host}:{port} refused: "
            + ("a loopback, link-local or private address" if literal is not None and not is_public_address(literal)
               else "not an allowed upstream")
            + f"; list {host} in {ALLOWED_UPSTREAMS_KEY} if the registry really stores blobs there")

    def resolved_allowed(self, host: str, port: int | None, addresses: Iterable[str]) -> list[str]:
        """Of the addresses `host` resolved to, those that may be reached: all of them when an entry
        names the host, else only public ones."""
        addresses = list(addresses)
        if self.names(host, port):
            return addresses
        return [a for a in addresses if is_public_address(a)]


def public_addresses(policy: UpstreamPolicy, host: str, port: int | None, addresses: Iterable[str]) -> list[str]:
    """:meth:`UpstreamPolicy.resolved_allowed`, raising :class:`UpstreamNotAllowed` when none is left."""
    addresses = list(addresses)
    kept = policy.resolved_allowed(host, port, addresses)
    if addresses and not kept:
        raise UpstreamNotAllowed(
            f"{host} resolves only to loopback, link-local or private addresses ({', '.join(addresses[:4])}); "
            f"list {host} in {ALLOWED_UPSTREAMS_KEY} to allow them")
    return kept
