"""``dfget URL -O FILE``: download one file (or, with ``-r``, a directory) through the local dfdaemon.

dfget does not move content bytes itself. It creates a locked temporary file next to FILE, asks
the dfdaemon on the unix socket (``DfdaemonDownload.DownloadTask``) to write the content into it,
shows progress from the piece messages of the response stream, checks ``--digest`` once more and
moves the file onto FILE (:mod:`peer.dfget_output`). FILE therefore either holds the exact content
or is left as it was: every failure, Ctrl-C and SIGTERM remove the temporary file and print one
line ``dfget: error: <reason>``; after a SIGKILL the daemon removes its partial copy and the next
dfget in that directory removes the stale file. An existing FILE is kept unless ``--overwrite``.

Flags follow Dragonfly's dfget (docs/dfget.md has the table); the common ones also come from
``DFGET_*`` environment variables, and a flag on the command line wins.

Exit codes: 0 success, 1 any failure (including Ctrl-C, SIGTERM and timeouts), 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import logging
import math
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType
from typing import Any, TextIO

from dragonfly_api import dfdaemon_pb2
from google.protobuf.message import DecodeError

from common.digest import file_digest, parse_digest
from common.download import MAX_PRIORITY, DownloadRequest
from common.errors import DamselflyError, DownloadFailed, FrameError, InvalidRequest, one_line
from common.ids import validate_url
from common.pieces import DEFAULT_MIN_PIECE_LENGTH, MAX_PIECE_LENGTH
from common.units import format_size, parse_bool, parse_duration, parse_size
from peer import dfget_listing
from peer.dfget_output import TempFile, create_temp, place, sweep_stale
from peer.download_socket import (
    DONE,
    ERROR,
    REQUEST,
    RESPONSE,
    FrameReader,
    decode_error,
    encode_frame,
    stream_socket_path,
)

log = logging.getLogger("dfget")

DEFAULT_ENDPOINT = "/var/run/damselfly/dfdaemon.sock"
DEFAULT_TIMEOUT = "2h"
# Dragonfly's default: LEVEL6, a seed peer back-sources a new task.
DEFAULT_PRIORITY = 6
DEFAULT_LOG_LEVEL = "warn"
DEFAULT_MAX_CONCURRENT_REQUESTS = 5
# How long dfget waits for a socket that accepted the connection to speak gRPC.
CONNECT_TIMEOUT = 5.0
# Progress redraws per second, at most; the line is also redrawn this often while nothing moves.
PROGRESS_REDRAWS_PER_SECOND = 10
# An ETA beyond this (seconds) is noise, shown as --:--.
MAX_ETA = 100 * 3600
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
              "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR}

# Flags that also come from the environment (Dragonfly's names; DFGET_ENDPOINT is ours).
ENVIRONMENT = {
    "endpoint": "DFGET_ENDPOINT",
    "timeout": "DFGET_TIMEOUT",
    "priority": "DFGET_PRIORITY",
    "piece_length": "DFGET_PIECE_LENGTH",
    "application": "DFGET_APPLICATION",
    "tag": "DFGET_TAG",
    "disable_back_to_source": "DFGET_DISABLE_BACK_TO_SOURCE",
    "overwrite": "DFGET_OVERWRITE",
    "max_files": "DFGET_MAX_FILES",
    "max_concurrent_requests": "DFGET_MAX_CONCURRENT_REQUESTS",
    "no_progress": "DFGET_NO_PROGRESS",
    "log_level": "DFGET_LOG_LEVEL",
}


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
    overwrite: bool = False
    piece_length: int | None = None
    log_level: str = DEFAULT_LOG_LEVEL
    recursive: bool = False
    include_files: tuple[str, ...] = ()
    max_files: int = dfget_listing.DEFAULT_MAX_FILES
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS


# --- command line ---------------------------------------------------------------------------


def _version() -> str:
    from importlib import metadata  # only for --version: it costs every dfget start 17 ms otherwise

    try:
        return metadata.version("damselfly")
    except metadata.PackageNotFoundError:
        return "unknown"


class _VersionAction(argparse.Action):
    """``--version``: the package version is looked up only when asked for (importlib.metadata
    and the look-up cost every other dfget start ~40 ms of CPU, sixteen starts at once a core's
    second)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        print(f"dfget (damselfly) {_version()}")
        parser.exit()


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be longer than zero")
    return seconds


