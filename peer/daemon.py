"""`damselfly dfdaemon`: builds a node's parts, wires them together, runs them.

Parts and who uses whom (explicit wiring, no globals)::

    PieceStore ── PieceServer (HTTP, sendfile)         ← other peers fetch pieces
        │
        ├──── Engine ── SchedulerClient                 → schedulers (AnnounceHost, AnnouncePeer)
        │        └──── OriginClient                     → registries / HTTP origins
        ├──── UploadService (gRPC, TCP)                  ← peers (SyncPieces, StatTask), scheduler (seed trigger)
        ├──── DownloadService (gRPC, unix socket)        ← dfget, local tools
        │        └──── DownloadSocketServer (<socket>.stream)  ← dfget (the same calls without gRPC)
        └──── CacheCollector                             TTL expiry, LRU eviction to the quota, write admission
    metrics (/metrics) and health (/healthy, /ready) over HTTP
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import random
import resource
import socket
import stat
from pathlib import Path

import grpc
from aiohttp import web
from dragonfly_api import common_pb2, dfdaemon_pb2_grpc

from common import ids
from common.clock import SystemClock
from common.config import DfdaemonConfig, split_address
from common.errors import ConfigError, ListenError
from common.hosts import announced_type
from common.http_limits import STATUS_LIMITS, start_limited_http
from common.listeners import GRPC_SERVER_OPTIONS, bind_grpc, naming_flag
from common.origin import OriginClient
from common.runtime import component_main, status_app
from common.tls import tls_from_config
from peer.access import TriggerPolicy, resolve_scheduler_ips
from peer.download.engine import Engine
from peer.download.scheduler_client import SchedulerClient
from peer.download_socket import stream_socket_path
from peer.download_socket_server import DownloadSocketServer
from peer.metrics import DaemonMetrics
from peer.proxy.server import Proxy, upstream_policy
from peer.proxy.tls import upstream_ssl_context
from peer.services import DownloadService, UploadService
from peer.storage.gc import CacheCollector
from peer.storage.store import PieceStore
from peer.upload.piece_server import DEFAULT_SHARE_WINDOW, PieceServer

log = logging.getLogger(__name__)

# The upload gRPC service faces the network: a handshake (TLS included) within 10 s, pings that
# find dead peers, streams per connection and calls in all bounded, idle connections closed.
UPLOAD_GRPC_LIMITS = (
    ("grpc.server_handshake_timeout_ms", 10_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_concurrent_streams", 256),
    ("grpc.max_connection_idle_ms", 300_000),
    ("grpc.max_receive_message_length", 4 << 20),
)
# Calls served at once (SyncPieces streams last as long as a child downloads); more get RESOURCE_EXHAUSTED.
UPLOAD_GRPC_MAX_RPCS = 4096


class Daemon:
    """One dfdaemon (or seed) process."""

    def __init__(self, config: DfdaemonConfig) -> None:
        self.config = config
        raise_fd_limit()  # before the piece server sizes its connection cap from it
        self.tls = tls_from_config(config)  # ConfigError at start-up when a TLS file is wrong
        self.metrics = DaemonMetrics()
        self.host_id = ids.host_id(config.host_ip, config.hostname, seed=config.seed)
        self.store = PieceStore(Path(config.data_dir), metrics=self.metrics,
                                page_cache_window=config.page_cache_window)
        self.piece_server = PieceServer(self.store, upload_slots=config.effective_upload_slots,
                                        metrics=self.metrics, rate_limit=config.upload_rate_limit,
                                        min_rate=config.upload_min_rate, swarm_slots=config.swarm_upload_slots,
                                        share_window=DEFAULT_SHARE_WINDOW if config.seed else 0.0)
        self.collector = CacheCollector(
            self.store, quota=config.cache_quota, high_watermark=config.gc_high_watermark,
            low_watermark=config.gc_low_watermark, task_ttl=config.task_ttl, interval=config.gc_interval,
            metrics=self.metrics, clock=self.store.clock)
        self._collector_task: asyncio.Task[None] | None = None
        self._scrub_task: asyncio.Task[None] | None = None
        # Back-sourcing trusts the same extra CA as the proxy's straight-through requests.
        upstream_ssl = upstream_ssl_context(config.proxy_upstream_ca_cert) if config.proxy_upstream_ca_cert else None
        self.origin = OriginClient(connect_timeout=config.origin_connect_timeout,
                                   sock_read_timeout=config.origin_read_timeout, ssl_context=upstream_ssl,
                                   upstreams=upstream_policy(config))  # where back-source redirects may go
        self.scheduler: SchedulerClient | None = None
        self.engine: Engine | None = None
        self.proxy: Proxy | None = None
        self._grpc_servers: list[grpc.aio.Server] = []
        self.download_socket: DownloadSocketServer | None = None
        self._http_runners: list[web.AppRunner] = []
        self.upload_port = 0

    def host_message(self) -> common_pb2.Host:
        """This node as the scheduler sees it."""
        config = self.config
        _, grpc_port = split_address(config.grpc_listen)
        _, proxy_port = split_address(config.proxy_listen)
        return common_pb2.Host(
            id=self.host_id, type=announced_type(config.seed),
            hostname=config.hostname, ip=config.host_ip, port=grpc_port, download_port=self.upload_port,
            proxy_port=proxy_port,
            network=common_pb2.Network(idc=config.idc, location=config.location,
                                       max_tx_bandwidth=config.effective_upload_slots),
        )

    async def start(self) -> None:
        """Open storage, start every server, announce the host."""
        config = self.config
        await asyncio.to_thread(prepare_data_dir, Path(config.data_dir))
        await asyncio.to_thread(self.store.load)
        self._collector_task = asyncio.create_task(self.collector.run(), name="cache-gc")
        self._scrub_task = asyncio.create_task(self._scrub(), name="scrub")
        host, port = split_address(config.upload_listen)
        piece_ssl = self.tls.server_ssl_context() if self.tls is not None else None
        with naming_flag("--upload-listen", config.upload_listen):
            self.upload_port = await self.piece_server.start(host, port, ssl_context=piece_ssl)
        self.scheduler = SchedulerClient(config.scheduler, self.host_message(), config.announce_interval,
                                         tls=self.tls)
        self.engine = Engine(config=config, store=self.store, scheduler=self.scheduler, origin=self.origin,
                             metrics=self.metrics, host_id=self.host_id, clock=SystemClock(), rng=random.Random(),
                             collector=self.collector, tls=self.tls)
        self.piece_server.serve_demands(self.engine.wait_demanded_piece)

        trigger_policy = TriggerPolicy(
            seed=config.seed, mutual_tls=self.tls is not None and self.tls.client_auth,
            scheduler_ips=await asyncio.to_thread(resolve_scheduler_ips, config.scheduler))
        # no SO_REUSEPORT (a second dfdaemon on this port fails, not shares it), and bounded
        upload = grpc.aio.server(options=GRPC_SERVER_OPTIONS + UPLOAD_GRPC_LIMITS,
                                 maximum_concurrent_rpcs=UPLOAD_GRPC_MAX_RPCS)
        dfdaemon_pb2_grpc.add_DfdaemonUploadServicer_to_server(
            UploadService(self.engine, self.store, config.host_ip, self.upload_port, trigger_policy), upload)
        bind_grpc(upload, config.grpc_listen, self.tls, "--grpc-listen")
        await upload.start()
        self._grpc_servers.append(upload)

        socket_path = Path(config.socket)
        with naming_flag("--socket", config.socket):
            await asyncio.to_thread(_prepare_socket_path, socket_path)
        download = grpc.aio.server()
        download_service = DownloadService(self.engine, self.store)
        dfdaemon_pb2_grpc.add_DfdaemonDownloadServicer_to_server(download_service, download)
        try:
            download.add_insecure_port(f"unix://{socket_path}")  # local, guarded by file permissions: no TLS
        except RuntimeError:
            raise ListenError("--socket", config.socket, "cannot be listened on (check the directory's "
                              "permissions)") from None
        # Bound, not yet serving: restrict it before anyone can call (the umask may leave it 0777).
        await asyncio.to_thread(restrict_socket, socket_path, config.socket_group)
        await download.start()
        self._grpc_servers.append(download)
        await self._start_download_socket(download_service, socket_path)

        self.proxy = Proxy(engine=self.engine, origin=self.origin, config=config, metrics=self.metrics)
        with naming_flag("--proxy-listen", config.proxy_listen):
            await self.proxy.start(*split_address(config.proxy_listen))
        with naming_flag("--metrics-listen", config.metrics_listen):
            self._http_runners.append(await start_limited_http(
                status_app(self._not_ready, self.metrics.registry, degraded=self._degraded),
                *split_address(config.metrics_listen), STATUS_LIMITS))
        with naming_flag("--health-listen", config.health_listen):
            self._http_runners.append(await start_limited_http(status_app(self._not_ready, degraded=self._degraded),
                                                               *split_address(config.health_listen), STATUS_LIMITS))
        await self.scheduler.start()
        log.info("dfdaemon %s ready: gRPC %s, pieces %s://%s:%d, socket %s%s%s", self.host_id, config.grpc_listen,
                 self.engine.piece_scheme, config.host_ip, self.upload_port, config.socket,
                 " (seed)" if config.seed else "",
                 "" if self.tls is None else " (mutual TLS)" if self.tls.client_auth else " (TLS)")

    async def _start_download_socket(self, service: DownloadService, grpc_socket: Path) -> None:
        """dfget's download socket beside the gRPC one (:mod:`peer.download_socket`). A path too
        long for a unix socket goes without one (dfget then uses gRPC, only slower to start);
        any other failure stops the daemon like the gRPC socket's: a name left to another
        process would have dfget send it its requests."""
        path = Path(stream_socket_path(str(grpc_socket)))
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            log.warning("no download socket: %s is longer than a unix socket path may be (%d bytes); "
                        "dfget will use gRPC on %s", path, MAX_UNIX_PATH, grpc_socket)
            return
        server = DownloadSocketServer(service)
        try:
            await server.start(path, lambda bound: restrict_socket(bound, self.config.socket_group))
        except OSError as exc:
            raise ListenError("--socket", str(path), f"cannot be listened on ({exc.strerror or exc}; check the "
                              "directory's permissions)") from None
        self.download_socket = server

    async def _scrub(self) -> None:
        """Check the pieces found on disk at start against their digests, in the background."""
        corrupt = await self.store.verify_all()
        if corrupt:
            log.warning("scrub: %d corrupt pieces found on disk and dropped", corrupt)

    async def _not_ready(self) -> list[str]:
        """What keeps this node from being ready (``/ready``): its storage only, nothing when it is.

        Not the scheduler: without one the node still serves its cache and falls back to the
        origin, and one scheduler outage must not mark a thousand dfdaemons NotReady.
        """
        try:
            await asyncio.to_thread(_probe_writable, Path(self.config.data_dir))
        except OSError as exc:
            return [f"storage not writable: {exc.strerror or exc}"]
        return []

    async def _degraded(self) -> list[str]:
        """What this node lacks while still ready (listed by ``/ready`` as ``degraded: ...``)."""
        if self.scheduler is not None and not self.scheduler.reachable:
            return ["no scheduler reachable (downloads fall back to the origin)"]
        return []

    async def stop(self) -> None:
        """Stop accepting work, cancel downloads, leave the schedulers."""
        for background in (self._collector_task, self._scrub_task):
            if background is not None:
                background.cancel()
                await asyncio.gather(background, return_exceptions=True)
        # Downloads first: one still running would react to the parents and servers going away
        # (a lazy download left waiting for the next read went back to source during a shutdown
        # and held the proxy's requests, past a 10 s grace).
        if self.engine is not None:
            await self.engine.stop()
        if self.download_socket is not None:
            await self.download_socket.stop()
        for server in self._grpc_servers:
            await server.stop(grace=1.0)
        if self.proxy is not None:
            await self.proxy.stop()
        if self.scheduler is not None:
            await self.scheduler.stop()
        await self.piece_server.stop()
        for runner in self._http_runners:
            await runner.cleanup()
        await self.origin.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.socket)


# sockaddr_un.sun_path holds 108 bytes, the last one the terminating NUL.
MAX_UNIX_PATH = 107


def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                pass  # nobody answers: a stale socket of a previous run
            else:
                raise OSError(errno.EADDRINUSE, "a running dfdaemon listens there")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def raise_fd_limit() -> None:
    """Use every file descriptor the hard limit allows: connection caps are sized from it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def prepare_data_dir(path: Path) -> None:
    """Create the data dir 0700, or refuse one another user could change; tighten a readable one.

    The cache holds private layers, and whoever can write the directory can swap a task's files
    under the daemon (poisoning what it serves): such a directory is a configuration error.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as exc:
        raise ConfigError("data_dir", f"cannot create {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError("data_dir", f"{path} is not a directory")
    if info.st_uid != os.geteuid():
        raise ConfigError("data_dir", f"{path} belongs to uid {info.st_uid}, not to the daemon's user "
                          f"(uid {os.geteuid()}): chown it, or choose another directory")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError("data_dir", f"{path} is writable by other users (mode {stat.filemode(info.st_mode)}): "
                          "chmod 700 it, or choose another directory")
    if info.st_mode & 0o077:
        log.info("data dir %s was mode %s: now 0700 (cached layers may be private)", path,
                 stat.filemode(info.st_mode))
        try:
            path.chmod(0o700)
        except OSError as exc:
            raise ConfigError("data_dir", f"cannot make {path} private (chmod 700): {exc.strerror}") from None


def restrict_socket(path: Path, group: str) -> None:
    """Make the unix socket 0660, owned by `group` when given (its members may run dfget)."""
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError("socket_group", f"no group called {group!r} on this host") from None
        try:
            os.chown(path, -1, gid)
        except OSError as exc:
            raise ConfigError("socket_group", f"cannot give {path} to group {group}: {exc.strerror}") from None
    os.chmod(path, 0o660)


def _probe_writable(directory: Path) -> None:
    probe = directory / ".ready-probe"
    probe.write_bytes(b"ok")
    probe.unlink()


async def serve(config: DfdaemonConfig) -> None:
    """Run a dfdaemon until cancelled (SIGTERM/SIGINT cancel it), then stop it cleanly."""
    daemon = Daemon(config)
    try:
        await daemon.start()
        await asyncio.Event().wait()
    finally:
        log.info("stopping")
        await daemon.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``damselfly dfdaemon``."""
    return component_main(argv, name="dfdaemon", description="Run the per-node P2P daemon (--seed: a seed peer).",
                          config_class=DfdaemonConfig, serve=serve)
