"""Bad input over real sockets: the piece server and the registry mirror / proxy never crash on it.

Hypothesis builds raw HTTP/1.x requests (request lines, methods, versions, header names and
values up to 100 KiB, Content-Length and Transfer-Encoding variants, path traversal in plain,
encoded, double-encoded, backslash and NUL forms) and sends each over a fresh TCP connection.
Every request ends its head with ``Connection: close``, so the whole answer is read up to EOF.

What must hold for every case:

- the answer is a 4xx, or the connection is closed without one (unparseable HTTP); a 2xx only
  for a request that names real content (a piece of our task, the pushed blob), with its exact
  bytes; never a 500;
- no answer carries a byte of the canary files planted next to (outside) the cache;
- the server still answers afterwards (``/healthy``), and logged no unhandled error.

The piece server runs in-process on uvloop (as in the daemon) over a real PieceStore; the proxy
is a real dfdaemon process of a LocalCluster, mirroring the session's test registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp.http_exceptions import HttpProcessingError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.launcher import LocalCluster, Node
from common.pieces import piece_span
from peer.metrics import DaemonMetrics
from peer.storage.store import PieceStore
from peer.upload.piece_server import PieceServer
from tests.support.registry import Registry, push_random_blob

pytestmark = pytest.mark.integration

TASK = "c" * 64
PIECE = 64 * 1024
CONTENT = os.urandom(3 * PIECE + 123)
CANARY = b"CANARY-" + os.urandom(16).hex().encode()
PASSWD_LINE = b"root:x:0:0"
IO_TIMEOUT = 20.0
# More for a deeper run: DAMSELFLY_FUZZ_EXAMPLES=5000 pytest tests/integration/test_fuzz.py
PIECE_EXAMPLES = int(os.environ.get("DAMSELFLY_FUZZ_EXAMPLES", "250"))
PROXY_EXAMPLES = int(os.environ.get("DAMSELFLY_FUZZ_EXAMPLES", "250"))

# ---- raw requests ----------------------------------------------------------------------------


@dataclass
class Answer:
    raw: bytes
    status: int | None  # None: closed without an HTTP answer
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def send_raw(port: int, data: bytes) -> Answer:
    """Send `data` on a new connection and read the answer until the server closes it."""
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        # the server may answer (or close) before it read it all: then read what it said
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return parse_answer(b"".join(chunks))


def parse_answer(raw: bytes) -> Answer:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not raw.startswith(b"HTTP/") or not sep:
        assert not raw, f"not an HTTP answer: {raw[:200]!r}"
        return Answer(raw, None)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = dechunk(body)
    return Answer(raw, status, headers, body)


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


def build(method: str, target: str, version: str, headers: list[tuple[str, str]], newline: str = "\r\n") -> bytes:
    """A request head with a ``Host`` (unless `headers` has one) and ``Connection: close``.

    A body that matches the framing headers follows, so that the server never waits for one.
    """
    lines = [f"{method} {target} {version}".rstrip(" ")]
    if not any(name.lower() == "host" for name, _ in headers):
        lines.append("Host: 127.0.0.1")
    lines += [f"{name}: {value}" for name, value in headers]
    lines += ["Connection: close", "", ""]
    body = b""
    for name, value in headers:
        if name.lower() == "content-length" and value.isascii() and value.isdigit() and int(value) < 4096:
            body += b"x" * int(value)
        if name.lower() == "transfer-encoding" and "chunked" in value.lower():
            body += b"0\r\n\r\n"
    return newline.join(lines).encode("utf-8", "surrogateescape") + body


def healthy(port: int, path: str = "/healthy") -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=IO_TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status == 200 and response.read().strip() == b"ok"
    finally:
        connection.close()


def unexpected_tracebacks(log: str) -> list[str]:
    """The exception lines of logged tracebacks, but for aiohttp's 400s to unparseable HTTP."""
    found = []
    lines = log.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            rest = lines[index + 1 :]
            last = next((x for x in rest if x and not x[0].isspace()), "")
            if not last.startswith("aiohttp.http_exceptions."):
                found.append(last)
    return found


def assert_no_leak(answer: Answer) -> None:
    assert CANARY not in answer.raw, "a file outside the cache was served"
    assert PASSWD_LINE not in answer.raw, "/etc/passwd was served"


# ---- strategies ------------------------------------------------------------------------------

