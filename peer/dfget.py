"""``dfget URL -O FILE``: download one file through the local dfdaemon.

dfget does not move content bytes itself. It asks the dfdaemon on the unix socket
(``DfdaemonDownload.DownloadTask``) to write the content into a temporary file next to FILE,
shows progress from the piece messages of the response stream, checks ``--digest`` once more
and renames the temporary file onto FILE. FILE therefore either holds the exact content or is
left as it was: every failure removes the temporary file and prints one line
``dfget: error: <reason>``.

Exit codes: 0 success, 1 any failure (including Ctrl-C and timeouts), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import os
import secrets
import socket
import stat
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from importlib import metadata
from typing import Any, TextIO

import grpc
from dragonfly_api import dfdaemon_pb2, dfdaemon_pb2_grpc

from common.config import format_size, parse_duration
from common.digest import file_digest, parse_digest
from common.download import MAX_PRIORITY, DownloadRequest
from common.errors import DamselflyError, DownloadFailed, InvalidRequest
from common.ids import validate_url

DEFAULT_ENDPOINT = "/var/run/damselfly/dfdaemon.sock"
DEFAULT_TIMEOUT = "2h"
# How long dfget waits for a socket that accepted the connection to speak gRPC.
CONNECT_TIMEOUT = 5.0
# Reads of the digest re-check.
# Progress redraws per second, at most.
PROGRESS_REDRAWS_PER_SECOND = 10
# An ETA beyond this (seconds) is noise, shown as --:--.
MAX_ETA = 100 * 3600
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


@dataclasses.dataclass(frozen=True)
class Options:
    """One dfget invocation, validated."""

    url: str
    output: str  # absolute
    endpoint: str
    digest: str  # "algo:hex" or ""
    headers: dict[str, str]
    tag: str
    application: str
    filtered_query_params: tuple[str, ...]
    priority: int
    timeout: float  # seconds
    timeout_text: str
    disable_back_to_source: bool
    progress: bool


# --- command line ---------------------------------------------------------------------------


def _version() -> str:
    try:
        return metadata.version("damselfly")
    except metadata.PackageNotFoundError:
        return "unknown"


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be longer than zero")
    return seconds


def _priority(text: str) -> int:
    if not text.strip().isdigit() or int(text) > MAX_PRIORITY:
        raise argparse.ArgumentTypeError(f"{text!r} is not a priority from 0 to {MAX_PRIORITY}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="dfget",
        description="Download URL into FILE through the local Damselfly dfdaemon (peer-to-peer).",
    )
    parser.add_argument("url", metavar="URL", help="http:// or https:// URL to download")
    parser.add_argument("-O", "--output", metavar="FILE", required=True, help="where to write the content")
    parser.add_argument("--endpoint", metavar="SOCKET", default=DEFAULT_ENDPOINT,
                        help=f"unix socket of the dfdaemon (default: {DEFAULT_ENDPOINT})")
    parser.add_argument("--digest", metavar="sha256:HEX", default="",
                        help="expected digest of the content; checked by the daemon and again by dfget")
    parser.add_argument("-H", "--header", metavar="'NAME: VALUE'", action="append", default=[],
                        help="request header for the origin (repeatable)")
    parser.add_argument("--tag", default="", help="tag telling apart tasks of the same URL")
    parser.add_argument("--application", default="", help="application telling apart tasks of the same URL")
    parser.add_argument("--filtered-query-param", metavar="NAME", action="append", default=[],
                        help="query parameter left out of the task id, e.g. a signature "
                             "(repeatable, or comma-separated)")
    parser.add_argument("--priority", type=_priority, default=0, metavar="0..6",
                        help="task priority, Dragonfly LEVEL0..LEVEL6 (default: 0)")
    parser.add_argument("--timeout", default=DEFAULT_TIMEOUT, metavar="DURATION",
                        help=f"give up after this long, e.g. 30s, 5m, 1h (default: {DEFAULT_TIMEOUT})")
    parser.add_argument("--disable-back-to-source", action="store_true",
                        help="fail rather than download from the origin when no peer has the content")
    parser.add_argument("--no-progress", action="store_true", help="do not draw a progress bar")
    parser.add_argument("--version", action="version", version=f"dfget (damselfly) {_version()}")
    return parser


def parse_header(text: str) -> tuple[str, str]:
    """``("Name", "value")`` from ``"Name: value"``; raises InvalidRequest when malformed."""
    name, sep, value = text.partition(":")
    name = name.strip()
    if not sep or not name or any(c.isspace() or not c.isprintable() for c in name):
        raise InvalidRequest(f"header {text!r} is not of the form 'Name: value'")
    value = value.strip()
    if any(c in "\r\n\x00" for c in value):
        raise InvalidRequest(f"header {name!r} has a line break or NUL in its value")
    return name, value


def parse_headers(texts: Sequence[str]) -> dict[str, str]:
    """Headers by name; a name given twice gets its values joined with ", " (as HTTP does)."""
    headers: dict[str, str] = {}
    by_lower: dict[str, str] = {}
    for text in texts:
        name, value = parse_header(text)
        known = by_lower.setdefault(name.lower(), name)
        headers[known] = f"{headers[known]}, {value}" if known in headers else value
    return headers


def split_names(values: Sequence[str]) -> tuple[str, ...]:
    """Names from repeated and comma-separated flags, stripped, without blanks or repeats."""
    names = (name.strip() for value in values for name in value.split(","))
    return tuple(dict.fromkeys(name for name in names if name))


def parse_options(argv: Sequence[str]) -> Options:
    """Options from the command line; bad usage exits with status 2 (argparse)."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    try:
        validate_url(args.url)
        headers = parse_headers(args.header)
        digest = ""
        if args.digest:
            algorithm, hexdigest = parse_digest(args.digest)
            digest = f"{algorithm}:{hexdigest}"
    except InvalidRequest as exc:
        parser.error(str(exc))
    try:
        timeout = _duration(args.timeout)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"argument --timeout: {exc}")
    if not args.output.strip():
        parser.error("-O/--output must not be empty")
    return Options(
        url=args.url,
        output=os.path.abspath(args.output),
        endpoint=args.endpoint,
        digest=digest,
        headers=headers,
        tag=args.tag,
        application=args.application,
        filtered_query_params=split_names(args.filtered_query_param),
        priority=args.priority,
        timeout=timeout,
        timeout_text=args.timeout.strip(),
        disable_back_to_source=args.disable_back_to_source,
        progress=not args.no_progress,
    )


