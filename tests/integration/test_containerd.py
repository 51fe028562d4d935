"""containerd as a tested client: ``ctr images pull --hosts-dir DIR --plain-http`` through dfdaemons
configured exactly as docs/integrations.md says.

A private registry (its log lists every blob GET it answered), a scheduler, a seed and two
dfdaemons that mirror no registry by default, and two private containerds. The first pulls a
3-layer image through node A with the ``X-Dragonfly-Registry`` header; the second pulls it
through node B *without* the header (containerd's ``?ns=`` alone names the plain-HTTP registry).
containerd verifies every blob against its digest and every unpacked layer against the config's
``diff_ids``. containerd's fallback (hosts.toml ``server``) is a byte-counting relay in front of
the registry: it must carry nothing (a fallback would otherwise be silent). The registry's log
must show no blob ``GET`` from anyone during the second pull.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.digest import file_digest
from common.launcher import LocalCluster, Node, http_get, wait_until
from tests.support.containerd import containerd_available, running_containerd, write_hosts_toml
from tests.support.registry import Registry, push_image, write_layer_tar
from tests.support.relay import ByteCountingRelay

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(containerd_available() is not None, reason=str(containerd_available())),
]

MIB = 1 << 20
LAYER_SIZES = (9 * MIB, 4 * MIB, 1 * MIB)  # the first one spans three 4 MiB pieces
P2P_OK = 'damselfly_dfdaemon_proxy_requests_total{route="p2p",status="2xx"}'
FROM_PEERS = 'damselfly_dfdaemon_download_traffic_bytes_total{type="remote_peer"}'
# One line per answered request in distribution's log (access log off, level info).
_BLOB_GET = re.compile(r'http\.request\.method=GET .*http\.request\.uri="?/v2/[^" ]*/blobs/(sha256:[0-9a-f]{64})')


class RegistryLog:
    """Blob GETs the registry answered, read from its log between two points in time."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.path = registry.workdir / "registry.log"
        self.offset = self.path.stat().st_size

    def blob_gets(self) -> list[str]:
        """The digest of every blob GET answered since the last call (or creation).

        A marker request is sent first and waited for, so every answer before it is in the log.
        """
        marker = uuid.uuid4().hex
        http_get(f"{self.registry.url}/v2/?marker={marker}")
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            new = b""

            def logged() -> bool:
                nonlocal new
                new += log.read()
                return marker.encode() in new

            wait_until(logged, 10, "the registry to log the marker request")
        self.offset += len(new)
        return [m.group(1) for m in map(_BLOB_GET.search, new.decode(errors="replace").splitlines()) if m]


@pytest.fixture
def network(tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    cluster = LocalCluster(tmp_path / "cluster")
    try:
        seed = cluster.plan_dfdaemon("seed", seed=True)
        cluster.start_scheduler(seeds=[seed])
        cluster.start_dfdaemon("seed", node=seed)
        node_a, node_b = cluster.start_dfdaemon("node-a"), cluster.start_dfdaemon("node-b")
        assert cluster.scheduler is not None
        cluster.wait_ready(cluster.scheduler, seed, node_a, node_b)
        yield node_a, node_b
    finally:
        cluster.stop()


def test_ctr_pulls_through_two_nodes_and_the_second_costs_the_registry_no_blob(
    registry_factory: Callable[..., Registry], relay_factory: Callable[..., ByteCountingRelay],
    network: tuple[Node, Node], tmp_path: Path,
) -> None:
    node_a, node_b = network
    registry = registry_factory()
    layers = [write_layer_tar(tmp_path / f"layer{i}.tar.gz", {f"data{i}.bin": random.Random(i).randbytes(size)})
              for i, size in enumerate(LAYER_SIZES)]
    manifest = push_image(registry, "ctr/app", "v1", layers)
    reference = f"{registry.host}/ctr/app:v1"
    layer_digests = {file_digest(layer) for layer in layers}
    log = RegistryLog(registry)
    fallback = relay_factory(registry.port)  # containerd's `server`: the registry, counted

    # Node A, hosts.toml with the X-Dragonfly-Registry header.
    with_header = write_hosts_toml(tmp_path / "hosts-a", registry.host, server=fallback.url,
                                   mirror=f"http://127.0.0.1:{node_a.ports['proxy']}", header_registry=registry.url)
    with running_containerd(tmp_path / "containerd-a") as containerd:
        first = containerd.pull(reference, hosts_dir=with_header)
    assert {manifest, *layer_digests} <= first.content, first.output
    assert "unpacking linux/amd64" in first.output and "done" in first.output, first.output
    assert fallback.connections == 0, "containerd fell back to the registry"
    first_gets = log.blob_gets()  # the seed's back-source, one GET per piece
    assert node_a.metrics()[P2P_OK] >= len(layers) + 1, "config and layers came through P2P"

    # Node B, hosts.toml without the header: ?ns=<registry host> alone names the plain-HTTP registry.
    without_header = write_hosts_toml(tmp_path / "hosts-b", registry.host, server=fallback.url,
                                      mirror=f"http://127.0.0.1:{node_b.ports['proxy']}")
    with running_containerd(tmp_path / "containerd-b") as containerd:
        second = containerd.pull(reference, hosts_dir=without_header)
    assert {manifest, *layer_digests} <= second.content, second.output
    assert fallback.connections == 0, "containerd fell back to the registry"
    assert log.blob_gets() == [], "the second pull's blobs came from peers, none from the registry"
    metrics = node_b.metrics()
    assert metrics[P2P_OK] >= len(layers) + 1
    assert metrics[FROM_PEERS] >= sum(layer.stat().st_size for layer in layers)
    print(f"\nctr pull through node A (cold): {first.seconds:.2f}s; through node B (from peers): "
          f"{second.seconds:.2f}s; registry blob GETs during the first pull: {len(first_gets)}")