TRAVERSALS = ["..", "%2e%2e", "%2E%2E", ".%2e", "%252e%252e", "..%2f..%2f", "..%5c..%5c", "..\\..", "%2e%2e%2f",
              "%c0%ae%c0%ae", "..%00", "%00", ".", "", "....//", "..;", "%u002e%u002e"]
methods = st.one_of(
    st.sampled_from(["GET", "GET", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH", "get",
                     "G ET", "GET\x00", "\x16\x03\x01", "", "PRI", "M-SEARCH", "GET" * 400]),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12),
)
versions = st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/9.9", "http/1.1", "HTTP/1.1 x",
                            "", "HTTP/1", "HTTP/1.1\x00", "HTTP/" + "1" * 100])
header_names = st.one_of(
    st.sampled_from(["Host", "Range", "Accept", "User-Agent", "X-Dragonfly-Tag", "If-Range", "Expect",
                     "Content-Type", "Authorization", "Cookie", "X-Forwarded-For"]),
    st.sampled_from(["", " Host", "Bad Name", "Na:me", "Ünicode", "X\x00Y", "X\tY", "(", "X" * 9000]),
    st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"), min_size=1, max_size=16),
)
header_values = st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    st.sampled_from(["bytes=0-", "bytes=-1", "bytes=5-1", "bytes=" + "9" * 40 + "-", "bytes=0-0,1-1,2-2",
                     "100-continue", "\x00", "\u2028", "é", "a\rb", "a\nb: c"]),
    st.sampled_from([8 * 1024, 64 * 1024, 100 * 1024]).map(lambda n: "v" * n),  # huge values
)
framing = st.one_of(
    st.tuples(st.just("Content-Length"), st.sampled_from(["0", "5", "-1", "abc", "1, 2", "0x10", " 5", "+5",
                                                          "9" * 30, "5\x00", "٣", ""])),
    st.tuples(st.just("Transfer-Encoding"), st.sampled_from(["chunked", "gzip", "chunked, chunked", "identity",
                                                             "xchunked", "gzip, chunked", " chunked"])),
)
header_lists = st.lists(st.one_of(st.tuples(header_names, header_values), framing), max_size=5)
newlines = st.sampled_from(["\r\n", "\r\n", "\r\n", "\n"])


def numbers() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["0", "1", "3", "4", "-1", "-0", "+1", "00", "1.0", "1e3", "0x1", " 1", "%30", "%2d1",
                         "\u0663", "\uff11", "9" * 13, "9" * 400, "18446744073709551616", "0/../../canary.txt",
                         "0%00"]),
        st.integers(-(2**70), 2**70).map(str),
    )


def task_segments() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from([TASK, TASK.upper(), TASK[:63], TASK + "c", TASK + "%00", TASK + "/..", "c" * 10_000,
                         "%63" * 64, TASK[:62] + "..", "../" + TASK]),
        st.sampled_from(TRAVERSALS),
        st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="/?#"), max_size=70),
    )


def traversal_path(prefix: str, target: str) -> st.SearchStrategy[str]:
    """``prefix`` + some ``..`` steps (plain or encoded, / or \\) + `target`."""
    steps = st.lists(st.sampled_from(TRAVERSALS[:10]), min_size=1, max_size=8)
    seps = st.sampled_from(["/", "\\", "%2f", "%2F", "%252f", "%5c"])
    return st.builds(lambda parts, sep: prefix + sep.join([*parts, target.lstrip("/")]), steps, seps)


# ---- the piece server --------------------------------------------------------------------------


@dataclass
class PieceHost:
    port: int
    errors: list[logging.LogRecord]


class _Errors(logging.Handler):
    """Errors of the piece server, but for aiohttp's own 400 answers to unparseable HTTP.

    What the ``aiohttp`` and ``peer`` loggers log, and what the server's own event loop reports
    (unhandled task exceptions, tasks destroyed while pending) through :meth:`loop_error`. Not the
    process-wide ``asyncio`` logger: it also reports the tasks of other tests' event loops whenever
    the garbage collector gets to them, which may well be during this long test (a loop that a
    test stopped without closing, with a request still pending on it, is reported as "Task was
    destroyed but it is pending!" by the collection that frees it).
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            return
        self.records.append(record)

    def loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The exception handler of the server's loop: logs the report as usual, and records it."""
        loop.default_exception_handler(context)
        details = [f"{key}: {value!r}" for key, value in context.items() if key not in ("message", "exception")]
        message = "\n".join([str(context.get("message", "Unhandled exception in event loop")), *details])
        exc = context.get("exception")
        exc_info = (type(exc), exc, exc.__traceback__) if isinstance(exc, BaseException) else None
        self.emit(logging.LogRecord("asyncio", logging.ERROR, __file__, 0, message, None, exc_info))


