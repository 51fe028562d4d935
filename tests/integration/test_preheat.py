"""``damselfly preheat`` end to end: a multi-arch image in a token-auth registry, then four nodes
pulling it through their mirrors with skopeo.

Everything is real: ``docker-registry`` behind the test token server (Bearer auth), a TCP relay
in front of it counting every byte the registry sends, a scheduler, a seed and four dfdaemons as
processes, the ``damselfly preheat`` command and skopeo. The image is an OCI index of two
platforms, each a config and three gzip layers; every blob is at least 256 KiB, so "no blob byte
from the registry" is a relay count below that (manifests, tokens' challenges and HEADs are a
few KiB).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import platform
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from dragonfly_api import scheduler_pb2, scheduler_pb2_grpc

from common import oci
from common.launcher import LocalCluster, Node, free_port, sha256_file
from tests.support.cluster import start_network
from tests.support.registry import OCI_CONFIG, OCI_LAYER_GZIP, Registry, push_blob, push_manifest, write_layer_tar
from tests.support.relay import ByteCountingRelay

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")]

KIB = 1 << 10
MIB = 1 << 20
REPO = "preheat/multi"
# The smallest blob of the test image; any blob body from the registry exceeds the budget below.
MIN_BLOB = 256 * KIB
NON_BLOB_BUDGET = 64 * KIB  # manifests, 401 challenges and access-check HEADs of four pulls
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
OTHER_ARCH = "arm64" if HOST_ARCH != "arm64" else "amd64"


@dataclass
class PushedImage:
    reference: str  # 127.0.0.1:<relay port>/preheat/multi:v1
    files: dict[str, dict[str, Path]]  # arch -> digest -> file holding the blob

    def size(self, arch: str) -> int:
        return sum(path.stat().st_size for path in self.files[arch].values())


def _push_platform(registry: Registry, repo: str, workdir: Path, arch: str, seed: int) -> tuple[bytes, dict[str, Path]]:
    """Config (padded to MIN_BLOB) and three random gzip layers for linux/`arch`; the manifest."""
    files: dict[str, Path] = {}
    layers = []
    diff_ids = []
    for number in range(3):
        content = random.Random(seed * 10 + number).randbytes(MIB + number * 512 * KIB)
        path = write_layer_tar(workdir / f"{arch}-layer{number}.tar.gz", {f"{arch}/file{number}": content})
        digest = push_blob(registry, repo, path)
        files[digest] = path
        layers.append({"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": path.stat().st_size})
        diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest())
    config = json.dumps({
        "architecture": arch, "os": "linux", "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "damselfly preheat test", "comment": random.Random(seed).randbytes(MIN_BLOB).hex()}],
    }, sort_keys=True).encode()
    config_path = workdir / f"{arch}-config.json"
    config_path.write_bytes(config)
    config_digest = push_blob(registry, repo, config_path)
    files[config_digest] = config_path
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest,
                   "size": len(config)},
        "layers": layers,
    }, sort_keys=True).encode()
    return manifest, files


def push_multi_arch_image(registry: Registry, relay: ByteCountingRelay, workdir: Path) -> PushedImage:
    entries = []
    files = {}
    for seed, arch in enumerate((HOST_ARCH, OTHER_ARCH), start=1):
        manifest, files[arch] = _push_platform(registry, REPO, workdir, arch, seed)
        digest = push_manifest(registry, REPO, f"sha256:{hashlib.sha256(manifest).hexdigest()}", manifest,
                               oci.OCI_MANIFEST)
        entries.append({"mediaType": oci.OCI_MANIFEST, "digest": digest, "size": len(manifest),
                        "platform": {"os": "linux", "architecture": arch}})
    index = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": entries}).encode()
    push_manifest(registry, REPO, "v1", index, oci.OCI_INDEX)
    return PushedImage(f"127.0.0.1:{relay.port}/{REPO}:v1", files)


@dataclass
class Network:
    cluster: LocalCluster
    seed: Node
    nodes: list[Node]


@pytest.fixture
def network(cluster: LocalCluster, token_registry: Registry,
            relay_factory: Callable[..., ByteCountingRelay]) -> Iterator[tuple[Network, ByteCountingRelay]]:
    relay = relay_factory(token_registry.port)
    # Every dfdaemon mirrors the registry through the relay, so any blob a node or the seed
    # fetched from the registry for a pull would be counted.
    seed, nodes = start_network(cluster, [f"node{i}" for i in range(1, 5)], "--registry-mirror", relay.url)
    yield Network(cluster, seed, nodes), relay


def preheat(network: Network, image: str, *extra: str) -> subprocess.CompletedProcess[str]:
    assert network.cluster.scheduler is not None
    scheduler = f"127.0.0.1:{network.cluster.scheduler.ports['grpc']}"
    return subprocess.run([sys.executable, "-m", "common.cli", "preheat", image, "--scheduler", scheduler,
                           "--plain-http", *extra], capture_output=True, text=True, timeout=300)


def skopeo_pull(node: Node, creds: str, out: Path) -> subprocess.CompletedProcess[str]:
    """skopeo names the node's mirror as the registry (it sends --src-creds only to the registry it
    names); the dfdaemon's --registry-mirror is the upstream."""
    image = f"127.0.0.1:{node.ports['proxy']}/{REPO}:v1"
    return subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", "--src-creds", creds, "--override-os", "linux",
         "--override-arch", HOST_ARCH, f"docker://{image}", f"dir:{out}"],
        capture_output=True, text=True, timeout=300)


