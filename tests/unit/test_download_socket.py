"""The download socket (peer.download_socket, peer.download_socket_server) against a fake
DownloadService: framing, errors, and a client that tries to cross it — garbage, oversized
frames, silence, hanging up. The real daemon's side is in tests/integration/test_dfget.py and
tests/integration/test_security_peer.py."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from dragonfly_api import common_pb2, dfdaemon_pb2

from common.errors import FrameError, InvalidRequest, OutputUnwritable, TaskNotFound
from peer import download_socket, download_socket_server
from peer.download_socket import (
    DONE,
    ERROR,
    HEADER,
    REQUEST,
    RESPONSE,
    FrameReader,
    decode_error,
    encode_frame,
    parse_header,
)
from peer.download_socket_server import DownloadSocketServer
from peer.services import DownloadService

DEADLINE = 10.0


def response(number: int) -> dfdaemon_pb2.DownloadTaskResponse:
    piece = common_pb2.Piece(number=number, offset=number * 1024, length=1024)
    return dfdaemon_pb2.DownloadTaskResponse(
        task_id="t", download_piece_finished_response=dfdaemon_pb2.DownloadPieceFinishedResponse(piece=piece))


def request(url: str = "http://origin.example/blob") -> dfdaemon_pb2.DownloadTaskRequest:
    return dfdaemon_pb2.DownloadTaskRequest(download=common_pb2.Download(url=url, output_path="/tmp/x"))


class FakeService:
    """Yields `pieces` responses, then raises `error` or waits forever (`hang`)."""

    def __init__(self, pieces: int = 3, error: BaseException | None = None, hang: bool = False) -> None:
        self.pieces = pieces
        self.error = error
        self.hang = hang
        self.requests: list[dfdaemon_pb2.DownloadTaskRequest] = []
        self.started = asyncio.Event()  # a request came
        self.closed = asyncio.Event()  # the download's cleanup ran

    async def responses(self, req: dfdaemon_pb2.DownloadTaskRequest) -> AsyncGenerator[Any, None]:
        self.requests.append(req)
        self.started.set()
        try:
            for number in range(self.pieces):
                yield response(number)
            if self.error is not None:
                raise self.error
            if self.hang:
                await asyncio.Event().wait()
        finally:
            self.closed.set()


@pytest.fixture
def socket_path() -> Iterator[Path]:
    directory = tempfile.mkdtemp(prefix="dls-", dir="/tmp")  # unix socket paths are short
    yield Path(directory) / "d.sock.stream"
    shutil.rmtree(directory, ignore_errors=True)


async def serve(path: Path, service: FakeService) -> DownloadSocketServer:
    server = DownloadSocketServer(cast(DownloadService, service))
    await server.start(path, lambda _: None)
    return server


async def read_frames(reader: asyncio.StreamReader) -> AsyncIterator[tuple[bytes, bytes]]:
    while header := await reader.read(HEADER.size):
        if len(header) < HEADER.size:
            header += await reader.readexactly(HEADER.size - len(header))
        kind, length = parse_header(header, download_socket.MAX_RESPONSE_BYTES)
        yield kind, await reader.readexactly(length)


async def exchange(path: Path, sent: bytes) -> list[tuple[bytes, bytes]]:
    """Send `sent`, then read every frame until the daemon closes the connection."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(sent)
    await writer.drain()
    async with asyncio.timeout(DEADLINE):
        frames = [frame async for frame in read_frames(reader)]
    writer.close()
    return frames


def request_frame(req: dfdaemon_pb2.DownloadTaskRequest | None = None) -> bytes:
    return encode_frame(REQUEST, (req or request()).SerializeToString())


# --- frames ------------------------------------------------------------------------------------


def test_frame_reader_resumes_after_a_timeout_mid_frame() -> None:
    left, right = socket.socketpair()
    with left, right:
        frame = encode_frame(RESPONSE, response(7).SerializeToString())
        left.sendall(frame[:3])
        right.settimeout(0.05)
        reader = FrameReader(right)
        with pytest.raises(TimeoutError):
            reader.read()
        left.sendall(frame[3:] + encode_frame(DONE))
        kind, payload = reader.read()
        assert kind == RESPONSE and dfdaemon_pb2.DownloadTaskResponse.FromString(payload) == response(7)
        assert reader.read() == (DONE, b"")
        left.close()
        with pytest.raises(ConnectionError):
            reader.read()


