"""Our errors as gRPC status codes and back: the one translation at the gRPC boundary.

Errors cross a gRPC wire as status codes, never as sentences: a server answers a
:class:`~common.errors.DamselflyError` with the code :func:`status_of` gives it (the message is
for people and logs only), and a client turns a ``grpc.aio.AioRpcError`` back into one of ours
with :func:`map_rpc_errors` (or :func:`error_from_rpc`), then decides on the exception's type
alone, which comes from the code alone.

What a server answers (:data:`STATUS_OF_ERROR`, first match wins)::

    NotFound (TaskNotFound, PeerNotFound, HostNotFound)   NOT_FOUND
    PermissionDenied                                      PERMISSION_DENIED
    QuotaExceeded                                         RESOURCE_EXHAUSTED
    LocalError (ConfigError, InvalidRequest, ...)         INVALID_ARGUMENT
    DiskFull                                              RESOURCE_EXHAUSTED
    IntegrityError                                        DATA_LOSS
    OriginError                                           FAILED_PRECONDITION
    RemoteError (SchedulerUnavailable, ParentError)       UNAVAILABLE
    DownloadFailed                                        FAILED_PRECONDITION
    anything else                                         INTERNAL

``UNAVAILABLE`` from a server says that *this server* cannot serve now: the scheduler puts a
seed on cool-down for it and dfget says it lost its daemon. An origin failure a daemon relays
is not that, it is its download's failure: ``FAILED_PRECONDITION``, like :class:`DownloadFailed`
(the download cannot succeed until something changes: the origin, the disk, the swarm).
``ABORTED`` would say that retrying the same calls is likely to work, which a download that gave
up does not promise.

What a client raises (:data:`ERROR_OF_STATUS`; the codes of :data:`UNREACHABLE_CODES` raise the
caller's ``unreachable`` class, e.g. :class:`~common.errors.SchedulerUnavailable`; any other code
raises :class:`~common.errors.RemoteError`)::

    UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, UNKNOWN    unreachable (the remote is not there)
    NOT_FOUND                                             NotFound
    INVALID_ARGUMENT, OUT_OF_RANGE                        InvalidRequest
    DATA_LOSS                                             IntegrityError
    FAILED_PRECONDITION, ABORTED                          DownloadFailed
    anything else                                         RemoteError (the remote failed)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

import grpc

from common.errors import (
    DamselflyError,
    DiskFull,
    DownloadFailed,
    IntegrityError,
    InvalidRequest,
    LocalError,
    NotFound,
    OriginError,
    PermissionDenied,
    QuotaExceeded,
    RemoteError,
)

# Builds our exception from "CODE: details" (an exception class taking one message does).
ErrorFactory = Callable[[str], DamselflyError]

STATUS_OF_ERROR: tuple[tuple[type[DamselflyError], grpc.StatusCode], ...] = (
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LocalError, grpc.StatusCode.INVALID_ARGUMENT),
    (DiskFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (OriginError, grpc.StatusCode.FAILED_PRECONDITION),
    (RemoteError, grpc.StatusCode.UNAVAILABLE),
    (DownloadFailed, grpc.StatusCode.FAILED_PRECONDITION),
)

# Codes that mean "the remote party is not there (or did not finish)", as opposed to "it refused".
UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                               grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN})

ERROR_OF_STATUS: Mapping[grpc.StatusCode, ErrorFactory] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.DATA_LOSS: IntegrityError,
    grpc.StatusCode.FAILED_PRECONDITION: DownloadFailed,
    grpc.StatusCode.ABORTED: DownloadFailed,
}


def status_of(error: BaseException) -> grpc.StatusCode:
    """The status code a server answers `error` with."""
    for kind, code in STATUS_OF_ERROR:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


async def abort(context: Any, error: BaseException) -> NoReturn:
    """End the RPC of `context` with `error`'s status code and its message."""
    await context.abort(status_of(error), str(error))
    raise AssertionError("abort returned")  # pragma: no cover - abort always raises


def error_from_rpc(
    error: grpc.aio.AioRpcError, *, unreachable: ErrorFactory = RemoteError,
    overrides: Mapping[grpc.StatusCode, ErrorFactory] | None = None,
) -> DamselflyError:
    """Our exception for a failed call: chosen by its status code alone.

    `unreachable` builds the error for :data:`UNREACHABLE_CODES`; `overrides` lets a call that
    knows more name the error of a code (a register's NOT_FOUND is this host's HostNotFound).
    """
    code = error.code()
    message = f"{code.name}: {error.details() or 'no details'}"
    factory = (overrides or {}).get(code)
    if factory is None:
        factory = unreachable if code in UNREACHABLE_CODES else ERROR_OF_STATUS.get(code, RemoteError)
    return factory(message)


@contextlib.contextmanager
def map_rpc_errors(
    *, unreachable: ErrorFactory = RemoteError, overrides: Mapping[grpc.StatusCode, ErrorFactory] | None = None,
) -> Iterator[None]:
    """Raise our exception (see :func:`error_from_rpc`) for a gRPC call that fails inside."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc, unreachable=unreachable, overrides=overrides) from exc
