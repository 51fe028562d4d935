"""Throughput of the piece server: 64 pieces of 4 MiB over one keep-alive connection.

    .venv/bin/python bench/piece_server.py [--pieces 64] [--rounds 3] [--uvloop]

Prints MB/s for the sendfile path and for the chunked fallback (what uvloop gets). The client is
a blocking socket in another process that reads bodies into one reused buffer, so the number is
the server's cost plus loopback, not the client's.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peer.metrics import DaemonMetrics
from peer.piece_server import PieceServer
from peer.storage import PieceStore

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


async def _bench(pieces: int, rounds: int, use_sendfile: bool, data_dir: Path) -> float:
    store = PieceStore(data_dir)
    store.load()
    task = store.create(TASK, url="http://bench.invalid/blob")
    task.set_content_info(pieces * PIECE, PIECE, {})
    for number in range(pieces):
        await task.write_piece(number, _piece_chunks(number))
    server = PieceServer(store, upload_slots=16, metrics=DaemonMetrics(), use_sendfile=use_sendfile)
    port = await server.start("127.0.0.1", 0)
    try:
        context = multiprocessing.get_context("spawn")
        results: multiprocessing.Queue[float] = context.Queue()
        client = context.Process(target=_client_process, args=(port, pieces, rounds, results))
        client.start()
        best = await asyncio.to_thread(results.get, True, 600)
        await asyncio.to_thread(client.join)
        if use_sendfile and not server.uses_sendfile:
            print("  (this loop has no sendfile: the fallback was used)")
    finally:
        await server.stop()
        await store.delete(TASK)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pieces", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (no sendfile there)")
    args = parser.parse_args()
    loop_factory = None
    if args.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with tempfile.TemporaryDirectory() as tmp:
        for use_sendfile in (True, False):
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                rate = runner.run(_bench(args.pieces, args.rounds, use_sendfile, Path(tmp)))
            label = "sendfile" if use_sendfile else "chunked "
            print(f"{label}: {rate:8.0f} MB/s  ({args.pieces} x 4 MiB, keep-alive, best of {args.rounds})")


if __name__ == "__main__":
    main()
