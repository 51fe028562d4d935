"""Piece transfers from parents over plain HTTP/1.1, each in one worker thread.

A piece is the bulk of what a node receives, and on the event loop every chunk of it cost a
wake-up, a parser pass, a copy into a stream buffer and a join (aiohttp), more so on slow links,
where chunks are small. Here a worker thread sends the GET and reads the body straight into a
reused buffer with blocking ``recv_into(MSG_WAITALL)`` — one system call per MiB, without the
GIL — and hands each full buffer to a sink (the store hashes and writes it in the same thread,
and flushes the piece there too): less than half the CPU per MiB (``bench/piece_receive.py``).

Only the piece server's own responses are spoken: a status line, headers, and a body of exactly
``Content-Length`` bytes (the piece server never sends another framing). Connections are kept
alive per parent address and reused by the next transfer; a reused connection that the parent
closed meanwhile is replaced once, before any byte of the answer arrived (a GET is safe to
repeat). TLS parents are served by the loop's aiohttp session instead (:mod:`peer.download.engine`).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping

from common.errors import ParentBusy, ParentError

# Bytes read (and handed to the sink) at once: one recv, one hash update, one pwrite.
RECEIVE_BUFFER = 1 << 20
# The status line and headers of a piece response are far shorter; more is not a piece server.
MAX_HEADER_BYTES = 16 * 1024
# Error bodies are short texts; only their beginning is kept for the message.
MAX_ERROR_BODY = 64 * 1024
# A parent that does not accept a connection within this long is taken for dead. (A blocked
# connect cannot be aborted: it holds its worker thread, and at exit the process, this long.)
CONNECT_TIMEOUT = 5.0
# Idle keep-alive connections kept per parent address.
IDLE_CONNECTIONS_PER_PARENT = 4

BUSY_STATUS = 503

# The sink takes each received part of the body, in order.
Sink = Callable[[memoryview], None]


class PieceFetcher:
    """Keep-alive connections to parents' piece servers, shared by the worker threads."""

    def __init__(self, *, idle_per_parent: int = IDLE_CONNECTIONS_PER_PARENT) -> None:
        self._idle: dict[tuple[str, int], list[socket.socket]] = {}
        self._idle_per_parent = idle_per_parent
        self._lock = threading.Lock()
        self._buffers = threading.local()
        self._closed = False

    def request(self, parent_id: str, ip: str, port: int, path: str, headers: Mapping[str, str],
                *, timeout: float, busy_header: str) -> PieceRequest:
        """One GET of a piece, to be carried out by :meth:`PieceRequest.receive` in a worker thread."""
        return PieceRequest(self, parent_id, (ip, port), path, dict(headers), timeout, busy_header)

    def close(self) -> None:
        """Close the idle connections; connections in use are closed when their transfer ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    def _take(self, address: tuple[str, int]) -> socket.socket | None:
        with self._lock:
            connections = self._idle.get(address)
            return connections.pop() if connections else None

    def _give_back(self, address: tuple[str, int], connection: socket.socket) -> None:
        with self._lock:
            if not self._closed:
                connections = self._idle.setdefault(address, [])
                if len(connections) < self._idle_per_parent:
                    connections.append(connection)
                    return
        connection.close()

    def _buffer(self) -> memoryview:
        """This thread's receive buffer (threads are reused: the buffer is allocated once)."""
        view: memoryview | None = getattr(self._buffers, "view", None)
        if view is None:
            view = self._buffers.view = memoryview(bytearray(RECEIVE_BUFFER))
        return view


def _reusable(headers: dict[str, str]) -> bool:
    return headers.get("connection", "").lower() != "close"


