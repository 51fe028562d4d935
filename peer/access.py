"""Who may call what on a dfdaemon's gRPC upload service: pure decisions, no I/O.

The upload service (``DfdaemonUpload``, TCP) is reachable by every host that can route to the
node. ``SyncPieces`` and ``StatTask`` serve the swarm: any cluster member (with mutual TLS, any
certificate of the cluster CA; the handshake already refused the others). ``DownloadTask`` makes
the node fetch a URL with the caller's headers, so it is a seed trigger only:

* only a seed answers it (a normal node would be an SSRF relay with read-back);
* with mutual TLS, only a caller whose certificate proves the ``scheduler`` role
  (:mod:`common.identity`);
* without client certificates (plaintext, development), only a caller whose IP is one of the
  configured ``--scheduler`` addresses: an IP proves little, which ``docs/security.md`` says.

``DeleteTask`` is not served over TCP at all: only the local unix socket deletes.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from common.config import split_address
from common.identity import Identity, Role


@dataclass(frozen=True, slots=True)
class TriggerPolicy:
    """What decides who may trigger a download on this node."""

    seed: bool
    mutual_tls: bool
    scheduler_ips: frozenset[str]


def trigger_refusal(policy: TriggerPolicy, identity: Identity | None, caller_ip: str | None) -> str | None:
    """Why a ``DownloadTask`` call must be refused; None when it may go ahead."""
    if not policy.seed:
        return "DownloadTask is a seed trigger: this node is not a seed (dfget uses the local unix socket)"
    if policy.mutual_tls:
        if identity is None or identity.role is not Role.SCHEDULER:
            shown = "no certificate" if identity is None else f"a {identity.role} certificate"
            return f"DownloadTask is for the scheduler only; the caller presented {shown}"
        return None
    if caller_ip is None or _normal_ip(caller_ip) not in policy.scheduler_ips:
        return (f"DownloadTask is for the scheduler only; {caller_ip or 'the caller'} is not a configured "
                "--scheduler address (turn mutual TLS on to prove identities)")
    return None


def caller_ip(peer: str) -> str | None:
    """The IP of a gRPC ``context.peer()`` (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``); None otherwise."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return None


def _normal_ip(ip: str) -> str:
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def resolve_scheduler_ips(addresses: Iterable[str]) -> frozenset[str]:
    """Every IP the configured scheduler addresses resolve to (blocking: call it at start-up)."""
    ips: set[str] = set()
    for address in addresses:
        host, port = split_address(address)
        try:
            infos = socket.getaddrinfo(host or "127.0.0.1", port, type=socket.SOCK_STREAM)
        except OSError:
            continue  # an unresolvable scheduler cannot call us either
        ips.update(_normal_ip(str(info[4][0])) for info in infos)
    return frozenset(ips)


def public_url(url: str) -> str:
    """`url` as other hosts may see it: no user info, query (signatures, tokens) or fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