def _priority(text: str) -> int:
    """0..6, or Dragonfly's enum names LEVEL0..LEVEL6."""
    value = text.strip().upper().removeprefix("LEVEL")
    if not value.isdigit() or int(value) > MAX_PRIORITY:
        raise argparse.ArgumentTypeError(f"{text!r} is not a priority from 0 to {MAX_PRIORITY} (or LEVEL0..LEVEL6)")
    return int(value)


def _piece_length(text: str) -> int:
    try:
        length = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not DEFAULT_MIN_PIECE_LENGTH <= length <= MAX_PIECE_LENGTH:
        raise argparse.ArgumentTypeError(
            f"{text!r} is outside {format_size(DEFAULT_MIN_PIECE_LENGTH)} .. {format_size(MAX_PIECE_LENGTH)}")
    return length


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def _boolean(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# How each environment variable's text is read (the flag's own converter).
_ENV_CONVERTERS: dict[str, Callable[[str], object]] = {
    "endpoint": str, "timeout": str, "priority": _priority, "piece_length": _piece_length,
    "application": str, "tag": str, "disable_back_to_source": _boolean, "overwrite": _boolean,
    "max_files": _positive_int, "max_concurrent_requests": _positive_int, "no_progress": _boolean,
    "log_level": _log_level,
}


def environment_defaults(environ: Mapping[str, str]) -> dict[str, object]:
    """Flag defaults from ``DFGET_*`` variables; ArgumentTypeError naming the variable if bad."""
    defaults: dict[str, object] = {}
    for dest, variable in ENVIRONMENT.items():
        text = environ.get(variable)
        if text is None or text == "":
            continue
        try:
            defaults[dest] = _ENV_CONVERTERS[dest](text)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"environment variable {variable}: {exc}") from None
    return defaults


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="dfget",
        description="Download URL into FILE through the local Damselfly dfdaemon (peer-to-peer). "
                    "Flags follow Dragonfly's dfget; those marked [env] also come from DFGET_<FLAG> "
                    "environment variables (e.g. DFGET_TIMEOUT=30m), and the command line wins.",
    )
    add = parser.add_argument
    add("url", metavar="URL", help="http:// or https:// URL to download (a directory with -r)")
    add("-O", "--output", metavar="FILE", required=True,
        help="where to write the content (with -r: an existing directory)")
    add("-e", "--endpoint", metavar="SOCKET", default=DEFAULT_ENDPOINT,
        help=f"unix socket of the dfdaemon [env] (default: {DEFAULT_ENDPOINT})")
    add("--overwrite", action="store_true",
        help="replace FILE if it exists; without it an existing FILE is an error [env]")
    add("--digest", metavar="ALGO:HEX", default="",
        help="expected digest of the content, sha256:<64 hex> or sha512:<128 hex>; "
             "checked by the daemon and again by dfget")
    add("-p", "--priority", type=_priority, default=DEFAULT_PRIORITY, metavar="0..6",
        help="task priority for the scheduler, Dragonfly's LEVEL0..LEVEL6 (what each level does: "
             "docs/dfget.md) [env] (default: 6)")
    add("--piece-length", type=_piece_length, default=None, metavar="SIZE",
        help=f"piece length, e.g. 4MiB ({format_size(DEFAULT_MIN_PIECE_LENGTH)} .. {format_size(MAX_PIECE_LENGTH)}); "
             "another length is another task [env] (default: chosen from the content length)")
    add("-H", "--header", metavar="'NAME: VALUE'", action="append", default=[],
        help="request header for the origin (repeatable)")
    add("--tag", default="", help="tag telling apart tasks of the same URL [env]")
    add("--application", default="", help="application telling apart tasks of the same URL [env]")
    add("--filtered-query-param", metavar="NAME", action="append", default=[],
        help="query parameter left out of the task id, e.g. a signature (repeatable, or comma-separated)")
    add("--timeout", default=DEFAULT_TIMEOUT, metavar="DURATION",
        help=f"give up after this long, e.g. 30s, 5m, 1h [env] (default: {DEFAULT_TIMEOUT})")
    add("--disable-back-to-source", action="store_true",
        help="this peer never downloads from the origin itself (seed peers still may) [env]")
    add("-r", "--recursive", action="store_true",
        help="URL is an HTTP directory listing: download every file below it into the directory -O")
    add("-I", "--include-files", metavar="PATTERN", action="append", default=[],
        help="with -r: only files whose path below URL matches this glob; 'dir/' takes a whole "
             "subdirectory (repeatable)")
    add("--max-files", type=_positive_int, default=dfget_listing.DEFAULT_MAX_FILES, metavar="N",
        help=f"with -r: refuse when more files than this match [env] (default: {dfget_listing.DEFAULT_MAX_FILES})")
    add("--max-concurrent-requests", type=_positive_int, default=DEFAULT_MAX_CONCURRENT_REQUESTS, metavar="N",
        help=f"with -r: files downloaded at once [env] (default: {DEFAULT_MAX_CONCURRENT_REQUESTS})")
    add("--no-progress", action="store_true", help="do not draw a progress bar [env]")
    add("-l", "--log-level", type=_log_level, default=DEFAULT_LOG_LEVEL, metavar="LEVEL",
        help=f"log to stderr from this level: trace, debug, info, warn, error [env] (default: {DEFAULT_LOG_LEVEL})")
    add("-V", "--version", action=_VersionAction, help="show the version and exit")
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