def test_preheat_then_four_nodes_pull_with_no_blob_from_the_registry(
    network: tuple[Network, ByteCountingRelay], token_registry: Registry, tmp_path: Path
) -> None:
    net, relay = network
    assert token_registry.credentials is not None
    creds = ":".join(token_registry.credentials)
    image = push_multi_arch_image(token_registry, relay, tmp_path / "image")
    wanted = image.files[HOST_ARCH]

    # 1. Preheat the host's platform: each of its four blobs is fetched once, by the seed.
    relay.reset()
    first = preheat(net, image.reference, "--platform", f"linux/{HOST_ARCH}", "--creds", creds)
    assert first.returncode == 0, first.stdout + first.stderr
    lines = [line for line in first.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 4 and all("fetched by seed" in line for line in lines), first.stdout
    for digest in wanted:
        assert any(digest in line for line in lines), f"{digest} has no progress line:\n{first.stdout}"
    assert "4/4 blobs" in first.stdout.splitlines()[-1], first.stdout
    fetched = relay.bytes_from_target
    assert image.size(HOST_ARCH) <= fetched < image.size(HOST_ARCH) + MIN_BLOB, (
        f"the registry sent {fetched} bytes for {image.size(HOST_ARCH)} bytes of {HOST_ARCH} blobs: "
        f"one copy, and nothing of {OTHER_ARCH}")

    # 2. Again: every blob is already on the seed and none is read from the registry.
    relay.reset()
    again = preheat(net, image.reference, "--platform", f"linux/{HOST_ARCH}", "--creds", creds)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already on seed") == 4, again.stdout
    assert relay.bytes_from_target < NON_BLOB_BUDGET, "a preheated blob was fetched again"

    # 3. Four nodes pull at once through their mirrors: every blob byte comes from peers.
    relay.reset()
    outputs = [tmp_path / f"pull-{node.name}" for node in net.nodes]
    with ThreadPoolExecutor(len(net.nodes)) as pool:
        pulls = list(pool.map(lambda pair: skopeo_pull(pair[0], creds, pair[1]), zip(net.nodes, outputs, strict=True)))
    for node, pull in zip(net.nodes, pulls, strict=True):
        assert pull.returncode == 0, f"{node.name}: {pull.stderr}"
    origin_bytes = relay.bytes_from_target
    assert origin_bytes < NON_BLOB_BUDGET, (
        f"the registry sent {origin_bytes} bytes during the pulls; a blob (>= {MIN_BLOB}) came from it")
    for out in outputs:
        for digest, path in wanted.items():
            copied = out / digest.removeprefix("sha256:")
            assert copied.exists(), f"{digest} missing from {out}"
            assert sha256_file(copied) == digest == sha256_file(path)
    print(f"\npreheat: {fetched} origin bytes for {image.size(HOST_ARCH)} bytes of blobs; "
          f"4 pulls: {origin_bytes} origin bytes (manifests and checks), 0 blob bytes")


def test_a_layer_that_cannot_be_preheated_is_named(
    network: tuple[Network, ByteCountingRelay], token_registry: Registry, tmp_path: Path
) -> None:
    net, relay = network
    assert token_registry.credentials is not None
    creds = ":".join(token_registry.credentials)
    manifest, files = _push_platform(token_registry, "preheat/broken", tmp_path, HOST_ARCH, seed=7)
    push_manifest(token_registry, "preheat/broken", "v1", manifest, oci.OCI_MANIFEST)
    lost = next(d for d, p in files.items() if p.name.endswith("layer1.tar.gz"))
    data = token_registry.storage / "docker/registry/v2/blobs/sha256" / lost[7:9] / lost[7:] / "data"
    data.unlink()  # the registry still lists the layer, but cannot serve it

    result = preheat(net, f"127.0.0.1:{relay.port}/preheat/broken:v1", "--creds", creds)
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if "FAILED" in line and line.startswith("[")]
    assert len(failed) == 1 and lost in failed[0], result.stdout
    assert result.stdout.count("fetched by seed") == 3, result.stdout
    assert "1 failed" in result.stdout.splitlines()[-1]

    # The scheduler's PreheatImage (Dragonfly's API) resolves the image itself and names the layer too.
    assert net.cluster.scheduler is not None
    user, password = token_registry.credentials
    request = scheduler_pb2.PreheatImageRequest(url=f"http://127.0.0.1:{relay.port}/v2/preheat/broken/manifests/v1",
                                                username=user, password=password)
    address = f"127.0.0.1:{net.cluster.scheduler.ports['grpc']}"
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as refused:
        scheduler_pb2_grpc.SchedulerStub(channel).PreheatImage(request, timeout=120)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value
    assert f"layer {lost}" in str(refused.value.details()), refused.value.details()


