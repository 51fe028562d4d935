"""``/ready`` of a dfdaemon is about its own storage, not the scheduler.

The chart's readiness probe reads it: if it meant "a scheduler is reachable", one scheduler
outage would mark every dfdaemon of a 1,000-node cluster NotReady (stalled rollouts, ``helm
--wait`` timing out) while each node still serves its cache and falls back to the origin. A
real dfdaemon process with no scheduler listening must be ready (saying it is degraded), and
unready as soon as its data directory cannot be written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common.launcher import LocalCluster, Node, wait_until

pytestmark = pytest.mark.integration

READY_TIMEOUT = 30.0


def ready(node: Node) -> tuple[int, str]:
    if not node.alive:
        raise AssertionError(f"{node.name} exited; see {node.log_path}")
    status, body = node.get("health", "/ready")
    return status, body.decode()


def test_dfdaemon_is_ready_without_a_scheduler_and_unready_without_storage(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "cluster")
    try:
        # Nothing listens on the scheduler address the dfdaemon is given.
        node = cluster.start_dfdaemon("lonely")
        wait_until(lambda: ready(node)[0] == 200, READY_TIMEOUT, "the dfdaemon to be ready without a scheduler")
        body = ready(node)[1]
        assert body.splitlines()[0] == "ready"
        assert "degraded: no scheduler reachable" in body, body
        assert node.get("metrics", "/ready")[0] == 200  # the metrics port answers the same

        # Storage gone (a file where the data directory was): unready, with the reason.
        assert node.data_dir is not None
        shutil.rmtree(node.data_dir)
        node.data_dir.write_bytes(b"not a directory")
        wait_until(lambda: ready(node)[0] == 503, READY_TIMEOUT, "the dfdaemon to be unready without storage")
        assert "storage not writable" in ready(node)[1]
        node.data_dir.unlink()
        node.data_dir.mkdir()

        # A scheduler comes up: ready and no longer degraded.
        cluster.start_scheduler()
        wait_until(lambda: ready(node) == (200, "ready\n"), READY_TIMEOUT,
                   "the dfdaemon to reach the scheduler and drop the degraded line")
    finally:
        cluster.stop()
