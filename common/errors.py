"""The one exception tree of Damselfly.

Every error a component raises on purpose is a :class:`DamselflyError`. Faults of a remote
party (the origin, a parent peer, the scheduler) are kept apart from misuse by the local caller
(bad config, bad input), so callers can decide whether to retry elsewhere or to give up::

    DamselflyError
    ├── LocalError                  the caller asked for something wrong; retrying won't help
    │   ├── ConfigError             a config key or flag is invalid (names the key)
    │   │   └── ListenError         a listener cannot bind its address (names the flag)
    │   ├── InvalidRequest          malformed input from a client (URL, header, digest)
    │   │   ├── InvalidRange        a Range header that cannot be parsed
    │   │   └── FrameError          bytes on dfget's download socket that are no frame of it
    │   ├── RangeNotSatisfiable     a well-formed range outside the content
    │   ├── InvalidTransition       an event a lifecycle table does not allow in the current state
    │   ├── PermissionDenied        the caller's identity may not do this (names the role it needs)
    │   ├── QuotaExceeded           the caller reached a per-client limit (hosts, streams)
    │   └── NotFound                no such thing here (or at the remote party we asked)
    │       ├── TaskNotFound        no such task in this store / scheduler
    │       ├── PeerNotFound        no such peer in the scheduler
    │       └── HostNotFound        no such host in the scheduler (not announced, or forgotten)
    ├── StorageError                the local disk failed us
    │   ├── DiskFull                a write does not fit in the cache quota or the disk
    │   └── OutputUnwritable        the client's output file (dfget's) cannot be written
    ├── IntegrityError              bytes that do not match the digest they must have
    │   ├── PieceDigestMismatch     one piece (names the parent that sent it)
    │   └── ContentDigestMismatch   the whole content against the requested digest
    ├── RemoteError                 a remote party failed; another source may work
    │   ├── OriginError             the origin (registry, HTTP server) failed
    │   │   ├── OriginStatusError   it answered a non-success status (keeps status and reason)
    │   │   │   └── OriginResponseError   ... and its headers and body start, to relay them
    │   │   │                             (in :mod:`common.origin`, beside the header helpers)
    │   │   ├── OriginUnreachable   connection refused, reset, timed out
    │   │   └── UpstreamNotAllowed  a destination the operator's allow-list refuses
    │   ├── ParentError             a parent peer failed to serve a piece
    │   │   └── ParentBusy          its uplink is full: ask another parent (no failure)
    │   └── SchedulerUnavailable    no scheduler answers
    ├── DownloadFailed              a download gave up; the message says why
    │   └── TaskFailed              the scheduler failed the task for every peer (the origin's answer)
    └── ProxyError                  an error answer of the proxy itself (keeps the HTTP status)
        └── _Relayed                an upstream answer passed on as it is (private to the proxy)

Third-party exceptions (aiohttp, grpc, OSError) are translated where they enter our code; for
gRPC, both directions of the translation are tables in :mod:`common.rpc`.
"""

from __future__ import annotations

from http import HTTPStatus


class DamselflyError(Exception):
    """Base of every error Damselfly raises on purpose."""


class LocalError(DamselflyError):
    """The caller asked for something wrong; retrying the same request will not help."""


class ConfigError(LocalError):
    """A configuration key or flag has an invalid value."""

    def __init__(self, key: str, reason: str) -> None:
        # A flag names itself ("--config: cannot read ..."); a key says it is one ("config listen: ...").
        super().__init__(f"{key}: {reason}" if key.startswith("-") else f"config {key}: {reason}")
        self.key = key
        self.reason = reason


class ListenError(ConfigError):
    """A listener cannot bind its address: ``--upload-listen 127.0.0.1:4005 is in use (...)``."""

    def __init__(self, flag: str, address: str, problem: str) -> None:
        super().__init__(flag, f"{address} {problem}")
        self.args = (f"{flag} {address} {problem}",)
        self.address = address


class InvalidRequest(LocalError):
    """A client sent malformed input (URL, header, digest)."""


class InvalidRange(InvalidRequest):
    """A Range header that cannot be parsed."""


class FrameError(InvalidRequest):
    """Bytes on dfget's download socket (:mod:`peer.download_socket`) that are no frame of it."""


class RangeNotSatisfiable(LocalError):
    """A syntactically valid range that lies outside the content."""

    def __init__(self, header: str, content_length: int) -> None:
        super().__init__(f"range {header!r} is not satisfiable for {content_length} bytes")
        self.content_length = content_length


