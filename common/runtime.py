"""How every component's process runs: flags and config, logging, uvloop, signals, exit codes,
and the HTTP status endpoints each serves (``/healthy``, ``/ready``, ``/metrics``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from common.config import LoggingConfig, add_config_arguments, config_from_args, split_address
from common.errors import ConfigError
from common.logs import setup_logging

log = logging.getLogger(__name__)

C = TypeVar("C", bound=LoggingConfig)

# What keeps a component from being ready: one line per problem, none when it is ready.
ReadinessCheck = Callable[[], Awaitable[list[str]]]


async def _until_signalled(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` as a task that SIGINT/SIGTERM cancel (its `finally` blocks do the clean-up)."""
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def run(main: Coroutine[Any, Any, None], name: str) -> int:
    """Run `main` until it ends or a signal stops it; a process exit code."""
    runner: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency, but not on every platform
        runner = asyncio.run
    try:
        runner(_until_signalled(main))
    except ConfigError as exc:  # some settings (TLS files, data dir) are checked when serving starts
        print(f"damselfly {name}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"damselfly {name}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def component_main(
    argv: list[str] | None, *, name: str, description: str, config_class: type[C],
    serve: Callable[[C], Coroutine[Any, Any, None]],
) -> int:
    """``damselfly NAME``: parse flags and ``--config``, set up logging, serve until stopped."""
    parser = argparse.ArgumentParser(prog=f"damselfly {name}", description=description)
    add_config_arguments(parser, config_class)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(config_class, args)
    except ConfigError as exc:
        print(f"damselfly {name}: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    return run(serve(config), name)


def status_app(
    not_ready: ReadinessCheck, registry: CollectorRegistry | None = None, *, degraded: ReadinessCheck | None = None,
) -> web.Application:
    """``/healthy`` (the process answers), ``/ready`` (``503`` with one line per problem that
    `not_ready` finds) and, given a registry, ``/metrics``.

    `degraded` finds problems that do not make the component unready: ``/ready`` stays ``200``
    and lists each as a ``degraded: ...`` line after ``ready`` (a dfdaemon without a scheduler
    still serves its cache and falls back to the origin; marking it unready would take a whole
    fleet out of its Services and stall rollouts when one scheduler is down).

    ``/metrics`` is always the Prometheus text format. prometheus_client's own aiohttp handler
    would let Prometheus negotiate OpenMetrics, under which Prometheus files a counter's metadata
    without its ``_total`` suffix: a change for the metadata API and dashboards, not one to make
    in passing.
    """

    async def healthy(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def ready(request: web.Request) -> web.Response:
        problems = await not_ready()
        if problems:
            return web.Response(status=503, text="\n".join(problems) + "\n")
        warnings = await degraded() if degraded is not None else []
        return web.Response(text="".join(["ready\n", *(f"degraded: {w}\n" for w in warnings)]))

    app = web.Application()
    if registry is not None:
        app.router.add_get("/metrics", _metrics_handler(registry))
    app.router.add_get("/healthy", healthy)
    app.router.add_get("/ready", ready)
    return app


def _metrics_handler(registry: CollectorRegistry) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return metrics


async def start_http(app: web.Application, address: str) -> web.AppRunner:
    """Serve `app` on ``HOST:PORT``; the runner to clean up when done."""
    host, port = split_address(address)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