def parse_options(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Options:
    """Options from the command line and ``DFGET_*`` variables; bad usage exits with status 2."""
    parser = build_parser()
    try:
        parser.set_defaults(**environment_defaults(os.environ if environ is None else environ))
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    args = parser.parse_args(list(argv))
    try:
        validate_url(args.url)
        headers = parse_headers(args.header)
        digest = ""
        if args.digest:
            algorithm, hexdigest = parse_digest(args.digest)
            digest = f"{algorithm}:{hexdigest}"
        include = tuple(dfget_listing.check_include_pattern(p) for p in args.include_files)
    except InvalidRequest as exc:
        parser.error(str(exc))
    try:
        timeout = _duration(args.timeout)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"argument --timeout: {exc}")
    if not args.output.strip():
        parser.error("-O/--output must not be empty")
    if args.recursive and digest:
        parser.error("--digest names one file's content; it cannot be used with -r")
    if include and not args.recursive:
        parser.error("--include-files filters a directory download; add -r")
    return Options(
        url=dfget_listing.directory_url(args.url) if args.recursive else args.url,
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
        overwrite=args.overwrite,
        piece_length=args.piece_length,
        log_level=args.log_level,
        recursive=args.recursive,
        include_files=include,
        max_files=args.max_files,
        max_concurrent_requests=args.max_concurrent_requests,
    )


# --- output path ----------------------------------------------------------------------------


