"""Fixtures that run Damselfly itself as real processes (scheduler, seeds, dfdaemons).

``cluster``: a :class:`common.launcher.LocalCluster` rooted in the test's tmp dir, stopped at the end;
when the test failed, the tail of every node's log is printed to help the reader.
``dfget``: run the real dfget against a node, returning the CompletedProcess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.launcher import LocalCluster, Node, dfget_command, tail


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path / "cluster", log_level=os.environ.get("DAMSELFLY_TEST_LOG_LEVEL", "info"))
    try:
        yield local
    finally:
        local.stop()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            for node in local.nodes:
                print(f"\n----- {node.name} ({node.log_path}) -----\n{tail(node.log_path, 40)}")


def run_dfget(
    node: Node, url: str, output: Path, *extra: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The real dfget against `node`'s socket."""
    assert node.socket_path is not None
    return subprocess.run(dfget_command(sys.executable, url, output, node.socket_path, *extra),
                          capture_output=True, text=True, timeout=timeout)


def start_dfget(node: Node, url: str, output: Path, *extra: str) -> subprocess.Popen[str]:
    """The real dfget against `node`'s socket, in the background."""
    assert node.socket_path is not None
    return subprocess.Popen(dfget_command(sys.executable, url, output, node.socket_path, *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_network(cluster: LocalCluster, names: list[str], *extra: str, seed_extra: tuple[str, ...] = (),
                  scheduler_extra: tuple[str, ...] = ()) -> tuple[Node, list[Node]]:
    """A scheduler, one seed and a dfdaemon per name, all ready; `extra` flags go to every daemon."""
    seed = cluster.plan_dfdaemon("seed", seed=True)
    cluster.start_scheduler(*scheduler_extra, seeds=[seed])
    cluster.start_dfdaemon("seed", *extra, *seed_extra, node=seed)
    daemons = [cluster.start_dfdaemon(name, *extra) for name in names]
    assert cluster.scheduler is not None
    cluster.wait_ready(cluster.scheduler, seed, *daemons)
    return seed, daemons


@pytest.fixture
def dfget() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_dfget
