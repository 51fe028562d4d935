"""common.tls: config errors name the key and the path; credentials work (and refuse) for real.

The handshakes run in-process on 127.0.0.1 (a gRPC server, the PieceServer over HTTPS) with
certificates from a throwaway CA; tests/integration/test_tls.py runs a whole mTLS cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from dragonfly_api import scheduler_pb2, scheduler_pb2_grpc

from common.config import DfdaemonConfig, SchedulerConfig, add_config_arguments, config_from_args, load_config
from common.errors import ConfigError
from common.tls import TlsCredentials, add_port, open_channel, tls_from_config, url_scheme
from peer.metrics import DaemonMetrics
from peer.storage.store import PieceStore
from peer.upload.piece_server import PieceServer
from tests.support.certs import Issued, TestCA

TASK = "e" * 64
DEADLINE = 10.0


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "ca")


@pytest.fixture
def node(ca: TestCA) -> Issued:
    return ca.issue("node")


def tls_keys(ca: TestCA, issued: Issued) -> dict[str, object]:
    return {"tls_ca_cert": str(ca.cert_path), "tls_cert": str(issued.cert), "tls_key": str(issued.key)}


# ------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("cls", [SchedulerConfig, DfdaemonConfig])
def test_tls_is_off_by_default(cls: type[SchedulerConfig] | type[DfdaemonConfig]) -> None:
    config = load_config(cls)
    assert (config.tls_ca_cert, config.tls_cert, config.tls_key) == ("", "", "")
    assert config.tls_client_auth is True
    assert tls_from_config(config) is None


@pytest.mark.parametrize("cls", [SchedulerConfig, DfdaemonConfig])
def test_tls_keys_are_flags_and_yaml_keys(
    cls: type[SchedulerConfig] | type[DfdaemonConfig], ca: TestCA, node: Issued, tmp_path: Path
) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(f"tls_ca_cert: {ca.cert_path}\ntls_cert: {node.cert}\ntls_key: /from/the/file\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, cls)
    args = parser.parse_args(["--config", str(config_file), "--tls-key", str(node.key), "--no-tls-client-auth"])
    config = config_from_args(cls, args)
    assert (config.tls_ca_cert, config.tls_cert, config.tls_key) == (str(ca.cert_path), str(node.cert), str(node.key))
    assert config.tls_client_auth is False
    tls = tls_from_config(config)
    assert tls is not None and tls.client_auth is False


@pytest.mark.parametrize(
    ("given", "key", "reason"),
    [
        ({"tls_cert": "/c.pem"}, "tls_key", "required when tls_cert is set"),
        ({"tls_key": "/k.pem", "tls_ca_cert": "/ca.pem"}, "tls_cert", "required for TLS"),
        ({"tls_ca_cert": "/ca.pem"}, "tls_cert", "required for TLS"),
        ({"tls_cert": "/c.pem", "tls_key": "/k.pem"}, "tls_ca_cert", "required for mutual TLS"),
        ({"tls_client_auth": "maybe"}, "tls_client_auth", "not true or false"),
    ],
)
def test_keys_that_do_not_go_together_fail_at_load(given: dict[str, object], key: str, reason: str) -> None:
    for cls in (SchedulerConfig, DfdaemonConfig):
        with pytest.raises(ConfigError) as info:
            load_config(cls, overrides=given)
        assert info.value.key == key
        assert reason in info.value.reason


def test_tls_without_client_auth_needs_no_ca(node: Issued) -> None:
    config = load_config(DfdaemonConfig, overrides={"tls_cert": str(node.cert), "tls_key": str(node.key),
                                                    "tls_client_auth": False})
    tls = tls_from_config(config)
    assert tls is not None and tls.ca_cert is None
    assert tls.server_ssl_context().verify_mode == ssl.CERT_NONE


def _broken(tmp_path: Path, ca: TestCA, node: Issued, kind: str) -> tuple[dict[str, object], str, str]:
    """Config keys with one bad file; the key that must be named and a fragment of the reason."""
    keys = tls_keys(ca, node)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    empty = tmp_path / "empty.pem"
    empty.write_text("\n")
    other = ca.issue("other")
    cases: dict[str, tuple[str, object, str]] = {
        "missing ca": ("tls_ca_cert", tmp_path / "nope" / "ca.crt", "cannot read"),
        "directory as cert": ("tls_cert", tmp_path, "cannot read"),
        "empty key": ("tls_key", empty, "is empty"),
        "garbage ca": ("tls_ca_cert", garbage, "is not a PEM certificate"),
        "key as cert": ("tls_cert", node.key, "is not a PEM certificate"),
        "garbage key": ("tls_key", garbage, "is not an unencrypted PEM private key"),
        "someone else's key": ("tls_key", other.key, "is not the key of the certificate"),
    }
    key, path, reason = cases[kind]
    keys[key] = str(path)
    return keys, key, reason


@pytest.mark.parametrize("kind", ["missing ca", "directory as cert", "empty key", "garbage ca", "key as cert",
                                  "garbage key", "someone else's key"])
def test_bad_files_fail_at_start_up_naming_key_and_path(
    kind: str, tmp_path: Path, ca: TestCA, node: Issued
) -> None:
    keys, key, reason = _broken(tmp_path, ca, node, kind)
    config = load_config(DfdaemonConfig, overrides=keys)  # the config itself reads no file
    with pytest.raises(ConfigError) as info:
        tls_from_config(config)
    assert info.value.key == key
    assert reason in info.value.reason
    assert str(keys[key]) in info.value.reason


def test_an_encrypted_key_is_refused_not_prompted_for(tmp_path: Path, ca: TestCA, node: Issued) -> None:
    from cryptography.hazmat.primitives import serialization

    plain = serialization.load_pem_private_key(node.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(plain.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ConfigError) as info:
        TlsCredentials.load(ca_cert=str(ca.cert_path), cert=str(node.cert), key=str(encrypted))
    assert info.value.key == "tls_key"


def test_daemon_and_scheduler_refuse_to_start_with_a_bad_file(tmp_path: Path, ca: TestCA, node: Issued) -> None:
    from peer.daemon import Daemon
    from scheduler.server import main as scheduler_main

    keys, _, _ = _broken(tmp_path, ca, node, "missing ca")
    with pytest.raises(ConfigError, match="tls_ca_cert"):
        Daemon(load_config(DfdaemonConfig, overrides={**keys, "data_dir": str(tmp_path / "data")}))
    args = [f"--{k.replace('_', '-')}={v}" for k, v in keys.items()]
    assert scheduler_main(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", *args]) == 2


def test_url_scheme_follows_tls(ca: TestCA, node: Issued) -> None:
    tls = TlsCredentials.load(ca_cert=str(ca.cert_path), cert=str(node.cert), key=str(node.key))
    assert url_scheme(None) == "http"
    assert url_scheme(tls) == "https"


# ------------------------------------------------------------------------------------------------
# gRPC: the credentials admit members and refuse everyone else


class _Hosts(scheduler_pb2_grpc.SchedulerServicer):  # type: ignore[misc]
    async def ListHosts(self, request: object, context: grpc.aio.ServicerContext) -> scheduler_pb2.ListHostsResponse:
        return scheduler_pb2.ListHostsResponse()


@pytest.fixture
async def grpc_port(ca: TestCA, node: Issued) -> AsyncIterator[int]:
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(_Hosts(), server)
    port = add_port(server, "127.0.0.1:0", TlsCredentials.load(**_paths(ca, node)))
    await server.start()
    yield port
    await server.stop(0)


def _paths(ca: TestCA, issued: Issued) -> dict[str, str]:
    return {"ca_cert": str(ca.cert_path), "cert": str(issued.cert), "key": str(issued.key)}


async def _list_hosts(channel: grpc.aio.Channel) -> grpc.StatusCode:
    from google.protobuf import empty_pb2

    async with channel:
        try:
            await scheduler_pb2_grpc.SchedulerStub(channel).ListHosts(empty_pb2.Empty(), timeout=DEADLINE)
        except grpc.aio.AioRpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


async def test_grpc_member_is_served(grpc_port: int, ca: TestCA) -> None:
    member = TlsCredentials.load(**_paths(ca, ca.issue("member")))
    assert await _list_hosts(open_channel(f"127.0.0.1:{grpc_port}", member)) == grpc.StatusCode.OK


async def test_grpc_refuses_no_certificate_plaintext_and_another_ca(
    grpc_port: int, ca: TestCA, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{grpc_port}"
    no_cert = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca.cert_path.read_bytes()))
    assert await _list_hosts(no_cert) == grpc.StatusCode.UNAVAILABLE
    assert await _list_hosts(open_channel(target, None)) == grpc.StatusCode.UNAVAILABLE
    rogue_ca = TestCA(tmp_path / "rogue")
    rogue = dataclasses.replace(TlsCredentials.load(**_paths(rogue_ca, rogue_ca.issue("rogue"))),
                                ca_cert=ca.cert_path.read_bytes())  # trusts our server, but is not one of us
    assert await _list_hosts(open_channel(target, rogue)) == grpc.StatusCode.UNAVAILABLE


async def test_grpc_client_checks_the_server_address_against_ip_sans(ca: TestCA) -> None:
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(_Hosts(), server)
    named_only = ca.issue("named-only", ips=(), dns=("scheduler.example",))
    port = add_port(server, "127.0.0.1:0", TlsCredentials.load(**_paths(ca, named_only)))
    await server.start()
    try:
        member = TlsCredentials.load(**_paths(ca, ca.issue("member")))
        assert await _list_hosts(open_channel(f"127.0.0.1:{port}", member)) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)


# ------------------------------------------------------------------------------------------------
# The piece server over HTTPS


@pytest.fixture
async def https_pieces(tmp_path: Path, ca: TestCA, node: Issued) -> AsyncIterator[tuple[int, bytes]]:
    store = PieceStore(tmp_path / "store")
    store.load()
    data = b"piece bytes over TLS " * 1000
    task = store.create(TASK, url="http://origin.test/blob")
    task.set_content_info(len(data), len(data), {})

    async def one_chunk() -> AsyncIterator[bytes]:
        yield data

    await task.write_piece(0, one_chunk())
    server = PieceServer(store, upload_slots=4, metrics=DaemonMetrics())
    tls = TlsCredentials.load(**_paths(ca, node))
    port = await server.start("127.0.0.1", 0, ssl_context=tls.server_ssl_context())
    yield port, data
    await server.stop()


async def _get(url: str, context: ssl.SSLContext | bool) -> tuple[int, bytes]:
    timeout = aiohttp.ClientTimeout(total=DEADLINE)
    connector = aiohttp.TCPConnector(ssl=context)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session, session.get(url) as response:
        return response.status, await response.read()


async def test_piece_server_serves_a_member_over_https(https_pieces: tuple[int, bytes], ca: TestCA) -> None:
    port, data = https_pieces
    member = TlsCredentials.load(**_paths(ca, ca.issue("member")))
    assert await _get(f"https://127.0.0.1:{port}/pieces/{TASK}/0", member.client_ssl_context()) == (200, data)


async def test_piece_server_refuses_no_certificate_plaintext_and_another_ca(
    https_pieces: tuple[int, bytes], ca: TestCA, tmp_path: Path
) -> None:
    port, _ = https_pieces
    url = f"https://127.0.0.1:{port}/pieces/{TASK}/0"
    no_cert = ssl.create_default_context(cafile=str(ca.cert_path))
    with pytest.raises(aiohttp.ClientError):
        await _get(url, no_cert)
    with pytest.raises(aiohttp.ClientError):
        await _get(f"http://127.0.0.1:{port}/pieces/{TASK}/0", True)
    rogue_ca = TestCA(tmp_path / "rogue")
    rogue = ssl.create_default_context(cafile=str(ca.cert_path))
    rogue_cert = rogue_ca.issue("rogue")
    rogue.load_cert_chain(rogue_cert.cert, rogue_cert.key)
    with pytest.raises(aiohttp.ClientError):
        await _get(url, rogue)


# ------------------------------------------------------------------------------------------------
# tls_server_name: one name for the whole cluster instead of per-node IP SANs

CLUSTER_NAME = "damselfly.cluster.internal"


@pytest.fixture
def named_only(ca: TestCA) -> Issued:
    """A server certificate with the cluster name and no IP SAN (a pod whose IP changes)."""
    return ca.issue("named-only", ips=(), dns=(CLUSTER_NAME,))


@pytest.mark.parametrize(("server_name", "served"), [(CLUSTER_NAME, True), ("", False), ("other.name", False)])
async def test_grpc_server_name_replaces_the_address_check(
    ca: TestCA, named_only: Issued, server_name: str, served: bool
) -> None:
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(_Hosts(), server)
    port = add_port(server, "127.0.0.1:0", TlsCredentials.load(**_paths(ca, named_only)))
    await server.start()
    try:
        client = TlsCredentials.load(**_paths(ca, ca.issue("member")), server_name=server_name)
        code = await _list_hosts(open_channel(f"127.0.0.1:{port}", client))
        assert code == (grpc.StatusCode.OK if served else grpc.StatusCode.UNAVAILABLE)
    finally:
        await server.stop(0)


@pytest.mark.parametrize(("server_name", "served"), [(CLUSTER_NAME, True), ("", False), ("other.name", False)])
async def test_https_server_name_replaces_the_address_check(
    tmp_path: Path, ca: TestCA, named_only: Issued, server_name: str, served: bool
) -> None:
    store = PieceStore(tmp_path / "store")
    store.load()
    server = PieceServer(store, upload_slots=4, metrics=DaemonMetrics())
    port = await server.start("127.0.0.1", 0,
                              ssl_context=TlsCredentials.load(**_paths(ca, named_only)).server_ssl_context())
    try:
        client = TlsCredentials.load(**_paths(ca, ca.issue("member")), server_name=server_name)
        url = f"https://127.0.0.1:{port}/healthy"
        if served:
            assert (await _get(url, client.client_ssl_context()))[0] == 200
        else:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await _get(url, client.client_ssl_context())
    finally:
        await server.stop()


def test_server_name_is_a_config_key(ca: TestCA, node: Issued) -> None:
    config = load_config(SchedulerConfig, overrides={**tls_keys(ca, node), "tls_server_name": CLUSTER_NAME})
    tls = tls_from_config(config)
    assert tls is not None and tls.server_name == CLUSTER_NAME
    assert tls.grpc_channel_options() == [("grpc.ssl_target_name_override", CLUSTER_NAME)]
