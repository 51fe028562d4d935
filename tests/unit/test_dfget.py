"""dfget against a fake dfdaemon.

The fake serves ``DfdaemonDownload.DownloadTask`` on a unix socket from a thread pool: it writes
the scenario's bytes to ``download.output_path`` and streams the started and piece messages, or
aborts, or stops answering. What is tested is dfget's own logic: the request it sends, the
temporary file, the digest re-check, the atomic rename, cleanup and messages. The integration
tests run dfget against the real daemon.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc

from common.errors import DownloadFailed, InvalidRequest
from peer import dfget, dfget_listing, dfget_output, download_socket, output_fill
from tests.support.page_cache import resident_pages

REPO = Path(__file__).resolve().parents[2]
URL = "http://origin.example/files/blob.bin"
CONTENT = os.urandom(300_000)
PIECE = 64 * 1024


@dataclass
class Scenario:
    """What the fake daemon does with the next request."""

    content: bytes = CONTENT
    announced_length: int | None = None  # content_length in the started message (default: len)
    fail_after: int | None = None  # abort after writing this many bytes
    error: tuple[grpc.StatusCode, str] = (grpc.StatusCode.INTERNAL, "origin answered 404 for the URL")
    hang_after: int | None = None  # stop answering after writing this many bytes
    requests: list[dfdaemon_pb2.DownloadTaskRequest] = field(default_factory=list)
    transports: list[str] = field(default_factory=list)  # how each request came
    hanging: threading.Event = field(default_factory=threading.Event)
    after_write: Any = None  # called once the content is written
    release: threading.Event = field(default_factory=threading.Event)


class FakeDaemon(dfdaemon_pb2_grpc.DfdaemonDownloadServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.scenario = Scenario()

    def DownloadTask(self, request: dfdaemon_pb2.DownloadTaskRequest, context: Any) -> Iterator[Any]:
        sc = self.scenario
        sc.requests.append(request)
        sc.transports.append("download-socket" if isinstance(context, _FrameContext) else "grpc")
        content = sc.content
        length = len(content) if sc.announced_length is None else sc.announced_length
        yield dfdaemon_pb2.DownloadTaskResponse(
            task_id="t",
            download_task_started_response=dfdaemon_pb2.DownloadTaskStartedResponse(content_length=length),
        )
        with open(request.download.output_path, "wb") as out:
            for number, offset in enumerate(range(0, len(content), PIECE)):
                if sc.fail_after is not None and offset >= sc.fail_after:
                    out.flush()
                    context.abort(*sc.error)
                if sc.hang_after is not None and offset >= sc.hang_after:
                    out.flush()
                    sc.hanging.set()
                    sc.release.wait()
                    return
                chunk = content[offset : offset + PIECE]
                out.write(chunk)
                piece = common_pb2.Piece(number=number, offset=offset, length=len(chunk))
                yield dfdaemon_pb2.DownloadTaskResponse(
                    task_id="t",
                    download_piece_finished_response=dfdaemon_pb2.DownloadPieceFinishedResponse(piece=piece),
                )
        if sc.after_write is not None:
            sc.after_write()


class _Abort(Exception):
    """What ``context.abort`` raises in the fake's download-socket server."""


