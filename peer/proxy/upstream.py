"""Which scheme a registry named only by host (containerd's ``?ns=host:port``) speaks.

containerd names the registry of a mirror request with ``ns`` and no scheme. Guessing
``https://`` breaks plain-HTTP registries: the TLS handshake fails, the proxy answers ``502``,
and containerd silently falls back to the registry itself. So the proxy asks the registry's
``/v2/`` ping once: over TLS first, and over plain HTTP only when the port does not speak TLS at
all (a TLS *protocol* failure, such as ``WRONG_VERSION_NUMBER``). A certificate the proxy does
not trust is a TLS server: it stays ``https`` (never downgraded), and so does a host that
cannot be reached at all (the real request then reports why).

:func:`choose_scheme` is the decision; :class:`SchemeCache` remembers it per host for
:data:`SCHEME_TTL` seconds (:data:`UNDECIDED_TTL` when nothing answered) and shares one probe
among concurrent requests.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable

from common.clock import Clock, SystemClock

log = logging.getLogger(__name__)

SCHEME_TTL = 600.0  # seconds a probed scheme is remembered per host
# Seconds an undecided probe (nothing answered) is remembered: a registry that was down for a
# moment is probed again soon, one that stays down is not probed on every request.
UNDECIDED_TTL = 10.0
MAX_HOSTS = 1024  # hosts remembered before the cache is emptied (bounded memory)


class Probe(enum.Enum):
    """How a ``GET /v2/`` ping over one scheme went."""

    ANSWERED = "answered"  # any HTTP status: the scheme is spoken there
    NOT_TLS = "not_tls"  # the TLS handshake failed as a plain-HTTP port makes it fail
    UNREACHABLE = "unreachable"  # refused, timed out, unknown host, a certificate not trusted, ...


def choose_scheme(over_tls: Probe, plain: Probe | None) -> str | None:
    """The scheme to use given the TLS ping and, when asked, the plain-HTTP one.

    None: ask the plain-HTTP ping first (only after a TLS protocol failure).
    """
    if over_tls is not Probe.NOT_TLS:
        return "https"
    if plain is None:
        return None
    return "http" if plain is Probe.ANSWERED else "https"


ProbeFn = Callable[[str], Awaitable[Probe]]  # probe(url of /v2/) -> outcome


class SchemeCache:
    """``https`` or ``http`` per registry host (``host[:port]``), probed once per :data:`SCHEME_TTL`."""

    def __init__(self, probe: ProbeFn, clock: Clock | None = None, ttl: float = SCHEME_TTL) -> None:
        self._probe = probe
        self._clock: Clock = clock or SystemClock()
        self._ttl = ttl
        self._known: dict[str, tuple[str, float]] = {}  # host -> (scheme, expiry)
        self._in_flight: dict[str, asyncio.Task[str]] = {}

    async def scheme(self, host: str) -> str:
        """The scheme `host` speaks (probing it unless a fresh answer is known)."""
        known = self._known.get(host)
        if known is not None and known[1] > self._clock.time():
            return known[0]
        task = self._in_flight.get(host)
        if task is None:
            task = asyncio.create_task(self._find(host))
            self._in_flight[host] = task
            task.add_done_callback(lambda _: self._in_flight.pop(host, None))
        return await asyncio.shield(task)

    async def _find(self, host: str) -> str:
        over_tls = await self._probe(f"https://{host}/v2/")
        plain: Probe | None = None
        scheme = choose_scheme(over_tls, plain)
        if scheme is None:
            plain = await self._probe(f"http://{host}/v2/")
            scheme = choose_scheme(over_tls, plain)
            assert scheme is not None
            if scheme == "http":
                log.info("registry %s speaks plain HTTP (no TLS on that port): mirror requests with ns=%s "
                         "go to http://%s", host, host, host)
        answered = Probe.ANSWERED in (over_tls, plain)
        if len(self._known) >= MAX_HOSTS:
            self._known.clear()
        self._known[host] = (scheme, self._clock.time() + (self._ttl if answered else UNDECIDED_TTL))
        return scheme
