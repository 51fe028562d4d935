"""A private containerd for integration tests, and ``ctr`` pulls through a hosts directory.

Debian's ``containerd`` (1.6) runs as a subprocess with a config of its own: root, state and
socket under a temporary directory, the CRI plugin disabled (so it needs no system service, no
CNI and no kubelet), no TCP listeners. Pulls use the real ``ctr`` client::

    with running_containerd(tmp_path / "ctrd") as containerd:
        hosts = write_hosts_toml(tmp_path / "hosts", registry.host, server=registry.url,
                                 mirror="http://127.0.0.1:4001")
        pulled = containerd.pull(f"{registry.host}/team/app:v1", hosts_dir=hosts)
        assert set(layer_digests) <= pulled.content

containerd checks every blob it fetches against the digest the manifest names before it commits
it to its content store, and unpacking checks each layer's uncompressed digest against the image
config's ``diff_ids``: a pull that succeeds has verified every byte. Needs root (containerd
mounts snapshots); :func:`containerd_available` says whether this machine can run it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from common.launcher import tail, wait_until

CONTAINERD_BINARY = "/usr/bin/containerd"
CTR_BINARY = "/usr/bin/ctr"
START_TIMEOUT = 30.0  # seconds for containerd to answer on its socket
PULL_TIMEOUT = 300.0
NAMESPACE = "damselfly-test"  # containerd namespace the pulls go to


class ContainerdError(RuntimeError):
    """containerd failed to start, or ctr failed (the message has its output)."""


@dataclass(frozen=True)
class PullResult:
    """What one ``ctr images pull`` did."""

    command: list[str]
    output: str  # ctr's stdout and stderr
    seconds: float
    content: frozenset[str]  # digests in the content store after the pull (verified on commit)


@dataclass
class Containerd:
    """A running private containerd; ``address`` is its unix socket."""

    workdir: Path
    address: Path
    process: subprocess.Popen[bytes]
    _log: BinaryIO | None = field(default=None, repr=False)
    _socket_dir: Path | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.workdir / "containerd.log"

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def ctr(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address <socket> --namespace <ns> ARGS``."""
        command = [CTR_BINARY, "--address", str(self.address), "--namespace", NAMESPACE, *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise ContainerdError(
                f"{' '.join(command)} exited with {result.returncode}:\n{result.stdout}{result.stderr}\n"
                f"--- containerd log ---\n{self.log_tail()}"
            )
        return result

    def pull(
        self, reference: str, *, hosts_dir: Path, plain_http: bool = True,
        extra: Sequence[str] = (), timeout: float = PULL_TIMEOUT,
    ) -> PullResult:
        """``ctr images pull --hosts-dir DIR [--plain-http] REF``: fetch, verify, unpack into a snapshot.

        Raises :class:`ContainerdError` with ctr's output when the pull fails.
        """
        args = ["images", "pull", "--hosts-dir", str(hosts_dir)]
        if plain_http:
            args.append("--plain-http")
        args += [*extra, reference]
        started = time.monotonic()
        result = self.ctr(*args, timeout=timeout)
        seconds = time.monotonic() - started
        return PullResult([CTR_BINARY, *args], result.stdout + result.stderr, seconds, self.content())

    def content(self) -> frozenset[str]:
        """Digests in the content store (``ctr content ls -q``)."""
        listed = self.ctr("content", "ls", "-q").stdout
        return frozenset(line.strip() for line in listed.splitlines() if line.strip())

    def remove_image(self, reference: str) -> None:
        """``ctr images rm --sync`` (the content is garbage-collected with it)."""
        self.ctr("images", "rm", "--sync", reference)

    def stop(self) -> None:
        """SIGTERM, wait (SIGKILL after 15 s), unmount what it left, remove the socket directory."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        if self._log is not None:
            self._log.close()
            self._log = None
        _unmount_below(self.workdir)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None


def containerd_available() -> str | None:
    """None when containerd can run here, else why not (for ``pytest.skip``)."""
    for binary in (CONTAINERD_BINARY, CTR_BINARY):
        if not Path(binary).exists():
            return f"{binary} is missing; install Debian's containerd package (scripts/setup.sh does)"
    if os.geteuid() != 0:
        return "containerd needs root (it mounts snapshots)"
    return None


def config_toml(root: Path, state: Path, address: Path) -> str:
    """containerd's config: own root/state/socket, CRI off, no TCP listeners."""
    return "\n".join([
        "version = 2",
        f'root = "{root}"',
        f'state = "{state}"',
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
        "",
        "[grpc]",
        f'  address = "{address}"',
        "",
        "[ttrpc]",
        f'  address = "{address}.ttrpc"',
        "",
        "[debug]",
        '  address = ""',
        '  level = "info"',
        "",
        "[metrics]",
        '  address = ""',
        "",
        '[plugins."io.containerd.internal.v1.opt"]',
        f'  path = "{root / "opt"}"',
        "",
    ])


def start_containerd(workdir: Path, *, start_timeout: float = START_TIMEOUT) -> Containerd:
    """Start a private containerd in `workdir`; call :meth:`Containerd.stop` when done."""
    reason = containerd_available()
    if reason is not None:
        raise ContainerdError(reason)
    workdir.mkdir(parents=True, exist_ok=True)
    # A unix socket path must fit in 108 bytes; pytest's tmp paths can be longer.
    socket_dir = Path(tempfile.mkdtemp(prefix="ctrd-"))
    address = socket_dir / "containerd.sock"
    config = workdir / "config.toml"
    config.write_text(config_toml(workdir / "root", workdir / "state", address))
    log = (workdir / "containerd.log").open("ab")
    process = subprocess.Popen(
        [CONTAINERD_BINARY, "--config", str(config)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    containerd = Containerd(workdir, address, process, log, socket_dir)

    def answering() -> bool:
        if process.poll() is not None:
            raise ContainerdError(f"containerd exited with {process.returncode}:\n{containerd.log_tail()}")
        if not address.exists():
            return False
        probe = subprocess.run([CTR_BINARY, "--address", str(address), "version"],
                               capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
        return probe.returncode == 0

    try:
        wait_until(answering, start_timeout, f"containerd to answer on {address}", interval=0.1)
    except BaseException:
        containerd.stop()
        raise
    return containerd


@contextmanager
def running_containerd(workdir: Path) -> Iterator[Containerd]:
    """:func:`start_containerd` as a context manager that stops it on exit."""
    containerd = start_containerd(workdir)
    try:
        yield containerd
    finally:
        containerd.stop()


def write_hosts_toml(
    hosts_dir: Path, registry_host: str, *, server: str, mirror: str, header_registry: str | None = None,
) -> Path:
    """``<hosts_dir>/<registry_host>/hosts.toml`` as ``docs/integrations.md`` shows it; returns hosts_dir.

    `server` is the registry's own URL (containerd's fallback), `mirror` the dfdaemon's proxy
    URL; `header_registry` adds the optional ``X-Dragonfly-Registry`` header.
    """
    lines = [
        f'server = "{server}"',
        "",
        f'[host."{mirror}"]',
        '  capabilities = ["pull", "resolve"]',
    ]
    if header_registry is not None:
        lines += [f'  [host."{mirror}".header]', f'    X-Dragonfly-Registry = ["{header_registry}"]']
    directory = hosts_dir / registry_host
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts.toml").write_text("\n".join(lines) + "\n")
    return hosts_dir


def _unmount_below(path: Path) -> None:
    """Unmount whatever containerd left mounted under `path` (deepest first), so it can be deleted."""
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    prefix = str(path.resolve()) + "/"
    targets = [fields[4] for fields in (line.split() for line in mounts)
               if len(fields) > 4 and fields[4].startswith(prefix)]
    for target in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, stdin=subprocess.DEVNULL)