def plant_canaries(*directories: Path) -> list[Path]:
    planted = []
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("canary.txt", "content", "metadata", "passwd"):
            (directory / name).write_bytes(CANARY)
            planted.append(directory / name)
    return planted


@pytest.fixture(scope="module")
def piece_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PieceHost]:
    root = tmp_path_factory.mktemp("fuzz-pieces")
    data = root / "data"
    plant_canaries(root, root / "etc")
    errors = _Errors()
    watched = [logging.getLogger(name) for name in ("aiohttp", "peer")]
    for logger in watched:
        logger.addHandler(errors)
    # The Runner closes the loop after cancelling whatever is left on it: nothing of this server
    # is left pending for the garbage collector to report during later tests.
    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    loop = runner.get_loop()
    loop.set_exception_handler(errors.loop_error)
    ready = threading.Event()
    port: list[int] = []
    stop = asyncio.Event()

    async def serve() -> None:
        store = PieceStore(data)
        store.load()
        task = store.create(TASK, url="http://origin.test/blob")
        task.set_content_info(len(CONTENT), PIECE, {})
        for number in range(4):
            span = piece_span(number, len(CONTENT), PIECE)

            async def chunks(span_offset: int = span.offset, span_end: int = span.end) -> object:
                yield CONTENT[span_offset:span_end]

            await task.write_piece(number, chunks())  # type: ignore[arg-type]
        server = PieceServer(store, upload_slots=4, metrics=DaemonMetrics(), slot_wait=0.5)
        port.append(await server.start("127.0.0.1", 0))
        ready.set()
        try:
            await stop.wait()
        finally:
            await server.stop()

    def run() -> None:
        with runner:
            runner.run(serve())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert ready.wait(10), "piece server did not start"
        yield PieceHost(port[0], errors.records)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        for logger in watched:
            logger.removeHandler(errors)


PIECES = {CONTENT[piece_span(n, len(CONTENT), PIECE).offset : piece_span(n, len(CONTENT), PIECE).end]
          for n in range(4)}

piece_targets = st.one_of(
    st.builds(lambda task, number: f"/pieces/{task}/{number}", task_segments(), numbers()),
    traversal_path("/pieces/", "/etc/passwd"),
    traversal_path("/pieces/" + TASK + "/", "canary.txt"),
    traversal_path("/pieces/", "canary.txt"),
    st.sampled_from(["/pieces/../../etc/passwd", "/pieces/%2e%2e/%2e%2e/etc/passwd", "/pieces/..%2f..%2fetc%2fpasswd",
                     "/pieces/%252e%252e%252fetc%252fpasswd", "/pieces/..\\..\\etc\\passwd", f"/pieces/{TASK}/0\x00",
                     f"/pieces/{TASK}\x00/0", "/pieces//0", "/pieces/", "/pieces", "*", "", " ", "//pieces/x/0",
                     f"http://127.0.0.1/pieces/{TASK}/0", f"http://evil.test/pieces/{TASK}/0", "file:///etc/passwd",
                     f"/healthy/../pieces/{TASK}/0", f"/pieces/{TASK}/0?x=../../canary.txt", f"/pieces/{TASK}/0#x",
                     "/" + "a" * 70_000, "/pieces/" + "%" * 100, "/%", "/pieces/%zz/0"]),
    st.text(max_size=80),
)


@settings(max_examples=PIECE_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=methods, target=piece_targets, version=versions, headers=header_lists, newline=newlines)
def test_piece_server_answers_bad_input_with_4xx(
    piece_host: PieceHost, method: str, target: str, version: str, headers: list[tuple[str, str]], newline: str
) -> None:
    answer = send_raw(piece_host.port, build(method, target, version, headers, newline))
    assert_no_leak(answer)
    if answer.status is not None and answer.status < 400:
        # only real content: one of our pieces, whole and exact (or the health check)
        assert answer.status == 200 and (answer.body in PIECES or answer.body == b"ok"), answer.raw[:300]
    else:
        assert answer.status is None or 400 <= answer.status < 500, answer.raw[:300]
    assert healthy(piece_host.port)
    assert not piece_host.errors, [r.getMessage() for r in piece_host.errors]


# ---- the proxy ---------------------------------------------------------------------------------


@dataclass
class ProxyHost:
    node: Node
    port: int
    blob_path: str
    blob: bytes
    canaries: list[Path]