# --- output path ----------------------------------------------------------------------------


def check_output(output: str) -> None:
    """Raise InvalidRequest unless FILE can be created or replaced."""
    parent = os.path.dirname(output)
    if not os.path.isdir(parent):
        raise InvalidRequest(f"directory {parent} of the output file does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidRequest(f"directory {parent} of the output file is not writable")
    if os.path.isdir(output):
        raise InvalidRequest(f"output {output} is a directory")


def temp_path_for(output: str) -> str:
    """A fresh name next to FILE (same file system, so the final rename is atomic)."""
    parent, name = os.path.split(output)
    while True:
        candidate = os.path.join(parent, f".{name}.dfget-{secrets.token_hex(6)}")
        if not os.path.lexists(candidate):
            return candidate


def remove_quietly(path: str) -> None:
    """Remove `path` if it is there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# --- progress -------------------------------------------------------------------------------


def _format_duration(seconds: float) -> str:
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_progress(done: int, total: int | None, elapsed: float) -> str:
    """One progress line: percentage, bytes, MB/s and ETA (what is known of them)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    speed = f"{rate / 1e6:.1f} MB/s"
    if total is None:
        return f"{format_size(done)}  {speed}"
    percent = 100 if total == 0 else min(100, done * 100 // total)
    if done >= total:
        eta = _format_duration(elapsed)  # the time it took
    elif rate > 0 and (total - done) / rate < MAX_ETA:
        eta = _format_duration((total - done) / rate)
    else:
        eta = "--:--"
    return f"{percent:3d}%  {format_size(done)} / {format_size(total)}  {speed}  ETA {eta}"


class ProgressBar:
    """A one-line progress display on a terminal, redrawn at most 10 times a second."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._clock = clock
        self._started = clock()
        self._last_draw: float | None = None
        self._drawn = False
        self.total: int | None = None
        self.done = 0

    def start(self, total: int, already: int = 0) -> None:
        """The content length is known; `already` bytes were in the cache."""
        self.total = total
        self.done = already
        self._draw(force=True)

    def advance(self, count: int) -> None:
        """`count` more bytes are written."""
        self.done += count
        self._draw(force=False)

    def finish(self, success: bool) -> None:
        """Draw the final state (on success) and end the line."""
        if success:
            if self.total is not None:
                self.done = self.total
            self._draw(force=True)
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False

    def _draw(self, *, force: bool) -> None:
        now = self._clock()
        recent = self._last_draw is not None and now - self._last_draw < 1 / PROGRESS_REDRAWS_PER_SECOND
        if recent and not force:
            return
        self._last_draw = now
        # \r and "erase to end of line" keep it on one line as it shrinks.
        self._stream.write("\r" + format_progress(self.done, self.total, now - self._started) + "\x1b[K")
        self._stream.flush()
        self._drawn = True


class NoProgress(ProgressBar):
    """Draws nothing (not a terminal, or --no-progress)."""

    def _draw(self, *, force: bool) -> None:
        pass


# --- the download ---------------------------------------------------------------------------


def _no_daemon(endpoint: str, why: str) -> DownloadFailed:
    return DownloadFailed(
        f"no dfdaemon answers at {endpoint} ({why}): is it running? "
        f"(start it with: damselfly dfdaemon --socket {endpoint} ... or damselfly up)"
    )


def probe_endpoint(endpoint: str) -> None:
    """Fail fast, with a clear reason, when nothing listens on the unix socket."""
    try:
        mode = os.stat(endpoint).st_mode
    except FileNotFoundError:
        raise _no_daemon(endpoint, "the socket does not exist") from None
    except OSError as exc:
        raise DownloadFailed(f"cannot use dfdaemon socket {endpoint}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise DownloadFailed(f"{endpoint} is not a unix socket; pass the dfdaemon's socket with --endpoint")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(CONNECT_TIMEOUT)
        try:
            probe.connect(endpoint)
        except ConnectionRefusedError:
            raise _no_daemon(endpoint, "connection refused") from None
        except TimeoutError:
            raise _no_daemon(endpoint, "connection timed out") from None
        except OSError as exc:
            if exc.errno == errno.EACCES:
                raise DownloadFailed(f"permission denied on dfdaemon socket {endpoint}") from None
            raise _no_daemon(endpoint, exc.strerror or str(exc)) from None


def build_request(options: Options, temp_path: str) -> dfdaemon_pb2.DownloadTaskRequest:
    """The DownloadTask request for `options`, writing into `temp_path`."""
    download = DownloadRequest(
        url=options.url,
        digest=options.digest,
        tag=options.tag,
        application=options.application,
        priority=options.priority,
        filtered_query_params=options.filtered_query_params,
        request_header=options.headers,
        disable_back_to_source=options.disable_back_to_source,
        timeout=options.timeout,
    ).to_proto()
    download.output_path = temp_path
    return dfdaemon_pb2.DownloadTaskRequest(download=download)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _rpc_failure(error: Any, options: Options) -> DownloadFailed:
    """Translate a grpc.aio.AioRpcError into our one-line reason."""
    code = error.code()
    details = _one_line(error.details() or "")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DownloadFailed(f"timed out after {options.timeout_text}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return DownloadFailed(f"lost the dfdaemon at {options.endpoint}: {details or 'unavailable'}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return DownloadFailed(f"{options.endpoint} does not serve dfdaemon downloads: {details}")
    return DownloadFailed(details or f"dfdaemon failed the download ({code.name})")


async def run_download(options: Options, temp_path: str, progress: ProgressBar) -> int | None:
    """Have the daemon write the content into `temp_path`; the content length, when told."""
    target = f"unix://{options.endpoint}"
    content_length: int | None = None
    seen: set[int] = set()
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            try:
                await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT)
            except TimeoutError:
                raise _no_daemon(options.endpoint, "it does not speak gRPC") from None
            stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(channel)
            call = stub.DownloadTask(build_request(options, temp_path), timeout=options.timeout)
            async for response in call:
                kind = response.WhichOneof("response")
                if kind == "download_task_started_response":
                    started = response.download_task_started_response
                    content_length = started.content_length
                    already = 0
                    for piece in started.pieces:
                        if piece.number not in seen:
                            seen.add(piece.number)
                            already += piece.length
                    progress.start(content_length, content_length if started.is_finished else already)
                elif kind == "download_piece_finished_response":
                    piece = response.download_piece_finished_response.piece
                    if piece.number not in seen:
                        seen.add(piece.number)
                        progress.advance(piece.length)
    except grpc.aio.AioRpcError as exc:
        raise _rpc_failure(exc, options) from None
    return content_length


def verify_file(path: str, content_length: int | None, digest: str) -> None:
    """Check what the daemon wrote: it exists, has the announced length and the digest."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise DownloadFailed("the dfdaemon reported success but wrote no output file") from None
    if content_length is not None and size != content_length:
        raise DownloadFailed(f"the dfdaemon announced {content_length} bytes but wrote {size}")
    if not digest:
        return
    algorithm, expected = parse_digest(digest)
    try:
        actual = file_digest(path, algorithm)
    except OSError as exc:
        raise DownloadFailed(f"cannot read the downloaded file {path}: {exc.strerror or exc}") from None
    if actual != f"{algorithm}:{expected}":
        raise DownloadFailed(f"content digest {actual} does not match --digest {digest}")


def _run(coroutine: Coroutine[Any, Any, int | None]) -> int | None:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def download(options: Options, stderr: TextIO) -> None:
    """Download into FILE or raise; FILE is replaced only by the complete, checked content."""
    check_output(options.output)
    probe_endpoint(options.endpoint)
    temp_path = temp_path_for(options.output)
    progress = ProgressBar(stderr) if options.progress and stderr.isatty() else NoProgress(stderr)
    success = False
    try:
        content_length = _run(run_download(options, temp_path, progress))
        verify_file(temp_path, content_length, options.digest)
        progress.finish(success=True)
        os.replace(temp_path, options.output)
        success = True
    except OSError as exc:
        raise DownloadFailed(f"cannot write {options.output}: {exc.strerror or exc}") from None
    finally:
        if not success:
            progress.finish(success=False)
            remove_quietly(temp_path)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``dfget`` console script; returns the exit status."""
    try:
        options = parse_options(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or EXIT_OK
        return EXIT_USAGE
    try:
        download(options, sys.stderr)
    except DamselflyError as exc:
        print(f"dfget: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("dfget: error: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
