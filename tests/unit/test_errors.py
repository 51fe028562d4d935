"""The exception tree (drawn in common/errors.py, complete) and its gRPC translation (common/rpc.py).

Both directions of the status-code tables are tested as tables, then once over a real grpc.aio
server on 127.0.0.1: a servicer aborts with `rpc.abort`, the client maps the failure back.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc

from common import errors, rpc
from common.errors import (
    ConfigError,
    ContentDigestMismatch,
    DamselflyError,
    DiskFull,
    DownloadFailed,
    HostNotFound,
    IntegrityError,
    InvalidRange,
    InvalidRequest,
    InvalidTransition,
    LocalError,
    NotFound,
    OriginStatusError,
    OriginUnreachable,
    ParentError,
    PeerNotFound,
    PieceDigestMismatch,
    ProxyError,
    RangeNotSatisfiable,
    RemoteError,
    SchedulerUnavailable,
    StorageError,
    TaskNotFound,
)
from common.origin import OriginResponseError

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "scheduler", "peer", "seed")
Code = grpc.StatusCode


# --------------------------------------------------------------------------------------------
# The tree


def _drawn_tree() -> dict[str, str]:
    """Class name -> parent name, as drawn in common/errors.py's docstring."""
    parents: dict[str, str] = {}
    stack: list[str] = []
    for line in (errors.__doc__ or "").splitlines():
        match = re.match(r"^    ((?:[│ ]   )*)(?:├── |└── )?([A-Za-z_]\w*)(?:\s|$)", line)
        if match is None or (not stack and match[2] != "DamselflyError"):
            continue
        depth = len(match[1]) // 4 + (1 if match[2] != "DamselflyError" else 0)
        del stack[depth:]
        if stack:
            parents[match[2]] = stack[-1]
        stack.append(match[2])
    return parents


def test_the_drawn_tree_is_the_class_tree() -> None:
    drawn = _drawn_tree()
    defined = {name: cls for name, cls in vars(errors).items()
               if isinstance(cls, type) and issubclass(cls, DamselflyError) and cls.__module__ == errors.__name__}
    elsewhere = {"OriginResponseError": OriginResponseError}
    for name, cls in {**defined, **elsewhere}.items():
        if cls is DamselflyError:
            continue
        assert drawn.get(name) == cls.__bases__[0].__name__, f"{name} is drawn under {drawn.get(name)}"
    assert set(drawn) - set(defined) - set(elsewhere) == {"_Relayed"}  # the proxy's private one


