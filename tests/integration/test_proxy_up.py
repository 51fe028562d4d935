"""``damselfly up`` as a user runs it: a registry mirror for clients that name no registry, dfdaemon
flags passed through, fixed ports that survive a restart, health URLs printed."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.launcher import NODE_PORT_STRIDE, fixed_node_ports, http_get, port_in_use, wait_until
from tests.support.registry import Registry, push_random_blob

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


def test_up_mirrors_a_registry_on_fixed_ports_across_restarts(registry: Registry, tmp_path: Path,
                                                              ups: list[Up]) -> None:
    digest, path = push_random_blob(registry, "up/mirror", 1 * MIB + 9, seed=90)
    base = free_base_port()
    proxy = fixed_node_ports(base, 1)["proxy"]
    # One P2P request per 100 s: the second one within the test is refused, which shows the
    # flag reached the dfdaemon.
    args = ["--data-dir", str(tmp_path / "up"), "--peers", str(PEERS), "--base-port", str(base),
            "--registry-mirror", registry.url, "--dfdaemon-args=--proxy-p2p-rate 0.01"]
    for run in range(2):
        up = Up(tmp_path, *args)
        ups.append(up)
        printed = up.wait_ready()
        assert f"proxy 127.0.0.1:{proxy} " in printed, printed
        health = re.search(r"peer1 .*health (\S+)", printed)
        assert health is not None, printed
        assert health.group(1) == f"http://127.0.0.1:{fixed_node_ports(base, 1)['health']}/healthy"
        assert http_get(health.group(1))[0] == 200
        # A registries.conf mirror or docker names no registry: --registry-mirror is the upstream.
        status, headers, body = get(proxy, f"/v2/up/mirror/blobs/{digest}")
        assert (status, body) == (200, path.read_bytes()), (run, body[:300])
        assert headers["x-dragonfly-task-id"]
        status, headers, _ = get(proxy, f"/v2/up/mirror/blobs/{digest}")
        assert (status, headers.get("retry-after")) == (429, "100"), "--dfdaemon-args reached the dfdaemon"
        assert up.stop() == 0


def test_up_names_the_flag_when_a_fixed_port_is_taken(tmp_path: Path, ups: list[Up]) -> None:
    base = free_base_port()
    taken = fixed_node_ports(base, 1)["proxy"]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        up = Up(tmp_path, "--data-dir", str(tmp_path / "up"), "--base-port", str(base))
        ups.append(up)
        assert up.process.wait(timeout=60) == 1
    assert f"--base-port {base}: 127.0.0.1:{taken} (peer1 proxy) is in use" in up.text()
