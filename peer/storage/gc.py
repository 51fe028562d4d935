"""The dfdaemon's cache garbage collector: TTL expiry, LRU eviction under a quota, write admission.

The policy is :func:`plan_evictions`, a pure function of a snapshot of the tasks (no I/O, no
clock): it returns which tasks to delete and why. :class:`CacheCollector` takes the snapshot from
the :class:`~peer.storage.PieceStore`, applies the plan with ``store.delete`` and counts metrics.

Sizes are the cache's own bytes (``PieceStore.used_bytes()``: complete pieces), never the
filesystem's free space, so a quota means the same thing on a shared disk. ENOSPC from the disk
itself is translated to :class:`~common.errors.DiskFull` by the store.

Rules, in order:

1. A task with readers, or one being downloaded (``running``), is never evicted, whatever the
   pressure: the cache may stay above its watermark rather than pull content from under a reader.
2. ``ttl``: a task not accessed for longer than the TTL is evicted (also an idle ``pending`` or
   ``failed`` task: partial content nobody came back for).
3. ``quota``: when the bytes in use (plus the bytes about to be written) exceed the high watermark
   of the quota, finished tasks (``succeeded`` or ``failed``) are evicted least recently used
   first until the total is at or below the low watermark. ``pending`` tasks are kept: the engine
   may be about to resume them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from common.clock import Clock
from common.errors import DiskFull
from common.units import format_size
from peer.metrics import DaemonMetrics
from peer.storage.store import FAILED, RUNNING, SUCCEEDED, LocalTask, PieceStore

log = logging.getLogger(__name__)

REASON_TTL = "ttl"
REASON_QUOTA = "quota"
REASONS = (REASON_TTL, REASON_QUOTA)
# States whose content is final: evicting them never interrupts a download.
QUOTA_EVICTABLE_STATES = frozenset({SUCCEEDED, FAILED})


@dataclass(frozen=True)
class TaskView:
    """What the policy needs to know about one task, copied at one instant."""

    task_id: str
    state: str
    readers: int
    last_access: float  # on the store's clock
    used_bytes: int

    @classmethod
    def of(cls, task: LocalTask) -> TaskView:
        """Snapshot of a live task."""
        return cls(task.task_id, task.state, task.readers, task.last_access, task.used_bytes)

    @property
    def protected(self) -> bool:
        """Being read or being downloaded: never evicted."""
        return self.readers > 0 or self.state == RUNNING


def plan_evictions(
    tasks_snapshot: Sequence[TaskView],
    used: int,
    quota: int,
    high: float,
    low: float,
    now: float,
    ttl: float,
    incoming: int = 0,
) -> list[tuple[str, str]]:
    """Tasks to evict as ``(task_id, reason)``, TTL expiries first, then quota evictions in LRU order.

    `used` is the cache's bytes in use, `incoming` bytes about to be written (counted as used).
    `quota` 0 means no quota (TTL only); `ttl` 0 or less means no TTL. Protected tasks (readers,
    running) are skipped even if the cache then stays above the low watermark.
    """
    plan: list[tuple[str, str]] = []
    chosen: set[str] = set()
    if ttl > 0:
        for task in sorted(tasks_snapshot, key=_lru_key):
            if not task.protected and now - task.last_access > ttl:
                plan.append((task.task_id, REASON_TTL))
                chosen.add(task.task_id)
                used -= task.used_bytes
    if quota > 0 and used + incoming > high * quota:
        target = low * quota
        candidates = sorted(
            (t for t in tasks_snapshot
             if t.task_id not in chosen and not t.protected and t.state in QUOTA_EVICTABLE_STATES
             and t.used_bytes > 0),  # evicting an empty task frees nothing (the TTL removes it)
            key=_lru_key,
        )
        for task in candidates:
            if used + incoming <= target:
                break
            plan.append((task.task_id, REASON_QUOTA))
            used -= task.used_bytes
    return plan


def _lru_key(task: TaskView) -> tuple[float, str]:
    return task.last_access, task.task_id  # the id breaks ties, so plans are deterministic


class CacheCollector:
    """Keeps the piece store within its TTL and quota; admits writes that fit.

    ``run()`` collects every `interval` seconds on `clock`; ``ensure_room(n)`` is called before
    writing `n` bytes of content and raises DiskFull when they cannot fit in the quota even after
    an urgent collection.
    """

    def __init__(
        self,
        store: PieceStore,
        *,
        quota: int,
        high_watermark: float,
        low_watermark: float,
        task_ttl: float,
        interval: float,
        metrics: DaemonMetrics | None = None,
        clock: Clock | None = None,
    ) -> None:
        if quota < 0:
            raise ValueError(f"quota {quota} is negative")
        if not 0.0 <= low_watermark < high_watermark <= 1.0:
            raise ValueError(f"need 0 <= low watermark ({low_watermark}) < high watermark ({high_watermark}) <= 1")
        if interval <= 0:
            raise ValueError(f"interval {interval} must be positive")
        self.store = store
        self.quota = quota
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.task_ttl = task_ttl
        self.interval = interval
        self.metrics = metrics
        # Same clock as the store's last_access stamps unless told otherwise.
        self.clock: Clock = clock or store.clock
        self._lock = asyncio.Lock()  # one collection at a time: no plan built on a stale snapshot
        if metrics is not None:
            metrics.cache_quota.set(quota)
            for reason in REASONS:
                metrics.gc_evictions.labels(reason)

    def plan(self, incoming: int = 0) -> list[tuple[str, str]]:
        """The evictions a collection would make now (nothing is deleted)."""
        return plan_evictions(
            [TaskView.of(task) for task in self.store.tasks()],
            self.store.used_bytes(), self.quota, self.high_watermark, self.low_watermark,
            self.clock.time(), self.task_ttl, incoming,
        )

    async def collect(self, incoming: int = 0) -> list[str]:
        """Evict what the policy says; return the evicted task ids.

        `incoming`: bytes about to be written, counted as used (an urgent collection).
        """
        async with self._lock:
            evicted: list[str] = []
            for task_id, reason in self.plan(incoming):
                task = self.store.get(task_id)
                # The plan is a snapshot and deletes yield to the loop: re-check the live task.
                if task is None or task.readers > 0 or task.state == RUNNING:
                    continue
                size = task.used_bytes
                await self.store.delete(task_id)
                evicted.append(task_id)
                if self.metrics is not None:
                    self.metrics.gc_evictions.labels(reason).inc()
                log.info("gc: evicted task %s (%s, %d bytes); cache now %d bytes of quota %d",
                         task_id, reason, size, self.store.used_bytes(), self.quota)
            return evicted

    async def ensure_room(self, nbytes: int) -> None:
        """Make room for `nbytes` more bytes of content, or raise DiskFull.

        Without a quota this never raises (the disk's own ENOSPC becomes DiskFull in the store).
        Above the high watermark it first runs an urgent collection counting the new bytes.
        """
        if self.quota <= 0 or nbytes <= 0:
            return
        if self.store.used_bytes() + nbytes > self.high_watermark * self.quota:
            await self.collect(incoming=nbytes)
        used = self.store.used_bytes()
        if used + nbytes > self.quota:
            raise DiskFull(self._full_message(nbytes, used))

    def reserve(self, nbytes: int) -> None:
        """Synchronous admission check without collecting: DiskFull if `nbytes` do not fit now."""
        if self.quota <= 0 or nbytes <= 0:
            return
        used = self.store.used_bytes()
        if used + nbytes > self.quota:
            raise DiskFull(self._full_message(nbytes, used))

    def _full_message(self, nbytes: int, used: int) -> str:
        held = _describe(t for t in self.store.tasks() if TaskView.of(t).protected)
        return (f"cache quota {format_size(self.quota)} ({self.quota} bytes) cannot take "
                f"{format_size(nbytes)} more: {format_size(used)} in use and nothing more can be evicted ({held}); "
                f"raise cache_quota or free space")

    async def run(self) -> None:
        """Collect every `interval` seconds until cancelled; a failed collection is logged, not fatal."""
        while True:
            await self.clock.sleep(self.interval)
            try:
                await self.collect()
            except asyncio.CancelledError:
                raise
            except Exception:  # a disk error in one round must not stop the collector
                log.exception("gc: collection failed; retrying in %.0fs", self.interval)


def _describe(protected: Iterable[LocalTask]) -> str:
    tasks = list(protected)
    if not tasks:
        return "no task is being read or downloaded"
    reading = sum(1 for t in tasks if t.readers > 0)
    downloading = sum(1 for t in tasks if t.state == RUNNING)
    return f"{reading} tasks being read, {downloading} being downloaded"
