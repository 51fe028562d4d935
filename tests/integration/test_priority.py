"""dfget's ``-p`` with Dragonfly's meaning, end to end (a scheduler, a seed and a dfdaemon as
processes, a real registry as origin): LEVEL1 is refused, LEVEL2 is refused for a task nobody has
and served from peers once the seed has it, LEVEL3 makes the peer fetch a new task itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.launcher import LocalCluster, sha256_file
from tests.support.cluster import run_dfget, start_network
from tests.support.registry import Registry, push_random_blob

pytestmark = pytest.mark.integration

FROM_ORIGIN = 'damselfly_dfdaemon_download_traffic_bytes_total{type="back_to_source"}'
SIZE = 6 << 20


def test_priorities_decide_who_may_bring_a_new_task_in(
    cluster: LocalCluster, registry: Registry, tmp_path: Path
) -> None:
    seed, (peer,) = start_network(cluster, ["peer"])
    forbidden, _ = push_random_blob(registry, "priority/one", SIZE, seed=61)
    peers_only, _ = push_random_blob(registry, "priority/two", SIZE, seed=62)
    itself, _ = push_random_blob(registry, "priority/three", SIZE, seed=63)

    result = run_dfget(peer, registry.blob_url("priority/one", forbidden), tmp_path / "one", "-p", "1")
    assert result.returncode != 0
    assert "priority LEVEL1 forbids downloading it" in result.stderr

    url = registry.blob_url("priority/two", peers_only)
    result = run_dfget(peer, url, tmp_path / "two", "-p", "LEVEL2")
    assert result.returncode != 0
    assert "priority LEVEL2 allows peers only" in result.stderr
    assert seed.metrics().get(FROM_ORIGIN, 0) == 0  # nobody went to the origin for it
    # Once the seed has it (a default-priority download brought it in), LEVEL2 is served by peers.
    assert run_dfget(seed, url, tmp_path / "two-seed").returncode == 0
    result = run_dfget(peer, url, tmp_path / "two", "-p", "2")
    assert result.returncode == 0, result.stderr
    assert sha256_file(tmp_path / "two") == peers_only

    result = run_dfget(peer, registry.blob_url("priority/three", itself), tmp_path / "three", "-p", "3")
    assert result.returncode == 0, result.stderr
    assert sha256_file(tmp_path / "three") == itself
    assert peer.metrics()[FROM_ORIGIN] == SIZE  # the peer fetched it itself, not the seed
    assert seed.metrics().get(FROM_ORIGIN, 0) == SIZE  # only the LEVEL2 task, by its own dfget
