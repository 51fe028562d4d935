"""Lazy loading: N nydusd-like cold starts at once, straight from the registry vs through Damselfly.

    sudo .venv/bin/python bench/lazyload.py [--nodes 1,4,16] [--modes registry,damselfly,prefetch] \\
        [--size-mib 256] [--rate 200mbit]

Needs root (network namespaces) and Debian's docker-registry. ``../shared/tools/netlab.sh up
N+2 RATE RATE`` builds a star of namespaces with every link shaped to RATE both ways: the origin
host ``nl-origin`` runs a real registry behind a byte-counting relay; nodes ``nl-n1..nl-nN`` each
run one cold start; ``nl-n<N+1>`` runs the scheduler and ``nl-n<N+2>`` the seed peer, each on a
host of its own.

The cold-start trace imitates nydusd reading a lazily loaded layer: one 64 KiB read at the blob's
tail first (the blob meta / ToC), then READS reads of 4 KiB-1 MiB, together about 54 MiB, inside
the same hot ~12 % of the blob (24 extents), each node in an order of its own, 4 reads in flight,
one closed ``Range`` per read. Every body is compared with the blob.

Modes, each on a fresh cluster with empty caches:

* ``registry``: every node reads straight from the registry;
* ``damselfly``: through the node's dfdaemon started with ``--registry-mirror`` and ``--no-prefetch``;
* ``prefetch``: the same with ``--prefetch`` (the rest of the blob follows in the background).

Prints one table per run: trace time p50/max over nodes, read latency p50/p99 over all reads,
origin bytes ÷ blob and ÷ the unique bytes the traces read, wrong bodies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.distribution import (  # noqa: E402
    NetnsRelay,
    clean_up,
    daemons_cpu_seconds,
    existing_lab,
    netlab,
    node_ip,
    node_ns,
    stop_cluster,
)
from common.launcher import (  # noqa: E402
    _UPLOADED,
    LocalCluster,
    Node,
    in_netns,
)
from tests.support.registry import Registry, push_random_blob, start_registry  # noqa: E402

KIB, MIB = 1024, 1024 * 1024
ORIGIN_NS, ORIGIN_IP = "nl-origin", "10.77.0.2"
REPO_NAME = "bench/lazy"
_UPLOAD_PIECES = "damselfly_dfdaemon_upload_pieces_total"
META_READ = 64 * KIB  # nydusd reads the blob meta at the tail first
MIN_READ, MAX_READ = 4 * KIB, 1 * MIB
HOT_SHARE = 0.12
EXTENTS = 24
IN_FLIGHT = 4
READ_TIMEOUT = 300.0
MODES = ("registry", "damselfly", "prefetch")


@dataclass(frozen=True)
class Read:
    offset: int
    length: int


def make_trace(size: int, reads: int, target_bytes: int, seed: int) -> list[Read]:
    """The reads of one cold start (the tail read first, the rest in a canonical order).

    Extents cover HOT_SHARE of the blob; read sizes are log-uniform in [MIN_READ, MAX_READ],
    scaled until they add up to about `target_bytes`; each read lies inside one extent.
    """
    rng = random.Random(seed)
    hot = int(size * HOT_SHARE)
    extent_len = hot // EXTENTS
    slots = (size - META_READ) // extent_len  # extents never overlap and never reach the tail read
    starts = sorted(rng.sample(range(slots), EXTENTS))
    extents = [(slot * extent_len, extent_len) for slot in starts]
    raw = [rng.uniform(0.0, 1.0) for _ in range(reads)]
    scale = 1.0
    for _ in range(40):  # find the scale of the log-uniform draw that gives target_bytes in all
        lengths = [int(min(MAX_READ, MIN_READ * (MAX_READ / MIN_READ) ** (u * scale))) for u in raw]
        total = sum(lengths)
        if abs(total - target_bytes) < target_bytes * 0.02:
            break
        scale *= 1.1 if total < target_bytes else 0.93
    trace = [Read(size - META_READ, META_READ)]
    for length in lengths:
        start, span = extents[rng.randrange(EXTENTS)]
        length = min(length, span)
        trace.append(Read(start + rng.randrange(span - length + 1), length))
    return trace


def unique_bytes(trace: Sequence[Read]) -> int:
    """Bytes covered by the union of the reads."""
    covered = 0
    end = -1
    for read in sorted(trace, key=lambda r: r.offset):
        lo, hi = read.offset, read.offset + read.length
        if hi > end:
            covered += hi - max(lo, end)
            end = hi
    return covered


def node_order(trace: Sequence[Read], node: int) -> list[Read]:
    """One node's order: the tail read first, the others shuffled by the node's own seed."""
    rest = list(trace[1:])
    random.Random(1000 + node).shuffle(rest)
    return [trace[0], *rest]


# -- the replayer, run in a node's namespace ---------------------------------------------------


async def replay(url: str, blob_path: Path, reads: list[Read]) -> dict[str, object]:
    """Replay `reads` against `url`, IN_FLIGHT at a time after the first; time them and check bodies."""
    import aiohttp

    latencies: list[float] = []
    wrong: list[str] = []
    timeout = aiohttp.ClientTimeout(total=READ_TIMEOUT)
    with blob_path.open("rb") as blob:
        fd = blob.fileno()
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:

            async def one(read: Read) -> None:
                started = time.monotonic()
                headers = {"Range": f"bytes={read.offset}-{read.offset + read.length - 1}"}
                async with session.get(url, headers=headers) as response:
                    body = await response.read()
                latencies.append(time.monotonic() - started)
                if response.status != 206 or body != os.pread(fd, read.length, read.offset):
                    wrong.append(f"{read.offset}+{read.length}: HTTP {response.status}, {len(body)} bytes")

            queue = list(reversed(reads[1:]))

            async def worker() -> None:
                while queue:
                    await one(queue.pop())

            print("ready", flush=True)
            sys.stdin.readline()  # the go signal: every node starts at once
            started, cpu_started = time.monotonic(), time.process_time()
            await one(reads[0])
            await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
            elapsed, cpu = time.monotonic() - started, time.process_time() - cpu_started
    return {"seconds": elapsed, "latencies": latencies, "wrong": wrong, "cpu": cpu}


def replay_main(args: argparse.Namespace) -> int:
    trace = make_trace(args.size_mib * MIB, args.reads, args.read_mib * MIB, args.seed)
    result = asyncio.run(replay(args.url, Path(args.blob), node_order(trace, args.node)))
    print(json.dumps(result), flush=True)
    return 0


# -- the orchestrator ------------------------------------------------------------------------


@dataclass
class Row:
    mode: str
    n: int
    trace_p50: float
    trace_max: float
    read_p50: float
    read_p99: float
    origin_bytes: int
    wrong: int
    failed: int
    seed_upload: float = float("nan")  # bytes the seed sent to the nodes (Damselfly rows)
    cpu_seconds: float = float("nan")  # of every daemon (scheduler, seed, nodes) during the traces
    replay_cpu: float = float("nan")  # of every replayer (the nydusd stand-ins) during its trace


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def run_traces(urls: list[str], blob: Path, args: argparse.Namespace) -> tuple[list[dict[str, object]], int]:
    """One replayer per node, started together; returns their results and how many failed."""
    procs = []
    for i, url in enumerate(urls, start=1):
        command = ["ip", "netns", "exec", node_ns(i), sys.executable, str(Path(__file__).resolve()), "--replay",
                   "--url", url, "--blob", str(blob), "--node", str(i), "--size-mib", str(args.size_mib),
                   "--reads", str(args.reads), "--read-mib", str(args.read_mib), "--seed", str(args.seed)]
        procs.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a replayer did not start; see its stderr above")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results, failed = [], 0
        for proc in procs:
            out, _ = proc.communicate(timeout=READ_TIMEOUT * 2)
            if proc.returncode != 0:
                failed += 1
                continue
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results, failed
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def summarize(mode: str, n: int, results: list[dict[str, object]], failed: int, origin: int,
              seed_upload: float = float("nan"), cpu_seconds: float = float("nan")) -> Row:
    seconds = [float(r["seconds"]) for r in results]  # type: ignore[arg-type]
    latencies = [float(x) for r in results for x in r["latencies"]]  # type: ignore[attr-defined]
    wrong = sum(len(r["wrong"]) for r in results)  # type: ignore[arg-type]
    replay_cpu = 0.0
    for r in results:
        replay_cpu += float(r["cpu"])  # type: ignore[arg-type]
    for r in results:
        for line in r["wrong"][:3]:  # type: ignore[index]
            print(f"  {mode} N={n}: wrong body {line}", file=sys.stderr)
    return Row(mode, n, percentile(seconds, 0.5), max(seconds, default=float("nan")),
               percentile(latencies, 0.5), percentile(latencies, 0.99), origin, wrong, failed, seed_upload, cpu_seconds,
               replay_cpu)


def run_registry(n: int, url: str, blob: Path, relay: NetnsRelay, args: argparse.Namespace) -> Row:
    relay.reset()
    results, failed = run_traces([url] * n, blob, args)
    return summarize("registry", n, results, failed, relay.bytes_from_target)


def run_damselfly(mode: str, n: int, path: str, blob: Path, relay: NetnsRelay, work: Path,
                  args: argparse.Namespace) -> Row:
    root = work / f"{mode}-{n}"
    scheduler_host, seed_host = n + 1, n + 2
    cluster = LocalCluster(root, python=sys.executable, log_level=args.log_level,
                           scheduler_ip=node_ip(scheduler_host), scheduler_netns=node_ns(scheduler_host))
    prefetch = "--prefetch" if mode == "prefetch" else "--no-prefetch"
    mirror = ("--registry-mirror", relay.url)
    try:
        seed = cluster.plan_dfdaemon("seed", seed=True, netns=node_ns(seed_host), host_ip=node_ip(seed_host))
        scheduler = cluster.start_scheduler(seeds=[seed])
        cluster.start_dfdaemon("seed", *mirror, node=seed)
        daemons = [cluster.start_dfdaemon(f"n{i}", *mirror, prefetch,
                                          node=cluster.plan_dfdaemon(f"n{i}", netns=node_ns(i), host_ip=node_ip(i)))
                   for i in range(1, n + 1)]
        cluster.wait_ready(scheduler, seed, *daemons)
        relay.reset()
        cpu_before = daemons_cpu_seconds(cluster.nodes)
        results, failed = run_traces([node.url("proxy", path) for node in daemons], blob, args)
        cpu = daemons_cpu_seconds(cluster.nodes) - cpu_before
        print_uploads(mode, n, [seed, *daemons])
        return summarize(mode, n, results, failed, relay.bytes_from_target, seed.metrics().get(_UPLOADED, 0.0), cpu)
    finally:
        stop_cluster(cluster)


def print_uploads(mode: str, n: int, daemons: list[Node]) -> None:
    """Piece requests the daemons answered, by result, and the bytes they uploaded (a diagnosis:
    refusals cost CPU too)."""
    results: dict[str, float] = {}
    uploaded = 0.0
    for daemon in daemons:
        for name, value in daemon.metrics().items():
            if name.startswith(_UPLOAD_PIECES + "{"):
                result = name.split('result="', 1)[1].split('"', 1)[0]
                results[result] = results.get(result, 0.0) + value
            elif name == _UPLOADED:
                uploaded += value
    counts = ", ".join(f"{result} {count:.0f}" for result, count in sorted(results.items()))
    print(f"{mode} N={n}: piece requests answered: {counts}; uploaded {uploaded / MIB:.0f} MiB", file=sys.stderr)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def print_table(rows: list[Row], size: int, unique: int, args: argparse.Namespace) -> None:
    if not rows:
        return
    print(f"\n{args.size_mib} MiB blob, every link {args.rate}; {args.reads + 1} reads per node, "
          f"{args.read_mib} MiB read per node, {unique / MIB:.1f} MiB unique\n")
    print("| mode | N | trace p50 / max s | read p50 / p99 ms | origin ÷ blob | origin ÷ unique | "
          "seed up ÷ unique | daemon CPU s | replayer CPU s | wrong | failed |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        seed_up = "-" if math.isnan(r.seed_upload) else f"{r.seed_upload / unique:.2f}"
        cpu = "-" if math.isnan(r.cpu_seconds) else f"{r.cpu_seconds:.1f}"
        print(f"| {r.mode} | {r.n} | {r.trace_p50:.1f} / {r.trace_max:.1f} | {r.read_p50 * 1e3:.1f} / "
              f"{r.read_p99 * 1e3:.0f} | {r.origin_bytes / size:.2f} | {r.origin_bytes / unique:.2f} | "
              f"{seed_up} | {cpu} | {r.replay_cpu:.1f} | {r.wrong} | {r.failed} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,4,16", help="comma-separated numbers of nodes (default 1,4,16)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--size-mib", type=int, default=256, help="blob size in MiB (default 256)")
    parser.add_argument("--reads", type=int, default=200, help="reads per node after the tail read (default 200)")
    parser.add_argument("--read-mib", type=int, default=54, help="MiB read per node (default 54)")
    parser.add_argument("--seed", type=int, default=11, help="seed of the trace")
    parser.add_argument("--rate", default="200mbit", help="tc rate of every link (default 200mbit)")
    parser.add_argument("--netlab", type=Path, default=REPO.parent / "shared" / "tools" / "netlab.sh")
    parser.add_argument("--log-level", default="warning", help="log level of the Damselfly processes")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--replay", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--blob", help=argparse.SUPPRESS)
    parser.add_argument("--node", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replay:
        return replay_main(args)
    counts = sorted({int(x) for x in args.nodes.split(",")})
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"--modes: unknown {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")
    if os.geteuid() != 0:
        parser.error("needs root: it creates network namespaces")
    if lab := existing_lab():
        parser.error(f"network namespaces {' '.join(lab)} exist already; remove them with `{args.netlab} down`")
    os.chdir(REPO)
    signal.signal(signal.SIGTERM, _interrupt)
    size = args.size_mib * MIB
    trace = make_trace(size, args.reads, args.read_mib * MIB, args.seed)
    unique = unique_bytes(trace)
    work = Path(tempfile.mkdtemp(prefix="damselfly-lazyload-"))
    registry: Registry | None = None
    relay: NetnsRelay | None = None
    rows: list[Row] = []
    try:
        netlab(args.netlab, "up", str(counts[-1] + 2), args.rate, args.rate)
        registry = in_netns(ORIGIN_NS, lambda: start_registry(work / "registry"))
        reg = registry
        digest, blob = in_netns(ORIGIN_NS, lambda: push_random_blob(reg, REPO_NAME, size, seed=7))
        relay = NetnsRelay(ORIGIN_NS, ORIGIN_IP, "127.0.0.1", registry.port).start()
        path = f"/v2/{REPO_NAME}/blobs/{digest}"
        print(f"blob {digest} ({args.size_mib} MiB); trace: {len(trace)} reads, "
              f"{sum(r.length for r in trace) / MIB:.1f} MiB, {unique / MIB:.1f} MiB unique; work dir {work}",
              flush=True)
        for n in counts:
            for mode in modes:
                if mode == "registry":
                    row = run_registry(n, relay.url + path, blob, relay, args)
                else:
                    row = run_damselfly(mode, n, path, blob, relay, work, args)
                print(f"N={n} {mode}: trace p50 {row.trace_p50:.1f} s max {row.trace_max:.1f} s, read p50 "
                      f"{row.read_p50 * 1e3:.1f} ms p99 {row.read_p99 * 1e3:.0f} ms, origin "
                      f"{row.origin_bytes / size:.2f}x blob, wrong {row.wrong}, failed {row.failed}", flush=True)
                rows.append(row)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
    finally:
        clean_up(relay, registry, args.netlab, work, keep=args.keep)
    print_table(rows, size, unique, args)
    return 0 if rows and all(r.wrong == 0 and r.failed == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
