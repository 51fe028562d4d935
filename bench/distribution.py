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

``--swarm`` is issue 11's set-up instead (no direct pulls): every link at ``--node-rate``
(default 200mbit, the origin's at ``--origin-rate``), the scheduler and the seed each on a host of
its own (``nl-n(N+1)``, ``nl-n(N+2)``), N=4,8,16,32 and blobs of 64 and 256 MiB by default, a
fresh cluster per row. Its table has wall, p50/max node completion, x the lower bound
max(F/u_origin, N·F/(u_origin + N·u_node), F/d_node), origin bytes (relay and link TX counter),
seed and min/max peer upload, the daemons' CPU-seconds per GiB delivered and byte-exact copies.
``--tls`` runs every daemon with mutual TLS (a throwaway CA, role CNs); ``--repeat`` repeats rows;
``--kill-seed-at S`` kills the seed (SIGKILL) S seconds after the dfgets start, to see the swarm
fetch the pieces that died with it (docs/protocol.md, "Lost pieces").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.launcher import (  # noqa: E402
    _FROM_ORIGIN,
    _FROM_PEERS,
    _UPLOADED,
    READY_TIMEOUT,
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
    busy_seconds: float  # CPU seconds the machine was busy meanwhile
    commands_cpu: tuple[float, float]  # (user, system) CPU seconds of the commands themselves
    outcomes: list[tuple[int, str]]  # exit code and stderr of each command
    times: list[float] = field(default_factory=list)  # seconds until each command ended, in order


def run_all(commands: list[list[str]]) -> Run:
    """Start every command at once and wait for all of them."""
    busy0, total0 = cpu_times()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
             for cmd in commands]
    ended: list[float] = []

    def wait(proc: subprocess.Popen[bytes]) -> tuple[int, str, float]:
        _, err = proc.communicate(timeout=DOWNLOAD_TIMEOUT)
        elapsed = time.monotonic() - started
        ended.append(elapsed)  # list.append is atomic
        return proc.returncode, err.decode(errors="replace").strip(), elapsed

    try:
        with ThreadPoolExecutor(len(procs)) as pool:
            finished = list(pool.map(wait, procs))
        busy1, total1 = cpu_times()
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        return Run(max(ended), min(ended), (busy1 - busy0) / max(total1 - total0, 1),
                   (busy1 - busy0) / os.sysconf("SC_CLK_TCK"),
                   (children1.ru_utime - children0.ru_utime, children1.ru_stime - children0.ru_stime),
                   [(code, err) for code, err, _ in finished], [elapsed for _, _, elapsed in finished])
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
        stop_cluster(cluster)


def stop_cluster(cluster: LocalCluster) -> None:
    """Stop every process, say which died on its own, and drop the caches (the logs stay until
    the work directory goes)."""
    cluster.stop()
    report_dead(cluster.nodes)
    for node in cluster.nodes:
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


def clean_up(relay: ByteCountingRelay | None, registry: Registry | None, netlab_sh: Path, work: Path, *,
             keep: bool) -> None:
    """End a bench run: relay, registry, the namespaces, the work directory (unless `keep`).
    Ctrl-C is ignored meanwhile, so a second one cannot leave namespaces behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if relay is not None:
        relay.close()
    if registry is not None:
        registry.stop()
    subprocess.run(["bash", str(netlab_sh), "down"], check=False)
    if keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swarm", action="store_true",
                        help="issue 11's set-up: every link at --node-rate (default 200mbit, origin too), "
                             "scheduler and seed each on a host of their own, no direct pulls, N=4,8,16,32, "
                             "blobs of 64 and 256 MiB; one table of completion, origin, uploads and CPU")
    parser.add_argument("--nodes", help="comma-separated numbers of pulling nodes "
                                        "(default 1,2,4,8; with --swarm 4,8,16,32)")
    parser.add_argument("--size-mib", help="blob size in MiB (default 128); with --swarm a comma-separated "
                                           "list (default 64,256)")
    parser.add_argument("--origin-rate", default="200mbit", help="tc rate of the registry's link (default 200mbit)")
    parser.add_argument("--node-rate", help="tc rate of every node's link (default 1gbit; with --swarm 200mbit)")
    parser.add_argument("--tls", action="store_true",
                        help="--swarm only: mutual TLS on every daemon (a throwaway CA, one certificate each)")
    parser.add_argument("--repeat", type=int, default=1, help="--swarm only: runs of each row (default 1)")
    parser.add_argument("--kill-seed-at", type=float, default=None, metavar="SECONDS",
                        help="--swarm only: kill the seed (SIGKILL) this long after the dfgets start; its "
                             "upload is then what it had sent by that moment")
    parser.add_argument("--netlab", type=Path, default=REPO.parent / "shared" / "tools" / "netlab.sh")
    parser.add_argument("--log-level", default="warning", help="log level of the Damselfly processes")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) instead of deleting it")
    args = parser.parse_args()
    args.nodes = args.nodes or ("4,8,16,32" if args.swarm else "1,2,4,8")
    args.node_rate = args.node_rate or ("200mbit" if args.swarm else "1gbit")
    counts = sorted({int(x) for x in args.nodes.split(",")})
    sizes = [int(x) for x in (args.size_mib or ("64,256" if args.swarm else "128")).split(",")]
    if not args.swarm and (len(sizes) != 1 or args.tls or args.repeat != 1):
        parser.error("--tls, --repeat and several --size-mib go with --swarm")
    if args.repeat < 1 or min(sizes) < 1:
        parser.error("--repeat and --size-mib: at least 1")
    args.size_mib = sizes[0]
    if os.geteuid() != 0:
        parser.error("needs root: it creates network namespaces")
    if counts[0] < 1 or counts[-1] > 200:
        parser.error("--nodes: between 1 and 200")
    if lab := existing_lab():
        parser.error(f"network namespaces {' '.join(lab)} exist already (another netlab?); "
                     f"remove them with `{args.netlab} down` first")
    os.chdir(REPO)  # the daemons run as `python -m common.cli`
    signal.signal(signal.SIGTERM, _interrupt)
    if args.swarm:
        return swarm_main(args, counts, sizes)
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
        clean_up(relay, registry, args.netlab, work, keep=args.keep)
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


# --- The swarm set-up of issue 11 (`--swarm`) ---------------------------------------------------
#
# Every link (origin and nodes) at the same rate by default, the scheduler and the seed each on a
# host of its own, N nodes pulling one blob with dfget at once, a fresh cluster for every row.

GIB = 1024 * MIB
TLS_ROLES = {"scheduler": "scheduler.damselfly", "seed": "seed.damselfly", "peer": "peer.damselfly"}


def tc_rate_bits(rate: str) -> float:
    """Bits per second of a tc rate such as ``200mbit`` or ``1gbit`` (tc's units: k = 1000)."""
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0, "gbps": 8e9, "mbps": 8e6, "kbps": 8e3, "bps": 8.0}
    text = rate.strip().lower()
    for unit, factor in units.items():
        if text.endswith(unit) and text[: -len(unit)].replace(".", "", 1).isdigit():
            return float(text[: -len(unit)]) * factor
    raise ValueError(f"rate {rate!r}: write it as tc does, e.g. 200mbit or 1gbit")


def lower_bound(size: int, n: int, origin_bits: float, node_bits: float) -> float:
    """Seconds no distribution can beat: max(F/u_origin, N·F/(u_origin + N·u_node), F/d_node)."""
    bits = 8.0 * size
    return max(bits / origin_bits, n * bits / (origin_bits + n * node_bits), bits / node_bits)


def process_user_system_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and its waited-for children, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    tick = os.sysconf("SC_CLK_TCK")
    return (utime + cutime) / tick, (stime + cstime) / tick


def cpu_by_role(nodes: list[Node]) -> dict[str, tuple[float, float]]:
    """(user, system) CPU seconds so far of the scheduler, the seeds and the other dfdaemons."""
    split: dict[str, tuple[float, float]] = {}
    for node in nodes:
        if node.process is None or not node.alive:
            continue
        role = "nodes" if node.kind == "dfdaemon" else node.kind
        user, system = process_user_system_seconds(node.process.pid)
        u0, s0 = split.get(role, (0.0, 0.0))
        split[role] = (u0 + user, s0 + system)
    return split


def cpu_split_between(before: dict[str, tuple[float, float]],
                      after: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Each role's (user, system) CPU seconds from `before` to `after`."""
    return {role: (user - before.get(role, (0.0, 0.0))[0], system - before.get(role, (0.0, 0.0))[1])
            for role, (user, system) in after.items()}


def daemons_cpu_seconds(nodes: list[Node]) -> float:
    """CPU seconds used so far by every running daemon of `nodes` (scheduler and seed included)."""
    return sum(user + system for user, system in cpu_by_role(nodes).values())


def link_tx_bytes(netns: str, device: str) -> int:
    """Bytes sent so far by `device` in `netns` (the kernel's counter: payload plus headers)."""
    out = subprocess.run(["ip", "-n", netns, "-j", "-s", "link", "show", "dev", device],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


@dataclass
class SwarmResult:
    size: int
    n: int
    bound: float  # seconds, the lower bound of this row
    wall: float  # start of all dfgets to the last one's exit
    times: list[float]  # each node's dfget completion, seconds from the start
    origin_relay: int  # bytes the registry sent (relay count)
    origin_link: int  # bytes the origin link sent (kernel TX counter)
    seed_upload: float
    peer_uploads: list[float]
    busy: float  # share of the machine's CPU busy during the downloads
    ok: int
    # role (nodes, seed, scheduler): (user, system) CPU seconds of those daemons during the downloads
    cpu_split: dict[str, tuple[float, float]] = field(default_factory=dict)
    machine_busy_seconds: float = 0.0  # CPU seconds the whole machine was busy during the downloads
    dfget_cpu: tuple[float, float] = (0.0, 0.0)  # (user, system) CPU seconds of the N dfgets

    def cpu_split_line(self) -> str:
        """Where the row's CPU went: each role's user/system seconds, and everything else."""
        split = {**self.cpu_split, "dfget": self.dfget_cpu}
        parts = [f"{role} {u:.1f}+{s:.1f}" for role, (u, s) in sorted(split.items())]
        rest = self.machine_busy_seconds - sum(u + s for u, s in split.values())
        return (f"    CPU s (user+system): {', '.join(parts)}; everything else (kernel threads, bench) {rest:.1f}; "
                f"machine {self.machine_busy_seconds:.1f}")

    @property
    def p50(self) -> float:
        return statistics.median(self.times)

    @property
    def max_time(self) -> float:
        return max(self.times)

    def cpu_per_gib(self) -> float:
        return self.cpu_seconds / (self.n * self.size / GIB)

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds of all daemons (scheduler, seed, nodes) during the downloads."""
        return sum(user + system for user, system in self.cpu_split.values())


class SwarmPki:
    """A throwaway CA and one certificate per daemon, with its host IP and its role's CN."""

    def __init__(self, directory: Path) -> None:
        from tests.support.certs import TestCA  # trustme: only needed with --tls

        self.ca = TestCA(directory, "damselfly-bench-ca")

    def args(self, name: str, role: str, ip: str) -> list[str]:
        issued = self.ca.issue(name, ips=(ip,), common_name=TLS_ROLES[role])
        return ["--tls-ca-cert", str(self.ca.cert_path), "--tls-cert", str(issued.cert), "--tls-key", str(issued.key)]


def swarm_row(n: int, size: int, url: str, digest: str, relay: ByteCountingRelay, work: Path, *,
              scheduler_host: int, seed_host: int, origin_bits: float, node_bits: float, log_level: str,
              pki: SwarmPki | None, label: str, kill_seed_at: float | None = None) -> SwarmResult:
    """One row: a fresh cluster (scheduler, seed, N dfdaemons, each on its own host), N dfgets at once;
    with `kill_seed_at`, the seed is killed (SIGKILL) that many seconds after they start."""
    root = work / label
    cluster = LocalCluster(root, python=sys.executable, log_level=log_level,
                           scheduler_ip=node_ip(scheduler_host), scheduler_netns=node_ns(scheduler_host))

    def tls(name: str, role: str, ip: str) -> list[str]:
        return pki.args(f"{label}-{name}", role, ip) if pki is not None else []

    try:
        seed = cluster.plan_dfdaemon("seed", seed=True, netns=node_ns(seed_host), host_ip=node_ip(seed_host))
        scheduler = cluster.start_scheduler(*tls("scheduler", "scheduler", node_ip(scheduler_host)), seeds=[seed])
        cluster.start_dfdaemon("seed", *tls("seed", "seed", node_ip(seed_host)), node=seed)
        daemons = [cluster.start_dfdaemon(f"n{i}", *tls(f"n{i}", "peer", node_ip(i)),
                                          node=cluster.plan_dfdaemon(f"n{i}", netns=node_ns(i), host_ip=node_ip(i)))
                   for i in range(1, n + 1)]
        cluster.wait_ready(scheduler, seed, *daemons, timeout=max(READY_TIMEOUT, 3.0 * n))
        outputs = [root / f"n{i}.out" for i in range(1, n + 1)]
        commands = []
        for i, (node, out) in enumerate(zip(daemons, outputs, strict=True), start=1):
            assert node.socket_path is not None
            commands.append(["ip", "netns", "exec", node_ns(i),
                             *dfget_command(sys.executable, url, out, node.socket_path)])
        relay.reset()
        link0 = link_tx_bytes(ORIGIN_NS, "v-origin")
        roles0 = cpu_by_role(cluster.nodes)
        seed_upload: list[float] = []  # read just before the seed is killed, if it is

        def kill_seed() -> None:
            seed_upload.append(seed.metrics().get(_UPLOADED, 0.0))
            cluster.kill(seed, signal.SIGKILL)

        killer = threading.Timer(kill_seed_at, kill_seed) if kill_seed_at is not None else None
        if killer is not None:
            killer.start()
        run = run_all(commands)
        if killer is not None:
            killer.cancel()
            killer.join()
        roles1 = cpu_by_role(cluster.nodes)
        link1 = link_tx_bytes(ORIGIN_NS, "v-origin")
        origin = relay.bytes_from_target
        ok = check_copies(outputs, run.outcomes, digest, label)
        return SwarmResult(
            size=size, n=n, bound=lower_bound(size, n, origin_bits, node_bits), wall=run.seconds, times=run.times,
            origin_relay=origin, origin_link=link1 - link0,
            seed_upload=seed_upload[0] if seed_upload else seed.metrics().get(_UPLOADED, 0.0),
            peer_uploads=[node.metrics().get(_UPLOADED, 0.0) for node in daemons],
            busy=run.cpu, ok=ok, cpu_split=cpu_split_between(roles0, roles1),
            machine_busy_seconds=run.busy_seconds, dfget_cpu=run.commands_cpu)
    finally:
        stop_cluster(cluster)


SWARM_HEADER = ("|   blob |  N | TLS | wall s | p50 s | max s | bound s | x bound | origin ÷ blob (relay / link) "
                "| seed up ÷ blob | peer up ÷ blob min / max | daemon CPU s / GiB | machine busy | byte-exact |")
SWARM_RULE = ("|-------:|---:|:---:|-------:|------:|------:|--------:|--------:|:---------------------------:"
              "|---------------:|:------------------------:|-------------------:|-------------:|:----------:|")


def swarm_line(r: SwarmResult, tls: bool) -> str:
    blob = float(r.size)
    return (f"| {r.size // MIB:>3} MiB | {r.n:>2} | {'on' if tls else 'off':^3} | {r.wall:>6.1f} | {r.p50:>5.1f} | "
            f"{r.max_time:>5.1f} | {r.bound:>7.1f} | {r.max_time / r.bound:>6.1f}x | "
            f"{r.origin_relay / blob:>12.2f} / {r.origin_link / blob:<12.2f} | {r.seed_upload / blob:>14.2f} | "
            f"{min(r.peer_uploads) / blob:>11.2f} / {max(r.peer_uploads) / blob:<10.2f} | "
            f"{r.cpu_per_gib():>18.1f} | {r.busy:>11.0%} | {r.ok:>4}/{r.n:<5} |")


def swarm_main(args: argparse.Namespace, counts: list[int], sizes: list[int]) -> int:
    """The issue-11 set-up: one table over every size, N and --repeat, printed as rows finish."""
    scheduler_host, seed_host = counts[-1] + 1, counts[-1] + 2
    origin_bits, node_bits = tc_rate_bits(args.origin_rate), tc_rate_bits(args.node_rate)
    work = Path(tempfile.mkdtemp(prefix="damselfly-swarm-"))
    registry: Registry | None = None
    relay: NetnsRelay | None = None
    results: list[SwarmResult] = []
    interrupted = False
    killed = f"; the seed killed {args.kill_seed_at:g} s in" if args.kill_seed_at is not None else ""
    try:
        netlab(args.netlab, "up", str(seed_host), args.origin_rate, args.node_rate)
        registry = in_netns(ORIGIN_NS, lambda: start_registry(work / "registry"))
        reg = registry
        relay = NetnsRelay(ORIGIN_NS, ORIGIN_IP, "127.0.0.1", registry.port).start()
        blobs: dict[int, tuple[str, str]] = {}
        for size_mib in sizes:
            def push(m: int = size_mib) -> tuple[str, Path]:
                return push_random_blob(reg, REPO_NAME, m * MIB, seed=m)

            digest, _ = in_netns(ORIGIN_NS, push)
            blobs[size_mib] = (digest, f"{relay.url}/v2/{REPO_NAME}/blobs/{digest}")
        pki = SwarmPki(work / "pki") if args.tls else None
        print(f"swarm set-up: origin link {args.origin_rate}, node links {args.node_rate} (scheduler "
              f"{node_ip(scheduler_host)}, seed {node_ip(seed_host)} on hosts of their own); TLS "
              f"{'on' if args.tls else 'off'}{killed}; work dir {work}\n{SWARM_HEADER}\n{SWARM_RULE}", flush=True)
        for size_mib in sizes:
            digest, url = blobs[size_mib]
            for n in counts:
                for attempt in range(1, args.repeat + 1):
                    r = swarm_row(n, size_mib * MIB, url, digest, relay, work, scheduler_host=scheduler_host,
                                  seed_host=seed_host, origin_bits=origin_bits, node_bits=node_bits,
                                  log_level=args.log_level, pki=pki, label=f"{size_mib}m-n{n}-{attempt}",
                                  kill_seed_at=args.kill_seed_at)
                    results.append(r)
                    print(swarm_line(r, args.tls), flush=True)
                    print(r.cpu_split_line(), flush=True)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        interrupted = True
    finally:
        clean_up(relay, registry, args.netlab, work, keep=args.keep)
    if results:
        print(f"\nall links: origin {args.origin_rate}, nodes {args.node_rate}; TLS {'on' if args.tls else 'off'}"
              f"{killed}\n")
        print(SWARM_HEADER)
        print(SWARM_RULE)
        for r in results:
            print(swarm_line(r, args.tls))
    if interrupted:
        return 130
    return 0 if results and all(r.ok == r.n for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