def _exception_classes(path: Path, known: set[str]) -> list[str]:
    """Classes in a module whose base is an exception: a builtin one or one of the tree."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ClassDef):
            bases = {base.id if isinstance(base, ast.Name) else getattr(base, "attr", "") for base in node.bases}
            if bases & known or any(b.endswith(("Error", "Exception")) for b in bases):
                found.append(f"{path.relative_to(ROOT)}: {node.name}")
    return found


def test_every_exception_class_is_in_the_drawn_tree() -> None:
    drawn = set(_drawn_tree()) | {"DamselflyError"}
    classes = [hit for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
               for hit in _exception_classes(path, drawn)]
    assert classes, "no exception classes found"
    outside = [hit for hit in classes if hit.rsplit(": ", 1)[1] not in drawn]
    assert outside == [], "exception classes missing from the tree in common/errors.py:\n" + "\n".join(outside)


def test_each_exception_class_is_defined_once() -> None:
    drawn = set(_drawn_tree()) | {"DamselflyError"}
    names = [hit.rsplit(": ", 1)[1] for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
             for hit in _exception_classes(path, drawn)]
    assert sorted({name for name in names if names.count(name) > 1}) == []


# --------------------------------------------------------------------------------------------
# Our errors -> status codes (what a server answers)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (TaskNotFound("t"), Code.NOT_FOUND),
        (PeerNotFound("p"), Code.NOT_FOUND),
        (HostNotFound("h"), Code.NOT_FOUND),
        (NotFound("something"), Code.NOT_FOUND),
        (InvalidRequest("bad url"), Code.INVALID_ARGUMENT),
        (InvalidRange("bytes=x"), Code.INVALID_ARGUMENT),
        (RangeNotSatisfiable("bytes=9-", 5), Code.INVALID_ARGUMENT),
        (ConfigError("listen", "not an address"), Code.INVALID_ARGUMENT),
        (InvalidTransition("peer", "p", "Running", "Register"), Code.INVALID_ARGUMENT),
        (LocalError("misuse"), Code.INVALID_ARGUMENT),
        (DiskFull("quota"), Code.RESOURCE_EXHAUSTED),
        (StorageError("disk"), Code.INTERNAL),
        (PieceDigestMismatch("t", 3, "xxh3:a", "xxh3:b", "p"), Code.DATA_LOSS),
        (ContentDigestMismatch("sha256:a", "sha256:b"), Code.DATA_LOSS),
        (IntegrityError("bytes"), Code.DATA_LOSS),
        # the origin failing a daemon's download is not the daemon being unavailable
        (OriginStatusError("https://o/x", 404), Code.FAILED_PRECONDITION),
        (OriginResponseError("https://o/x", 401, headers={"WWW-Authenticate": "Basic"}), Code.FAILED_PRECONDITION),
        (OriginUnreachable("refused"), Code.FAILED_PRECONDITION),
        (ParentError("p", "reset"), Code.UNAVAILABLE),
        (SchedulerUnavailable("none"), Code.UNAVAILABLE),
        (RemoteError("remote"), Code.UNAVAILABLE),
        (DownloadFailed("gave up"), Code.FAILED_PRECONDITION),
        (ProxyError(502, "upstream"), Code.INTERNAL),
        (DamselflyError("?"), Code.INTERNAL),
        (ValueError("a bug"), Code.INTERNAL),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else value.name,
)
def test_status_of(error: BaseException, code: grpc.StatusCode) -> None:
    assert rpc.status_of(error) == code


# --------------------------------------------------------------------------------------------
# Status codes -> our errors (what a client raises)


def _rpc_error(code: grpc.StatusCode, details: str = "told so") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (Code.UNAVAILABLE, SchedulerUnavailable),  # the caller's `unreachable`
        (Code.DEADLINE_EXCEEDED, SchedulerUnavailable),
        (Code.CANCELLED, SchedulerUnavailable),
        (Code.UNKNOWN, SchedulerUnavailable),
        (Code.NOT_FOUND, NotFound),
        (Code.INVALID_ARGUMENT, InvalidRequest),
        (Code.OUT_OF_RANGE, InvalidRequest),
        (Code.DATA_LOSS, IntegrityError),
        (Code.FAILED_PRECONDITION, DownloadFailed),
        (Code.ABORTED, DownloadFailed),
        (Code.RESOURCE_EXHAUSTED, RemoteError),
        (Code.ALREADY_EXISTS, RemoteError),
        (Code.PERMISSION_DENIED, RemoteError),
        (Code.UNAUTHENTICATED, RemoteError),
        (Code.UNIMPLEMENTED, RemoteError),
        (Code.INTERNAL, RemoteError),
    ],
    ids=lambda value: value.name if isinstance(value, grpc.StatusCode) else value.__name__,
)
def test_error_from_rpc(code: grpc.StatusCode, expected: type[DamselflyError]) -> None:
    error = rpc.error_from_rpc(_rpc_error(code, "the details"), unreachable=SchedulerUnavailable)
    assert type(error) is expected
    assert str(error) == f"{code.name}: the details"


def test_every_code_is_in_the_client_table() -> None:
    tested = {case.name for case in Code if case is not Code.OK}
    assert tested == {c.name for c in rpc.UNREACHABLE_CODES} | {c.name for c in rpc.ERROR_OF_STATUS} | {
        "RESOURCE_EXHAUSTED", "ALREADY_EXISTS", "PERMISSION_DENIED", "UNAUTHENTICATED", "UNIMPLEMENTED", "INTERNAL"}


def test_unreachable_defaults_to_remote_error_and_overrides_win() -> None:
    assert type(rpc.error_from_rpc(_rpc_error(Code.UNAVAILABLE))) is RemoteError
    error = rpc.error_from_rpc(_rpc_error(Code.NOT_FOUND), overrides={Code.NOT_FOUND: lambda _: HostNotFound("h1")})
    assert isinstance(error, HostNotFound) and error.host_id == "h1"


def test_map_rpc_errors_chains_the_grpc_error_and_lets_others_through() -> None:
    cause = _rpc_error(Code.DATA_LOSS)
    with pytest.raises(IntegrityError) as raised, rpc.map_rpc_errors():
        raise cause
    assert raised.value.__cause__ is cause
    with pytest.raises(KeyError), rpc.map_rpc_errors():
        raise KeyError("not ours to map")


# --------------------------------------------------------------------------------------------
# Both directions over a real gRPC server


class Refusing(dfdaemon_pb2_grpc.DfdaemonUploadServicer):  # type: ignore[misc]
    """Answers StatTask with the error it is given, through the shared table."""

    def __init__(self) -> None:
        self.error: BaseException = DownloadFailed("unset")

    async def StatTask(self, request: Any, context: Any) -> common_pb2.Task:
        await rpc.abort(context, self.error)


@pytest.fixture
async def refusing() -> Any:
    servicer = Refusing()
    server = grpc.aio.server()
    dfdaemon_pb2_grpc.add_DfdaemonUploadServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield servicer, dfdaemon_pb2_grpc.DfdaemonUploadStub(channel)
    await channel.close()
    await server.stop(None)


@pytest.mark.parametrize(
    ("raised", "caught"),
    [
        (TaskNotFound("t1"), NotFound),
        (InvalidRequest("bad"), InvalidRequest),
        (ContentDigestMismatch("sha256:a", "sha256:b"), IntegrityError),
        (DownloadFailed("gave up"), DownloadFailed),
        (OriginStatusError("https://o/x", 404), DownloadFailed),
        (DiskFull("quota"), RemoteError),
        (SchedulerUnavailable("none"), ParentError),  # the caller said what "unreachable" is
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else value.__name__,
)
async def test_round_trip_over_grpc(refusing: Any, raised: DamselflyError, caught: type[DamselflyError]) -> None:
    servicer, stub = refusing
    servicer.error = raised
    unreachable: Callable[[str], DamselflyError] = lambda message: ParentError("parent-1", message)  # noqa: E731
    with pytest.raises(DamselflyError) as failed, rpc.map_rpc_errors(unreachable=unreachable):
        await stub.StatTask(dfdaemon_pb2.StatTaskRequest(task_id="t1"), timeout=10)
    assert type(failed.value) is caught
    assert str(raised) in str(failed.value)  # the message travels, for people
