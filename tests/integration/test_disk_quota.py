"""Disk quota (issue 5, scenario 8): a real dfdaemon with a cache quota smaller than the working set.

The cache's usage is read twice, from the daemon's metrics and from its data directory (the
tasks whose metadata is still on disk and the size of their content), so a GC that only updated
its own counters would not pass.
"""

from __future__ import annotations

from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import pytest

from common.launcher import LocalCluster, sha256_file, wait_until
from tests.support.cluster import run_dfget
from tests.support.registry import Registry, push_random_blob

pytestmark = pytest.mark.integration

MIB = 1 << 20
QUOTA = 16 * MIB
HIGH = 0.9  # the default high watermark: collect above 14.4 MiB
LOW = 0.8  # collect down to 12.8 MiB
BLOB = 6 * MIB  # two blobs fit (12 MiB), three do not (18 MiB > the 16 MiB quota)
CACHE_USED = "damselfly_dfdaemon_cache_used_bytes"
EVICTED = 'damselfly_dfdaemon_gc_evicted_tasks_total{reason="quota"}'


def cached_urls(data_dir: Path) -> dict[str, int]:
    """URL -> content bytes of every task whose files are in the daemon's cache directory."""
    found: dict[str, int] = {}
    for metadata in (data_dir / "tasks").glob("*/*/metadata"):
        try:
            meta = msgpack.unpackb(metadata.read_bytes(), strict_map_key=False)
            size = (metadata.parent / "content").stat().st_size
        except (FileNotFoundError, ValueError):
            continue  # being moved to the trash right now
        if meta.get("state") == "succeeded":
            found[meta["url"]] = size
    return found


def test_quota_evicts_the_least_recently_used_blob_down_to_the_low_watermark(
    cluster: LocalCluster, registry: Registry, tmp_path: Path
) -> None:
    blobs = {name: push_random_blob(registry, f"gc/{name}", BLOB, seed=80 + i)[0]
             for i, name in enumerate(("a", "b", "c"))}
    urls = {name: registry.blob_url(f"gc/{name}", digest) for name, digest in blobs.items()}
    scheduler = cluster.start_scheduler()
    peer = cluster.start_dfdaemon("peer", "--cache-quota", str(QUOTA), "--gc-high-watermark", str(HIGH),
                                  "--gc-low-watermark", str(LOW), "--gc-interval", "1s")
    cluster.wait_ready(scheduler, peer)
    data_dir = peer.data_dir
    assert data_dir is not None

    def fetch(name: str, attempt: str) -> None:
        output = tmp_path / f"{name}-{attempt}.blob"
        result = run_dfget(peer, urls[name], output)
        assert result.returncode == 0, f"dfget {name} ({attempt}): {result.stderr}"
        assert sha256_file(output) == blobs[name], f"{name} ({attempt}) is not byte-exact"

    fetch("a", "first")
    fetch("b", "first")
    assert set(cached_urls(data_dir)) == {urls["a"], urls["b"]}, "12 MiB is under the high watermark"
    fetch("a", "again")  # a cache hit: a is now more recently used than b
    fetch("c", "first")  # 18 MiB: over the quota's high watermark

    def collected() -> bool:
        return (peer.metrics().get(CACHE_USED, QUOTA) <= LOW * QUOTA
                and urls["b"] not in cached_urls(data_dir))

    wait_until(collected, 30, "the cache to fall to the low watermark")
    cached = cached_urls(data_dir)
    metrics = peer.metrics()
    print(f"\ncache after GC: {metrics[CACHE_USED] / MIB:.1f} MiB in metrics, "
          f"{sum(cached.values()) / MIB:.1f} MiB on disk, quota {QUOTA / MIB:.0f} MiB, "
          f"low watermark {LOW * QUOTA / MIB:.1f} MiB, evicted {metrics.get(EVICTED, 0):.0f}")
    assert set(cached) == {urls["a"], urls["c"]}, "b, the least recently used, goes; a (read again) and c stay"
    assert sum(cached.values()) <= LOW * QUOTA
    assert metrics[CACHE_USED] == sum(cached.values()) == 2 * BLOB
    assert metrics.get(EVICTED) == 1

    # An evicted blob is simply fetched again, byte-exact; the GC then makes room once more.
    fetch("b", "after eviction")
    wait_until(lambda: urls["a"] not in cached_urls(data_dir), 30, "a, now the LRU blob, to be evicted")
    assert set(cached_urls(data_dir)) == {urls["b"], urls["c"]}
    assert peer.metrics().get(EVICTED) == 2
