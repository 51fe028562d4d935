"""Distribution of one blob to N nodes on a bandwidth-shaped network: straight from the registry vs Damselfly.

    sudo .venv/bin/python bench/distribution.py [--nodes 1,2,4,8] [--size-mib 128] \\
        [--origin-rate 200mbit] [--node-rate 1gbit]

Needs root (network namespaces) and Debian's docker-registry. It builds a star of network
namespaces with ../shared/tools/netlab.sh: the origin host ``nl-origin`` (10.77.0.2) behind a
thin link, and nodes ``nl-n1..`` (10.77.0.11..) behind fast ones, every link shaped with tc tbf
in both directions. In ``nl-origin`` a real registry listens on the namespace's loopback, with a
byte-counting relay in front of it on 10.77.0.2: everything the registry sends anyone is counted
there. A random blob is pushed into it. Then, for each N:

* direct: every node pulls the blob from the registry at once (``curl`` in the node's namespace);
* damselfly: a scheduler and a seed peer run in one extra node namespace (same link as the other
  nodes: seed peers live in the cluster, next to the nodes, far from the registry), one dfdaemon
  runs in each node namespace with that namespace's IP, and every node runs ``dfget`` at once.

Each run is timed from the start of all downloads to the end of the last one; every copy's sha256
is checked against the blob digest. A fresh Damselfly cluster (empty caches) is used for every N.
Prints one table; everything (processes, namespaces, files) is removed on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.launcher import (  # noqa: E402
    _FROM_ORIGIN,
    _FROM_PEERS,
    _UPLOADED,
    LocalCluster,
    Node,
    dfget_command,
    enter_netns,
    in_netns,
    sha256_file,
)
from tests.support.registry import Registry, push_random_blob, start_registry  # noqa: E402
from tests.support.relay import ByteCountingRelay  # noqa: E402

MIB = 1024 * 1024
ORIGIN_NS, ORIGIN_IP = "nl-origin", "10.77.0.2"
REPO_NAME = "bench/blob"
DOWNLOAD_TIMEOUT = 600.0


def node_ns(i: int) -> str:
    return f"nl-n{i}"


def node_ip(i: int) -> str:
    return f"10.77.0.{10 + i}"


class NetnsRelay(ByteCountingRelay):
    """A :class:`ByteCountingRelay` whose event loop (and so its sockets) lives in another namespace."""

    def __init__(self, netns: str, listen_host: str, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self.netns = netns
        self.listen_host = listen_host

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    def start(self) -> NetnsRelay:
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            enter_netns(self.netns)  # before the loop runs anything: every socket is made in the namespace
            loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"relay-{self.netns}", daemon=True)
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, self.listen_host, 0), loop
        ).result(timeout=10)
        self._server = server
        self._port = int(server.sockets[0].getsockname()[1])
        return self


@dataclass
class Result:
    seconds: float
    origin_bytes: int
    ok: int  # copies whose sha256 matched
    first: float  # seconds until the first download ended
    cpu: float  # share of the machine's CPU time that was busy during the downloads, 0..1
    from_seed: float = 0.0  # bytes the nodes received from the seed peer
    from_nodes: float = 0.0  # bytes the nodes received from other pulling nodes
    nodes_origin: float = 0.0  # bytes the nodes fetched from the origin themselves


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


@dataclass
class Run:
    seconds: float  # until the last command ended
    first: float  # until the first command ended
    cpu: float  # busy share of all CPUs meanwhile
    outcomes: list[tuple[int, str]]  # exit code and stderr of each command


def run_all(commands: list[list[str]]) -> Run:
    """Start every command at once and wait for all of them."""
    busy0, total0 = cpu_times()
    started = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
             for cmd in commands]
    ended: list[float] = []

    def wait(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
        _, err = proc.communicate(timeout=DOWNLOAD_TIMEOUT)
        ended.append(time.monotonic() - started)  # list.append is atomic
        return proc.returncode, err.decode(errors="replace").strip()

    try:
        with ThreadPoolExecutor(len(procs)) as pool:
            outcomes = list(pool.map(wait, procs))
        busy1, total1 = cpu_times()
        return Run(max(ended), min(ended), (busy1 - busy0) / max(total1 - total0, 1), outcomes)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def check_copies(outputs: list[Path], outcomes: list[tuple[int, str]], digest: str, label: str) -> int:
    ok = 0
    for path, (code, err) in zip(outputs, outcomes, strict=True):
        if code != 0:
            print(f"  {label} {path.name}: exit {code}: {err[-300:]}", file=sys.stderr)
        elif (got := sha256_file(path)) != digest:
            print(f"  {label} {path.name}: sha256 {got} != {digest}", file=sys.stderr)
        else:
            ok += 1
        path.unlink(missing_ok=True)
    return ok


def direct(n: int, url: str, digest: str, relay: ByteCountingRelay, work: Path) -> Result:
    out_dir = work / f"direct-{n}"
    out_dir.mkdir()
    outputs = [out_dir / f"n{i}.bin" for i in range(1, n + 1)]
    relay.reset()
    run = run_all([
        ["ip", "netns", "exec", node_ns(i), "curl", "-sS", "--fail", "--max-time", str(int(DOWNLOAD_TIMEOUT)),
         "-o", str(out), url]
        for i, out in enumerate(outputs, start=1)
    ])
    origin = relay.bytes_from_target
    ok = check_copies(outputs, run.outcomes, digest, "direct")
    shutil.rmtree(out_dir)
    return Result(run.seconds, origin, ok, run.first, run.cpu)


def damselfly(n: int, url: str, digest: str, relay: ByteCountingRelay, work: Path, control: int,
              log_level: str) -> Result:
    root = work / f"damselfly-{n}"
    cluster = LocalCluster(root, python=sys.executable, log_level=log_level,
                           scheduler_ip=node_ip(control), scheduler_netns=node_ns(control))
    try:
        seed = cluster.plan_dfdaemon("seed", seed=True, netns=node_ns(control), host_ip=node_ip(control))
        scheduler = cluster.start_scheduler(seeds=[seed])
        cluster.start_dfdaemon("seed", node=seed)
        daemons = [cluster.start_dfdaemon(f"n{i}", node=cluster.plan_dfdaemon(f"n{i}", netns=node_ns(i),
                                                                              host_ip=node_ip(i)))
                   for i in range(1, n + 1)]
        cluster.wait_ready(scheduler, seed, *daemons)
        outputs = [root / f"n{i}.out" for i in range(1, n + 1)]
        relay.reset()
        commands = []
        for i, (node, out) in enumerate(zip(daemons, outputs, strict=True), start=1):
            assert node.socket_path is not None
            commands.append(["ip", "netns", "exec", node_ns(i),
                             *dfget_command(sys.executable, url, out, node.socket_path)])
        run = run_all(commands)
        origin = relay.bytes_from_target
        ok = check_copies(outputs, run.outcomes, digest, "damselfly")
        from_peers = nodes_origin = 0.0
        for node in daemons:
            metrics = node.metrics()
            from_peers += metrics.get(_FROM_PEERS, 0.0)
            nodes_origin += metrics.get(_FROM_ORIGIN, 0.0)
        from_seed = seed.metrics().get(_UPLOADED, 0.0)
        return Result(run.seconds, origin, ok, run.first, run.cpu, from_seed, from_peers - from_seed, nodes_origin)
    finally:
        cluster.stop()
        report_dead(cluster.nodes)
        for node in cluster.nodes:  # the caches; the logs stay until the work directory goes
            if node.data_dir is not None:
                shutil.rmtree(node.data_dir, ignore_errors=True)


def report_dead(nodes: list[Node]) -> None:
    for node in nodes:
        if node.process is not None and node.process.returncode not in (0, -signal.SIGTERM):
            print(f"  {node.name} ended with {node.process.returncode}; see {node.log_path}", file=sys.stderr)


def netlab(netlab_sh: Path, *args: str) -> None:
    subprocess.run(["bash", str(netlab_sh), *args], check=True, stdout=subprocess.DEVNULL)


def existing_lab() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith("nl-")]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,2,4,8", help="comma-separated numbers of pulling nodes (default 1,2,4,8)")
    parser.add_argument("--size-mib", type=int, default=128, help="blob size in MiB (default 128)")
    parser.add_argument("--origin-rate", default="200mbit", help="tc rate of the registry's link (default 200mbit)")
    parser.add_argument("--node-rate", default="1gbit", help="tc rate of every node's link (default 1gbit)")
    parser.add_argument("--netlab", type=Path, default=REPO.parent / "shared" / "tools" / "netlab.sh")
    parser.add_argument("--log-level", default="warning", help="log level of the Damselfly processes")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) instead of deleting it")
    args = parser.parse_args()
    counts = sorted({int(x) for x in args.nodes.split(",")})
    if os.geteuid() != 0:
        parser.error("needs root: it creates network namespaces")
    if counts[0] < 1 or counts[-1] > 200:
        parser.error("--nodes: between 1 and 200")
    if lab := existing_lab():
        parser.error(f"network namespaces {' '.join(lab)} exist already (another netlab?); "
                     f"remove them with `{args.netlab} down` first")
    os.chdir(REPO)  # the daemons run as `python -m common.cli`
    signal.signal(signal.SIGTERM, _interrupt)
    control = counts[-1] + 1  # the namespace of the scheduler and the seed peer
    work = Path(tempfile.mkdtemp(prefix="damselfly-bench-"))
    size = args.size_mib * MIB
    registry: Registry | None = None
    relay: NetnsRelay | None = None
    rows: list[tuple[int, Result, Result]] = []
    interrupted = False
    try:
        netlab(args.netlab, "up", str(control), args.origin_rate, args.node_rate)
        registry = in_netns(ORIGIN_NS, lambda: start_registry(work / "registry"))
        reg = registry
        digest, _ = in_netns(ORIGIN_NS, lambda: push_random_blob(reg, REPO_NAME, size, seed=7))
        relay = NetnsRelay(ORIGIN_NS, ORIGIN_IP, "127.0.0.1", registry.port).start()
        url = f"{relay.url}/v2/{REPO_NAME}/blobs/{digest}"
        print(f"blob {digest} ({args.size_mib} MiB) at {url}\n"
              f"origin link {args.origin_rate}, node links {args.node_rate}; scheduler + seed in "
              f"{node_ns(control)} ({node_ip(control)}); work dir {work}", flush=True)
        for n in counts:
            d = direct(n, url, digest, relay, work)
            print(f"N={n} direct:    {d.seconds:6.1f} s (first done {d.first:.1f} s, CPU {d.cpu:.0%}), "
                  f"origin {d.origin_bytes / MIB:7.1f} MiB, {d.ok}/{n} copies ok", flush=True)
            p = damselfly(n, url, digest, relay, work, control, args.log_level)
            print(f"N={n} damselfly: {p.seconds:6.1f} s (first done {p.first:.1f} s, CPU {p.cpu:.0%}), "
                  f"origin {p.origin_bytes / MIB:7.1f} MiB, {p.ok}/{n} copies ok; "
                  f"nodes got {p.from_seed / MIB:.1f} MiB from the seed, "
                  f"{p.from_nodes / MIB:.1f} MiB from each other, {p.nodes_origin / MIB:.1f} MiB from the origin",
                  flush=True)
            rows.append((n, d, p))
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        interrupted = True
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the clean-up finish
        if relay is not None:
            relay.close()
        if registry is not None:
            registry.stop()
        subprocess.run(["bash", str(args.netlab), "down"], check=False)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows, args)
    if interrupted:
        return 130
    return 0 if rows and all(d.ok == n and p.ok == n for n, d, p in rows) else 1


def print_table(rows: list[tuple[int, Result, Result]], args: argparse.Namespace) -> None:
    if not rows:
        return
    print(f"\n{args.size_mib} MiB blob; origin link {args.origin_rate}, node links {args.node_rate}\n")
    print("|  N | direct s | direct origin MiB | damselfly s | damselfly origin MiB | from peers | from seed | ok |")
    print("|---:|---------:|------------------:|------------:|---------------------:|-----------:|----------:|:--:|")
    for n, d, p in rows:
        received = p.from_seed + p.from_nodes + p.nodes_origin
        peers = 100 * p.from_nodes / received if received else 0.0
        seed = 100 * p.from_seed / received if received else 0.0
        ok = "yes" if d.ok == n and p.ok == n else f"{d.ok}+{p.ok}/{2 * n}"
        print(f"| {n:>2} | {d.seconds:>8.1f} | {d.origin_bytes / MIB:>17.1f} | {p.seconds:>11.1f} | "
              f"{p.origin_bytes / MIB:>20.1f} | {peers:>9.0f}% | {seed:>8.0f}% | {ok} |")


if __name__ == "__main__":
    sys.exit(main())
