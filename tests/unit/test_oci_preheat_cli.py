"""The pure parts of ``damselfly preheat``: options, Docker auth files, the lines it prints."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from dragonfly_api import scheduler_pb2, scheduler_pb2_grpc
from google.protobuf import empty_pb2

from common import hashring, ids, oci
from common.errors import ConfigError
from common.origin import basic_authorization
from common.preheat import RESULT_KEY, SEED_KEY, ResolvedImage
from common.preheat_cli import (
    DEFAULT_SCHEDULER,
    EXIT_USAGE,
    BlobResult,
    credentials_from_auth_file,
    format_result,
    format_summary,
    main,
    parse_options,
    preheat_blobs,
)
from common.tls import TlsCredentials
from tests.support.certs import TestCA

DIGEST = "sha256:" + "ab" * 32


def test_defaults() -> None:
    options = parse_options(["registry.example.com/app:v1"])
    assert options.image == oci.ImageReference("registry.example.com", "app", "v1")
    assert options.platforms == ()
    assert options.schedulers == (DEFAULT_SCHEDULER,)
    assert options.authorization is None
    assert options.plain_http is False


def test_repeated_and_comma_separated_lists() -> None:
    options = parse_options(["app", "--platform", "linux/amd64,linux/arm64", "--platform", "linux/arm/v7",
                             "--scheduler", "10.0.0.1:8002,10.0.0.2:8002", "--scheduler", "10.0.0.1:8002",
                             "--creds", "alice:pa:ss", "--plain-http"])
    assert [str(p) for p in options.platforms] == ["linux/amd64", "linux/arm64", "linux/arm/v7"]
    assert options.schedulers == ("10.0.0.1:8002", "10.0.0.2:8002")
    assert options.authorization == basic_authorization("alice", "pa:ss")
    assert options.plain_http


@pytest.mark.parametrize("argv", [
    ["app", "--creds", "alice:x", "--auth-file", "/nonexistent"],  # one or the other
    ["app", "--creds", "alice"],
    ["app", "--platform", "linux"],
    ["app", "--scheduler", "no-port"],
    ["Bad/Name"],
    [],
])
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == EXIT_USAGE
    assert "damselfly preheat" in capsys.readouterr().err


def _auth_file(tmp_path: Path, auths: object) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": auths}))
    return str(path)


def test_auth_file_entries(tmp_path: Path) -> None:
    encoded = base64.b64encode(b"bob:secret").decode()
    path = _auth_file(tmp_path, {
        "registry.example.com": {"auth": encoded},
        "https://other.example.com": {"username": "carol", "password": "pw"},
        "https://index.docker.io/v1/": {"auth": encoded},
    })
    assert credentials_from_auth_file(path, "registry.example.com") == basic_authorization("bob", "secret")
    assert credentials_from_auth_file(path, "other.example.com") == basic_authorization("carol", "pw")
    assert credentials_from_auth_file(path, "docker.io") == basic_authorization("bob", "secret")
    assert credentials_from_auth_file(path, "unknown.example.com") is None
    options = parse_options(["registry.example.com/app", "--auth-file", path])
    assert options.authorization == basic_authorization("bob", "secret")


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read"),
    ("{", "not JSON"),
    (json.dumps({"credsStore": "desktop"}), "no 'auths'"),
    (json.dumps({"auths": {"r.example.com": {"auth": "%%%"}}}), "not base64"),
    (json.dumps({"auths": {"r.example.com": {"auth": base64.b64encode(b"nocolon").decode()}}}), "not base64"),
    (json.dumps({"auths": {"r.example.com": {}}}), "credential helpers"),
])
def test_bad_auth_files_name_the_flag(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as raised:
        credentials_from_auth_file(str(path), "r.example.com")
    assert raised.value.key == "--auth-file"


def test_lines_name_the_blob_and_the_outcome() -> None:
    blob = oci.Blob(DIGEST, 3 << 20, "application/vnd.oci.image.layer.v1.tar+gzip", "layer",
                    ("linux/amd64", "linux/arm64"))
    fetched = BlobResult(blob, "fetched", "10.0.0.5:4000", 1.23)
    assert format_result(2, 7, fetched) == (
        f"[2/7] layer {DIGEST} (3.0 MiB, linux/amd64, linux/arm64): fetched by seed 10.0.0.5:4000 in 1.2s")
    cached = BlobResult(blob, "cached", "10.0.0.5:4000", 0.01)
    assert "already on seed 10.0.0.5:4000" in format_result(1, 7, cached)
    failed = BlobResult(blob, "failed", "seed 10.0.0.5:4000: origin answered 404", 0.5)
    assert format_result(3, 7, failed) == (
        f"[3/7] layer {DIGEST} (3.0 MiB, linux/amd64, linux/arm64): FAILED: seed 10.0.0.5:4000: origin answered 404")
    image = oci.parse_reference("registry.example.com/app:v1")
    assert format_summary(image, [fetched, cached], 2.0) == (
        "preheated registry.example.com/app:v1: 2/2 blobs (6.0 MiB) on seeds in 2.0s: "
        "1 fetched, 1 already there, 0 failed")
    summary = format_summary(image, [fetched, failed], 2.0)
    assert summary.startswith("preheat FAILED for registry.example.com/app:v1: 1/2")


def test_tls_flags_load_the_credentials(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = TestCA(tmp_path)
    client = ca.issue("preheat")
    options = parse_options(["app", "--tls-ca-cert", str(ca.cert_path), "--tls-cert", str(client.cert),
                             "--tls-key", str(client.key)])
    assert options.tls is not None and options.tls.client_auth
    assert main(["app", "--tls-cert", str(client.cert)]) == EXIT_USAGE
    assert "tls_key" in capsys.readouterr().err


class _FakeScheduler(scheduler_pb2_grpc.SchedulerServicer):  # type: ignore[misc]
    """Records PreheatFile calls; answers like scheduler.preheat, a 404 for one blob."""

    def __init__(self, address_name: str, calls: list[tuple[str, str, dict[str, str]]], failing: str) -> None:
        self.name = address_name
        self.calls = calls
        self.failing = failing

    async def PreheatFile(self, request: scheduler_pb2.PreheatFileRequest, context: Any) -> empty_pb2.Empty:
        self.calls.append((self.name, request.url, dict(request.header)))
        if request.url.endswith(self.failing):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "seed 10.0.0.9:4000: origin answered 404")
        context.set_trailing_metadata(((RESULT_KEY, "cached"), (SEED_KEY, "10.0.0.9:4000")))
        return empty_pb2.Empty()


async def test_each_blob_goes_to_the_scheduler_owning_its_task_over_tls(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    server_cert, client_cert = ca.issue("scheduler"), ca.issue("preheat")
    tls = TlsCredentials.load(ca_cert=str(ca.cert_path), cert=str(server_cert.cert), key=str(server_cert.key))
    calls: list[tuple[str, str, dict[str, str]]] = []
    # 16 tasks: the chance that they all hash to one of the two schedulers is 2**-15
    blobs = [oci.Blob(f"sha256:{hashlib.sha256(bytes([n])).hexdigest()}", 10, "x", "layer", ("",)) for n in range(16)]
    servers, addresses = [], []
    for _ in range(2):
        server = grpc.aio.server()
        port = server.add_secure_port("127.0.0.1:0", tls.grpc_server_credentials())
        address = f"127.0.0.1:{port}"
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(_FakeScheduler(address, calls, blobs[2].digest), server)
        await server.start()
        servers.append(server)
        addresses.append(address)
    try:
        options = parse_options(["127.0.0.1:5000/team/app:v1", "--plain-http", "--creds", "u:p",
                                 "--scheduler", ",".join(addresses), "--tls-ca-cert", str(ca.cert_path),
                                 "--tls-cert", str(client_cert.cert), "--tls-key", str(client_cert.key)])
        image = ResolvedImage(options.image, (("", "v1"),), tuple(blobs))
        out = io.StringIO()
        results = await preheat_blobs(options, image, out)
    finally:
        for server in servers:
            await server.stop(None)
    assert sorted(r.outcome for r in results) == ["cached"] * 15 + ["failed"]
    assert len(calls) == 16
    for address, url, header in calls:
        assert url.startswith("http://127.0.0.1:5000/v2/team/app/blobs/sha256:")
        assert address == hashring.choose(addresses, ids.task_id(url)), "sent to the scheduler owning the task"
        assert header == {"Authorization": basic_authorization("u", "p")}
    assert len({address for address, _, _ in calls}) == 2, "the tasks spread over both schedulers"
    lines = out.getvalue().splitlines()
    assert len(lines) == 16
    assert any(blobs[2].digest in line and "FAILED: seed 10.0.0.9:4000: origin answered 404" in line
               for line in lines), lines
