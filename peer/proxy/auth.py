"""Keeps private blobs private under P2P: may this client read this blob from the registry?

Under P2P a blob reaches a node from other peers, never from the registry with this client's
credentials, and once cached it can be read by anything that reaches the proxy. So before the
proxy serves a blob it asks the registry itself: a ``HEAD`` of the exact blob URL with the
client's ``Authorization`` (none when the client sent none). The registry's yes is remembered
for a short TTL per (credential, blob URL); a no is never remembered and its answer (``401``
with ``WWW-Authenticate``, ``403``, ``404``) reaches the client unchanged, so it can fetch a token
and retry.

The key is the blob URL, not just the repository: the task id of an OCI blob is its digest, so a
client allowed to read repository B must not get a blob of private repository A by asking for
``/v2/B/blobs/<digest of A's blob>``; the registry answers that HEAD with ``404`` unless B has it.

A blob the registry served without any credentials is public: it is remembered for every
client (no check per credential) until the TTL ends.
"""

from __future__ import annotations

import asyncio

from common.clock import Clock, SystemClock
from common.http import credential_key
from common.origin import OriginClient

# Entries kept before expired ones are pruned (bounded memory on a busy node).
MAX_ENTRIES = 50_000


class BlobAccess:
    """The registry's answers to "may this credential read this blob?", cached for `ttl` seconds."""

    def __init__(self, origin: OriginClient, ttl: float, clock: Clock | None = None) -> None:
        self._origin = origin
        self._ttl = ttl
        self._clock: Clock = clock or SystemClock()
        self._allowed: dict[tuple[str, str], float] = {}  # (credential key, url) -> expiry
        self._in_flight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.checks = 0  # HEADs sent to registries (tests, metrics)

    def cached(self, url: str, authorization: str | None) -> bool:
        """Whether a fresh yes is known for this credential (or for everyone: public)."""
        now = self._clock.time()
        for key in ((credential_key(authorization), url), ("", url)):
            expiry = self._allowed.get(key)
            if expiry is not None and expiry > now:
                return True
        return False

    async def check(self, url: str, authorization: str | None) -> None:
        """Return when the registry lets this credential read `url`.

        Raises :class:`~common.origin.OriginResponseError` with the registry's answer when it
        does not, and :class:`~common.errors.OriginError` when it cannot be asked.
        Concurrent checks of the same key share one HEAD.
        """
        if self.cached(url, authorization):
            return
        key = (credential_key(authorization), url)
        task = self._in_flight.get(key)
        if task is None:
            task = asyncio.create_task(self._ask(url, authorization, key))
            self._in_flight[key] = task
            task.add_done_callback(lambda _: self._in_flight.pop(key, None))
        await asyncio.shield(task)

    async def _ask(self, url: str, authorization: str | None, key: tuple[str, str]) -> None:
        headers = {"Authorization": authorization} if authorization else {}
        self.checks += 1
        await self._origin.stat(url, headers)  # raises the registry's refusal
        if len(self._allowed) >= MAX_ENTRIES:
            now = self._clock.time()
            self._allowed = {k: v for k, v in self._allowed.items() if v > now}
            if len(self._allowed) >= MAX_ENTRIES:
                self._allowed.clear()
        self._allowed[key] = self._clock.time() + self._ttl
