"""Values people write in flags and config files: durations, sizes, booleans.

Light on purpose (no other module of ours, nothing beyond ``re`` and ``math``): dfget imports it,
and every dfget is a process that starts for one download.
"""

from __future__ import annotations

import math
import re

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_duration(value: object) -> float:
    """Seconds from ``30``, ``2.5``, ``500ms``, ``30s``, ``5m`` or ``24h``."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration like 30s, 500ms, 5m or 24h")
        seconds = float(match[1]) * _DURATION_UNITS[match[2]]
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a finite, non-negative duration")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from ``1048576``, ``512MiB``, ``10GiB``, ``1G`` or ``64k``."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a size like 512MiB or 10GiB")
        unit = (match[2] or "b").lower()[0]
        number = float(match[1])
        if not math.isfinite(number) or number > 2**62:
            raise ValueError(f"{value!r} is too large")
        size = int(number * 1024 ** "bkmgt".index(unit))
    if size < 0:
        raise ValueError(f"{value!r} is negative")
    return size


def format_size(nbytes: float) -> str:
    """Bytes for people: ``512 B``, ``1.5 KiB``, ``4.0 MiB`` ... ``2.0 TiB`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def parse_bool(value: object) -> bool:
    """True or False from a bool or ``true/yes/1/on``, ``false/no/0/off`` (any case); else ValueError."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"{value!r} is not true or false")
