"""Latency and throughput of 1 MiB Range reads, the way nydusd reads a blob lazily.

    .venv/bin/python bench/range.py [--size-mib 256] [--reads 200] [--concurrency 1]

Starts a real ``docker-registry`` and a scheduler, a seed and one dfdaemon (real processes, the
dfdaemon a registry mirror of that registry), pushes random blobs, then reads random 1 MiB
ranges (not aligned to pieces) over keep-alive connections in three ways, in one run:

- ``direct``: from the registry itself;
- ``proxy cold``: through the dfdaemon's mirror on a blob no node has yet (the reads start at
  once; the pieces covering each read are fetched first and the rest of the blob is prefetched
  in the background, as at a container's cold start);
- ``proxy cached``: through the mirror once the blob is complete on the node.

Every body is compared with the pushed blob. Prints p50/p99 latency and MB/s per mode.
"""

from __future__ import annotations

import argparse
import http.client
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.launcher import LocalCluster
from tests.support.registry import push_random_blob, start_registry

MIB = 1024 * 1024
READ = MIB


@dataclass
class Result:
    mode: str
    latencies: list[float]
    seconds: float

    def row(self) -> str:
        ms = sorted(x * 1000 for x in self.latencies)
        p50 = statistics.median(ms)
        p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
        rate = len(ms) * READ / self.seconds / 1e6
        return f"{self.mode:<14} {len(ms):>6} {p50:>9.2f} {p99:>9.2f} {rate:>9.1f}"


def _reads(size: int, count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, size - READ) for _ in range(count)]


def _run(mode: str, port: int, path: str, starts: list[int], blob: bytes, concurrency: int) -> Result:
    def worker(share: list[int]) -> list[float]:
        latencies = []
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            for start in share:
                began = time.perf_counter()
                connection.request("GET", path, headers={"Range": f"bytes={start}-{start + READ - 1}"})
                response = connection.getresponse()
                body = response.read()
                latencies.append(time.perf_counter() - began)
                if response.status != 206 or body != blob[start:start + READ]:
                    raise AssertionError(f"{mode}: bad answer for bytes {start}-: {response.status}, {len(body)} B")
        finally:
            connection.close()
        return latencies

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        shares = list(pool.map(worker, [starts[i::concurrency] for i in range(concurrency)]))
    return Result(mode, [x for share in shares for x in share], time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256, help="blob size (default 256)")
    parser.add_argument("--reads", type=int, default=200, help="reads per mode (default 200)")
    parser.add_argument("--concurrency", type=int, default=1, help="parallel keep-alive connections (default 1)")
    args = parser.parse_args()
    size = args.size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="damselfly-bench-range-") as tmp:
        root = Path(tmp)
        registry = start_registry(root / "registry")
        cluster = LocalCluster(root / "cluster", log_level="warning")
        try:
            seed = cluster.plan_dfdaemon("seed", seed=True)
            cluster.start_scheduler(seeds=[seed])
            cluster.start_dfdaemon("seed", node=seed)
            node = cluster.start_dfdaemon("node", "--registry-mirror", registry.url)
            assert cluster.scheduler is not None
            cluster.wait_ready(cluster.scheduler, seed, node)
            proxy = node.ports["proxy"]
            digest_a, path_a = push_random_blob(registry, "bench/direct", size, seed=1)
            digest_b, path_b = push_random_blob(registry, "bench/proxied", size, seed=2)
            blob_a, blob_b = path_a.read_bytes(), path_b.read_bytes()

            results = [_run("direct", registry.port, f"/v2/bench/direct/blobs/{digest_a}",
                            _reads(size, args.reads, 10), blob_a, args.concurrency)]
            target = f"/v2/bench/proxied/blobs/{digest_b}"
            results.append(_run("proxy cold", proxy, target, _reads(size, args.reads, 11), blob_b,
                                args.concurrency))
            # A whole read waits for every piece: after it the blob is complete on the node.
            _run_whole(proxy, target, blob_b)
            results.append(_run("proxy cached", proxy, target, _reads(size, args.reads, 12), blob_b,
                                args.concurrency))
        finally:
            cluster.stop()
            registry.stop()
    print(f"\n1 MiB Range reads of a {args.size_mib} MiB blob, {args.concurrency} keep-alive connection(s)")
    print(f"{'mode':<14} {'reads':>6} {'p50 ms':>9} {'p99 ms':>9} {'MB/s':>9}")
    for result in results:
        print(result.row())


def _run_whole(port: int, path: str, blob: bytes) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        if response.status != 200 or response.read() != blob:
            raise AssertionError(f"whole read through the proxy failed: {response.status}")
    finally:
        connection.close()


if __name__ == "__main__":
    main()
