"""The TLS settings of a node, checked without loading any TLS or gRPC machinery.

:mod:`common.config` validates the ``tls_*`` keys at start-up through this module; building
credentials, channels and servers from them is :mod:`common.tls`'s job. Keeping the two apart
lets the pure scheduling core (which reads its config) be imported without grpc.
"""

from __future__ import annotations

from typing import Protocol

from common.errors import ConfigError


class TlsSettings(Protocol):
    """The config fields TLS is built from (SchedulerConfig and DfdaemonConfig have them)."""

    @property
    def tls_ca_cert(self) -> str: ...

    @property
    def tls_cert(self) -> str: ...

    @property
    def tls_key(self) -> str: ...

    @property
    def tls_client_auth(self) -> bool: ...

    @property
    def tls_server_name(self) -> str: ...


def check_settings(*, ca_cert: str, cert: str, key: str, client_auth: bool) -> None:
    """Check that the TLS keys go together, without touching the files (ConfigError if not)."""
    if not cert:
        raise ConfigError("tls_cert", "is required for TLS (every node serves something)")
    if not key:
        raise ConfigError("tls_key", "is required when tls_cert is set")
    if client_auth and not ca_cert:
        raise ConfigError("tls_ca_cert", "is required for mutual TLS (tls_client_auth); "
                          "set it, or turn tls_client_auth off")


def tls_enabled(config: TlsSettings) -> bool:
    """True when any tls_* file is configured (then all that TLS needs must be)."""
    return bool(config.tls_cert or config.tls_key or config.tls_ca_cert)