@pytest.fixture(scope="module")
def proxy_host(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[ProxyHost]:
    root = tmp_path_factory.mktemp("fuzz-proxy")
    cluster = LocalCluster(root)
    try:
        cluster.start_scheduler()
        node = cluster.start_dfdaemon("fuzzed", "--registry-mirror", registry.url)
        assert cluster.scheduler is not None
        cluster.wait_ready(cluster.scheduler, node)
        assert node.data_dir is not None
        canaries = plant_canaries(root, node.data_dir.parent, root / "etc")
        digest, path = push_random_blob(registry, "fuzz/blob", 2 * PIECE + 17, seed=10)
        yield ProxyHost(node, node.ports["proxy"], f"/v2/fuzz/blob/blobs/{digest}", path.read_bytes(), canaries)
    finally:
        cluster.stop()
    crashes = unexpected_tracebacks(node.log_path.read_text(errors="replace"))
    assert not crashes, crashes[:3]


def proxy_targets(host: ProxyHost) -> st.SearchStrategy[str]:
    canary = str(host.canaries[0])
    weird_hosts = st.sampled_from(["", "127.0.0.1:1", "../../etc", "a b", "%00", "x" * 300, "[::1]", "[::1",
                                   "localhost:99999", "docker.io", "http://x", "-", "..", "a..b", "1.2.3.4:0",
                                   "nonexistent.invalid", "ex\uff03ample", "%2e%2e", "host:port", "127.0.0.1:0"])
    digests = st.sampled_from(["sha256:" + "0" * 64, "sha256:../../etc/passwd", "sha256:", "sha512:x", "md5:1",
                               host.blob_path.rsplit("/", 1)[1]])
    return st.one_of(
        st.sampled_from([host.blob_path, "/v2/", "/v2", "/v2/../", "/v2/..%2f..%2f", "/v2/%2e%2e/%2e%2e/etc/passwd",
                         "/v2/../../etc/passwd", f"/v2/../../../..{canary}", f"/v2/%2e%2e%2f%2e%2e{canary}",
                         "/v2/fuzz/blob/blobs/../../../../etc/passwd", "/v2/fuzz/blob/manifests/latest",
                         "/v2/_catalog", "/", "*", "", "/pieces/../../etc/passwd", "/v2/\\..\\..\\etc\\passwd",
                         "/v2/fuzz/blob/blobs/%73ha256:" + "0" * 64, "/v2/%00/blobs/sha256:" + "0" * 64,
                         "/" + "v" * 70_000]),
        st.builds(lambda repo, digest: f"/v2/{repo}/blobs/{digest}", task_segments(), digests),
        st.builds(lambda path, ns: f"{path}?ns={ns}", st.sampled_from([host.blob_path, "/v2/", "/v2/x/manifests/y"]),
                  weird_hosts),
        traversal_path("/v2/", "/etc/passwd"),
        traversal_path("/v2/", canary),
        st.builds(lambda scheme, authority, path: f"{scheme}{authority}{path}",
                  st.sampled_from(["http://", "https://", "ftp://", "file://", "gopher://", "http:", "HTTP://"]),
                  weird_hosts, st.sampled_from(["", "/", canary, "/etc/passwd", "/v2/", "/%00"])),
        st.text(max_size=80),
    )


connect_targets = st.one_of(
    st.sampled_from(["nonsense", "nonsense:", ":80", "host:99999", "host:-1", "[::1", "[::1]:0", "127.0.0.1:0", "a:b",
                     "", "x" * 300 + ":80", "nonexistent.invalid:443", "127.0.0.1:1", "[::1]:1", "/etc/passwd",
                     "http://127.0.0.1:1/", "%00:80", "127.0.0.1:01", "127.0.0.1:+1"]),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=30),
)
proxy_header_lists = st.lists(st.one_of(
    st.tuples(header_names, header_values),
    framing,
    st.tuples(st.sampled_from(["X-Dragonfly-Registry"]),
              st.sampled_from(["[::1", "http://[::1", "ftp://x", "http://", "://", "http://ex\uff03ample", "\x01",
                               "127.0.0.1:1", "http://127.0.0.1:1", "https://nonexistent.invalid", "x" * 300,
                               "http://user:pw@127.0.0.1:1", "http://[zz]"])),
    st.tuples(st.sampled_from(["X-Dragonfly-Priority", "X-Dragonfly-Use-P2P", "X-Dragonfly-Prefetch",
                               "X-Dragonfly-Filtered-Query-Params", "X-Dragonfly-Tag", "Range"]),
              st.sampled_from(["-1", "99", "\u0663", "9" * 100, "9" * 5000, "true", "false", "", ",,,", "bytes=0-",
                               "bytes=-0", "bytes=99999999-", "bytes=1-0", "bytes=0-0,5-", "x"])),
), max_size=5)


