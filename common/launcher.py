"""`damselfly up`: a whole Damselfly network on loopback, in one command.

It starts a scheduler, one seed peer and N dfdaemons as separate processes (the same binaries a
cluster runs), waits until they are ready, prints where everything listens, and optionally
downloads a URL through every dfdaemon at once to show the pieces travelling between peers.
:class:`LocalCluster` is also what the integration tests use to run real processes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from common.digest import file_digest
from common.ids import parse_oci_blob_url

READY_TIMEOUT = 30.0
_FROM_ORIGIN = 'damselfly_dfdaemon_download_traffic_bytes_total{type="back_to_source"}'
_FROM_PEERS = 'damselfly_dfdaemon_download_traffic_bytes_total{type="remote_peer"}'
_UPLOADED = "damselfly_dfdaemon_upload_traffic_bytes_total"
_CLONE_NEWNET = 0x40000000
_T = TypeVar("_T")


# Ports are chosen below the kernel's ephemeral range (32768+ by default): a port picked there
# could be taken by any outgoing connection before the daemon that was given it binds it.
_PORT_RANGE = (15000, 32000)


def free_port(taken: set[int] | None = None) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, outside the ephemeral range.

    Ports in `taken` (handed out already, not yet bound) are skipped, and the new one is added.
    """
    taken = set() if taken is None else taken
    for _ in range(100):
        port = random.randrange(*_PORT_RANGE)
        if port in taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            taken.add(port)
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Fixed ports (`damselfly up --base-port B`): the scheduler takes B and B+1; node k (the seed is
# 0, peerN is N) takes B + NODE_PORT_STRIDE*(k+1) + the offsets below, so a restart with the same
# base port gives every node the ports its clients are configured with.
SCHEDULER_PORT_OFFSETS = {"grpc": 0, "metrics": 1}
NODE_PORT_OFFSETS = {"grpc": 0, "upload": 1, "proxy": 2, "metrics": 3, "health": 4}
NODE_PORT_STRIDE = 10


def fixed_node_ports(base_port: int, index: int) -> dict[str, int]:
    """The ports of node `index` (seed 0, peerN N) under `--base-port base_port`."""
    first = base_port + NODE_PORT_STRIDE * (index + 1)
    return {name: first + offset for name, offset in NODE_PORT_OFFSETS.items()}


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on host:port (or it cannot be bound for another reason).

    Binds as the daemons do, with SO_REUSEADDR: connections of a previous run lingering in
    TIME_WAIT do not keep a restarted node from its port.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Status and body of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


def enter_netns(netns: str) -> None:
    """Move the calling thread (only it) into the named network namespace (`ip netns add` name).

    Sockets the thread opens afterwards, and processes it starts, live in that namespace. Needs root.
    """
    fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({netns}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def in_netns(netns: str | None, fn: Callable[[], _T]) -> _T:
    """`fn()` run in network namespace `netns` (in a throwaway thread), or right here when None."""
    if netns is None:
        return fn()
    outcome: list[_T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            enter_netns(netns)
            outcome.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def wait_until(condition: object, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `condition()` until it is true; raise TimeoutError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Node:
    """One process of the local cluster."""

    name: str
    kind: str  # "scheduler" | "dfdaemon" | "seed"
    args: list[str]
    ports: dict[str, int]
    log_path: Path
    data_dir: Path | None = None
    socket_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    host: str = "127.0.0.1"  # the address every listener binds
    netns: str | None = None  # network namespace the process runs in (None: this one)

    def url(self, port_name: str, path: str = "") -> str:
        """http://<host>:<port><path> (host is 127.0.0.1 unless the node was given a host IP)."""
        return f"http://{self.host}:{self.ports[port_name]}{path}"

    def get(self, port_name: str, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        """:func:`http_get` of one of this node's URLs, from inside the node's namespace."""
        return in_netns(self.netns, lambda: http_get(self.url(port_name, path), timeout))

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.process is not None and self.process.poll() is None

    def metrics(self) -> dict[str, float]:
        """This node's Prometheus metrics as {'name{labels}': value}."""
        status, body = self.get("metrics", "/metrics")
        if status != 200:
            return {}
        values: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values


class LocalCluster:
    """Scheduler, seeds and dfdaemons as real processes on loopback.

    Optionally each node runs in a network namespace of its own with a host IP there
    (`scheduler_netns`/`scheduler_ip`, and `netns`/`host_ip` of :meth:`plan_dfdaemon`): the
    process is started with ``ip netns exec NS`` and every listener binds that IP.

    `allowed_upstreams` go to every dfdaemon's ``--proxy-allowed-upstreams``: by default
    ``127.0.0.1``, where test registries listen, so their proxies may reach them when a request
    names them (``X-Dragonfly-Registry``, ``?ns=``); ``damselfly up`` allows only its
    ``--registry-mirror``, like a node in production.
    """

    def __init__(self, root: Path, *, python: str = sys.executable, log_level: str = "info",
                 scheduler_ip: str = "127.0.0.1", scheduler_netns: str | None = None,
                 base_port: int | None = None, allowed_upstreams: tuple[str, ...] = ("127.0.0.1",)) -> None:
        self.root = root
        self.allowed_upstreams = allowed_upstreams
        self.python = python
        self.log_level = log_level
        self.scheduler_ip = scheduler_ip
        self.scheduler_netns = scheduler_netns
        self.nodes: list[Node] = []
        self.scheduler: Node | None = None
        # Known before the scheduler starts: seeds and the scheduler each need the other's address.
        self._ports: set[int] = set()  # every port handed out, so no two nodes get the same one
        self.base_port = base_port  # None: free ports picked at random
        if base_port is None:
            self.scheduler_ports = {"grpc": free_port(self._ports), "metrics": free_port(self._ports)}
        else:
            self.scheduler_ports = {name: base_port + offset for name, offset in SCHEDULER_PORT_OFFSETS.items()}
        root.mkdir(parents=True, exist_ok=True)

    def _spawn(self, node: Node) -> Node:
        log = node.log_path.open("ab")
        prefix = ["ip", "netns", "exec", node.netns] if node.netns else []
        node.process = subprocess.Popen(
            [*prefix, self.python, "-m", "common.cli", node.kind if node.kind != "seed" else "dfdaemon", *node.args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        if node not in self.nodes:
            self.nodes.append(node)
        return node

    def start_scheduler(self, *extra: str, seeds: list[Node] | None = None) -> Node:
        """Start the scheduler (one per cluster here)."""
        ports = self.scheduler_ports
        ip = self.scheduler_ip
        args = ["--listen", f"{ip}:{ports['grpc']}", "--metrics-listen", f"{ip}:{ports['metrics']}",
                "--log-level", self.log_level, *extra]
        for seed in seeds or []:
            args += ["--seed-peer", f"{seed.host}:{seed.ports['grpc']}"]
        node = Node("scheduler", "scheduler", args, ports, self.root / "scheduler.log", host=ip,
                    netns=self.scheduler_netns)
        self.scheduler = self._spawn(node)
        return node

    def plan_dfdaemon(self, name: str, *, seed: bool = False, ports: dict[str, int] | None = None,
                      netns: str | None = None, host_ip: str = "127.0.0.1") -> Node:
        """Allocate a dfdaemon's ports and directories without starting it.

        `netns` runs it in that network namespace; `host_ip` is its advertised address and what
        every listener binds (the unix socket stays a path, reachable from any namespace).
        """
        ports = ports or {p: free_port(self._ports) for p in ("grpc", "upload", "proxy", "metrics", "health")}
        data_dir = self.root / name / "data"
        socket_path = self.root / name / "dfdaemon.sock"
        ip = host_ip
        args = [
            "--scheduler", f"{self.scheduler_ip}:{self.scheduler_ports['grpc']}", "--data-dir", str(data_dir),
            "--host-ip", ip, "--hostname", name,
            "--grpc-listen", f"{ip}:{ports['grpc']}", "--upload-listen", f"{ip}:{ports['upload']}",
            "--proxy-listen", f"{ip}:{ports['proxy']}", "--metrics-listen", f"{ip}:{ports['metrics']}",
            "--health-listen", f"{ip}:{ports['health']}", "--socket", str(socket_path),
            "--log-level", self.log_level,
        ]
        if self.allowed_upstreams:
            args += ["--proxy-allowed-upstreams", ",".join(self.allowed_upstreams)]
        if seed:
            args.append("--seed")
        return Node(name, "seed" if seed else "dfdaemon", args, ports, self.root / f"{name}.log", data_dir,
                    socket_path, host=ip, netns=netns)

    def start_dfdaemon(self, name: str, *extra: str, seed: bool = False, node: Node | None = None) -> Node:
        """Start a dfdaemon (or a seed) pointing at the scheduler."""
        node = node or self.plan_dfdaemon(name, seed=seed)
        node.args = [*node.args, *extra]
        return self._spawn(node)

    def restart(self, node: Node) -> Node:
        """Start a stopped node again with the same ports and data."""
        return self._spawn(node)

    def wait_ready(self, *nodes: Node, timeout: float = READY_TIMEOUT) -> None:
        """Wait until every node answers its readiness check (dfdaemons: scheduler reachable)."""
        for node in nodes:
            port = "metrics" if node.kind == "scheduler" else "health"

            def ready(node: Node = node, port: str = port) -> bool:
                if not node.alive:
                    raise RuntimeError(f"{node.name} exited with {node.process and node.process.returncode}; "
                                       f"log {node.log_path}:\n{tail(node.log_path)}")
                status, body = node.get(port, "/ready")
                return status == 200 and b"degraded:" not in body  # dfdaemons: a scheduler too

            wait_until(ready, timeout, f"{node.name} to be ready")

    def kill(self, node: Node, sig: int = signal.SIGKILL) -> None:
        """Send `sig` and wait for the process to end."""
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(sig)
            node.process.wait(timeout=30)

    def stop(self) -> None:
        """Stop every node: SIGTERM, then SIGKILL after a grace period."""
        for node in self.nodes:
            if node.alive:
                assert node.process is not None
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def dfget_command(python: str, url: str, output: Path, socket_path: Path, *extra: str) -> list[str]:
    """The dfget command line for one download."""
    return [python, "-m", "peer.dfget", url, "-O", str(output), "--endpoint", str(socket_path), "--no-progress",
            *extra]


def sha256_file(path: Path) -> str:
    """sha256:<hex> of a file, streamed."""
    return file_digest(path)


@contextlib.contextmanager
def running_cluster(root: Path, peers: int, log_level: str = "info", *, base_port: int | None = None,
                    dfdaemon_args: tuple[str, ...] = ()) -> Iterator[LocalCluster]:
    """A scheduler, one seed and `peers` dfdaemons, all ready; stopped on exit.

    `base_port` fixes every port (see :func:`fixed_node_ports`); `dfdaemon_args` go to every
    dfdaemon and the seed.
    """
    cluster = LocalCluster(root, log_level=log_level, base_port=base_port, allowed_upstreams=())
    try:
        names = ["seed", *(f"peer{i}" for i in range(1, peers + 1))]
        planned = [cluster.plan_dfdaemon(name, seed=index == 0,
                                         ports=None if base_port is None else fixed_node_ports(base_port, index))
                   for index, name in enumerate(names)]
        if base_port is not None:
            _check_fixed_ports(base_port, cluster.scheduler_ports, planned)
        seed = planned[0]
        cluster.start_scheduler(seeds=[seed])
        cluster.start_dfdaemon("seed", *dfdaemon_args, node=seed)
        daemons = [cluster.start_dfdaemon(node.name, *dfdaemon_args, node=node) for node in planned[1:]]
        assert cluster.scheduler is not None
        cluster.wait_ready(cluster.scheduler, seed, *daemons)
        yield cluster
    finally:
        cluster.stop()


def _check_fixed_ports(base_port: int, scheduler_ports: dict[str, int], nodes: list[Node]) -> None:
    """RuntimeError naming the first port of the `--base-port` layout that is taken or out of range."""
    wanted = [("scheduler", name, port) for name, port in scheduler_ports.items()]
    wanted += [(node.name, name, port) for node in nodes for name, port in node.ports.items()]
    for owner, name, port in wanted:
        if not 0 < port < 65536:
            raise RuntimeError(f"--base-port {base_port}: {owner} {name} port {port} is out of range; "
                               f"choose a base port below {65535 - NODE_PORT_STRIDE * (len(nodes) + 1)}")
        if port_in_use(port):
            raise RuntimeError(f"--base-port {base_port}: 127.0.0.1:{port} ({owner} {name}) is in use; "
                               "stop what holds it or choose another base port")


def _fetch_everywhere(cluster: LocalCluster, url: str, out_dir: Path) -> int:
    """dfget `url` through every dfdaemon at once; print who got which bytes from where."""
    daemons = [n for n in cluster.nodes if n.kind == "dfdaemon"]
    out_dir.mkdir(parents=True, exist_ok=True)
    blob = parse_oci_blob_url(url)

    def fetch(node: Node) -> tuple[Node, int, float, str]:
        output = out_dir / f"{node.name}.out"
        assert node.socket_path is not None
        started = time.monotonic()
        # up's own scratch copies: a rerun with the same --data-dir replaces them.
        result = subprocess.run(dfget_command(cluster.python, url, output, node.socket_path, "--overwrite"),
                                capture_output=True, text=True)
        elapsed = time.monotonic() - started
        if result.returncode != 0:
            return node, result.returncode, elapsed, result.stderr.strip()
        digest = sha256_file(output)
        verdict = " (= blob digest)" if blob and digest == blob.digest else ""
        return node, 0, elapsed, digest + verdict

    with ThreadPoolExecutor(len(daemons)) as pool:
        results = list(pool.map(fetch, daemons))
    print(f"\n{'peer':<8} {'exit':>4} {'seconds':>8} {'from origin':>12} {'from peers':>11} {'served':>9}  "
          "sha256 / error")
    for node, code, elapsed, detail in results:
        m = node.metrics()
        origin, remote, served = m.get(_FROM_ORIGIN, 0), m.get(_FROM_PEERS, 0), m.get(_UPLOADED, 0)
        print(f"{node.name:<8} {code:>4} {elapsed:>8.2f} {origin / 1e6:>10.1f}MB {remote / 1e6:>9.1f}MB "
              f"{served / 1e6:>7.1f}MB  {detail}")
    seed = next(n for n in cluster.nodes if n.kind == "seed")
    metrics = seed.metrics()
    print(f"seed     read {metrics.get(_FROM_ORIGIN, 0) / 1e6:.1f} MB from the origin, "
          f"served {metrics.get(_UPLOADED, 0) / 1e6:.1f} MB to peers")
    return 1 if any(code for _, code, _, _ in results) else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``damselfly up``."""
    parser = argparse.ArgumentParser(prog="damselfly up", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="where logs and caches go (default: a new temporary directory)")
    parser.add_argument("--peers", type=int, default=1, help="number of dfdaemons besides the seed (default 1)")
    parser.add_argument("--fetch", metavar="URL", help="download URL through every dfdaemon at once, then exit")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="log level of every node; each node logs to <data-dir>/<node>.log (default info)")
    parser.add_argument("--registry-mirror", metavar="URL",
                        help="default upstream registry of every dfdaemon's mirror (for clients that name no "
                             "registry: registries.conf mirrors, docker), e.g. http://127.0.0.1:5000")
    parser.add_argument("--base-port", type=int, metavar="PORT",
                        help="fixed ports, the same after a restart: the scheduler gets PORT (gRPC) and PORT+1 "
                             f"(metrics); node k (seed 0, peerN N) gets PORT+{NODE_PORT_STRIDE}*(k+1) + 0 gRPC, "
                             "1 upload, 2 proxy, 3 metrics, 4 health (default: free ports picked at random)")
    parser.add_argument("--dfdaemon-args", metavar="ARGS", default="",
                        help="more flags for every dfdaemon and the seed, as one shell-quoted string, "
                             "e.g. --dfdaemon-args='--proxy-p2p-rate 100 --prefetch false'")
    args = parser.parse_args(argv)
    if args.peers < 1:
        parser.error("--peers must be at least 1")
    if args.base_port is not None and not 1024 <= args.base_port <= 65535 - NODE_PORT_STRIDE * (args.peers + 1):
        parser.error(f"--base-port must be between 1024 and {65535 - NODE_PORT_STRIDE * (args.peers + 1)} "
                     f"for {args.peers} peer(s)")
    try:
        dfdaemon_args = tuple(shlex.split(args.dfdaemon_args))
    except ValueError as exc:
        parser.error(f"--dfdaemon-args {args.dfdaemon_args!r}: {exc}")
    if args.registry_mirror:
        dfdaemon_args = ("--registry-mirror", args.registry_mirror, *dfdaemon_args)
    root = Path(args.data_dir or tempfile.mkdtemp(prefix="damselfly-up-")).resolve()
    print(f"damselfly up: data and logs under {root}")
    try:
        with running_cluster(root, args.peers, args.log_level, base_port=args.base_port,
                             dfdaemon_args=dfdaemon_args) as cluster:
            assert cluster.scheduler is not None
            print(f"  scheduler   gRPC 127.0.0.1:{cluster.scheduler.ports['grpc']}  "
                  f"metrics {cluster.scheduler.url('metrics', '/metrics')}")
            for node in cluster.nodes[1:]:
                print(f"  {node.name:<10}  proxy 127.0.0.1:{node.ports['proxy']}  dfget --endpoint {node.socket_path}  "
                      f"health {node.url('health', '/healthy')}  metrics {node.url('metrics', '/metrics')}")
            if args.fetch:
                return _fetch_everywhere(cluster, args.fetch, root / "downloads")
            print("ready; Ctrl-C stops everything", flush=True)  # also when stdout is a pipe or a file
            # Blocked, the signals wait for sigwait: SIGTERM would otherwise kill this process
            # at once and leave the nodes (in their own sessions) running.
            stop_signals = {signal.SIGINT, signal.SIGTERM}
            signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
            signal.sigwait(stop_signals)
            print("stopping")
    except (TimeoutError, RuntimeError) as exc:
        print(f"damselfly up: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
