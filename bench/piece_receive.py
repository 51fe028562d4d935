"""CPU a node spends receiving pieces from a parent: the worker-thread path (PieceFetcher into
LocalTask.write_piece_in_thread) against the event-loop path (aiohttp into LocalTask.write_piece).

A real piece server (sendfile) runs in a process of its own on loopback; this process fetches
every piece of a task with a few in flight and reports its own CPU per MiB (user and system) and
the wall time. Usage::

    .venv/bin/python bench/piece_receive.py [--pieces 256] [--piece-mib 1] [--in-flight 4]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import uvloop  # noqa: E402

from peer.download.piece_fetch import PieceFetcher  # noqa: E402
from peer.metrics import DaemonMetrics  # noqa: E402
from peer.storage.store import LocalTask, PieceStore  # noqa: E402
from peer.upload.piece_server import BUSY_HEADER, PieceServer  # noqa: E402

TASK_ID = "b" * 64
MIB = 1 << 20


def _cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def _new_task(directory: str, pieces: int, piece_length: int) -> tuple[PieceStore, LocalTask]:
    store = PieceStore(Path(directory))
    store.load()
    task = store.create(TASK_ID, url="http://origin.invalid/blob")
    task.set_content_info(pieces * piece_length, piece_length, {})
    return store, task


async def _serve(queue: Queue[Any], directory: str, pieces: int, piece_length: int) -> None:
    store, task = _new_task(directory, pieces, piece_length)

    async def one(number: int) -> Any:
        yield bytes([number % 251]) * piece_length

    for number in range(pieces):
        await task.write_piece(number, one(number))
    server = PieceServer(store, upload_slots=16, metrics=DaemonMetrics(), use_sendfile=True)
    port = await server.start("127.0.0.1", 0)
    queue.put(port)
    await asyncio.to_thread(queue.get)  # until the client is done
    await server.stop()


def _server_process(queue: Queue[Any], directory: str, pieces: int, piece_length: int) -> None:
    uvloop.run(_serve(queue, directory, pieces, piece_length))


async def _receive(mode: str, port: int, directory: str, pieces: int, piece_length: int,
                   in_flight: int) -> tuple[float, float, float]:
    _, task = _new_task(directory, pieces, piece_length)
    slots = asyncio.Semaphore(in_flight)
    fetcher = PieceFetcher()
    threads = ThreadPoolExecutor(max_workers=in_flight)
    async with aiohttp.ClientSession() as session:
        async def one(number: int) -> None:
            path = f"/pieces/{TASK_ID}/{number}"
            async with slots:
                if mode == "thread":
                    request = fetcher.request("parent", "127.0.0.1", port, path, {}, timeout=30,
                                              busy_header=BUSY_HEADER)
                    await task.write_piece_in_thread(number, request.receive, executor=threads)
                    return
                async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                    assert response.status == 200, response.status
                    await task.write_piece(number, response.content.iter_chunked(MIB))

        cpu_before, started = _cpu(), time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(pieces)))
        cpu_after, ended = _cpu(), time.perf_counter()
    fetcher.close()
    threads.shutdown()
    return cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1], ended - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pieces", type=int, default=256)
    parser.add_argument("--piece-mib", type=int, default=1)
    parser.add_argument("--in-flight", type=int, default=4)
    args = parser.parse_args()
    piece_length = args.piece_mib * MIB
    mib = args.pieces * piece_length / MIB
    print("| path | user ms / MiB | system ms / MiB | wall ms / MiB |")
    print("|---|---:|---:|---:|")
    for mode in ("loop", "thread"):
        with tempfile.TemporaryDirectory() as served, tempfile.TemporaryDirectory() as received:
            context = multiprocessing.get_context("spawn")
            queue: Queue[Any] = context.Queue()
            server = context.Process(target=_server_process, args=(queue, served, args.pieces, piece_length))
            server.start()
            port = queue.get()
            user, system, wall = uvloop.run(_receive(mode, port, received, args.pieces, piece_length,
                                                     args.in_flight))
            queue.put("done")
            server.join()
        label = "aiohttp on the event loop" if mode == "loop" else "worker thread (PieceFetcher)"
        print(f"| {label} | {user / mib * 1000:.2f} | {system / mib * 1000:.2f} | {wall / mib * 1000:.2f} |")


if __name__ == "__main__":
    main()
