"""Transport security: TLS, or mutual TLS with a cluster CA, from three PEM files.

:class:`TlsCredentials` is loaded once at start-up from the ``tls_ca_cert``, ``tls_cert`` and
``tls_key`` config keys, checked there (a missing, unreadable or invalid file, or a key that does
not belong to the certificate, is a :class:`~common.errors.ConfigError` naming the key and the
path), and then hands out whatever a component needs::

    grpc_server_credentials()    scheduler gRPC, dfdaemon upload gRPC
    grpc_channel_credentials()   channels to schedulers, parents and seeds
    server_ssl_context()         the HTTPS piece server (aiohttp)
    client_ssl_context()         the piece fetcher's aiohttp session

With ``tls_client_auth`` (the default once TLS is on) servers demand a client certificate signed
by ``tls_ca_cert``: only cluster members get through. Clients always present their certificate
and always verify the server's chain against ``tls_ca_cert`` (the system roots when it is empty
and client auth is off).

Servers are verified by the address that was dialed: peers reach each other by IP
(``host_ip``), so a node's certificate needs an **IP SAN** for its ``host_ip``, and a DNS SAN for
any name it is dialed by (a scheduler address like ``scheduler.damselfly:8002``). gRPC and
Python's ``ssl`` both match IP SANs against an IP target, and a member of the cluster cannot pose
as another node's address. Where per-node IP SANs are impractical (pods with changing IPs),
``tls_server_name`` makes every client check that one DNS name instead, on gRPC
(``grpc.ssl_target_name_override``) and HTTPS alike (:class:`_PinnedNameContext`): then any
certificate of the cluster CA that carries the name passes, whatever address it answers on.

:func:`open_channel` and :func:`add_port` pick secure or plaintext by whether credentials are
given, so callers have one code path; ``None`` means plaintext (the default).

What the ``tls_*`` keys must look like (:func:`check_settings`, :func:`tls_enabled`, re-exported
here) lives in :mod:`common.tls_settings`, so that config validation does not load grpc.
"""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

import grpc

from common.errors import ConfigError

# Re-exported: callers that build TLS from a config find the settings checks here too.
from common.tls_settings import TlsSettings as TlsSettings
from common.tls_settings import check_settings as check_settings
from common.tls_settings import tls_enabled as tls_enabled

# Python's default client context already refuses anything older; servers get the same floor.
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2


def _no_password() -> bytes:
    # An encrypted key would otherwise make OpenSSL prompt on the terminal; refuse it instead.
    return b""


class _PinnedNameContext(ssl.SSLContext):
    """A client context that checks one fixed server name, whatever host the caller dialed.

    asyncio and uvloop both open TLS through ``wrap_bio(..., server_hostname=host)``; swapping the
    name there is the HTTPS counterpart of gRPC's ``ssl_target_name_override`` (SNI carries it too).
    """

    pinned_name = ""

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | bytes | None = None, session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        if not server_side and self.pinned_name:
            server_hostname = self.pinned_name
        return super().wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname,
                                session=session)


def _read(key: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise ConfigError(key, f"{path} is empty")
    return data


def _check_certificates(key: str, path: str, pem: bytes) -> None:
    """Raise ConfigError unless `pem` holds at least one PEM certificate."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(key, f"{path} is not a PEM certificate: {exc}") from None


@dataclasses.dataclass(frozen=True)
class TlsCredentials:
    """Validated TLS material of one node. Build it with :meth:`load` or :func:`tls_from_config`."""

    ca_cert_path: str
    cert_path: str
    key_path: str
    client_auth: bool
    ca_cert: bytes | None
    cert: bytes
    key: bytes
    server_name: str = ""  # check servers against this name instead of the address dialed

    @classmethod
    def load(cls, *, ca_cert: str, cert: str, key: str, client_auth: bool = True,
             server_name: str = "") -> TlsCredentials:
        """Read and check the files; ConfigError (naming the key and path) when one is wrong."""
        check_settings(ca_cert=ca_cert, cert=cert, key=key, client_auth=client_auth)
        ca_pem = _read("tls_ca_cert", ca_cert) if ca_cert else None
        if ca_pem is not None:
            _check_certificates("tls_ca_cert", ca_cert, ca_pem)
        cert_pem = _read("tls_cert", cert)
        _check_certificates("tls_cert", cert, cert_pem)
        key_pem = _read("tls_key", key)
        credentials = cls(ca_cert, cert, key, client_auth, ca_pem, cert_pem, key_pem, server_name)
        try:
            credentials.server_ssl_context()
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise ConfigError("tls_key", f"{key} is not the key of the certificate {cert}") from None
            raise ConfigError("tls_key", f"{key} is not an unencrypted PEM private key: {exc}") from None
        return credentials

    # ----------------------------------------------------------------------------------------
    # gRPC

    def grpc_server_credentials(self) -> grpc.ServerCredentials:
        """Server credentials; requires a client certificate signed by the CA when mutual."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca_cert, require_client_auth=self.client_auth
        )

    def grpc_channel_credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials: verify the server against the CA, present our certificate."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca_cert, private_key=self.key,
                                            certificate_chain=self.cert)

    def grpc_channel_options(self) -> list[tuple[str, str]]:
        """Channel options: the server name to check when ``tls_server_name`` is set."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    # ----------------------------------------------------------------------------------------
    # HTTPS (aiohttp)

    def server_ssl_context(self) -> ssl.SSLContext:
        """For an aiohttp server: our certificate; client certificates required when mutual."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = MINIMUM_TLS_VERSION
        context.load_cert_chain(self.cert_path, self.key_path, password=_no_password)
        if self.ca_cert is not None:
            context.load_verify_locations(cadata=self.ca_cert.decode("ascii", "replace"))
        context.verify_mode = ssl.CERT_REQUIRED if self.client_auth else ssl.CERT_NONE
        return context

    def client_ssl_context(self) -> ssl.SSLContext:
        """For an aiohttp client: verify the server (chain, and address or name), present our certificate."""
        context = _PinnedNameContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies chain and host name by default
        context.pinned_name = self.server_name
        if self.ca_cert is not None:
            context.load_verify_locations(cadata=self.ca_cert.decode("ascii", "replace"))
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        context.minimum_version = MINIMUM_TLS_VERSION
        context.load_cert_chain(self.cert_path, self.key_path, password=_no_password)
        return context


def tls_from_config(config: TlsSettings) -> TlsCredentials | None:
    """The node's TLS credentials, or None when TLS is off (no tls_* file configured)."""
    if not tls_enabled(config):
        return None
    return TlsCredentials.load(ca_cert=config.tls_ca_cert, cert=config.tls_cert, key=config.tls_key,
                               client_auth=config.tls_client_auth, server_name=config.tls_server_name)


def open_channel(address: str, tls: TlsCredentials | None) -> grpc.aio.Channel:
    """A gRPC channel to `address`: TLS with our credentials, or plaintext when `tls` is None."""
    if tls is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, tls.grpc_channel_credentials(), options=tls.grpc_channel_options())


def add_port(server: grpc.aio.Server, address: str, tls: TlsCredentials | None) -> int:
    """Listen on `address` (TLS when `tls` is given); the bound port, 0 when it failed."""
    if tls is None:
        return int(server.add_insecure_port(address))
    return int(server.add_secure_port(address, tls.grpc_server_credentials()))


def url_scheme(tls: TlsCredentials | None) -> str:
    """``https`` when TLS is on, else ``http`` (piece URLs; all nodes of a cluster agree)."""
    return "http" if tls is None else "https"