class PieceRequest:
    """One piece GET. :meth:`receive` blocks (run it in a worker thread); :meth:`abort`, from any
    thread, makes a blocked :meth:`receive` fail at once."""

    def __init__(self, fetcher: PieceFetcher, parent_id: str, address: tuple[str, int], path: str,
                 headers: dict[str, str], timeout: float, busy_header: str) -> None:
        self._fetcher = fetcher
        self._parent_id = parent_id
        self._address = address
        self._path = path
        self._headers = headers
        self._timeout = timeout
        self._busy_header = busy_header.lower()
        self._connection: socket.socket | None = None
        self._aborted = False
        self._lock = threading.Lock()

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            connection = self._connection
        if connection is not None:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def receive(self, length: int, sink: Sink) -> None:
        """Fetch the piece and pass its `length` bytes to `sink`, in order.

        Raises ParentBusy (the parent's uplink is full), ParentError (any other answer than the
        whole piece, a connection that failed or stalled past the timeout); whatever `sink`
        raises propagates, and the connection is then closed.
        """
        deadline = time.monotonic() + self._timeout
        reused = self._fetcher._take(self._address)
        if reused is not None and self._exchange(reused, deadline, length, sink):
            return
        # (the parent closed the reused connection while it sat idle: once more on a new one)
        try:
            connection = socket.create_connection(self._address,
                                                  timeout=min(CONNECT_TIMEOUT, self._remaining(deadline)))
        except OSError as exc:
            raise self._failed(f"cannot connect to {self._address[0]}:{self._address[1]}: {exc}") from None
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self._exchange(connection, deadline, length, sink):
            raise self._failed("the connection closed before an answer")

    def _exchange(self, connection: socket.socket, deadline: float, length: int, sink: Sink) -> bool:
        """The GET on `connection`; False when it was closed before any byte of an answer."""
        with self._lock:
            self._connection = connection
            aborted = self._aborted
        keep = False
        try:
            if aborted:
                raise self._failed("transfer cancelled")
            # Blocking mode with kernel time-outs: MSG_WAITALL then fills the whole buffer in one
            # call (a Python socket time-out would poll and return every arriving segment).
            connection.settimeout(None)
            self._set_timeouts(connection, deadline)
            try:
                connection.sendall(self._request_bytes())
            except OSError as exc:
                if self._is_reuse_failure(exc):
                    return False
                raise self._failed(f"sending the request: {exc}") from None
            head = self._read_head(connection, deadline)
            if head is None:
                return False
            status, headers, body_start = head
            size = self._content_length(status, headers)
            if status != 200:
                text = self._read_text(connection, deadline, body_start, size)
                keep = _reusable(headers)  # the answer was read whole: the next GET may follow
                raise self._refusal(status, headers, text)
            if size != length:
                raise self._failed(f"{size} bytes announced instead of the piece's {length}")
            self._read_piece(connection, deadline, body_start, size, sink)
            keep = _reusable(headers)
            return True
        finally:
            with self._lock:
                self._connection = None
            if keep and not self._aborted:
                self._fetcher._give_back(self._address, connection)
            else:
                connection.close()

    def _request_bytes(self) -> bytes:
        host, port = self._address
        lines = [f"GET {self._path} HTTP/1.1", f"Host: {host}:{port}", "Accept-Encoding: identity"]
        lines += [f"{name}: {value}" for name, value in self._headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _read_head(self, connection: socket.socket, deadline: float) -> tuple[int, dict[str, str], bytes] | None:
        """Status, headers (lower-case names) and the body bytes that came with them; None when
        the connection closed before the first byte."""
        received = bytearray()
        while True:
            self._set_timeouts(connection, deadline)
            try:
                chunk = connection.recv(MAX_HEADER_BYTES)
            except OSError as exc:
                if not received and self._is_reuse_failure(exc):
                    return None
                raise self._failed(self._network_problem("reading the answer", exc)) from None
            if not chunk:
                if not received:
                    return None
                raise self._failed("the connection closed inside the answer's headers")
            received += chunk
            end = received.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(received) > MAX_HEADER_BYTES:
                raise self._failed(f"no end of headers in the first {MAX_HEADER_BYTES} bytes")
        lines = bytes(received[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise self._failed(f"not an HTTP answer: {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers, bytes(received[end + 4:])

    def _content_length(self, status: int, headers: dict[str, str]) -> int:
        declared = headers.get("content-length", "")
        if not declared.isdigit() or "chunked" in headers.get("transfer-encoding", ""):
            raise self._failed(f"HTTP {status} without a Content-Length")
        return int(declared)

    def _refusal(self, status: int, headers: dict[str, str], text: bytes) -> ParentError:
        if status == BUSY_STATUS and self._busy_header in headers:
            return ParentBusy(self._parent_id)
        reason = text[:200].decode("utf-8", "replace").strip()
        return ParentError(self._parent_id, f"HTTP {status} for {self._path}: {reason}")

    def _read_piece(self, connection: socket.socket, deadline: float, body_start: bytes, size: int,
                    sink: Sink) -> None:
        """The body, `size` bytes, to `sink` in buffer-sized parts."""
        buffer = self._fetcher._buffer()
        filled = len(body_start)
        if filled > size:
            raise self._failed(f"more than {size} bytes")
        buffer[:filled] = body_start
        remaining = size - filled
        while True:
            want = min(len(buffer) - filled, remaining)
            while want:
                self._set_timeouts(connection, deadline)
                try:
                    got = connection.recv_into(buffer[filled:filled + want], want, socket.MSG_WAITALL)
                except OSError as exc:
                    raise self._failed(self._network_problem(f"receiving {self._path}", exc)) from None
                if not got:
                    raise self._failed(f"the connection closed after {size - remaining} of {size} bytes")
                filled += got
                remaining -= got
                want -= got
            if filled:
                sink(buffer[:filled])
                filled = 0
            if not remaining:
                return

    def _read_text(self, connection: socket.socket, deadline: float, start: bytes, size: int) -> bytes:
        if size > MAX_ERROR_BODY:
            raise self._failed(f"an error answer of {size} bytes")
        text = bytearray(start)
        while len(text) < size:
            self._set_timeouts(connection, deadline)
            try:
                chunk = connection.recv(size - len(text))
            except OSError as exc:
                raise self._failed(self._network_problem("reading an error answer", exc)) from None
            if not chunk:
                raise self._failed("the connection closed inside an error answer")
            text += chunk
        return bytes(text[:size])

    def _set_timeouts(self, connection: socket.socket, deadline: float) -> None:
        remaining = self._remaining(deadline)
        seconds = int(remaining)
        value = struct.pack("ll", seconds, max(1, int((remaining - seconds) * 1_000_000)))
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)

    def _remaining(self, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._failed(f"no answer within {self._timeout:g} s")
        return remaining

    def _network_problem(self, what: str, exc: OSError) -> str:
        if self._aborted:
            return "transfer cancelled"
        if isinstance(exc, (BlockingIOError, TimeoutError)):
            return f"{what}: stalled past the {self._timeout:g} s piece timeout"
        return f"{what}: {exc}"

    def _is_reuse_failure(self, exc: OSError) -> bool:
        return isinstance(exc, (ConnectionResetError, BrokenPipeError)) and not self._aborted

    def _failed(self, reason: str) -> ParentError:
        return ParentError(self._parent_id, "transfer cancelled" if self._aborted else reason)
