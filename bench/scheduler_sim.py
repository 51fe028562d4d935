"""Drive the scheduling core with many virtual peers of one task and print register latency.

    python bench/scheduler_sim.py [--peers 10000] [--pieces 64] [--seed-hosts 1]

One seed back-sources the task; every virtual peer registers, gets parents, fetches a few pieces
from them and finishes, so the task's parent set grows as in a real rollout. Time is a
ManualClock: this measures the core's CPU cost per event, not the network.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common.clock import ManualClock
from common.config import SchedulerConfig
from scheduler.core import SchedulerCore, SendNormal
from scheduler.resource import DownloadSpec, HostInfo

PIECE = 4 * 1024 * 1024


def run(peers: int, pieces: int) -> None:
    clock = ManualClock()
    core = SchedulerCore(SchedulerConfig(), clock)
    task = "t" * 64
    core.announce_host(HostInfo(id="seed", ip="10.255.0.1", type=1, port=4000))
    core.register_peer("seed", task, "seed-peer", DownloadSpec(url="https://r/b", need_back_to_source=True))
    core.back_to_source_started("seed-peer")
    for n in range(pieces):
        core.back_to_source_piece_finished("seed-peer", n, n * PIECE, PIECE, f"xxh3:{n:032x}")
    core.back_to_source_finished("seed-peer")

    latencies: list[float] = []
    other: list[float] = []
    for i in range(peers):
        host = f"h{i}"
        core.announce_host(HostInfo(id=host, ip=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", port=4000))
        start = time.perf_counter()
        decisions = core.register_peer(host, task, f"p{i}", DownloadSpec(url="https://r/b"))
        latencies.append(time.perf_counter() - start)
        first = decisions[0] if decisions else None
        if not isinstance(first, SendNormal):
            continue
        parent = first.candidates[0].peer_id
        start = time.perf_counter()
        core.download_started(f"p{i}")
        for n in range(pieces):
            core.piece_finished(f"p{i}", n, n * PIECE, PIECE, parent, 0.05)
        # most peers finish; a tenth stay running as hungry children
        if i % 10:
            core.peer_finished(f"p{i}")
        other.append((time.perf_counter() - start) / (pieces + 2))
        clock.advance(0.001)

    def row(name: str, values: list[float]) -> str:
        values = sorted(values)
        p99 = values[int(len(values) * 0.99) - 1]
        return (f"| {name:<22} | {len(values):>7} | {statistics.mean(values) * 1e6:>9.1f} | "
                f"{values[len(values) // 2] * 1e6:>9.1f} | {p99 * 1e6:>9.1f} | {values[-1] * 1e6:>9.1f} |")

    print(f"{peers} peers, {pieces} pieces, one seed; microseconds per call")
    print("| event                  |   calls |      mean |    median |       p99 |       max |")
    print("|------------------------|---------|-----------|-----------|-----------|-----------|")
    print(row("register_peer", latencies))
    print(row("other peer events", other))
    first_half, second_half = latencies[: peers // 2], latencies[peers // 2:]
    print(f"mean register, first half {statistics.mean(first_half) * 1e6:.1f} us, "
          f"second half {statistics.mean(second_half) * 1e6:.1f} us (flat = O(candidates))")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--pieces", type=int, default=64)
    args = parser.parse_args()
    run(args.peers, args.pieces)


if __name__ == "__main__":
    main()
