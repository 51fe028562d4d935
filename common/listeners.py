"""Binding listeners, with errors that name the flag: ``--upload-listen 127.0.0.1:4005 is in use``.

Every listener of a component comes from a flag (``--listen``, ``--grpc-listen``, ...). When its
address cannot be bound, the component stops at start-up with a :class:`~common.errors.ListenError`
naming that flag, the address and why, instead of a bare ``OSError`` or, for gRPC, a silently
shared port: gRPC servers set ``SO_REUSEPORT`` by default, which lets a second scheduler bind the
port of a running one and take half of its streams. :data:`GRPC_SERVER_OPTIONS` turns it off.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator

import grpc

from common.config import split_address
from common.errors import ListenError
from common.tls import TlsCredentials, add_port

# gRPC servers refuse a port another process listens on (grpc's default is SO_REUSEPORT on).
GRPC_SERVER_OPTIONS = (("grpc.so_reuseport", 0),)

_PROBLEMS = {
    errno.EADDRINUSE: "is in use (another process listens there: stop it, or choose another address)",
    errno.EACCES: "is not allowed (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "is not an address of this host",
}


def grpc_server() -> grpc.aio.Server:
    """A gRPC server that will not share its port with another process."""
    return grpc.aio.server(options=GRPC_SERVER_OPTIONS)


def listen_error(flag: str, address: str, error: OSError | None = None) -> ListenError:
    """The error of a listener that could not bind `address` (given by `flag`).

    Without the OSError (gRPC does not say why), a plain socket tries the address to find out.
    """
    if error is None or error.errno is None:
        error = _probe(address)
    problem = _PROBLEMS.get(error.errno or 0) if error is not None else None
    if problem is None:
        detail = (error.strerror or str(error)) if error is not None else "cannot be bound"
        problem = f"cannot be listened on: {detail}"
    return ListenError(flag, address, problem)


@contextlib.contextmanager
def naming_flag(flag: str, address: str) -> Iterator[None]:
    """Turn an OSError of binding `address` inside into the :class:`ListenError` of `flag`."""
    try:
        yield
    except OSError as exc:
        raise listen_error(flag, address, exc) from None


def bind_grpc(server: grpc.aio.Server, address: str, tls: TlsCredentials | None, flag: str) -> int:
    """Listen on `address` (TLS with `tls`); the bound port. Raises ListenError naming `flag`."""
    try:
        port = add_port(server, address, tls)
    except RuntimeError:  # newer grpcio raise "Failed to bind to address" instead of returning 0
        port = 0
    if port == 0:
        raise listen_error(flag, address)
    return port


def _probe(address: str) -> OSError | None:
    """Why `address` cannot be bound, found by binding it with a plain socket; None if it can be."""
    try:
        host, port = split_address(address)
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, ValueError) as exc:
        return OSError(errno.EADDRNOTAVAIL, str(exc))
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            return exc
    return None
