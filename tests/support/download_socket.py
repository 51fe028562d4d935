"""A client of the dfdaemon's download socket (peer.download_socket) for tests that speak it
byte by byte, as an attacker or a dfget would."""

from __future__ import annotations

import socket
from pathlib import Path

from dragonfly_api import dfdaemon_pb2

from peer import download_socket as frames


def download_socket_of(grpc_socket: Path) -> Path:
    return Path(frames.stream_socket_path(str(grpc_socket)))


def send_raw(grpc_socket: Path, data: bytes, timeout: float = 60) -> list[tuple[bytes, bytes]]:
    """Send `data` on the download socket; every frame until the daemon closes the connection."""
    received: list[tuple[bytes, bytes]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(download_socket_of(grpc_socket)))
        sock.sendall(data)
        reader = frames.FrameReader(sock)
        while True:
            try:
                received.append(reader.read())
            except ConnectionError:
                return received


def download_task(grpc_socket: Path, request: dfdaemon_pb2.DownloadTaskRequest,
                  timeout: float = 60) -> tuple[str, str, list[dfdaemon_pb2.DownloadTaskResponse]]:
    """DownloadTask over the download socket: (status name, its message, the responses); "OK"
    when the stream ended with the done frame."""
    received = send_raw(grpc_socket, frames.encode_frame(frames.REQUEST, request.SerializeToString()), timeout)
    responses = [dfdaemon_pb2.DownloadTaskResponse.FromString(p) for kind, p in received if kind == frames.RESPONSE]
    kind, payload = received[-1]
    if kind == frames.ERROR:
        return (*frames.decode_error(payload), responses)
    assert kind == frames.DONE, f"the stream ended with a {kind!r} frame"
    return "OK", "", responses
