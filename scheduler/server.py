"""``damselfly scheduler``: the gRPC server, the metrics and health HTTP server, and the CLI."""

from __future__ import annotations

import asyncio
import logging
import sys

import grpc
from aiohttp import web
from dragonfly_api import scheduler_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.clock import SystemClock
from common.config import SchedulerConfig, split_address
from common.runtime import component_main
from common.tls import add_port, tls_from_config
from scheduler.core import SchedulerCore
from scheduler.service import SchedulerService

log = logging.getLogger(__name__)

GRACEFUL_STOP_SECONDS = 5.0


def metrics_app(service: SchedulerService, ready: asyncio.Event) -> web.Application:
    """``/metrics``, ``/healthy`` (the process answers) and ``/ready`` (gRPC is serving)."""

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(service.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthy(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def is_ready(request: web.Request) -> web.Response:
        if ready.is_set():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="starting\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthy", healthy)
    app.router.add_get("/ready", is_ready)
    return app


async def serve(config: SchedulerConfig) -> None:
    """Serve until cancelled, then stop gracefully."""
    tls = tls_from_config(config)  # ConfigError now, not at the first handshake
    core = SchedulerCore(config, SystemClock())
    service = SchedulerService(core, tls=tls)
    ready = asyncio.Event()

    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(service, server)
    if add_port(server, config.listen, tls) == 0:
        raise OSError(f"cannot listen on {config.listen}")

    runner = web.AppRunner(metrics_app(service, ready), access_log=None)
    await runner.setup()
    try:
        host, port = split_address(config.metrics_listen)
        await web.TCPSite(runner, host, port).start()
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
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``damselfly scheduler``."""
    return component_main(argv, name="scheduler", description="Run the central scheduler.",
                          config_class=SchedulerConfig, serve=serve)


if __name__ == "__main__":
    sys.exit(main())