class InvalidTransition(LocalError):
    """An event that a lifecycle table does not allow in the current state."""

    def __init__(self, what: str, ident: str, state: str, event: str) -> None:
        super().__init__(f"{what} {ident}: event {event} is not allowed in state {state}")
        self.state = state
        self.event = event


class PermissionDenied(LocalError):
    """The caller's identity (its certificate, or its address in plaintext) may not do this."""


class QuotaExceeded(LocalError):
    """The caller reached one of a server's per-client limits (RESOURCE_EXHAUSTED)."""


class NotFound(LocalError):
    """No such thing here, or at the remote party we asked (its answer was "not found")."""


class TaskNotFound(NotFound):
    """No such task here."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id} not found")
        self.task_id = task_id


class PeerNotFound(NotFound):
    """No such peer in the scheduler."""

    def __init__(self, peer_id: str) -> None:
        super().__init__(f"peer {peer_id} not found")
        self.peer_id = peer_id


class HostNotFound(NotFound):
    """No such host in the scheduler."""

    def __init__(self, host_id: str) -> None:
        super().__init__(f"host {host_id} not found")
        self.host_id = host_id


class StorageError(DamselflyError):
    """The local disk failed us."""


class DiskFull(StorageError):
    """A write does not fit in the cache quota or on the disk."""


class OutputUnwritable(StorageError):
    """The file a local client (dfget) asked the daemon to fill cannot be written."""


class IntegrityError(DamselflyError):
    """Bytes that do not match the digest they must have."""


class PieceDigestMismatch(IntegrityError):
    """A piece's bytes do not match its digest."""

    def __init__(self, task_id: str, number: int, expected: str, actual: str, parent_id: str = "") -> None:
        source = f" from parent {parent_id}" if parent_id else ""
        super().__init__(
            f"piece {number} of task {task_id}{source}: digest {actual} does not match expected {expected}"
        )
        self.task_id = task_id
        self.number = number
        self.expected = expected
        self.actual = actual
        self.parent_id = parent_id


class ContentDigestMismatch(IntegrityError):
    """The whole content does not match the requested digest."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"content digest {actual} does not match expected {expected}")
        self.expected = expected
        self.actual = actual


class RemoteError(DamselflyError):
    """A remote party failed; another source may succeed."""


class OriginError(RemoteError):
    """The origin (registry or HTTP server) failed."""


class OriginStatusError(OriginError):
    """The origin answered with a non-success status."""

    def __init__(self, url: str, status: int, reason: str = "") -> None:
        # "origin answered 404 Not Found for URL: BLOB_UNKNOWN ...": the status as people know it.
        phrase = _status_phrase(status)
        detail = reason
        if phrase and detail.startswith(phrase):
            detail = detail[len(phrase):].lstrip(": ")
        answer = f"{status} {phrase}" if phrase else str(status)
        super().__init__(f"origin answered {answer} for {url}" + (f": {detail}" if detail else ""))
        self.url = url
        self.status = status
        self.reason = reason


class OriginUnreachable(OriginError):
    """The origin could not be reached or broke the connection."""


class UpstreamNotAllowed(OriginError):
    """A destination the operator's allow-list refuses (not listed, or a private address not named)."""


class ParentError(RemoteError):
    """A parent peer failed to serve a piece."""

    def __init__(self, parent_id: str, reason: str) -> None:
        super().__init__(f"parent {parent_id}: {reason}")
        self.parent_id = parent_id


class ParentBusy(ParentError):
    """A parent's uplink is full (all its swarm upload slots are taken): ask another parent."""

    def __init__(self, parent_id: str) -> None:
        super().__init__(parent_id, "busy: every upload slot is taken")


class SchedulerUnavailable(RemoteError):
    """No scheduler answers."""


class DownloadFailed(DamselflyError):
    """A download gave up; the message says why."""


class TaskFailed(DownloadFailed):
    """The scheduler failed the task for every peer waiting on it (its origin refused or could not
    be reached, see docs/reliability.md); the message is the origin's answer. Going to the origin
    another way would only ask it again."""


class ProxyError(DamselflyError):
    """An answer of the proxy itself (bad request, upstream unreachable): HTTP status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _status_phrase(status: int) -> str:
    """``Not Found`` for 404; empty for a status HTTP does not name."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def one_line(text: str) -> str:
    """A message on one line (gRPC details and tracebacks may carry newlines and runs of spaces)."""
    return " ".join(text.split())
