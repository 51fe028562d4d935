"""``damselfly scheduler``: the gRPC server, the metrics and health HTTP server, and the CLI."""

from __future__ import annotations

import asyncio
import logging
import sys

import grpc
from aiohttp import web
from dragonfly_api import scheduler_pb2_grpc

from common.clock import SystemClock
from common.config import SchedulerConfig
from common.listeners import GRPC_SERVER_OPTIONS, bind_grpc, naming_flag
from common.runtime import component_main, start_http, status_app
from common.tls import tls_from_config
from scheduler.core import SchedulerCore
from scheduler.preheat import PreheatingSchedulerService
from scheduler.service import SchedulerService

log = logging.getLogger(__name__)

GRACEFUL_STOP_SECONDS = 5.0
# Connection hygiene (gRPC core channel arguments): a TLS handshake must finish in 10 s; an idle
# connection (no stream for 5 minutes) is closed; a connection is pinged after a minute of
# silence and dropped when the ping is not answered in 20 s, so dead peers free their streams.
HANDSHAKE_TIMEOUT_MS = 10_000
MAX_CONNECTION_IDLE_MS = 300_000
KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000


def server_options(config: SchedulerConfig) -> tuple[tuple[str, int], ...]:
    """Channel arguments of the scheduler's gRPC server (limits against exhaustion included)."""
    return (
        *GRPC_SERVER_OPTIONS,
        ("grpc.max_concurrent_streams", config.grpc_max_concurrent_streams),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
    )


def metrics_app(service: SchedulerService, ready: asyncio.Event) -> web.Application:
    """``/metrics``, ``/healthy`` (the process answers) and ``/ready`` (gRPC is serving)."""

    async def not_ready() -> list[str]:
        return [] if ready.is_set() else ["starting"]

    return status_app(not_ready, service.metrics.registry)


async def serve(config: SchedulerConfig) -> None:
    """Serve until cancelled, then stop gracefully."""
    tls = tls_from_config(config)  # ConfigError now, not at the first handshake
    core = SchedulerCore(config, SystemClock())
    service = PreheatingSchedulerService(core, tls=tls)  # scheduler.v2.Scheduler, preheat RPCs included
    ready = asyncio.Event()

    # no SO_REUSEPORT (a second scheduler on this port fails, not shares it), and the limits above
    server = grpc.aio.server(options=server_options(config))
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(service, server)
    bind_grpc(server, config.listen, tls, "--listen")

    runner: web.AppRunner | None = None
    try:
        with naming_flag("--metrics-listen", config.metrics_listen):
            runner = await start_http(metrics_app(service, ready), config.metrics_listen)
        await server.start()
        service.start()
        ready.set()
        log.info("scheduler serving gRPC on %s (%s), metrics on %s", config.listen,
                 "plaintext" if tls is None else "mutual TLS" if tls.client_auth else "TLS", config.metrics_listen)
        await asyncio.Event().wait()  # until cancelled
    finally:
        ready.clear()
        log.info("scheduler stopping")
        await server.stop(GRACEFUL_STOP_SECONDS)
        await service.close()
        if runner is not None:
            await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``damselfly scheduler``."""
    return component_main(argv, name="scheduler", description="Run the central scheduler.",
                          config_class=SchedulerConfig, serve=serve)


if __name__ == "__main__":
    sys.exit(main())
