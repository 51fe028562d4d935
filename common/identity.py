"""Who is calling: the role, and optionally the host, that a cluster certificate proves.

With mutual TLS on, every caller of the scheduler's and the dfdaemons' gRPC services and of the
piece servers presents a certificate signed by the cluster CA. What it may do depends on the
identity in the certificate's subject common name (CN):

=====================================  ==================================================
``<role>.damselfly``                   any host of that role: a certificate shared by all
                                       of them (what the chart's generated CA issues)
``<hostname>.<role>.damselfly``        that one host only (per-node certificates, e.g.
                                       cert-manager's csi-driver): binds the announced name
=====================================  ==================================================

Roles: ``scheduler``, ``seed``, ``peer``, ``admin`` (operators and jobs: ``List*``, ``Delete*``,
preheat). A certificate of the CA whose CN is none of these proves membership and nothing else:
it counts as a ``peer`` without a host. Pure parsing here; the servers read the CN from the
transport (:func:`grpc_identity`, :func:`ssl_identity`) and decide.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

IDENTITY_DOMAIN = "damselfly"


class Role(StrEnum):
    SCHEDULER = "scheduler"
    SEED = "seed"
    PEER = "peer"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Identity:
    """A proven role; `hostname` empty means any host of the role (a shared certificate)."""

    role: Role
    hostname: str = ""

    def may_speak_for(self, hostname: str) -> bool:
        """True when this identity may act as the host called `hostname`."""
        return not self.hostname or self.hostname == hostname


MEMBER = Identity(Role.PEER)  # a cluster certificate without a Damselfly role in its CN


def common_name(role: Role, hostname: str = "") -> str:
    """The CN that proves `role` (for `hostname` only, when given)."""
    if "." in hostname:
        raise ValueError(f"host name {hostname!r}: a single DNS label (no dots) goes in an identity")
    return f"{hostname}.{role}.{IDENTITY_DOMAIN}" if hostname else f"{role}.{IDENTITY_DOMAIN}"


def identity_from_common_name(cn: str) -> Identity:
    """The identity a certificate's CN proves (:data:`MEMBER` when it names no role)."""
    labels = cn.strip().lower().split(".")
    if len(labels) in (2, 3) and labels[-1] == IDENTITY_DOMAIN and all(labels):
        try:
            role = Role(labels[-2])
        except ValueError:
            return MEMBER
        return Identity(role, labels[0] if len(labels) == 3 else "")
    return MEMBER


class _AuthContextHolder(Protocol):
    def auth_context(self) -> dict[str, Any]: ...


def grpc_identity(context: _AuthContextHolder) -> Identity | None:
    """The caller's identity from a gRPC servicer context; None on a plaintext connection."""
    auth = context.auth_context()
    names = auth.get("x509_common_name")
    if not names:
        return None
    first = names[0]
    return identity_from_common_name(first.decode() if isinstance(first, bytes) else str(first))


def ssl_identity(peercert: dict[str, Any] | None) -> Identity | None:
    """The caller's identity from ``SSLObject.getpeercert()``; None without a client certificate."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return identity_from_common_name(str(value))
    return MEMBER
