"""The download socket: ``DfdaemonDownload.DownloadTask`` for dfget, without gRPC.

gRPC's Python client loads asyncio and its C core before it sends anything: 0.12 s of CPU, most
of what a dfget costs, paid sixteen times at once when a swarm of nodes starts pulling. So the
dfdaemon also listens on a second unix socket beside the gRPC one, ``<socket>.stream``, with the
same owner and mode, that carries the same request and responses as length-prefixed frames::

    frame = kind (1 byte) | length (4 bytes, big-endian) | payload (length bytes)

The client sends one ``Q`` frame (a ``dfdaemon.v2.DownloadTaskRequest``), then reads ``R`` frames
(``DownloadTaskResponse``) until a ``D`` frame (done: the output is complete and checked) or an
``E`` frame (UTF-8 ``<gRPC status name> <message>``: what the gRPC service would have answered).
Closing the connection cancels the download, as cancelling the gRPC call does: the daemon removes
what it wrote. Anything else a client sends ends its connection with an ``E`` frame.

This module is shared by both ends and imports neither asyncio nor gRPC.
"""

from __future__ import annotations

import socket
import struct

from common.errors import FrameError

STREAM_SUFFIX = ".stream"

REQUEST = b"Q"
RESPONSE = b"R"
DONE = b"D"
ERROR = b"E"
KINDS = frozenset({REQUEST, RESPONSE, DONE, ERROR})

HEADER = struct.Struct(">cI")
# A request is a URL, headers and a path; a response at most lists every finished piece of a task.
MAX_REQUEST_BYTES = 1 << 20
MAX_RESPONSE_BYTES = 64 << 20


def stream_socket_path(grpc_socket: str) -> str:
    """The download socket beside the dfdaemon's gRPC unix socket `grpc_socket`."""
    return grpc_socket + STREAM_SUFFIX


def encode_frame(kind: bytes, payload: bytes = b"") -> bytes:
    """One frame; `kind` is one of :data:`KINDS`."""
    return HEADER.pack(kind, len(payload)) + payload


def encode_error(status: str, message: str) -> bytes:
    """An ``E`` frame: the gRPC status name (``NOT_FOUND``) and the one-line reason."""
    return encode_frame(ERROR, f"{status} {message}".encode())


def decode_error(payload: bytes) -> tuple[str, str]:
    """(status name, message) of an ``E`` frame's payload."""
    status, _, message = payload.decode(errors="replace").partition(" ")
    return status, message


def parse_header(header: bytes, limit: int) -> tuple[bytes, int]:
    """(kind, payload length) of a frame header; FrameError for an unknown kind or a payload
    longer than `limit`."""
    kind, length = HEADER.unpack(header)
    if kind not in KINDS:
        raise FrameError(f"unknown frame kind {kind!r} on the download socket (expected one of "
                         f"{b''.join(sorted(KINDS)).decode()}): is the client speaking this protocol?")
    if length > limit:
        raise FrameError(f"a {kind.decode()} frame of {length} bytes on the download socket: at most {limit}")
    return kind, length


class FrameReader:
    """Frames from a blocking socket. A read cut short by the socket's timeout (``TimeoutError``)
    keeps what arrived; the next :meth:`read` goes on from there."""

    def __init__(self, sock: socket.socket, limit: int = MAX_RESPONSE_BYTES) -> None:
        self._sock = sock
        self._limit = limit
        self._buffer = bytearray()

    def read(self) -> tuple[bytes, bytes]:
        """The next (kind, payload); ConnectionError when the peer closed the connection."""
        self._fill(HEADER.size)
        kind, length = parse_header(bytes(self._buffer[:HEADER.size]), self._limit)
        self._fill(HEADER.size + length)
        payload = bytes(self._buffer[HEADER.size:HEADER.size + length])
        del self._buffer[:HEADER.size + length]
        return kind, payload

    def _fill(self, size: int) -> None:
        while len(self._buffer) < size:
            chunk = self._sock.recv(max(size - len(self._buffer), 1 << 16))
            if not chunk:
                raise ConnectionError("the download socket was closed mid-stream")
            self._buffer += chunk
