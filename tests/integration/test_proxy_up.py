"""``damselfly up`` as a user runs it: a registry mirror for clients that name no registry, dfdaemon
flags passed through, fixed ports that survive a restart, health URLs printed."""

from __future__ import annotations

import http.client
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.digest import file_digest
from common.launcher import NODE_PORT_STRIDE, fixed_node_ports, http_get, port_in_use, wait_until
from tests.support.registry import Registry, push_image, write_layer_tar

pytestmark = pytest.mark.integration

MIB = 1 << 20
PEERS = 1


def free_base_port() -> int:
    """A base port whose whole `up --base-port` layout is free right now."""
    for base in range(21000, 31000, 97):
        if not any(port_in_use(p) for p in range(base, base + NODE_PORT_STRIDE * (PEERS + 1) + 5)):
            return base
    raise RuntimeError("no free port range for damselfly up")


class Up:
    """One `damselfly up` process; its output goes to a file the test reads."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.output = workdir / f"up-{len(list(workdir.glob('up-*.out')))}.out"
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "common.cli", "up", *args], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_ready(self) -> str:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"damselfly up exited with {self.process.returncode}:\n{self.text()}")
            return "ready; Ctrl-C stops everything" in self.text()

        wait_until(ready, 60, "damselfly up to be ready")
        return self.text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture
def ups() -> Iterator[list[Up]]:
    started: list[Up] = []
    yield started
    for up in started:
        up.stop()


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def start_up(tmp_path: Path, ups: list[Up], base: int, *args: str) -> str:
    """Start `damselfly up`, wait until ready, check peer1's printed health URL; what it printed."""
    up = Up(tmp_path, "--data-dir", str(tmp_path / "up"), "--peers", str(PEERS), "--base-port", str(base), *args)
    ups.append(up)
    printed = up.wait_ready()
    assert f"proxy 127.0.0.1:{fixed_node_ports(base, 1)['proxy']} " in printed, printed
    health = re.search(r"peer1 .*health (\S+)", printed)
    assert health is not None, printed
    assert health.group(1) == f"http://127.0.0.1:{fixed_node_ports(base, 1)['health']}/healthy"
    assert http_get(health.group(1))[0] == 200
    return printed


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_up_mirrors_a_registry_on_fixed_ports_across_restarts(registry: Registry, tmp_path: Path,
                                                              ups: list[Up]) -> None:
    layers = [write_layer_tar(tmp_path / f"layer{i}.tar.gz", {f"u{i}": random.Random(90 + i).randbytes(MIB)})
              for i in range(2)]
    push_image(registry, "up/mirror", "v1", layers)
    base = free_base_port()
    proxy = fixed_node_ports(base, 1)["proxy"]
    # skopeo names no registry in its mirror requests: --registry-mirror is the upstream. The
    # primary location does not exist, so a mirror that refuses cannot be hidden by a fallback.
    conf = tmp_path / "registries.conf"
    conf.write_text('unqualified-search-registries = []\n\n[[registry]]\nlocation = "registry.invalid:5000"\n'
                    f'\n[[registry.mirror]]\nlocation = "127.0.0.1:{proxy}"\ninsecure = true\n')
    start_up(tmp_path, ups, base, "--registry-mirror", registry.url)
    copied = subprocess.run(["skopeo", "--registries-conf", str(conf), "copy", "--src-tls-verify=false",
                             "docker://registry.invalid:5000/up/mirror:v1", f"dir:{tmp_path / 'out'}"],
                            capture_output=True, text=True, timeout=120)
    assert copied.returncode == 0, copied.stderr
    for layer in layers:
        digest = file_digest(layer)
        assert file_digest(tmp_path / "out" / digest.removeprefix("sha256:")) == digest
    assert ups[-1].stop() == 0

    # The same base port after a restart: the configured mirror address still reaches peer1.
    # One P2P request per 100 s, so the second is refused: --dfdaemon-args reached the dfdaemon.
    start_up(tmp_path, ups, base, "--registry-mirror", registry.url, "--dfdaemon-args=--proxy-p2p-rate 0.01")
    target = f"/v2/up/mirror/blobs/{file_digest(layers[0])}"
    status, headers, body = get(proxy, target)
    assert (status, body) == (200, layers[0].read_bytes()), body[:300]
    assert headers["x-dragonfly-task-id"]
    status, headers, _ = get(proxy, target)
    assert (status, headers.get("retry-after")) == (429, "100")
    assert ups[-1].stop() == 0


def test_up_names_the_flag_when_a_fixed_port_is_taken(tmp_path: Path, ups: list[Up]) -> None:
    base = free_base_port()
    taken = fixed_node_ports(base, 1)["proxy"]
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the previous test's TIME_WAITs
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        up = Up(tmp_path, "--data-dir", str(tmp_path / "up"), "--base-port", str(base))
        ups.append(up)
        assert up.process.wait(timeout=60) == 1
    assert f"--base-port {base}: 127.0.0.1:{taken} (peer1 proxy) is in use" in up.text()
