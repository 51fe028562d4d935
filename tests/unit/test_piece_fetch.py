"""PieceFetcher (peer.download.piece_fetch) against a scripted HTTP server on loopback: every
answer a piece server (or a broken parent) can give, keep-alive reuse, aborts and stalls."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from common.errors import ParentBusy, ParentError
from peer.download.piece_fetch import RECEIVE_BUFFER, PieceFetcher

# One scripted server turn: given the request bytes, what to send back and whether to keep the
# connection open for the next request.
Answer = Callable[[bytes], tuple[bytes, bool]]


class ScriptedServer:
    """Answers each request on each connection with the next scripted answer."""

    def __init__(self, answers: list[Answer]) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self.answers:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with connection:
                while self.answers:
                    request = b""
                    while b"\r\n\r\n" not in request:
                        chunk = connection.recv(65536)
                        if not chunk:
                            break
                        request += chunk
                    if not request:
                        break
                    self.requests.append(request)
                    reply, keep = self.answers.pop(0)(request)
                    if reply:
                        connection.sendall(reply)
                    if not keep:
                        break

    def close(self) -> None:
        self.listener.close()


Serve = Callable[[list[Answer]], ScriptedServer]


@pytest.fixture
def serve() -> Iterator[Serve]:
    servers: list[ScriptedServer] = []

    def start(answers: list[Answer]) -> ScriptedServer:
        servers.append(ScriptedServer(answers))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def piece(body: bytes, *, keep: bool = True) -> Answer:
    return lambda _: (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body, keep)


def status(code: int, text: bytes, headers: bytes = b"") -> Answer:
    return lambda _: (b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n" % (code, len(text), headers) + text, True)


def fetch(fetcher: PieceFetcher, port: int, length: int, *, timeout: float = 5.0) -> bytes:
    parts: list[bytes] = []
    request = fetcher.request("parent-1", "127.0.0.1", port, "/pieces/t/0", {"X-Damselfly-Child": "host-a"},
                              timeout=timeout, busy_header="X-Damselfly-Busy")
    request.receive(length, lambda view: parts.append(bytes(view)))
    return b"".join(parts)


def test_a_whole_piece_arrives_byte_exact_in_buffer_sized_parts(serve: Serve) -> None:
    body = bytes(range(256)) * (3 * RECEIVE_BUFFER // 256) + b"tail"
    server = serve([piece(body)])
    parts: list[int] = []
    got = bytearray()

    def sink(view: memoryview) -> None:
        parts.append(len(view))
        got.extend(view)

    request = PieceFetcher().request("p", "127.0.0.1", server.port, "/pieces/t/0", {"X-Damselfly-Child": "host-a"},
                                     timeout=5, busy_header="X-Damselfly-Busy")
    request.receive(len(body), sink)
    assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()
    assert parts == [RECEIVE_BUFFER] * 3 + [4]
    assert server.requests[0].startswith(b"GET /pieces/t/0 HTTP/1.1\r\n")
    assert b"\r\nX-Damselfly-Child: host-a\r\n" in server.requests[0]


def test_a_kept_alive_connection_is_reused_and_replaced_once_when_the_parent_closed_it(
    serve: Serve,
) -> None:
    server = serve([piece(b"a" * 10), piece(b"b" * 10), lambda _: (b"", False), piece(b"c" * 10)])
    fetcher = PieceFetcher()
    assert fetch(fetcher, server.port, 10) == b"a" * 10
    assert fetch(fetcher, server.port, 10) == b"b" * 10
    assert server.connections == 1
    # The third request finds its reused connection closed without an answer: asked again on a new one.
    assert fetch(fetcher, server.port, 10) == b"c" * 10
    assert server.connections == 2


def test_a_busy_parent_raises_parent_busy_and_other_statuses_parent_error(
    serve: Serve,
) -> None:
    server = serve([status(503, b"all slots taken", b"X-Damselfly-Busy: uplink\r\n"),
                    status(503, b"overloaded"), status(404, b"task t not found")])
    fetcher = PieceFetcher()
    with pytest.raises(ParentBusy):
        fetch(fetcher, server.port, 10)
    with pytest.raises(ParentError, match=r"HTTP 503 .*overloaded") as not_busy:
        fetch(fetcher, server.port, 10)
    assert not isinstance(not_busy.value, ParentBusy)
    with pytest.raises(ParentError, match=r"HTTP 404 .*task t not found"):
        fetch(fetcher, server.port, 10)
    assert server.connections == 1  # error answers with a body leave the connection usable


@pytest.mark.parametrize(("answer", "message"), [
    (lambda _: (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n123456789", False),
     "9 bytes announced instead of the piece's 10"),
    (lambda _: (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345", False), "closed after 5 of 10 bytes"),
    (lambda _: (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", False), "without a Content-Length"),
    (lambda _: (b"SSH-2.0-OpenSSH\r\n\r\n", False), "not an HTTP answer"),
    (lambda _: (b"HTTP/1.1 200 OK\r\nContent-Le", False), "closed inside the answer's headers"),
])
def test_a_broken_answer_is_a_parent_error_naming_what_was_wrong(
    serve: Serve, answer: Answer, message: str,
) -> None:
    server = serve([answer])
    with pytest.raises(ParentError, match=message):
        fetch(PieceFetcher(), server.port, 10)


def test_nothing_listening_is_a_parent_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(ParentError, match="cannot connect"):
        fetch(PieceFetcher(), port, 10)


def test_a_stalled_parent_fails_at_the_piece_timeout(serve: Serve) -> None:
    release = threading.Event()

    def stall(_: bytes) -> tuple[bytes, bool]:
        release.wait(10)
        return b"", False

    server = serve([lambda _: (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n123", True), stall])
    started = time.monotonic()
    try:
        with pytest.raises(ParentError, match=r"stalled past the 0\.3 s piece timeout|no answer within 0\.3 s"):
            fetch(PieceFetcher(), server.port, 10, timeout=0.3)
    finally:
        release.set()
    assert time.monotonic() - started < 5


def test_abort_from_another_thread_ends_a_blocked_transfer_at_once(serve: Serve) -> None:
    release, asked = threading.Event(), threading.Event()

    def stall(_: bytes) -> tuple[bytes, bool]:
        asked.set()
        release.wait(10)
        return b"", False

    server = serve([stall])
    request = PieceFetcher().request("p", "127.0.0.1", server.port, "/pieces/t/0", {}, timeout=30,
                                     busy_header="X-Damselfly-Busy")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            request.receive(10, lambda view: None)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    assert asked.wait(5)
    started = time.monotonic()
    request.abort()
    worker.join(5)
    release.set()
    assert not worker.is_alive()
    assert time.monotonic() - started < 2
    assert len(errors) == 1 and isinstance(errors[0], ParentError)
    assert "transfer cancelled" in str(errors[0])


def test_a_sink_failure_propagates_and_the_connection_is_not_reused(serve: Serve) -> None:
    server = serve([piece(b"x" * 10), piece(b"y" * 10)])
    fetcher = PieceFetcher()

    class DiskBroke(Exception):
        pass

    def sink(view: memoryview) -> None:
        raise DiskBroke()

    request = fetcher.request("p", "127.0.0.1", server.port, "/pieces/t/0", {}, timeout=5, busy_header="b")
    with pytest.raises(DiskBroke):
        request.receive(10, sink)
    assert fetch(fetcher, server.port, 10) == b"y" * 10
    assert server.connections == 2