class _FrameContext:
    """The gRPC context the fake's DownloadTask is given on the download socket."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Abort(code, details)


def serve_download_socket(path: str, fake: FakeDaemon) -> socket.socket:
    """The fake's DownloadTask on the download socket (peer.download_socket), one thread per client."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()

    def one(client: socket.socket) -> None:
        with client:
            try:
                kind, payload = download_socket.FrameReader(client, download_socket.MAX_REQUEST_BYTES).read()
                assert kind == download_socket.REQUEST
                request = dfdaemon_pb2.DownloadTaskRequest.FromString(payload)
                try:
                    for response in fake.DownloadTask(request, _FrameContext()):
                        client.sendall(download_socket.encode_frame(download_socket.RESPONSE,
                                                                    response.SerializeToString()))
                except _Abort as abort:
                    code, details = abort.args
                    client.sendall(download_socket.encode_error(code.name, details))
                else:
                    client.sendall(download_socket.encode_frame(download_socket.DONE))
            except OSError:
                pass  # dfget went away

    def accept() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=one, args=(client,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener


@dataclass
class Daemon:
    socket: str
    fake: FakeDaemon
    transport: str

    @property
    def scenario(self) -> Scenario:
        return self.fake.scenario


@pytest.fixture
def short_dir() -> Iterator[str]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="dfget-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["grpc", "download-socket"])
def daemon(short_dir: str, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    """The fake on gRPC alone (dfget's way to another dfdaemon) or also on the download socket
    beside it (dfget's way to ours): every scenario runs both ways."""
    path = os.path.join(short_dir, "d.sock")
    fake = FakeDaemon()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    dfdaemon_pb2_grpc.add_DfdaemonDownloadServicer_to_server(fake, server)
    server.add_insecure_port(f"unix://{path}")
    server.start()
    listener = None
    if request.param == "download-socket":
        listener = serve_download_socket(download_socket.stream_socket_path(path), fake)
    yield Daemon(path, fake, request.param)
    fake.scenario.release.set()
    server.stop(None)
    if listener is not None:
        listener.close()


def run(daemon_socket: str, output: Path, *extra: str, url: str = URL) -> int:
    return dfget.main([url, "-O", str(output), "--endpoint", daemon_socket, *extra])


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("dfget: error: ")]


# --- success ---------------------------------------------------------------------------------


def test_success_writes_exact_content_and_carries_request_fields(
    daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "blob.bin"
    digest = "sha256:" + hashlib.sha256(CONTENT).hexdigest()

    code = run(daemon.socket, output, "--digest", digest.upper().replace("SHA256", "sha256"),
               "-H", "Authorization: Bearer abc", "-H", "X-Extra:  one ", "-H", "x-extra: two",
               "--tag", "v1", "--application", "app", "--priority", "3",
               "--filtered-query-param", "Signature,Expires", "--filtered-query-param", "token",
               "--timeout", "5m", "--disable-back-to-source")

    assert code == 0, capsys.readouterr().err
    assert hashlib.sha256(output.read_bytes()).hexdigest() == digest.split(":")[1]
    assert entries(tmp_path) == ["blob.bin"]
    assert capsys.readouterr().err == ""  # not a terminal: no progress bar
    [request] = daemon.scenario.requests
    assert daemon.scenario.transports == [daemon.transport]
    d = request.download
    assert d.url == URL
    assert d.digest == digest
    assert dict(d.request_header) == {"Authorization": "Bearer abc", "X-Extra": "one, two"}
    assert (d.tag, d.application) == ("v1", "app")
    assert d.priority == common_pb2.Priority.Value("LEVEL3")
    assert list(d.filtered_query_params) == ["Signature", "Expires", "token"]
    assert d.timeout.seconds == 300
    assert d.disable_back_to_source is True
    assert os.path.isabs(d.output_path)
    assert os.path.dirname(d.output_path) == str(tmp_path)
    assert os.path.basename(d.output_path).startswith(".blob.bin.dfget-")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the socket to another user takes root")
def test_a_download_socket_of_another_user_is_not_used(
    daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a directory others may write, someone else could listen at <endpoint>.stream and read
    dfget's requests (URLs, Authorization headers): dfget takes it only from the endpoint's owner."""
    if daemon.transport != "download-socket":
        pytest.skip("only the fake with a download socket has one to hand over")
    os.chown(download_socket.stream_socket_path(daemon.socket), 65534, 65534)
    output = tmp_path / "blob.bin"

    assert run(daemon.socket, output) == 0
    assert daemon.scenario.transports == ["grpc"]
    assert output.read_bytes() == CONTENT
    assert "is not the dfdaemon's download socket" in capsys.readouterr().err


def test_relative_output_is_made_absolute_and_replaces_existing_file_with_overwrite(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "out").write_bytes(b"old")
    monkeypatch.chdir(tmp_path)

    assert run(daemon.socket, Path("out"), "--overwrite") == 0

    assert (tmp_path / "out").read_bytes() == CONTENT
    [request] = daemon.scenario.requests
    assert os.path.dirname(request.download.output_path) == str(tmp_path)
    assert request.download.digest == ""
    assert request.download.timeout.seconds == 2 * 3600
    assert request.download.priority == common_pb2.Priority.Value("LEVEL6")  # Dragonfly's default
    assert not request.download.HasField("piece_length")
    assert entries(tmp_path) == ["out"]


def test_existing_file_is_refused_without_overwrite(
    daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "blob.bin"
    output.write_bytes(b"precious")

    assert run(daemon.socket, output) == 1

    assert error_lines(capsys.readouterr().err) == [f"dfget: error: {output} exists; pass --overwrite to replace it"]
    assert output.read_bytes() == b"precious"
    assert daemon.scenario.requests == []  # refused before downloading anything
    assert entries(tmp_path) == ["blob.bin"]


def test_file_that_appears_during_the_download_is_not_clobbered(
    daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "blob.bin"
    daemon.scenario.after_write = lambda: output.write_bytes(b"someone else's")

    assert run(daemon.socket, output) == 1

    [line] = error_lines(capsys.readouterr().err)
    assert "appeared during the download" in line and "--overwrite" in line
    assert output.read_bytes() == b"someone else's"
    assert entries(tmp_path) == ["blob.bin"]


def test_empty_content(daemon: Daemon, tmp_path: Path) -> None:
    daemon.scenario.content = b""
    output = tmp_path / "empty"
    digest = "sha256:" + hashlib.sha256(b"").hexdigest()

    assert run(daemon.socket, output, "--digest", digest) == 0

    assert output.read_bytes() == b""


# --- failures leave nothing behind -----------------------------------------------------------


def test_daemon_error_exits_1_with_one_line_and_leaves_nothing(
    daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.scenario.fail_after = 2 * PIECE
    daemon.scenario.error = (grpc.StatusCode.NOT_FOUND, "origin answered 404\nfor http://origin.example/x")

    code = run(daemon.socket, tmp_path / "blob.bin")

    assert code == 1
    err = capsys.readouterr().err
    assert err == "dfget: error: origin answered 404 for http://origin.example/x\n"
    assert entries(tmp_path) == []


def test_existing_file_untouched_on_failure(
    daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "blob.bin"
    output.write_bytes(b"previous version")
    daemon.scenario.fail_after = PIECE

    assert run(daemon.socket, output, "--overwrite") == 1

    assert output.read_bytes() == b"previous version"
    assert entries(tmp_path) == ["blob.bin"]
    assert len(error_lines(capsys.readouterr().err)) == 1


def test_wrong_digest_exits_1_and_leaves_no_file(
    daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The fake daemon does not check digests, so this is dfget's own re-check at work.
    wrong = "sha256:" + "0" * 64
    output = tmp_path / "blob.bin"
    output.write_bytes(b"keep me")

    code = run(daemon.socket, output, "--digest", wrong, "--overwrite")

    assert code == 1
    [line] = error_lines(capsys.readouterr().err)
    assert "does not match" in line and wrong in line
    assert output.read_bytes() == b"keep me"
    assert entries(tmp_path) == ["blob.bin"]


def test_short_content_is_a_failure(
    daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.scenario.announced_length = len(CONTENT) + 1

    assert run(daemon.socket, tmp_path / "blob.bin") == 1

    [line] = error_lines(capsys.readouterr().err)
    assert f"announced {len(CONTENT) + 1} bytes but wrote {len(CONTENT)}" in line
    assert entries(tmp_path) == []


def test_timeout_is_the_rpc_deadline(
    daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.scenario.hang_after = PIECE

    code = run(daemon.socket, tmp_path / "blob.bin", "--timeout", "300ms")

    assert code == 1
    assert error_lines(capsys.readouterr().err) == ["dfget: error: timed out after 300ms"]
    assert daemon.scenario.hanging.is_set()
    assert entries(tmp_path) == []


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_removes_the_temporary_file(daemon: Daemon, tmp_path: Path) -> None:
    output = tmp_path / "blob.bin"
    output.write_bytes(b"old")
    daemon.scenario.hang_after = PIECE
    proc = subprocess.Popen(
        [sys.executable, "-m", "peer.dfget", URL, "-O", str(output), "--endpoint", daemon.socket, "--overwrite"],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as a terminal delivers it: the test runner may run with SIGINT ignored (a job
        # started with '&' by a shell without job control), and a child inherits that.
        preexec_fn=_default_sigint,
    )
    try:
        assert daemon.scenario.hanging.wait(timeout=30)
        assert any(name.startswith(".blob.bin.dfget-") for name in entries(tmp_path))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert error_lines(err) == ["dfget: error: interrupted"]
    assert entries(tmp_path) == ["blob.bin"]
    assert output.read_bytes() == b"old"


# --- no daemon -------------------------------------------------------------------------------


def test_missing_socket_fails_fast_with_a_hint(
    short_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = os.path.join(short_dir, "absent.sock")
    started = time.monotonic()

    code = run(endpoint, tmp_path / "blob.bin")

    assert code == 1
    assert time.monotonic() - started < 5
    [line] = error_lines(capsys.readouterr().err)
    assert f"no dfdaemon answers at {endpoint}" in line
    assert "is it running?" in line and "damselfly up" in line
    assert entries(tmp_path) == []


def test_stale_socket_fails_fast(short_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    endpoint = os.path.join(short_dir, "stale.sock")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(endpoint)  # the file exists but nobody listens: connection refused
    started = time.monotonic()

    code = run(endpoint, tmp_path / "blob.bin")

    assert code == 1
    assert time.monotonic() - started < 5
    [line] = error_lines(capsys.readouterr().err)
    assert "no dfdaemon answers at" in line and "connection refused" in line


def test_console_script_reports_missing_daemon(short_dir: str, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "dfget"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "peer.dfget"]
    endpoint = os.path.join(short_dir, "none.sock")

    done = subprocess.run([*command, URL, "-O", str(tmp_path / "f"), "--endpoint", endpoint],
                          cwd=REPO, capture_output=True, text=True, timeout=60)

    assert done.returncode == 1
    assert done.stderr.startswith(f"dfget: error: no dfdaemon answers at {endpoint}")
    assert done.stderr.count("\n") == 1


# --- usage errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        ["-H", "no colon here"],
        ["-H", ": empty name"],
        ["-H", "Bad Name: x"],
        ["--digest", "sha256:1234"],
        ["--digest", "md5:" + "0" * 32],
        ["--priority", "7"],
        ["--priority", "-1"],
        ["-p", "LEVEL7"],
        ["--piece-length", "1MiB"],
        ["--piece-length", "128MiB"],
        ["--piece-length", "big"],
        ["--max-files", "0"],
        ["-l", "loud"],
        ["-r", "--include-files", "../secret"],
        ["-r", "--include-files", "/etc/passwd"],
        ["--include-files", "a.txt"],  # without -r
        ["-r", "--digest", "sha256:" + "0" * 64],
        ["--timeout", "soon"],
        ["--timeout", "0s"],
    ],
)
def test_usage_errors_exit_2_before_connecting(
    extra: list[str], daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(daemon.socket, tmp_path / "f", *extra) == 2
    assert "usage: dfget" in capsys.readouterr().err
    assert daemon.scenario.requests == []


@pytest.mark.parametrize("url", ["ftp://origin.example/x", "/local/path", "http://"])
def test_bad_url_is_a_usage_error(url: str, daemon: Daemon, tmp_path: Path) -> None:
    assert run(daemon.socket, tmp_path / "f", url=url) == 2
    assert daemon.scenario.requests == []


def test_missing_output_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert dfget.main([URL]) == 2
    assert "-O/--output" in capsys.readouterr().err


def test_version_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert dfget.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("dfget (damselfly) ")


def test_a_download_does_not_look_up_the_version() -> None:
    """importlib.metadata costs every dfget start tens of ms of CPU: only --version loads it."""
    probe = ("import sys; from peer import dfget; "
             f"dfget.parse_options([{URL!r}, '-O', '/tmp/out']); print('importlib.metadata' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                            cwd=Path(dfget.__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("make_output", "message"),
    [
        (lambda d: d / "missing" / "f", "does not exist"),
        (lambda d: d, "is a directory"),
    ],
)
def test_unusable_output_path(
    make_output: Any, message: str, daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(daemon.socket, make_output(tmp_path)) == 1
    [line] = error_lines(capsys.readouterr().err)
    assert message in line
    assert daemon.scenario.requests == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_output_dir(daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tmp_path.chmod(0o500)
    try:
        assert run(daemon.socket, tmp_path / "f") == 1
    finally:
        tmp_path.chmod(0o700)
    assert "not writable" in capsys.readouterr().err


# --- parsing helpers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], ()),
        (["a"], ("a",)),
        (["a,b", "c"], ("a", "b", "c")),
        ([" a , ,b", "a"], ("a", "b")),
    ],
)
def test_split_names(values: list[str], expected: tuple[str, ...]) -> None:
    assert dfget.split_names(values) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Range: bytes=0-9", ("Range", "bytes=0-9")),
        ("X-A:b:c", ("X-A", "b:c")),
        ("X-Empty:", ("X-Empty", "")),
    ],
)
def test_parse_header(text: str, expected: tuple[str, str]) -> None:
    assert dfget.parse_header(text) == expected


# --- progress --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("done", "total", "elapsed", "expected"),
    [
        # Waiting for the first byte says so, with the time waited (it used to show nothing).
        (0, None, 3.0, "waiting for the first byte  0:03"),
        (0, 100 * 2**20, 0.0, "  0%  0 B / 100.0 MiB  waiting for the first byte  0:00"),
        # Speed in the same binary units as the sizes (it used to be MB/s next to MiB).
        (50 * 2**20, 100 * 2**20, 2.0, " 50%  50.0 MiB / 100.0 MiB  25.0 MiB/s  ETA 0:02"),
        (1, 4 * 2**30, 3600.0, "  0%  1 B / 4.0 GiB  0 B/s  ETA --:--"),
        (2**30, 4 * 2**30, 10.0, " 25%  1.0 GiB / 4.0 GiB  102.4 MiB/s  ETA 0:30"),
        (2**30, 4 * 2**30, 1200.0, " 25%  1.0 GiB / 4.0 GiB  873.8 KiB/s  ETA 1:00:00"),
        (2048, None, 1.0, "2.0 KiB  2.0 KiB/s"),
        # Every piece in, the copy and checks still running: no "ETA 0:00" with a falling speed.
        (100 * 2**20, 100 * 2**20, 4.0, "100%  100.0 MiB / 100.0 MiB  finishing  0:04"),
    ],
)
def test_format_progress(done: int, total: int | None, elapsed: float, expected: str) -> None:
    assert dfget.format_progress(done, total, elapsed) == expected


@pytest.mark.parametrize(
    ("done", "total", "elapsed", "expected"),
    [
        # The last line tells how long it took ("in"), not an "ETA" that was the elapsed time.
        (100 * 2**20, 100 * 2**20, 4.0, "100%  100.0 MiB  25.0 MiB/s  in 0:04"),
        (0, 0, 0.0, "100%  0 B  0 B/s  in 0:00"),
    ],
)
def test_format_progress_finished(done: int, total: int, elapsed: float, expected: str) -> None:
    line = dfget.format_progress(done, total, elapsed, finished=True)
    assert line == expected
    assert "ETA" not in line


def test_progress_bar_ticks_while_waiting_for_the_first_byte() -> None:
    stream, clock = io.StringIO(), Clock()
    bar = dfget.ProgressBar(stream, clock)
    clock.now += 2.0
    bar.tick()
    assert stream.getvalue().split("\r")[-1].startswith("waiting for the first byte  0:02")
    clock.now += 1.0
    bar.tick()
    assert stream.getvalue().split("\r")[-1].startswith("waiting for the first byte  0:03")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_bar_redraws_at_most_ten_times_a_second() -> None:
    stream, clock = io.StringIO(), Clock()
    bar = dfget.ProgressBar(stream, clock)
    bar.start(1000)
    assert stream.getvalue().count("\r") == 1

    clock.now += 0.05
    bar.advance(100)  # too soon after the last draw
    assert stream.getvalue().count("\r") == 1
    clock.now += 0.06
    bar.advance(100)
    assert stream.getvalue().count("\r") == 2
    assert " 20%" in stream.getvalue().split("\r")[-1]

    bar.finish(success=True)
    assert stream.getvalue().split("\r")[-1].startswith("100%")
    assert stream.getvalue().endswith("\n")


def test_progress_bar_draws_nothing_after_the_final_line() -> None:
    stream, clock = io.StringIO(), Clock()
    bar = dfget.ProgressBar(stream, clock)
    bar.start(1000)
    bar.finish(success=True)
    final = stream.getvalue()
    clock.now += 1.0
    bar.tick()  # the redraw task may tick once more before it is cancelled
    bar.finish(success=False)
    assert stream.getvalue() == final and final.endswith("\n")


def test_progress_bar_on_failure_only_ends_the_line() -> None:
    stream, clock = io.StringIO(), Clock()
    bar = dfget.ProgressBar(stream, clock)
    bar.start(1000)
    clock.now += 1
    bar.advance(300)
    bar.finish(success=False)
    assert " 30%" in stream.getvalue().split("\r")[-1]
    assert stream.getvalue().endswith("\n")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("fail", [False, True])
def test_progress_bar_on_a_terminal(fail: bool, daemon: Daemon, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    if fail:
        daemon.scenario.fail_after = 2 * PIECE

    code = run(daemon.socket, tmp_path / "blob.bin")

    *draws, last = terminal.getvalue().split("\r")
    assert draws and draws[0] == ""
    if fail:
        assert code == 1
        assert last.endswith("\n" + "dfget: error: origin answered 404 for the URL\n")
    else:
        assert code == 0
        assert last.startswith("100%  293.0 KiB  ") and " in 0:0" in last and last.endswith("\n")


def test_no_progress_flag_on_a_terminal(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert run(daemon.socket, tmp_path / "blob.bin", "--no-progress") == 0
    assert terminal.getvalue() == ""


def test_no_progress_writes_nothing() -> None:
    stream = io.StringIO()
    bar = dfget.NoProgress(stream)
    bar.start(10)
    bar.advance(10)
    bar.finish(success=True)
    assert stream.getvalue() == ""


# --- Dragonfly's flags and DFGET_* variables -------------------------------------------------


def test_dragonfly_short_flags(daemon: Daemon, tmp_path: Path) -> None:
    output = tmp_path / "blob.bin"
    code = dfget.main([URL, "-O", str(output), "-e", daemon.socket, "-p", "LEVEL3", "-l", "error",
                       "--piece-length", "8MiB"])
    assert code == 0
    [request] = daemon.scenario.requests
    assert request.download.priority == common_pb2.Priority.Value("LEVEL3")
    assert request.download.piece_length == 8 << 20


def test_short_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert dfget.main(["-V"]) == 0
    assert capsys.readouterr().out.startswith("dfget (damselfly) ")


def test_environment_variables_set_defaults_and_flags_win(tmp_path: Path) -> None:
    env = {"DFGET_ENDPOINT": "/run/env.sock", "DFGET_TIMEOUT": "30m", "DFGET_PRIORITY": "2",
           "DFGET_PIECE_LENGTH": "16mib", "DFGET_TAG": "t", "DFGET_APPLICATION": "a",
           "DFGET_DISABLE_BACK_TO_SOURCE": "true", "DFGET_OVERWRITE": "yes", "DFGET_NO_PROGRESS": "1",
           "DFGET_LOG_LEVEL": "debug", "DFGET_MAX_FILES": "7", "DFGET_MAX_CONCURRENT_REQUESTS": "2"}
    out = str(tmp_path / "f")

    from_env = dfget.parse_options([URL, "-O", out], env)
    assert (from_env.endpoint, from_env.timeout, from_env.priority, from_env.piece_length) == (
        "/run/env.sock", 1800.0, 2, 16 << 20)
    assert (from_env.tag, from_env.application, from_env.log_level) == ("t", "a", "debug")
    assert from_env.disable_back_to_source and from_env.overwrite and not from_env.progress
    assert (from_env.max_files, from_env.max_concurrent_requests) == (7, 2)

    flags = dfget.parse_options([URL, "-O", out, "-e", "/run/flag.sock", "--timeout", "5s", "-p", "5",
                                 "--tag", "x", "-l", "info", "--max-files", "9"], env)
    assert (flags.endpoint, flags.timeout, flags.priority, flags.tag, flags.log_level, flags.max_files) == (
        "/run/flag.sock", 5.0, 5, "x", "info", 9)

    plain = dfget.parse_options([URL, "-O", out], {})
    assert (plain.endpoint, plain.priority, plain.overwrite, plain.progress) == (
        dfget.DEFAULT_ENDPOINT, 6, False, True)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("DFGET_PRIORITY", "9"), ("DFGET_OVERWRITE", "maybe"), ("DFGET_PIECE_LENGTH", "1k"),
     ("DFGET_MAX_FILES", "-3"), ("DFGET_LOG_LEVEL", "chatty")],
)
def test_bad_environment_variable_is_a_usage_error_naming_it(
    variable: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    assert dfget.main([URL, "-O", str(tmp_path / "f")]) == 2
    assert f"environment variable {variable}" in capsys.readouterr().err


def test_sha512_digest_is_checked(daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = "sha512:" + hashlib.sha512(CONTENT).hexdigest()
    assert run(daemon.socket, tmp_path / "good", "--digest", good) == 0
    assert (tmp_path / "good").read_bytes() == CONTENT

    wrong = "sha512:" + "0" * 128
    assert run(daemon.socket, tmp_path / "bad", "--digest", wrong) == 1
    [line] = error_lines(capsys.readouterr().err)
    assert "does not match" in line and wrong in line
    assert entries(tmp_path) == ["good"]


# --- killed dfget: SIGTERM cleans up, SIGKILL leaves a stale file the next run removes ---------


def _start_dfget(daemon: Daemon, output: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "peer.dfget", URL, "-O", str(output), "--endpoint", daemon.socket, *extra],
        cwd=REPO, stderr=subprocess.PIPE, text=True)


def test_sigterm_removes_the_temporary_file(daemon: Daemon, tmp_path: Path) -> None:
    output = tmp_path / "blob.bin"
    daemon.scenario.hang_after = PIECE
    proc = _start_dfget(daemon, output)
    try:
        assert daemon.scenario.hanging.wait(timeout=30)
        assert any(dfget_output.is_temp_name(name) for name in entries(tmp_path))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert error_lines(err) == ["dfget: error: terminated (SIGTERM)"]
    assert entries(tmp_path) == []


def test_sigkill_leaves_a_stale_file_that_the_next_run_removes(daemon: Daemon, tmp_path: Path) -> None:
    output = tmp_path / "blob.bin"
    daemon.scenario.hang_after = 2 * PIECE
    proc = _start_dfget(daemon, output)
    try:
        assert daemon.scenario.hanging.wait(timeout=30)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    [stale] = entries(tmp_path)
    assert dfget_output.is_temp_name(stale) and (tmp_path / stale).stat().st_size == 2 * PIECE
    daemon.scenario.release.set()
    daemon.fake.scenario = Scenario()

    assert run(daemon.socket, output) == 0

    assert entries(tmp_path) == ["blob.bin"]
    assert output.read_bytes() == CONTENT


def test_sweep_spares_a_temporary_file_a_running_dfget_holds(tmp_path: Path) -> None:
    output = str(tmp_path / "out.bin")
    held = dfget_output.create_temp(output)
    abandoned = dfget_output.create_temp(output)
    abandoned.close()  # its dfget is gone: the lock is released
    unrelated = tmp_path / ".out.bin.dfget-notours"
    unrelated.write_bytes(b"x")
    try:
        removed = dfget_output.sweep_stale(str(tmp_path))
        assert removed == [os.path.basename(abandoned.path)]
        assert sorted(entries(tmp_path)) == sorted([os.path.basename(held.path), unrelated.name])
    finally:
        held.remove()
    assert entries(tmp_path) == [unrelated.name]


@pytest.mark.parametrize("o_tmpfile", [True, False], ids=["O_TMPFILE", "named-create"])
def test_a_sweep_between_create_and_lock_spares_the_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, o_tmpfile: bool
) -> None:
    """Another dfget's sweep that runs at the worst moment — the file exists, its lock not yet
    taken — must not remove it (seen on this machine, where linking an O_TMPFILE fails with EXDEV:
    one of 16 concurrent dfgets into one directory lost its file)."""
    import fcntl
    real_open, real_flock = os.open, fcntl.flock
    if not o_tmpfile:
        def no_tmpfile(path: str, flags: int, *args: int) -> int:
            if flags & os.O_TMPFILE == os.O_TMPFILE:
                raise OSError(errno.EOPNOTSUPP, "no O_TMPFILE here")
            return real_open(path, flags, *args)
        monkeypatch.setattr(os, "open", no_tmpfile)
    swept: list[list[str]] = []

    def sweep_then_lock(fd: int, operation: int) -> None:
        if not swept:
            swept.append(dfget_output.sweep_stale(str(tmp_path)))
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", sweep_then_lock)
    temp = dfget_output.create_temp(str(tmp_path / "out.bin"))
    monkeypatch.undo()
    try:
        assert swept == [[]], "the sweep removed a file being created"
        assert entries(tmp_path) == [os.path.basename(temp.path)]
        assert dfget_output.is_temp_name(os.path.basename(temp.path))
        with open(temp.path, "rb") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        temp.remove()


def test_a_file_left_mid_create_is_swept_once_it_is_old(tmp_path: Path) -> None:
    left = tmp_path / f".out.bin.dfget-{'ab' * 6}{dfget_output.CREATING_SUFFIX}"
    left.write_bytes(b"")
    assert dfget_output.sweep_stale(str(tmp_path)) == []  # may still be a dfget about to lock it
    old = time.time() - dfget_output.CREATING_GRACE - 1
    os.utime(left, (old, old))
    assert dfget_output.sweep_stale(str(tmp_path)) == [left.name]


def test_temporary_file_belongs_to_dfget_and_is_locked(tmp_path: Path) -> None:
    temp = dfget_output.create_temp(str(tmp_path / "f"))
    try:
        info = os.stat(temp.path)
        assert info.st_uid == os.geteuid() and info.st_nlink == 1 and info.st_size == 0
        import fcntl
        with open(temp.path, "rb") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        temp.remove()
    assert entries(tmp_path) == []


# --- the daemon side of the output file --------------------------------------------------------


@pytest.fixture
def cached(tmp_path: Path) -> Path:
    source = tmp_path / "cache.bin"
    source.write_bytes(os.urandom(3 * 2**20 + 17))
    return source


def test_copy_into_keeps_the_clients_file(cached: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output_fill, "COPY_STEP", 2**20)
    temp = dfget_output.create_temp(str(tmp_path / "out"))
    before = os.stat(temp.path)
    try:
        output_fill.copy_into(cached, Path(temp.path), threading.Event())
        after = os.stat(temp.path)
        assert (after.st_ino, after.st_uid) == (before.st_ino, before.st_uid)  # written in place
        assert Path(temp.path).read_bytes() == cached.read_bytes()
    finally:
        temp.remove()


def _takes_direct_writes(directory: Path) -> bool:
    try:
        fd = os.open(directory / "direct-probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(directory / "direct-probe")
    return True


@pytest.mark.parametrize("size", [3 * 2**20, 3 * 2**20 + 17, 100])
def test_copy_into_leaves_no_second_copy_in_the_page_cache(tmp_path: Path, size: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's cache holds the bytes in memory already: the client's copy goes around the
    page cache (all but the unaligned tail), and is byte-exact whatever its length."""
    if not _takes_direct_writes(tmp_path):
        pytest.skip(f"the file system of {tmp_path} takes no O_DIRECT writes")
    monkeypatch.setattr(output_fill, "COPY_STEP", 2**20)
    source = tmp_path / "cache.bin"
    source.write_bytes(os.urandom(size))
    temp = dfget_output.create_temp(str(tmp_path / "out"))
    try:
        output_fill.copy_into(source, Path(temp.path), threading.Event())
        resident = resident_pages(Path(temp.path))
        tail_pages = -(-(size % output_fill.DIRECT_ALIGN) // mmap.PAGESIZE)
        assert resident <= tail_pages, f"{resident} pages of the copy are cached"
        assert hashlib.sha256(Path(temp.path).read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()
    finally:
        temp.remove()


def test_copy_into_stops_mid_direct_copy_and_removes_the_file(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output_fill, "COPY_STEP", 2**20)
    source = tmp_path / "cache.bin"
    source.write_bytes(os.urandom(4 * 2**20))
    output = tmp_path / "users" / ".out.dfget-0123456789ab"
    output.parent.mkdir()
    if os.geteuid() == 0:
        os.chown(output.parent, 65534, 65534)
    stop = threading.Event()
    real_pwritev = os.pwritev

    def pwritev_then_stop(fd: int, buffers: Any, offset: int) -> int:
        written = real_pwritev(fd, buffers, offset)
        stop.set()  # the client goes away after the first step
        return written

    monkeypatch.setattr(output_fill.os, "pwritev", pwritev_then_stop)
    output.touch()
    with pytest.raises(DownloadFailed, match="went away"):
        output_fill.copy_into(source, output, stop)
    assert not output.exists()


def _fill(source: Path, output: Path, regions: list[tuple[int, int]], size: int) -> os.stat_result:
    async def run() -> os.stat_result:
        fill = output_fill.OutputFill(output, source)
        await fill.open()
        for offset, length in regions:
            fill.add(offset, length)
            await asyncio.sleep(0)  # copies start while more pieces come
        return await fill.finish(size)
    return asyncio.run(run())


def test_output_fill_copies_pieces_in_any_order_byte_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces arrive out of order (rarest first); each is copied in when it is there, and the
    file ends byte-exact, around the page cache but for the unaligned last piece."""
    monkeypatch.setattr(output_fill, "COPY_STEP", 2**20)
    piece, size = 3 * 2**20 // 2, 5 * 2**20 + 17  # a piece spans two copy steps; the last is short
    source = tmp_path / "cache.bin"
    source.write_bytes(os.urandom(size))
    temp = dfget_output.create_temp(str(tmp_path / "out"))
    try:
        regions = [(n * piece, min(piece, size - n * piece)) for n in (3, 0, 2, 1)]
        info = _fill(source, Path(temp.path), regions, size)
        assert (info.st_ino, info.st_size) == (os.stat(temp.path).st_ino, 0)  # written in place
        if _takes_direct_writes(tmp_path):
            assert resident_pages(Path(temp.path)) <= 1  # the unaligned tail
        assert hashlib.sha256(Path(temp.path).read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()
    finally:
        temp.remove()


def test_output_fill_discarded_mid_copy_removes_the_file_and_closes_after_the_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client went away (or the download failed) while a piece was being copied: the copy
    stops, the file goes, and its descriptors close only once the copying thread let go."""
    monkeypatch.setattr(output_fill, "COPY_STEP", 2**20)
    source = tmp_path / "cache.bin"
    source.write_bytes(os.urandom(8 * 2**20))
    output = tmp_path / ".out.dfget-0123456789ab"
    output.touch()
    in_copy, release = threading.Event(), threading.Event()
    real_copy_range = output_fill._copy_range

    def slow_copy_range(src_fd: int, fd: int, start: int, end: int, stop: threading.Event) -> None:
        in_copy.set()
        release.wait(10)
        real_copy_range(src_fd, fd, start, end, stop)

    monkeypatch.setattr(output_fill, "_copy_range", slow_copy_range)

    async def run() -> list[int]:
        fill = output_fill.OutputFill(output, source)
        await fill.open()
        fill.add(0, 4 * 2**20 + 1)  # direct head, then the (slow) buffered tail
        await asyncio.to_thread(in_copy.wait, 10)
        discarding = asyncio.ensure_future(fill.discard())
        await asyncio.sleep(0.05)
        assert not discarding.done()  # it waits for the thread
        release.set()
        await discarding
        return [fill._fd, fill._source_fd, fill._copier]  # the copier closes its O_DIRECT descriptor

    assert asyncio.run(run()) == [-1, -1, None]
    assert not output.exists()


def test_copy_into_creates_a_missing_file(cached: Path, tmp_path: Path) -> None:
    directory = tmp_path / "users"
    directory.mkdir()
    if os.geteuid() == 0:  # a root daemon creates files only in another owner's directory, as theirs
        os.chown(directory, 65534, 65534)
    output = directory / "new.bin"
    output_fill.copy_into(cached, output, threading.Event())
    assert output.read_bytes() == cached.read_bytes()
    assert os.stat(output).st_uid == os.stat(directory).st_uid


@pytest.mark.skipif(os.geteuid() != 0, reason="the rule of a root daemon")
def test_copy_into_as_root_creates_nothing_in_a_root_directory(cached: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="belongs to root"):
        output_fill.copy_into(cached, tmp_path / "cron-job", threading.Event())
    assert not (tmp_path / "cron-job").exists()


def test_copy_into_refuses_an_existing_file_that_dfget_did_not_create(cached: Path, tmp_path: Path) -> None:
    victim = tmp_path / "shadow"
    victim.write_bytes(b"do not touch")
    with pytest.raises(InvalidRequest, match="not a dfget temporary file"):
        output_fill.copy_into(cached, victim, threading.Event())
    assert victim.read_bytes() == b"do not touch"


@pytest.mark.skipif(os.geteuid() != 0, reason="planting a symlink of another user needs root")
def test_copy_into_refuses_a_directory_symlink_of_a_user(cached: Path, tmp_path: Path) -> None:
    target = tmp_path / "etc"
    target.mkdir()
    victim = target / ".passwd.dfget-0123456789ab"
    victim.write_bytes(b"do not touch")
    link = tmp_path / "innocent"
    link.symlink_to(target)
    os.lchown(link, 65534, 65534)  # planted by a user (root's own symlinks, like /var/run, are followed)
    with pytest.raises(InvalidRequest, match="symbolic link"):
        output_fill.copy_into(cached, link / victim.name, threading.Event())
    assert victim.read_bytes() == b"do not touch"


def test_copy_into_refuses_a_symlink(cached: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"do not touch")
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(InvalidRequest, match="symbolic link"):
        output_fill.copy_into(cached, link, threading.Event())
    assert victim.read_bytes() == b"do not touch"


def test_copy_into_refuses_a_hard_linked_file(cached: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"do not touch")
    os.link(victim, tmp_path / ".second.dfget-0123456789ab")
    with pytest.raises(InvalidRequest, match="hard links"):
        output_fill.copy_into(cached, tmp_path / ".second.dfget-0123456789ab", threading.Event())
    assert victim.read_bytes() == b"do not touch"


def test_copy_into_refuses_a_fifo_without_blocking(cached: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError):
        output_fill.copy_into(cached, fifo, threading.Event())


def test_stopped_copy_removes_what_it_wrote(cached: Path, tmp_path: Path) -> None:
    output = tmp_path / ".out.dfget-0123456789ab"
    output.write_bytes(b"")
    stop = threading.Event()
    stop.set()
    with pytest.raises(DownloadFailed, match="client went away"):
        output_fill.copy_into(cached, output, stop)
    assert not output.exists()


def test_output_fill_discarded_once_it_copied_everything_removes_the_file(cached: Path, tmp_path: Path) -> None:
    """The client went away (or the digest check failed) after every piece was copied in."""
    output = tmp_path / ".out.dfget-0123456789ab"
    output.write_bytes(b"")

    size, content = cached.stat().st_size, cached.read_bytes()

    async def scenario() -> None:
        fill = output_fill.OutputFill(output, cached)
        await fill.open()
        fill.add(0, size)
        while fill._copying is not None and not fill._copying.done():
            await asyncio.shield(fill._copying)
        assert await asyncio.to_thread(output.read_bytes) == content
        await fill.discard()

    asyncio.run(scenario())
    assert entries(tmp_path) == ["cache.bin"]


def test_place_without_overwrite_never_replaces(tmp_path: Path) -> None:
    output = tmp_path / "out"
    temp = dfget_output.create_temp(str(output))
    os.write(temp.fd, b"new")
    output.write_bytes(b"old")
    try:
        with pytest.raises(DownloadFailed, match="--overwrite"):
            dfget_output.place(temp, str(output), overwrite=False)
        assert output.read_bytes() == b"old"
        dfget_output.place(temp, str(output), overwrite=True)
        assert output.read_bytes() == b"new"
    finally:
        temp.close()
    assert entries(tmp_path) == ["out"]


# --- -r: directory listings --------------------------------------------------------------------

ROOT = "http://origin.example/data/"


def test_children_of_a_listing_page() -> None:
    hrefs = ["../", "a.txt", "sub/", "?C=N;O=D", "/data/b.bin", "http://elsewhere/x", "#top",
             "sub/", "/other/c", "a.txt#frag", "%E2%82%AC.txt"]
    files, dirs = dfget_listing.children(ROOT, hrefs)
    assert files == [ROOT + "a.txt", ROOT + "b.bin", ROOT + "%E2%82%AC.txt"]
    assert dirs == [ROOT + "sub/"]


@pytest.mark.parametrize("href", ["%2e%2e/etc", "a%2Fb", "x%00y"])
def test_unsafe_names_are_refused(href: str) -> None:
    with pytest.raises(InvalidRequest):
        dfget_listing.relative_parts(ROOT, ROOT + href)


def test_relative_parts_decode() -> None:
    assert dfget_listing.relative_parts(ROOT, ROOT + "sub/%E2%82%AC%20x.txt") == ("sub", "€ x.txt")


@pytest.mark.parametrize(
    ("relative", "patterns", "expected"),
    [("a.txt", [], True), ("a.txt", ["*.txt"], True), ("sub/a.bin", ["*.txt"], False),
     ("sub/deep/a.bin", ["sub/"], True), ("subway/a.bin", ["sub/"], False), ("sub/a.bin", ["sub/a.bin"], True)],
)
def test_included(relative: str, patterns: list[str], expected: bool) -> None:
    assert dfget_listing.included(relative, patterns) is expected


def _pages(pages: dict[str, list[str]]) -> dfget_listing.Fetcher:
    async def fetch(url: str) -> str:
        return "".join(f'<a href="{href}">{href}</a>' for href in pages[url])
    return fetch


def test_list_files_walks_subdirectories_once() -> None:
    pages = {ROOT: ["../", "a.txt", "sub/", "sub/"], ROOT + "sub/": ["../", "b.txt", "deeper/", "/data/"],
             ROOT + "sub/deeper/": ["c.txt", "/data/sub/"]}
    found = asyncio.run(dfget_listing.list_files("http://origin.example/data", _pages(pages)))
    assert [entry.relative for entry in found] == ["a.txt", "sub/b.txt", "sub/deeper/c.txt"]
    filtered = asyncio.run(dfget_listing.list_files(ROOT, _pages(pages), include=["sub/deeper/"]))
    assert [entry.relative for entry in filtered] == ["sub/deeper/c.txt"]


def test_list_files_refuses_more_than_max_files() -> None:
    pages = {ROOT: [f"f{i}" for i in range(5)]}
    assert len(asyncio.run(dfget_listing.list_files(ROOT, _pages(pages), max_files=5))) == 5
    with pytest.raises(DownloadFailed, match="more than 4 files"):
        asyncio.run(dfget_listing.list_files(ROOT, _pages(pages), max_files=4))


def test_recursive_output_must_be_a_directory(daemon: Daemon, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert run(daemon.socket, tmp_path / "missing", "-r", url=ROOT) == 1
    assert "must be an existing directory" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_copy_into_a_file_the_daemon_may_not_write_names_the_fix(cached: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.write_bytes(b"")
    output.chmod(0o400)
    with pytest.raises(InvalidRequest, match="run dfget as the daemon's user"):
        output_fill.copy_into(cached, output, threading.Event())


def test_log_level_info_names_the_stale_files_it_removes(
    daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "blob.bin"
    stale = dfget_output.create_temp(str(output))
    stale.close()  # as if its dfget had been killed

    assert run(daemon.socket, output, "-l", "info") == 0

    err = capsys.readouterr().err
    assert f"dfget: INFO: removed {stale.path}, left by a dfget that did not finish" in err
    assert entries(tmp_path) == ["blob.bin"]


# (what dfget does after the daemon filled its temporary file, whether the file is removed)
@pytest.mark.parametrize(("dfget_then", "removed"), [
    ("dies", True),  # SIGKILL right after the copy: nobody would move or remove it
    ("moves it onto FILE", False),  # the usual end: FILE stays, nothing is removed
])
def test_the_daemon_removes_a_filled_temporary_file_only_when_its_dfget_is_gone(
    tmp_path: Path, dfget_then: str, removed: bool
) -> None:
    output = str(tmp_path / "out.bin")
    temp = dfget_output.create_temp(output)
    os.write(temp.fd, CONTENT)
    filled = os.stat(temp.path)

    async def scenario() -> bool:
        watcher = asyncio.ensure_future(output_fill.remove_when_abandoned(Path(temp.path), filled, interval=0.01))
        # While the dfget lives it holds the lock: the file is not taken from under it.
        assert dfget_output.remove_if_unlocked(temp.path, lambda info: True) is False
        assert not watcher.done()
        if dfget_then == "dies":
            temp.close()  # the lock goes with the process
        else:
            dfget_output.place(temp, output, overwrite=False)
            temp.close()
        return await asyncio.wait_for(watcher, 10)

    assert asyncio.run(scenario()) is removed
    assert entries(tmp_path) == ([] if removed else ["out.bin"])
    if not removed:
        assert Path(output).read_bytes() == CONTENT
