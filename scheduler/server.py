"""``damselfly scheduler``: the gRPC server, the metrics and health HTTP server, and the CLI."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys

import grpc
from aiohttp import web
from dragonfly_api import scheduler_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.clock import SystemClock
from common.config import SchedulerConfig, add_config_arguments, config_from_args, split_address
from common.errors import ConfigError
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


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(config: SchedulerConfig) -> None:
    handler = logging.StreamHandler()
    if config.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler], force=True)


async def _run(config: SchedulerConfig) -> None:
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if main_task is not None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, main_task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await serve(config)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``damselfly scheduler``."""
    parser = argparse.ArgumentParser(prog="damselfly scheduler", description="Damselfly scheduler")
    add_config_arguments(parser, SchedulerConfig)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(SchedulerConfig, args)
    except ConfigError as exc:
        print(f"damselfly scheduler: {exc}", file=sys.stderr)
        return 2
    _setup_logging(config)
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(_run(config))
        else:
            uvloop.run(_run(config))
    except ConfigError as exc:  # TLS files are read when serving starts
        print(f"damselfly scheduler: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