@pytest.mark.parametrize(("header", "reason"), [
    (b"X\x00\x00\x00\x01", "unknown frame kind"),
    (b"Q\x00\x10\x00\x01", "at most 1048576"),
])
def test_a_bad_header_is_refused_naming_what_is_wrong(header: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        parse_header(header, download_socket.MAX_REQUEST_BYTES)


def test_an_error_frame_carries_the_status_and_the_reason() -> None:
    frame = download_socket.encode_error("NOT_FOUND", "task t is not here")
    kind, length = parse_header(frame[:HEADER.size], 1 << 10)
    assert kind == ERROR
    assert decode_error(frame[HEADER.size:HEADER.size + length]) == ("NOT_FOUND", "task t is not here")


# --- the server --------------------------------------------------------------------------------


async def test_a_download_streams_every_response_then_done(socket_path: Path) -> None:
    service = FakeService(pieces=3)
    server = await serve(socket_path, service)
    try:
        frames = await exchange(socket_path, request_frame(request("http://origin.example/a")))
    finally:
        await server.stop()
    assert [kind for kind, _ in frames] == [RESPONSE] * 3 + [DONE]
    assert [dfdaemon_pb2.DownloadTaskResponse.FromString(p) for _, p in frames[:3]] == [response(n) for n in range(3)]
    assert [r.download.url for r in service.requests] == ["http://origin.example/a"]
    assert socket_path.name not in os.listdir(socket_path.parent), "stop() leaves no socket file behind"


@pytest.mark.parametrize(("error", "status"), [
    (InvalidRequest("piece length 1 is below 1 MiB"), "INVALID_ARGUMENT"),
    (TaskNotFound("task t is not in this store"), "NOT_FOUND"),
    (OutputUnwritable("cannot write /out/x: No space left on device"), "INTERNAL"),
])
async def test_a_failed_download_ends_with_its_status_and_reason(socket_path: Path, error: Exception,
                                                                 status: str) -> None:
    server = await serve(socket_path, FakeService(pieces=1, error=error))
    try:
        frames = await exchange(socket_path, request_frame())
    finally:
        await server.stop()
    assert [kind for kind, _ in frames] == [RESPONSE, ERROR]
    assert decode_error(frames[-1][1]) == (status, str(error))


@pytest.mark.parametrize(("sent", "reason"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "unknown frame kind"),
    (HEADER.pack(REQUEST, 1 << 30), "at most"),  # a length to make the daemon allocate a GiB
    (encode_frame(REQUEST, b"\xff\xff\xff not protobuf"), "not a dfdaemon.v2.DownloadTaskRequest"),
    (encode_frame(DONE), "expected a request (Q) frame first"),
])
async def test_bytes_that_are_no_request_get_an_error_and_the_next_client_is_served(
    socket_path: Path, sent: bytes, reason: str
) -> None:
    service = FakeService(pieces=1)
    server = await serve(socket_path, service)
    try:
        [(kind, payload)] = await exchange(socket_path, sent)
        assert kind == ERROR
        status, message = decode_error(payload)
        assert status == "INVALID_ARGUMENT" and reason in message, message
        assert service.requests == []
        assert [kind for kind, _ in await exchange(socket_path, request_frame())] == [RESPONSE, DONE]
    finally:
        await server.stop()


async def test_a_silent_client_is_let_go(socket_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download_socket_server, "REQUEST_TIMEOUT", 0.2)
    service = FakeService()
    server = await serve(socket_path, service)
    try:
        [(kind, payload)] = await exchange(socket_path, request_frame()[:7])  # half a request, then nothing
    finally:
        await server.stop()
    assert kind == ERROR and decode_error(payload)[0] == "DEADLINE_EXCEEDED"
    assert service.requests == []


async def test_a_client_that_hangs_up_ends_its_download(socket_path: Path) -> None:
    service = FakeService(pieces=2, hang=True)
    server = await serve(socket_path, service)
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        writer.write(request_frame())
        frames = read_frames(reader)
        async with asyncio.timeout(DEADLINE):
            assert [(await anext(frames))[0] for _ in range(2)] == [RESPONSE, RESPONSE]
        assert not service.closed.is_set()
        writer.close()  # dfget killed mid-download
        async with asyncio.timeout(DEADLINE):
            await service.closed.wait()  # the download's cleanup ran (the daemon removes what it wrote)
        service.hang = False
        assert [kind for kind, _ in await exchange(socket_path, request_frame())] == [RESPONSE, RESPONSE, DONE]
    finally:
        await server.stop()


async def test_stopping_the_daemon_ends_the_downloads_of_connected_clients(socket_path: Path) -> None:
    service = FakeService(pieces=0, hang=True)
    server = await serve(socket_path, service)
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    writer.write(request_frame())
    async with asyncio.timeout(DEADLINE):
        await service.started.wait()
        await server.stop()
        await service.closed.wait()
        assert await reader.read() == b""  # closed: no done frame for a download that did not finish
    writer.close()


async def test_the_socket_accepts_no_one_before_it_is_restricted(socket_path: Path) -> None:
    refused: list[bool] = []

    def restrict(path: Path) -> None:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
            refused.append(False)
        except ConnectionRefusedError:
            refused.append(True)
        finally:
            probe.close()
        path.chmod(0o660)

    server = DownloadSocketServer(cast(DownloadService, FakeService()))
    await server.start(socket_path, restrict)
    try:
        assert refused == [True]
        assert os.stat(socket_path).st_mode & 0o777 == 0o660
    finally:
        await server.stop()
