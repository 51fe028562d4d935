"""How every component's process runs: flags and config, logging, uvloop, signals, exit codes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from common.config import LoggingConfig, add_config_arguments, config_from_args
from common.errors import ConfigError
from common.logs import setup_logging

log = logging.getLogger(__name__)

C = TypeVar("C", bound=LoggingConfig)


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