def test_resolution_errors_say_what_to_do(token_registry: Registry, relay_factory: Callable[..., ByteCountingRelay],
                                          tmp_path: Path) -> None:
    """No cluster needed: these fail before any scheduler is asked (its address is never dialed)."""
    relay = relay_factory(token_registry.port)
    image = push_multi_arch_image(token_registry, relay, tmp_path / "image")
    assert token_registry.credentials is not None
    creds = ":".join(token_registry.credentials)
    nowhere = f"127.0.0.1:{free_port()}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "common.cli", "preheat", *args, "--scheduler", nowhere],
                              capture_output=True, text=True, timeout=120)

    cases = [
        (("--plain-http",), "credentials missing or refused: pass --creds USER:PASSWORD or --auth-file"),
        (("--plain-http", "--creds", "damselfly:wrong"), "credentials missing or refused"),
        (("--creds", creds), "needs --plain-http"),
        (("--plain-http", "--creds", creds, "--platform", "linux/s390x"),
         f"no linux/s390x manifest; it offers linux/{min(HOST_ARCH, OTHER_ARCH)}, linux/{max(HOST_ARCH, OTHER_ARCH)}"),
    ]
    for args, message in cases:
        result = run(image.reference, *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert result.stderr.startswith("damselfly preheat: error: "), (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    missing = run(image.reference.replace(":v1", ":v2"), "--plain-http", "--creds", creds)
    assert missing.returncode == 1 and "no such image or tag" in missing.stderr, missing.stderr

    # The image resolves, but no scheduler answers: each blob's line says so, and the exit status is 1.
    down = run(image.reference, "--plain-http", "--creds", creds, "--platform", f"linux/{HOST_ARCH}")
    assert down.returncode == 1
    failed = [line for line in down.stdout.splitlines() if line.startswith("[")]
    assert len(failed) == 4 and all(f"FAILED: scheduler {nowhere} unavailable" in line for line in failed), down.stdout