def check_output(output: str, *, overwrite: bool) -> None:
    """Raise unless FILE can be created (or, with `overwrite`, replaced)."""
    parent = os.path.dirname(output)
    if not os.path.isdir(parent):
        raise InvalidRequest(f"directory {parent} of the output file does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidRequest(f"directory {parent} of the output file is not writable")
    if os.path.isdir(output):
        raise InvalidRequest(f"output {output} is a directory")
    if not overwrite and os.path.lexists(output):
        raise InvalidRequest(f"{output} exists; pass --overwrite to replace it")


def check_output_directory(output: str) -> None:
    """Raise unless -r can write below `output`."""
    if not os.path.isdir(output):
        raise InvalidRequest(f"with -r the output {output} must be an existing directory")
    if not os.access(output, os.W_OK | os.X_OK):
        raise InvalidRequest(f"output directory {output} is not writable")


def sweep_directory(directory: str) -> None:
    for name in sweep_stale(directory):
        log.info("removed %s, left by a dfget that did not finish", os.path.join(directory, name))


# --- progress -------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_progress(done: int, total: int | None, elapsed: float, *, finished: bool = False) -> str:
    """One progress line: percentage, bytes, speed (binary units, like the sizes) and ETA.

    Before the first byte it says so, with the time waited; once finished it shows the time the
    download took ("in"), not an ETA.
    """
    if done == 0 and not finished:
        size = "" if total is None else f"  0%  0 B / {format_size(total)}  "
        return f"{size}waiting for the first byte  {format_duration(elapsed)}"
    rate = done / elapsed if elapsed > 0 else 0.0
    speed = f"{format_size(rate)}/s"
    if total is None:
        return f"{format_size(done)}  {speed}"
    percent = 100 if total == 0 else min(100, done * 100 // total)
    if finished:
        return f"{percent:3d}%  {format_size(total)}  {speed}  in {format_duration(elapsed)}"
    if done >= total:
        # Every piece is in; the daemon checks and copies, dfget checks again: no ETA to give.
        return f"{percent:3d}%  {format_size(done)} / {format_size(total)}  finishing  {format_duration(elapsed)}"
    remaining = (total - done) / rate if rate > 0 else math.inf
    eta = format_duration(remaining) if remaining < MAX_ETA else "--:--"
    return f"{percent:3d}%  {format_size(done)} / {format_size(total)}  {speed}  ETA {eta}"


class ProgressBar:
    """A one-line progress display on a terminal, redrawn at most 10 times a second."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._clock = clock
        self._started = clock()
        self._last_draw: float | None = None
        self._drawn = False
        self._finished = False
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

    def tick(self) -> None:
        """Redraw (the clock moved): the wait for the first byte and the speed stay current."""
        if not self._finished:  # a late tick must not draw after the final line
            self._draw(force=False)

    def finish(self, success: bool) -> None:
        """Draw the final state (on success) and end the line."""
        if self._finished:
            return
        self._finished = True
        if success:
            if self.total is not None:
                self.done = self.total
            self._draw(force=True, finished=True)
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False

    def _draw(self, *, force: bool, finished: bool = False) -> None:
        now = self._clock()
        recent = self._last_draw is not None and now - self._last_draw < 1 / PROGRESS_REDRAWS_PER_SECOND
        if recent and not force:
            return
        self._last_draw = now
        line = format_progress(self.done, self.total, now - self._started, finished=finished)
        # \r and "erase to end of line" keep it on one line as it shrinks.
        self._stream.write("\r" + line + "\x1b[K")
        self._stream.flush()
        self._drawn = True


class NoProgress(ProgressBar):
    """Draws nothing (not a terminal, --no-progress, or one of the files of -r)."""

    def _draw(self, *, force: bool, finished: bool = False) -> None:
        pass


def progress_display(options: Options, stderr: TextIO) -> ProgressBar:
    """The progress bar of one file: drawn on a terminal unless --no-progress."""
    return ProgressBar(stderr) if options.progress and stderr.isatty() else NoProgress(stderr)


# --- talking to the daemon ------------------------------------------------------------------


def no_daemon_error(endpoint: str, why: str) -> DownloadFailed:
    return DownloadFailed(
        f"no dfdaemon answers at {endpoint} ({why}): is it running? "
        f"(start it with: damselfly dfdaemon --socket {endpoint} ... or damselfly up)"
    )


def probe_endpoint(endpoint: str) -> None:
    """Fail fast, with a clear reason, when nothing listens on the unix socket."""
    try:
        mode = os.stat(endpoint).st_mode
    except FileNotFoundError:
        raise no_daemon_error(endpoint, "the socket does not exist") from None
    except OSError as exc:
        raise DownloadFailed(f"cannot use dfdaemon socket {endpoint}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise DownloadFailed(f"{endpoint} is not a unix socket; pass the dfdaemon's socket with -e/--endpoint")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(CONNECT_TIMEOUT)
        try:
            probe.connect(endpoint)
        except ConnectionRefusedError:
            raise no_daemon_error(endpoint, "connection refused") from None
        except TimeoutError:
            raise no_daemon_error(endpoint, "connection timed out") from None
        except OSError as exc:
            if exc.errno == errno.EACCES:
                raise DownloadFailed(f"permission denied on dfdaemon socket {endpoint}") from None
            raise no_daemon_error(endpoint, exc.strerror or str(exc)) from None


def build_request(options: Options, temp_path: str, url: str | None = None) -> dfdaemon_pb2.DownloadTaskRequest:
    """The DownloadTask request for `options` (or one file `url` of -r), writing into `temp_path`."""
    download = DownloadRequest(
        url=url or options.url,
        digest=options.digest,
        tag=options.tag,
        application=options.application,
        priority=options.priority,
        filtered_query_params=options.filtered_query_params,
        request_header=options.headers,
        piece_length=options.piece_length,
        disable_back_to_source=options.disable_back_to_source,
        timeout=options.timeout,
    ).to_proto()
    download.output_path = temp_path
    return dfdaemon_pb2.DownloadTaskRequest(download=download)


def status_failure(status: str, details: str, options: Options) -> DownloadFailed:
    """Our one-line reason for a failed DownloadTask (`status` is the gRPC status name)."""
    details = one_line(details)
    if status == "DEADLINE_EXCEEDED":
        return DownloadFailed(f"timed out after {options.timeout_text}")
    if status == "UNAVAILABLE":
        return DownloadFailed(f"lost the dfdaemon at {options.endpoint}: {details or 'unavailable'}")
    if status == "UNIMPLEMENTED":
        return DownloadFailed(f"{options.endpoint} does not serve dfdaemon downloads: {details}")
    return DownloadFailed(details or f"dfdaemon failed the download ({status})")


class ResponseTracker:
    """What DownloadTask's responses tell dfget: the content length, and progress per new piece."""

    def __init__(self, progress: ProgressBar) -> None:
        self.progress = progress
        self.content_length: int | None = None
        self._seen: set[int] = set()

    def take(self, response: dfdaemon_pb2.DownloadTaskResponse) -> None:
        kind = response.WhichOneof("response")
        if kind == "download_task_started_response":
            started = response.download_task_started_response
            self.content_length = started.content_length
            already = 0
            for piece in started.pieces:
                if piece.number not in self._seen:
                    self._seen.add(piece.number)
                    already += piece.length
            self.progress.start(started.content_length, started.content_length if started.is_finished else already)
            log.info("task %s: %s", response.task_id, format_size(started.content_length))
        elif kind == "download_piece_finished_response":
            piece = response.download_piece_finished_response.piece
            if piece.number not in self._seen:
                self._seen.add(piece.number)
                self.progress.advance(piece.length)


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


class PendingOutput:
    """FILE's temporary file while the daemon fills it: moved onto FILE once checked, removed
    otherwise (on every failure, Ctrl-C and SIGTERM)."""

    def __init__(self, output: str, options: Options, progress: ProgressBar) -> None:
        try:
            self.temp: TempFile = create_temp(output)
        except OSError as exc:
            raise DownloadFailed(f"cannot create a temporary file next to {output}: {exc.strerror or exc}") from None
        self.output = output
        self.options = options
        self.progress = progress
        self._placed = False

    def complete(self, content_length: int | None) -> int:
        """Check the temporary file and move it onto FILE; the bytes it holds."""
        try:
            verify_file(self.temp.path, content_length, self.options.digest)
            self.progress.finish(success=True)
            place(self.temp, self.output, overwrite=self.options.overwrite)
            self._placed = True
            return os.stat(self.output).st_size
        except OSError as exc:
            raise DownloadFailed(f"cannot write {self.output}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if not self._placed:
            self.progress.finish(success=False)
            self.temp.remove()
        self.temp.close()


@contextlib.contextmanager
def pending_output(url: str, output: str, options: Options, progress: ProgressBar) -> Iterator[PendingOutput]:
    """A :class:`PendingOutput` for `url` into `output`, closed on the way out."""
    pending = PendingOutput(output, options, progress)
    log.debug("%s -> %s (via %s)", url, output, pending.temp.path)
    try:
        yield pending
    finally:
        pending.close()


# --- the download socket (one file) -------------------------------------------------------


def connect_download_socket(endpoint: str) -> socket.socket | None:
    """A connection to the daemon's download socket beside `endpoint`; None when it has none
    (another dfdaemon, or an older one), or when that name is not a socket of the owner of
    `endpoint` (someone else's, in a directory others may write): then dfget speaks gRPC."""
    path = stream_socket_path(endpoint)
    try:
        ours, theirs = os.stat(endpoint), os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISSOCK(theirs.st_mode) or theirs.st_uid != ours.st_uid:
        log.warning("%s is not the dfdaemon's download socket (not a socket of the owner of %s): "
                    "using gRPC", path, endpoint)
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        log.debug("no download socket at %s (%s): using gRPC", path, exc.strerror or exc)
        return None
    return sock


def stream_download(sock: socket.socket, request: dfdaemon_pb2.DownloadTaskRequest, options: Options,
                    progress: ProgressBar) -> int | None:
    """Have the daemon write the content, over the download socket; the content length, when told."""
    deadline = time.monotonic() + options.timeout
    redraw = None if isinstance(progress, NoProgress) else 1 / PROGRESS_REDRAWS_PER_SECOND
    tracker = ResponseTracker(progress)
    frames = FrameReader(sock)
    try:
        sock.sendall(encode_frame(REQUEST, request.SerializeToString()))
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise status_failure("DEADLINE_EXCEEDED", "", options)
            sock.settimeout(remaining if redraw is None else min(remaining, redraw))
            try:
                kind, payload = frames.read()
            except TimeoutError:
                progress.tick()
                continue
            if kind == RESPONSE:
                tracker.take(dfdaemon_pb2.DownloadTaskResponse.FromString(payload))
            elif kind == DONE:
                return tracker.content_length
            elif kind == ERROR:
                raise status_failure(*decode_error(payload), options)
            else:
                raise DownloadFailed(f"the dfdaemon sent a {kind.decode()} frame on {sock.getpeername()}")
    except (ConnectionError, FrameError, DecodeError) as exc:
        raise status_failure("UNAVAILABLE", str(exc), options) from None


def download_one(sock: socket.socket, options: Options, stderr: TextIO) -> None:
    """URL into FILE, over the download socket."""
    progress = progress_display(options, stderr)
    with pending_output(options.url, options.output, options, progress) as pending:
        pending.complete(stream_download(sock, build_request(options, pending.temp.path), options, progress))


# --- running it ----------------------------------------------------------------------------


def download(options: Options, stderr: TextIO) -> None:
    """Download into FILE (or the tree into the directory) or raise; FILE is replaced only by the
    complete, checked content, and only with --overwrite."""
    if options.recursive:
        check_output_directory(options.output)
    else:
        check_output(options.output, overwrite=options.overwrite)
        sweep_directory(os.path.dirname(options.output))
        sock = connect_download_socket(options.endpoint)
        if sock is not None:
            with sock:
                download_one(sock, options, stderr)
            return
    probe_endpoint(options.endpoint)
    # gRPC (and asyncio) only when needed: loading them is most of a short dfget's CPU.
    from peer import dfget_grpc

    dfget_grpc.download(options, stderr)


def terminated() -> DownloadFailed:
    return DownloadFailed("terminated (SIGTERM)")


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise terminated()


def _configure_logging(level: str, stderr: TextIO) -> None:
    handler = logging.StreamHandler(stderr)
    handler.setFormatter(logging.Formatter("dfget: %(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(LOG_LEVELS[level])
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """The ``dfget`` console script; returns the exit status."""
    try:
        options = parse_options(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or EXIT_OK
        return EXIT_USAGE
    _configure_logging(options.log_level, sys.stderr)
    # SIGTERM ends dfget like Ctrl-C: the exception unwinds the download, its temporary file goes.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        download(options, sys.stderr)
    except DamselflyError as exc:
        print(f"dfget: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("dfget: error: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
