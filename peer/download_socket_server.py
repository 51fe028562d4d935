"""The dfdaemon's end of the download socket (:mod:`peer.download_socket`): each connection is one
``DownloadTask`` run by the same :class:`~peer.services.DownloadService` as the gRPC call, so both
check and write the client's file alike.

The socket is a trust boundary like the gRPC one: it gets the same owner and mode before it
accepts anyone, a request must arrive within :data:`REQUEST_TIMEOUT` and fit
:data:`~peer.download_socket.MAX_REQUEST_BYTES`, and a client that hangs up cancels its download.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from dragonfly_api import dfdaemon_pb2
from google.protobuf.message import DecodeError

from common import rpc
from common.errors import DamselflyError, FrameError, one_line
from peer.download_socket import (
    DONE,
    HEADER,
    MAX_REQUEST_BYTES,
    REQUEST,
    RESPONSE,
    encode_error,
    encode_frame,
    parse_header,
)
from peer.services import DownloadService

log = logging.getLogger(__name__)

# A client that connected has this long to send its request (a slow local client, not a download).
REQUEST_TIMEOUT = 10.0


async def read_request(reader: asyncio.StreamReader) -> dfdaemon_pb2.DownloadTaskRequest:
    """The client's one ``Q`` frame; FrameError when it is anything else."""
    try:
        kind, length = parse_header(await reader.readexactly(HEADER.size), MAX_REQUEST_BYTES)
        if kind != REQUEST:
            raise FrameError(f"expected a request (Q) frame first, got {kind.decode()}")
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise FrameError("the client hung up before its request was complete") from None
    request = dfdaemon_pb2.DownloadTaskRequest()
    try:
        request.ParseFromString(payload)
    except DecodeError:
        raise FrameError("the request frame is not a dfdaemon.v2.DownloadTaskRequest") from None
    return request


class DownloadSocketServer:
    """Serves ``DownloadTask`` on the download socket."""

    def __init__(self, service: DownloadService) -> None:
        self.service = service
        self._server: asyncio.Server | None = None
        self._path: Path | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, path: Path, restrict: Callable[[Path], None]) -> None:
        """Bind `path`, let `restrict` set its owner and mode, then accept clients."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # the gRPC socket beside it was checked: no running dfdaemon owns this one
        self._server = await asyncio.start_unix_server(self._serve, path=str(path), start_serving=False,
                                                       limit=MAX_REQUEST_BYTES)
        self._path = path
        await asyncio.to_thread(restrict, path)
        await self._server.start_serving()

    async def stop(self) -> None:
        """Accept no one; cancel the downloads of connected clients (their files are removed)."""
        if self._server is None:
            return
        self._server.close()
        for connection in list(self._connections):
            connection.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = asyncio.current_task()
        assert connection is not None
        self._connections.add(connection)
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    request = await read_request(reader)
            except TimeoutError:
                writer.write(encode_error("DEADLINE_EXCEEDED",
                                          f"no request within {REQUEST_TIMEOUT:g} s of connecting"))
            except FrameError as exc:
                log.warning("download socket: %s", exc)
                writer.write(encode_error("INVALID_ARGUMENT", str(exc)))
            else:
                writer.write(await self._run(request, reader, writer))
            await writer.drain()
        except ConnectionError:
            pass  # the client went away: its download was cancelled
        except asyncio.CancelledError:
            # stop(): the download was cancelled and cleaned up. Not re-raised: asyncio's stream
            # server logs a handler that ends cancelled as an error.
            pass
        finally:
            self._connections.discard(connection)
            writer.close()

    async def _run(self, request: dfdaemon_pb2.DownloadTaskRequest, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> bytes:
        """Stream the download's responses; its last frame (done or the error)."""
        download = asyncio.current_task()
        assert download is not None
        # A client sends nothing after its request: data or the end of the stream means it is
        # gone (or broken), and its download stops, as a cancelled gRPC call does.
        hang_up = asyncio.create_task(self._cancel_on_hang_up(reader, download))
        try:
            # Closed at once when the client goes: the download's cleanup must not wait for the
            # garbage collector.
            async with contextlib.aclosing(self.service.responses(request)) as responses:
                async for response in responses:
                    writer.write(encode_frame(RESPONSE, response.SerializeToString()))
                    await writer.drain()
        except DamselflyError as exc:
            return encode_error(rpc.status_of(exc).name, one_line(str(exc)))
        except asyncio.CancelledError:
            if hang_up.done() and not hang_up.cancelled() and download.uncancel() == 0:
                raise ConnectionResetError("the client hung up") from None
            raise
        finally:
            hang_up.cancel()
        return encode_frame(DONE)

    @staticmethod
    async def _cancel_on_hang_up(reader: asyncio.StreamReader, download: asyncio.Task[None]) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read(1)
        download.cancel()