@settings(max_examples=PROXY_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_proxy_answers_bad_input_with_4xx(proxy_host: ProxyHost, data: st.DataObject) -> None:
    method = data.draw(st.one_of(methods, st.just("CONNECT")), "method")
    target = data.draw(connect_targets if method == "CONNECT" else proxy_targets(proxy_host), "target")
    headers = data.draw(proxy_header_lists, "headers")
    request = build(method, target, data.draw(versions, "version"), headers, data.draw(newlines, "newline"))
    answer = send_raw(proxy_host.port, request)
    assert_no_leak(answer)
    if answer.status is not None and answer.status >= 500:
        # the upstream could not be reached: said so by the proxy itself, never an internal error
        assert answer.status in (502, 504), answer.raw[:300]
        assert answer.headers.get("x-dragonfly-error-type") == "proxy", answer.raw[:300]
    if answer.status == 200 and answer.body and target.split("?")[0] == proxy_host.blob_path:
        assert answer.body == proxy_host.blob
    assert healthy(proxy_host.node.ports["health"])
    assert send_raw(proxy_host.port, build("GET", "/not-a-registry-path", "HTTP/1.1", [])).status == 400



BLOB_0 = "/v2/fuzz/blob/blobs/sha256:" + "0" * 64
LONG_LABEL = "x" * 70  # over the 63 characters of a DNS label: the resolver raises UnicodeError
# Requests that were answered with a 500 (an exception escaping the proxy), and what they get now.
PROXY_REGRESSIONS = [
    # (what, method, target, headers, status)
    ("registry header with a bad IPv6 host", "GET", "/v2/fuzz/blob/manifests/x",
     [("X-Dragonfly-Registry", "[::1")], 400),
    ("registry URL with a bad IPv6 host", "GET", "/v2/fuzz/blob/manifests/x",
     [("X-Dragonfly-Registry", "http://[::1")], 400),
    ("registry URL with a bracketed non-IP", "GET", "/v2/fuzz/blob/manifests/x",
     [("X-Dragonfly-Registry", "http://[zz]")], 400),
    ("registry URL that changes under NFKC", "GET", BLOB_0, [("X-Dragonfly-Registry", "http://ex\uff03ample")], 400),
    ("registry host with a long label, P2P", "GET", BLOB_0, [("X-Dragonfly-Registry", f"http://{LONG_LABEL}")], 400),
    ("registry host with a long label, straight", "GET", "/v2/fuzz/blob/manifests/x",
     [("X-Dragonfly-Registry", f"http://{LONG_LABEL}")], 400),
    ("ns with a long label", "GET", f"/v2/fuzz/blob/manifests/x?ns={LONG_LABEL}", [], 400),
    ("ns with a long label, P2P", "GET", f"{BLOB_0}?ns={LONG_LABEL}", [], 400),
    ("ns with an empty label", "GET", f"{BLOB_0}?ns=a..b", [], 400),
    ("absolute form with a long label", "GET", f"http://{LONG_LABEL}/v2/", [], 400),
    ("absolute form with a long label, P2P", "GET", f"http://{LONG_LABEL}/v2/x/blobs/sha256:{'0' * 64}", [], 400),
    ("CONNECT to a long label", "CONNECT", f"{LONG_LABEL}:443", [], 400),
    ("priority in Arabic-Indic digits", "GET", BLOB_0, [("X-Dragonfly-Priority", "\u0663")], 400),
    ("priority of 5000 digits (int() refuses over 4300)", "GET", BLOB_0, [("X-Dragonfly-Priority", "9" * 5000)],
     400),
]


@pytest.mark.parametrize(("what", "method", "target", "headers", "status"), PROXY_REGRESSIONS,
                         ids=[case[0] for case in PROXY_REGRESSIONS])
def test_proxy_regressions(proxy_host: ProxyHost, what: str, method: str, target: str,
                           headers: list[tuple[str, str]], status: int) -> None:
    answer = send_raw(proxy_host.port, build(method, target, "HTTP/1.1", headers))
    assert answer.status == status, answer.raw[:300]
    assert answer.headers.get("x-dragonfly-error-type") == "proxy"
    assert healthy(proxy_host.node.ports["health"])
