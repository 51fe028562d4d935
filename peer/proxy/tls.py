"""Interception of chosen HTTPS hosts, so their blobs can go through P2P too.

A ``CONNECT host:port`` whose target matches ``proxy_intercept_hosts`` is not tunnelled. The
proxy answers ``200``, then speaks TLS with the client itself, presenting a certificate for
`host` that it minted on the fly and signed with the operator's CA (``proxy_ca_cert`` and
``proxy_ca_key``; clients must trust that CA). The HTTP requests read inside are handled as if
they had been sent in absolute form to ``https://host:port/...``. Every other ``CONNECT`` stays a
byte-for-byte tunnel: the client then sees the origin's own certificate.

The parts, from pure to I/O:

- :class:`HostPattern` and :func:`inner_url`: which targets are intercepted, and the URL of a
  request read inside an intercepted connection (no I/O);
- :class:`CertificateAuthority`: the operator's CA, checked once at start-up (a
  :class:`~common.errors.ConfigError` names the key at fault), and the minting of host
  certificates;
- :class:`Interceptor`: the per-host server TLS contexts (minted once, cached), and the HTTP
  server of one intercepted connection;
- :func:`upstream_ssl_context`: what the proxy trusts on its own HTTPS requests upstream (the
  system store, plus ``proxy_upstream_ca_cert`` for private registries).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.clock import Clock, SystemClock
from common.errors import ConfigError, InvalidRequest

if TYPE_CHECKING:
    from common.config import DfdaemonConfig

log = logging.getLogger(__name__)

# A minted certificate is valid this long, and replaced once it is half way there: a client
# connecting late in its life still gets one that outlives its connection.
LEAF_LIFETIME = datetime.timedelta(days=7)
# Backdating absorbs clients whose clocks are a little behind ours.
LEAF_BACKDATE = datetime.timedelta(hours=1)
# Server contexts kept (least recently used dropped first): one per intercepted host name.
MAX_CONTEXTS = 1024
HANDSHAKE_TIMEOUT = 10.0
# After an intercepted connection ends, how long a request still running on it may take to finish.
SHUTDOWN_GRACE = 2.0

HttpHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
CaKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey


# -- which CONNECTs are intercepted (pure) ---------------------------------------------------------


@dataclass(frozen=True)
class HostPattern:
    """One ``proxy_intercept_hosts`` entry: an exact host or ``*.domain`` (any depth), any port or one."""

    host: str  # lowercase; IPv6 without brackets
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        """``registry.example.com``, ``*.example.com``, ``host:5000``, ``[::1]:443``."""
        text = text.strip().lower()
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                host, port_text = text, ""
        if not host or (port_text and not port_text.isdigit()):
            raise ValueError(f"{text!r} is not a host pattern")
        return cls(host, int(port_text) if port_text else None)

    def matches(self, host: str, port: int) -> bool:
        """Whether a ``CONNECT host:port`` is intercepted by this pattern."""
        if self.port is not None and port != self.port:
            return False
        host = host.lower().rstrip(".")
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host


def origin_of(host: str, port: int) -> str:
    """``https://host`` (port 443) or ``https://host:port``; IPv6 hosts in brackets."""
    shown = f"[{host}]" if ":" in host else host
    return f"https://{shown.lower()}" if port == 443 else f"https://{shown.lower()}:{port}"


def inner_url(origin: str, method: str, target: str) -> str:
    """The URL of a request read inside the intercepted connection to `origin`.

    Clients send origin form (``GET /v2/...``) there; absolute form is accepted when it names the
    same origin. Anything else (a ``CONNECT``, another host) is an :class:`InvalidRequest`.
    """
    if method == "CONNECT":
        raise InvalidRequest(f"CONNECT inside the intercepted connection to {origin}")
    if target.startswith("/"):
        return origin + target
    if target.lower() == origin or target.lower().startswith(origin + "/"):
        return origin + target[len(origin):]
    raise InvalidRequest(f"{target!r} is not on {origin}, the host this connection was opened to")


