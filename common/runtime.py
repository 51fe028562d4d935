"""Running a component's main coroutine: uvloop when available, clear exit on start-up errors."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from common.errors import ConfigError

log = logging.getLogger(__name__)


def run(main: Coroutine[Any, Any, None], name: str) -> int:
    """Run `main` to completion and return a process exit code."""
    runner: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency, but not on every platform
        runner = asyncio.run
    try:
        runner(main)
    except ConfigError as exc:
        print(f"damselfly {name}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"damselfly {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
