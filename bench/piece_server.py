"""Throughput of the piece server: 64 pieces of 4 MiB over one keep-alive connection.

    .venv/bin/python bench/piece_server.py [--pieces 64] [--rounds 3]

Prints a table of MB/s for each way the server can send: asyncio's loop.sendfile, uvloop with
os.sendfile in sender threads (what the daemons run), and the chunked path (TLS, or sendfile
turned off) on uvloop. The client is a blocking socket in another process that reads bodies into
one reused buffer, so the number is the server's cost plus loopback, not the client's.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peer.metrics import DaemonMetrics
from peer.storage.store import PieceStore
from peer.upload.piece_server import PieceServer

TASK = "b" * 64
MIB = 1024 * 1024
PIECE = 4 * MIB


async def _piece_chunks(number: int) -> AsyncIterator[bytes]:
    block = bytes([number % 251]) * MIB
    for _ in range(PIECE // MIB):
        yield block


def _client(port: int, pieces: int, rounds: int) -> float:
    """Fetch all pieces `rounds` times over one connection; best MB/s."""
    buffer = bytearray(MIB)
    view = memoryview(buffer)
    best = 0.0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(rounds):
            started = time.perf_counter()
            total = 0
            for number in range(pieces):
                request = f"GET /pieces/{TASK}/{number} HTTP/1.1\r\nHost: bench\r\n\r\n"
                sock.sendall(request.encode())
                head = b""
                while b"\r\n\r\n" not in head:
                    more = sock.recv(4096)
                    if not more:
                        raise ConnectionError("server closed the connection")
                    head += more
                header, _, body_start = head.partition(b"\r\n\r\n")
                if not header.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(header.decode(errors="replace"))
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in header.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                remaining = length - len(body_start)
                while remaining:
                    received = sock.recv_into(view, min(remaining, MIB))
                    if not received:
                        raise ConnectionError("short body")
                    remaining -= received
                total += length
            best = max(best, total / (time.perf_counter() - started) / 1e6)
    return best


def _client_process(port: int, pieces: int, rounds: int, results: multiprocessing.Queue[float]) -> None:
    results.put(_client(port, pieces, rounds))


@dataclass(frozen=True)
class Case:
    label: str
    loop_factory: Callable[[], asyncio.AbstractEventLoop]
    use_sendfile: bool
    in_threads: bool  # expected: sendfile by sender threads (the loop has none of its own)


CASES = (
    Case("asyncio + loop.sendfile", asyncio.new_event_loop, use_sendfile=True, in_threads=False),
    Case("uvloop + native sendfile", uvloop.new_event_loop, use_sendfile=True, in_threads=True),
    Case("uvloop + chunked", uvloop.new_event_loop, use_sendfile=False, in_threads=False),
)


async def _bench(pieces: int, rounds: int, case: Case, data_dir: Path) -> float:
    store = PieceStore(data_dir)
    store.load()
    task = store.create(TASK, url="http://bench.invalid/blob")
    task.set_content_info(pieces * PIECE, PIECE, {})
    for number in range(pieces):
        await task.write_piece(number, _piece_chunks(number))
    server = PieceServer(store, upload_slots=16, metrics=DaemonMetrics(), use_sendfile=case.use_sendfile)
    port = await server.start("127.0.0.1", 0)
    try:
        context = multiprocessing.get_context("spawn")
        results: multiprocessing.Queue[float] = context.Queue()
        client = context.Process(target=_client_process, args=(port, pieces, rounds, results))
        client.start()
        best = await asyncio.to_thread(results.get, True, 600)
        await asyncio.to_thread(client.join)
        if server.sendfile_in_threads != case.in_threads:
            raise RuntimeError(f"{case.label}: the server did not take the path this case measures")
    finally:
        await server.stop()
        await store.delete(TASK)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pieces", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.pieces} x 4 MiB pieces over one keep-alive connection, best of {args.rounds} rounds\n")
    width = max(len(case.label) for case in CASES)
    print(f"| {'path':<{width}} | {'MB/s':>6} |")
    print(f"|{'-' * (width + 2)}|{'-' * 7}:|")
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            with asyncio.Runner(loop_factory=case.loop_factory) as runner:
                rate = runner.run(_bench(args.pieces, args.rounds, case, Path(tmp)))
            print(f"| {case.label:<{width}} | {rate:6.0f} |", flush=True)


if __name__ == "__main__":
    main()
