"""dfget over gRPC (``DfdaemonDownload.DownloadTask`` on the dfdaemon's unix socket): directory
downloads (``-r``, many files over one channel), and single files when the daemon has no
download socket (another dfdaemon, an older one). Loaded only then: gRPC and asyncio cost a
dfget 0.12 s of CPU to import.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, TextIO

import grpc
from dragonfly_api import dfdaemon_pb2, dfdaemon_pb2_grpc

from common.errors import DamselflyError, DownloadFailed, InvalidRequest
from common.units import format_size
from peer import dfget_listing
from peer.dfget import (
    CONNECT_TIMEOUT,
    PROGRESS_REDRAWS_PER_SECOND,
    NoProgress,
    Options,
    ProgressBar,
    ResponseTracker,
    build_request,
    format_duration,
    log,
    no_daemon_error,
    pending_output,
    progress_display,
    status_failure,
    sweep_directory,
    terminated,
)


async def _keep_drawing(progress: ProgressBar) -> None:
    while True:
        await asyncio.sleep(1 / PROGRESS_REDRAWS_PER_SECOND)  # a display refresh, not a wait
        progress.tick()


@contextlib.asynccontextmanager
async def _daemon(options: Options) -> AsyncIterator[Any]:
    """A DfdaemonDownload stub on the unix socket, checked to speak gRPC."""
    async with grpc.aio.insecure_channel(f"unix://{options.endpoint}") as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT)
        except TimeoutError:
            raise no_daemon_error(options.endpoint, "it does not speak gRPC") from None
        yield dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)


async def run_download(stub: Any, request: dfdaemon_pb2.DownloadTaskRequest, options: Options,
                       progress: ProgressBar) -> int | None:
    """Have the daemon write the content; the content length, when told."""
    tracker = ResponseTracker(progress)
    try:
        async for response in stub.DownloadTask(request, timeout=options.timeout):
            tracker.take(response)
    except grpc.aio.AioRpcError as exc:
        raise status_failure(exc.code().name, exc.details() or "", options) from None
    return tracker.content_length


async def fetch_file(stub: Any, options: Options, url: str, output: str, progress: ProgressBar) -> int:
    """Download `url` into `output` through the daemon; the bytes written. Raises on failure,
    having removed the temporary file (also when cancelled: Ctrl-C, SIGTERM, a sibling failed)."""
    with pending_output(url, output, options, progress) as pending:
        content_length = await run_download(stub, build_request(options, pending.temp.path, url), options, progress)
        return await asyncio.to_thread(pending.complete, content_length)


async def download_one(options: Options, stderr: TextIO) -> None:
    """URL into FILE."""
    progress = progress_display(options, stderr)
    ticker = None if isinstance(progress, NoProgress) else asyncio.create_task(_keep_drawing(progress))
    try:
        async with _daemon(options) as stub:
            await fetch_file(stub, options, options.url, options.output, progress)
    finally:
        if ticker is not None:
            ticker.cancel()


async def download_tree(options: Options, stderr: TextIO) -> None:
    """Every file below the directory URL into the directory FILE, keeping the layout."""
    import aiohttp  # only directory downloads list the origin: a single file's dfget starts without it

    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        fetch = dfget_listing.http_fetcher(session, options.headers)
        entries = await dfget_listing.list_files(options.url, fetch, include=options.include_files,
                                                 max_files=options.max_files)
    jobs = await asyncio.to_thread(prepare_tree, options, entries)
    log.info("%d files below %s", len(jobs), options.url)
    slots = asyncio.Semaphore(options.max_concurrent_requests)
    total = 0

    async def one(url: str, path: str) -> None:
        nonlocal total
        async with slots:
            try:
                total += await fetch_file(stub, options, url, path, NoProgress(stderr))
            except DamselflyError as exc:
                raise DownloadFailed(f"{url}: {exc}") from None
            log.info("%s done", path)

    async with _daemon(options) as stub:
        try:
            async with asyncio.TaskGroup() as group:
                for entry, path in jobs:
                    group.create_task(one(entry.url, path))
        except BaseExceptionGroup as group_error:
            raise _first_error(group_error) from None
    if options.progress and stderr.isatty():
        print(f"{len(jobs)} files, {format_size(total)} in {format_duration(time.monotonic() - started)}",
              file=stderr)


def prepare_tree(options: Options, entries: Sequence[dfget_listing.Entry]) -> list[tuple[dfget_listing.Entry, str]]:
    """Each entry with its local path; refuses existing files without --overwrite (all named at
    once, before any download), creates the directories and sweeps stale temporary files."""
    jobs = [(entry, os.path.join(options.output, *entry.parts)) for entry in entries]
    if not options.overwrite:
        existing = [path for _, path in jobs if os.path.lexists(path)]
        if existing:
            more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
            raise InvalidRequest(f"{', '.join(existing[:3])}{more} exist; pass --overwrite to replace them")
    for directory in sorted({os.path.dirname(path) for _, path in jobs}):
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise DownloadFailed(f"cannot create directory {directory}: {exc.strerror or exc}") from None
        sweep_directory(directory)
    return jobs


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return _first_error(error)
        if not isinstance(error, asyncio.CancelledError):
            return error
    return group.exceptions[0]


async def _until_terminated(work: Coroutine[Any, Any, None]) -> None:
    """Run `work`; SIGTERM cancels it like Ctrl-C does (so its cleanup runs), then fails."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    was_terminated = False

    def on_sigterm() -> None:
        nonlocal was_terminated
        was_terminated = True
        task.cancel()

    with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        await work
    except asyncio.CancelledError:
        if was_terminated:
            raise terminated() from None
        raise


def _run(work: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(_until_terminated(work))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_until_terminated(work))


def download(options: Options, stderr: TextIO) -> None:
    """The tree of -r, or one file from a dfdaemon without a download socket (checks done)."""
    _run(download_tree(options, stderr) if options.recursive else download_one(options, stderr))
