"""The container image: built on this machine without a daemon, pulled through Damselfly, run;
and the chart's hosts.toml as containerd reads it.

``scripts/build-image.sh`` builds the Containerfile with buildah (base: a debootstrap'd bookworm,
cached in .cache/image) and pushes it to a real ``docker-registry``. A private containerd pulls it
with ``ctr images pull --hosts-dir`` through a dfdaemon configured as the chart's hosts.toml
(mirror = the dfdaemon's proxy with the ``X-Dragonfly-Registry`` header, fallback = a relay in
front of the registry that must carry nothing), then ``ctr run`` (runc) runs ``damselfly
--version`` from the pulled image. containerd verifies every blob against the manifest's digests
and every unpacked layer against the config's diff_ids, so a pull that succeeds is byte-exact.

The second test renders the chart's hosts.toml (``helm template``) with the local dfdaemon's port
closed and a second mirror listed (``containerd.injectMirror.extraMirrors``, the migration set-up
of docs/chart.md): containerd must accept the file (header, ``dial_timeout``) and pull through the
second mirror, never the registry.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
import tomllib
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from common.digest import file_digest
from common.launcher import LocalCluster, free_port
from tests.support.cluster import start_network
from tests.support.containerd import containerd_available, running_containerd, write_hosts_toml
from tests.support.registry import OCI_MANIFEST, Registry, push_image, write_layer_tar
from tests.support.relay import ByteCountingRelay
from tests.unit.test_chart import CHART, _obtain_helm

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
BUILD_TIMEOUT = 1200.0  # a first build: debootstrap and every dependency from PyPI
P2P_OK = 'damselfly_dfdaemon_proxy_requests_total{route="p2p",status="2xx"}'


def _cannot_build() -> str | None:
    """None when this machine can build and run the image, else why not."""
    for tool in ("buildah", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is missing; scripts/setup.sh installs it"
    if os.geteuid() != 0:
        return "building the image needs root (debootstrap, buildah's chroot)"
    return containerd_available()


pytestmark = pytest.mark.integration


@pytest.fixture
def _buildable() -> None:
    reason = _cannot_build()
    if reason is not None:
        # Not root: skipped like every containerd test. A missing tool in CI is an error:
        # scripts/setup.sh installs them.
        if os.environ.get("CI") and os.geteuid() == 0:
            pytest.fail(f"cannot build the image: {reason} (CI is set, so this is an error)")
        pytest.skip(reason)


def _manifest(registry: Registry, repository: str, tag: str) -> dict[str, object]:
    request = urllib.request.Request(f"{registry.url}/v2/{repository}/manifests/{tag}",
                                     headers={"Accept": OCI_MANIFEST})
    with urllib.request.urlopen(request, timeout=30) as response:
        manifest: dict[str, object] = json.loads(response.read())
    assert manifest["mediaType"] == OCI_MANIFEST, manifest
    return manifest


@pytest.mark.slow
@pytest.mark.usefixtures("_buildable")
def test_image_is_pulled_through_a_dfdaemon_by_containerd_and_runs(
    registry: Registry, relay_factory: Callable[..., ByteCountingRelay], cluster: LocalCluster, tmp_path: Path,
) -> None:
    repository, tag = "damselfly/damselfly", f"{VERSION}-test"
    reference = f"{registry.host}/{repository}:{tag}"
    started = time.monotonic()
    build = subprocess.run(
        [str(ROOT / "scripts" / "build-image.sh"), "--tag", f"localhost/damselfly:{tag}",
         "--push", f"docker://{reference}"],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False, stdin=subprocess.DEVNULL,
    )
    build_seconds = time.monotonic() - started
    assert build.returncode == 0, build.stdout + build.stderr
    assert f"pushed docker://{reference}" in build.stdout, build.stdout

    manifest = _manifest(registry, repository, tag)
    layers = manifest["layers"]
    assert isinstance(layers, list) and layers
    config = manifest["config"]
    assert isinstance(config, dict)
    blobs = {config["digest"], *(layer["digest"] for layer in layers)}
    packed = sum(int(layer["size"]) for layer in layers)

    # The registry is an upstream the operator allows (the chart lists its mirrored registries).
    _, (node,) = start_network(cluster, ["node"], "--proxy-allowed-upstreams", registry.url)
    fallback = relay_factory(registry.port)  # containerd's `server`: the registry, counted
    hosts = write_hosts_toml(tmp_path / "hosts", registry.host, server=fallback.url,
                             mirror=f"http://127.0.0.1:{node.ports['proxy']}", header_registry=registry.url)
    with running_containerd(tmp_path / "containerd") as containerd:
        pulled = containerd.pull(reference, hosts_dir=hosts)
        assert blobs <= pulled.content, pulled.output
        assert fallback.connections == 0, "containerd fell back to the registry: the image did not come through P2P"
        assert node.metrics()[P2P_OK] >= len(blobs), "the config and every layer came through the dfdaemon"

        # runc, through containerd: the image's own `damselfly`, as the chart runs it.
        run = containerd.ctr("run", "--rm", reference, "damselfly-version", "damselfly", "--version",
                             timeout=120, check=False)
        assert run.returncode == 0, run.stdout + run.stderr
        assert re.search(rf"\b{re.escape(VERSION)}\b", run.stdout), run.stdout
        whoami = containerd.ctr("run", "--rm", reference, "damselfly-id", "id", "-u", timeout=120)
        assert whoami.stdout.strip() == "65532", "the image runs as non-root by default"
    print(f"\nimage: build+push {build_seconds:.1f}s, {len(layers)} layers, {packed / 1e6:.1f} MB compressed; "
          f"ctr pull through the dfdaemon {pulled.seconds:.1f}s")


@pytest.mark.skipif(containerd_available() is not None, reason=str(containerd_available()))
def test_chart_hosts_toml_falls_back_to_the_next_mirror_not_the_registry(
    registry: Registry, relay_factory: Callable[..., ByteCountingRelay], cluster: LocalCluster, tmp_path: Path,
) -> None:
    helm, why = _obtain_helm()
    if helm is None:
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)
    layers = [write_layer_tar(tmp_path / f"layer{i}.tar.gz", {f"f{i}.bin": random.Random(i).randbytes(size)})
              for i, size in enumerate((3 << 20, 1 << 20))]
    manifest = push_image(registry, "chart/app", "v1", layers)
    fallback = relay_factory(registry.port)  # the hosts.toml `server` (and P2P's upstream), counted
    _, (node,) = start_network(cluster, ["node"], "--proxy-allowed-upstreams", fallback.url)
    closed = free_port()  # the "local dfdaemon" that is not up yet
    render = subprocess.run(
        [helm, "template", "rel", str(CHART), "--set", "containerd.injectMirror.enabled=true",
         "--set", f"ports.dfdaemon.proxy={closed}",
         "--set", f"containerd.injectMirror.registries[0].host={registry.host}",
         "--set", f"containerd.injectMirror.registries[0].server={fallback.url}",
         "--set", f"containerd.injectMirror.extraMirrors={{http://127.0.0.1:{node.ports['proxy']}}}"],
        capture_output=True, text=True, timeout=120, check=False)
    assert render.returncode == 0, render.stderr
    configmap = next(d for d in yaml.safe_load_all(render.stdout)
                     if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "rel-dfdaemon-containerd")
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / registry.host).mkdir(parents=True)
    (hosts_dir / registry.host / "hosts.toml").write_text(configmap["data"]["hosts-0.toml"])

    with running_containerd(tmp_path / "containerd") as containerd:
        pulled = containerd.pull(f"{registry.host}/chart/app:v1", hosts_dir=hosts_dir)
    assert {manifest, *(file_digest(layer) for layer in layers)} <= pulled.content, pulled.output
    # Every blob came through the second mirror (containerd fetches a blob once)...
    assert node.metrics()[P2P_OK] >= len(layers) + 1, "config and layers came through the second mirror"
    # ...and the registry served one copy: the seed's back-source (the X-Dragonfly-Registry header
    # names `server`, so P2P's upstream is the same relay). containerd going direct would double it.
    one_copy = sum(layer.stat().st_size for layer in layers)
    assert one_copy <= fallback.bytes_from_target < 1.5 * one_copy, (fallback.bytes_from_target, one_copy)