# -- the operator's CA -----------------------------------------------------------------------------


def _load_pem(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None


class CertificateAuthority:
    """The operator's CA certificate and key, and the host certificates minted with them."""

    def __init__(self, certificate: x509.Certificate, key: CaKey) -> None:
        self.certificate = certificate
        self._key = key
        self.chain_pem = certificate.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def load(cls, cert_path: str, key_path: str) -> CertificateAuthority:
        """Read and check the CA; a :class:`ConfigError` names the key whose file is wrong."""
        try:
            certificate = x509.load_pem_x509_certificate(_load_pem(cert_path, "proxy_ca_cert"))
        except ValueError as exc:
            raise ConfigError("proxy_ca_cert", f"{cert_path} is not a PEM certificate: {exc}") from None
        try:
            key = serialization.load_pem_private_key(_load_pem(key_path, "proxy_ca_key"), password=None)
        except TypeError:
            raise ConfigError("proxy_ca_key", f"{key_path} is encrypted; give the key without a passphrase") from None
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ConfigError("proxy_ca_key", f"{key_path} is not a PEM private key: {exc}") from None
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
                          | ed448.Ed448PrivateKey):
            raise ConfigError("proxy_ca_key", f"{key_path}: {type(key).__name__} keys cannot sign certificates")
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if (key.public_key().public_bytes(serialization.Encoding.DER, spki)
                != certificate.public_key().public_bytes(serialization.Encoding.DER, spki)):
            raise ConfigError("proxy_ca_key", f"{key_path} is not the key of proxy_ca_cert {cert_path}")
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise ConfigError("proxy_ca_cert", f"{cert_path} is not a CA certificate (basicConstraints CA:TRUE)")
        now = datetime.datetime.now(datetime.UTC)
        if not certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc:
            raise ConfigError("proxy_ca_cert", f"{cert_path} is not valid now (valid from "
                                               f"{certificate.not_valid_before_utc} to "
                                               f"{certificate.not_valid_after_utc})")
        return cls(certificate, key)

    def mint(self, host: str, key: ec.EllipticCurvePrivateKey, now: datetime.datetime) -> x509.Certificate:
        """A server certificate for `host` (a name or an IP address) on `key`, signed by this CA."""
        try:
            names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(host))]
        except ValueError:
            names = [x509.DNSName(host)]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)] if len(host) <= 64 else [])
        ca = self.certificate
        try:
            ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            authority_key = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            authority_key = x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key())
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(max(now - LEAF_BACKDATE, ca.not_valid_before_utc))
            .not_valid_after(min(now + LEAF_LIFETIME, ca.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(names), critical=not subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(authority_key, critical=False)
        )
        algorithm = None if isinstance(self._key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) \
            else hashes.SHA256()
        return builder.sign(self._key, algorithm)


def _server_context(certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey, chain_pem: bytes) -> ssl.SSLContext:
    """A server-side TLS context presenting `certificate` (and the CA after it)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])  # the proxy speaks HTTP/1.1 inside, never h2
    pem = (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
           + certificate.public_bytes(serialization.Encoding.PEM) + chain_pem)
    # ssl loads certificates only from files: the key exists on disk, in a private directory,
    # just for the call, and lives in the context's memory after it.
    with tempfile.TemporaryDirectory(prefix="damselfly-tls-") as directory:
        path = os.path.join(directory, "server.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
        context.load_cert_chain(path)
    return context


def upstream_ssl_context(ca_path: str) -> ssl.SSLContext:
    """Trust for HTTPS requests upstream: the system store, plus the PEM bundle at `ca_path` if any."""
    context = ssl.create_default_context()
    if ca_path:
        try:
            context.load_verify_locations(cafile=ca_path)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("proxy_upstream_ca_cert", f"{ca_path} holds no usable PEM certificates: {exc}") from None
    return context


# -- intercepted connections -----------------------------------------------------------------------


class _ConnectionServer(web.Server):
    """aiohttp's HTTP server for one intercepted connection; `ended` is set when it closes."""

    def __init__(self, handler: HttpHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.ended = asyncio.Event()

    def connection_lost(self, handler: Any, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self.ended.set()


class Interceptor:
    """TLS towards clients for the hosts of ``proxy_intercept_hosts``; see the module docstring."""

    def __init__(self, patterns: Iterable[HostPattern], authority: CertificateAuthority, *,
                 clock: Clock | None = None) -> None:
        self.patterns = tuple(patterns)
        self.authority = authority
        self._clock: Clock = clock or SystemClock()
        # One key for every minted certificate: generating one per host buys nothing, the CA
        # signature is what binds a certificate to its host.
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._contexts: OrderedDict[str, tuple[ssl.SSLContext, float]] = OrderedDict()  # host -> (ctx, renew at)
        self._minting: dict[str, asyncio.Task[ssl.SSLContext]] = {}
        self._servers: set[_ConnectionServer] = set()
        self.minted = 0  # certificates minted (tests, logs)

    @classmethod
    def from_config(cls, config: DfdaemonConfig) -> Interceptor | None:
        """The interceptor `config` asks for, or None when no host is to be intercepted."""
        if not config.proxy_intercept_hosts:
            return None
        patterns = [HostPattern.parse(text) for text in config.proxy_intercept_hosts]
        return cls(patterns, CertificateAuthority.load(config.proxy_ca_cert, config.proxy_ca_key))

    def intercepts(self, host: str, port: int) -> bool:
        """Whether ``CONNECT host:port`` is to be intercepted rather than tunnelled."""
        return any(pattern.matches(host, port) for pattern in self.patterns)

    async def server_context(self, host: str) -> ssl.SSLContext:
        """The TLS context presenting a certificate for `host`: cached, minted when missing or old."""
        host = host.lower()
        cached = self._contexts.get(host)
        if cached is not None and cached[1] > self._clock.time():
            self._contexts.move_to_end(host)
            return cached[0]
        task = self._minting.get(host)
        if task is None:
            task = asyncio.create_task(asyncio.to_thread(self._mint_context, host))
            self._minting[host] = task
            task.add_done_callback(lambda _: self._minting.pop(host, None))
        context = await asyncio.shield(task)
        self._contexts[host] = (context, self._clock.time() + LEAF_LIFETIME.total_seconds() / 2)
        self._contexts.move_to_end(host)
        while len(self._contexts) > MAX_CONTEXTS:
            self._contexts.popitem(last=False)
        return context

    def _mint_context(self, host: str) -> ssl.SSLContext:
        certificate = self.authority.mint(host, self._leaf_key, datetime.datetime.now(datetime.UTC))
        self.minted += 1
        log.info("minted a certificate for %s, valid until %s", host, certificate.not_valid_after_utc)
        return _server_context(certificate, self._leaf_key, self.authority.chain_pem)

    async def serve(self, transport: asyncio.Transport, context: ssl.SSLContext, handler: HttpHandler) -> None:
        """Speak TLS on `transport` (a client that was just told ``200`` to its CONNECT) and serve the
        HTTP requests inside with `handler`, until the connection ends or :meth:`close`."""
        loop = asyncio.get_running_loop()
        server = _ConnectionServer(handler, access_log=None)
        protocol = server()
        try:
            tls = await loop.start_tls(transport, protocol, context, server_side=True,
                                       ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            # Typically a client that does not trust the operator's CA.
            log.info("TLS handshake with an intercepting client failed: %s", exc)
            transport.close()
            return
        if tls is None:
            transport.close()
            return
        protocol.connection_made(tls)
        self._servers.add(server)
        try:
            await server.ended.wait()
        finally:
            self._servers.discard(server)
            tls.close()
            await server.shutdown(SHUTDOWN_GRACE)

    def close(self) -> None:
        """End every intercepted connection (the proxy is stopping)."""
        for server in list(self._servers):
            server.ended.set()
