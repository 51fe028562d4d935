"""Cache GC: the eviction policy as a table, then the collector on a real PieceStore."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from common.clock import ManualClock
from common.digest import piece_digest
from common.errors import DiskFull
from common.pieces import piece_span
from peer.metrics import DaemonMetrics
from peer.storage.gc import CacheCollector, TaskView, plan_evictions
from peer.storage.store import LocalTask, PieceStore

NOW = 10_000.0
QUOTA = 1000
HIGH = 0.9
LOW = 0.7
TTL = 100.0


def view(task_id: str, *, idle: float = 0.0, size: int = 100, state: str = "succeeded", readers: int = 0) -> TaskView:
    return TaskView(task_id, state, readers, NOW - idle, size)


def used_of(tasks: list[TaskView]) -> int:
    return sum(t.used_bytes for t in tasks)


# (name, tasks, overrides of plan_evictions' arguments, expected plan)
PLAN_CASES: list[tuple[str, list[TaskView], dict[str, float], list[tuple[str, str]]]] = [
    ("empty cache", [], {}, []),
    ("below the high watermark, nothing idle",
     [view("a", idle=50, size=400), view("b", idle=10, size=400)], {}, []),
    ("idle past the TTL", [view("a", idle=101), view("b", idle=99)], {}, [("a", "ttl")]),
    ("idle exactly the TTL is kept", [view("a", idle=100)], {}, []),
    ("TTL also removes idle failed and pending (abandoned) tasks",
     [view("f", idle=500, state="failed"), view("p", idle=400, state="pending")], {},
     [("f", "ttl"), ("p", "ttl")]),
    ("TTL never removes a task being read", [view("a", idle=500, readers=1)], {}, []),
    ("TTL never removes a running task", [view("a", idle=500, state="running")], {}, []),
    ("TTL 0 disables expiry", [view("a", idle=1e9)], {"ttl": 0}, []),
    ("no quota: TTL only, however full",
     [view("a", idle=101, size=5000), view("b", idle=50, size=5000)], {"quota": 0}, [("a", "ttl")]),
    ("exactly at the high watermark: no eviction",
     [view("a", idle=30, size=450), view("b", idle=20, size=450)], {}, []),
    ("one byte over the high watermark: LRU down to the low watermark",
     [view("old", idle=30, size=201), view("mid", idle=20, size=350), view("new", idle=10, size=350)], {},
     [("old", "quota")]),  # 901 - 201 = 700 <= 700: stop
    ("LRU order, several evictions until at or below the low watermark",
     [view("e", idle=1, size=200), view("c", idle=3, size=200), view("a", idle=5, size=200),
      view("d", idle=2, size=200), view("b", idle=4, size=200)], {},
     [("a", "quota"), ("b", "quota")]),  # 1000 -> 600
    ("a task being read is skipped, the next LRU goes",
     [view("a", idle=30, size=300, readers=2), view("b", idle=20, size=300), view("c", idle=10, size=350)], {},
     [("b", "quota")]),
    ("running and pending tasks are never quota-evicted",
     [view("r", idle=40, size=300, state="running"), view("p", idle=35, size=300, state="pending"),
      view("f", idle=30, size=100, state="failed"), view("s", idle=20, size=250)], {},
     [("f", "quota"), ("s", "quota")]),  # 950 -> 850 -> 600
    ("everything protected: stay above the watermark rather than evict",
     [view("a", idle=30, size=500, readers=1), view("b", idle=20, size=480, state="running")], {}, []),
    ("TTL evictions count towards the quota",
     [view("a", idle=200, size=300), view("b", idle=20, size=325), view("c", idle=10, size=325)], {},
     [("a", "ttl")]),  # 950 - 300 = 650: already under the low watermark
    ("a failed task without bytes frees nothing: not quota-evicted",
     [view("empty", idle=90, size=0, state="failed"), view("b", idle=20, size=500), view("c", idle=10, size=450)],
     {}, [("b", "quota")]),
    ("equal access times: the task id breaks the tie",
     [view("y", idle=10, size=500), view("x", idle=10, size=500)], {}, [("x", "quota")]),
    ("incoming bytes count as used",
     [view("a", idle=30, size=300), view("b", idle=20, size=300)], {"incoming": 350},
     [("a", "quota")]),  # 600 + 350 = 950 > 900; evicting a: 300 + 350 = 650 <= 700
    ("low watermark 0 empties every evictable task",
     [view("a", idle=30, size=500), view("b", idle=20, size=500, readers=1)], {"low": 0.0},
     [("a", "quota")]),
]


@pytest.mark.parametrize(("tasks", "overrides", "expected"), [c[1:] for c in PLAN_CASES],
                         ids=[c[0] for c in PLAN_CASES])
def test_plan_evictions(tasks: list[TaskView], overrides: dict[str, float], expected: list[tuple[str, str]]) -> None:
    args: dict[str, float] = {"quota": QUOTA, "high": HIGH, "low": LOW, "now": NOW, "ttl": TTL, "incoming": 0}
    args.update(overrides)
    plan = plan_evictions(tasks, used_of(tasks), int(args["quota"]), args["high"], args["low"], args["now"],
                          args["ttl"], int(args["incoming"]))
    assert plan == expected


def test_plan_is_pure() -> None:
    tasks = [view("a", idle=30, size=600), view("b", idle=20, size=400)]
    first = plan_evictions(tasks, 1000, QUOTA, HIGH, LOW, NOW, TTL)
    assert plan_evictions(tasks, 1000, QUOTA, HIGH, LOW, NOW, TTL) == first == [("a", "quota")]
    assert tasks == [view("a", idle=30, size=600), view("b", idle=20, size=400)]


# ---- the collector on a real store -----------------------------------------------------------

PIECE = 16 * 1024
TASK_SIZE = 4 * PIECE  # 64 KiB per task


def task_id(n: int) -> str:
    return hashlib.sha256(f"gc-task-{n}".encode()).hexdigest()


def content(n: int, size: int = TASK_SIZE) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{n}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


async def one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def add_task(store: PieceStore, n: int, *, finish: bool = True, size: int = TASK_SIZE) -> LocalTask:
    data = content(n, size)
    task = store.create(task_id(n), url=f"http://origin.test/blob/{n}")
    task.set_content_info(len(data), PIECE, {})
    task.mark_running()
    for number in range(task.piece_count):
        span = piece_span(number, len(data), PIECE)
        piece = data[span.offset : span.end]
        await task.write_piece(number, one_chunk(piece), expected_digest=piece_digest(piece))
    if finish:
        task.mark_succeeded()
    return task


def evictions(metrics: DaemonMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("damselfly_dfdaemon_gc_evicted_tasks_total", {"reason": reason})
    return value or 0.0


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = ManualClock(NOW)
        self.metrics = DaemonMetrics()
        self.store = PieceStore(tmp_path, clock=self.clock, metrics=self.metrics)
        self.store.load()

    def collector(self, quota: int = 4 * TASK_SIZE, *, ttl: float = 3600.0) -> CacheCollector:
        return CacheCollector(self.store, quota=quota, high_watermark=HIGH, low_watermark=LOW, task_ttl=ttl,
                              interval=5.0, metrics=self.metrics, clock=self.clock)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


async def test_collect_evicts_lru_to_the_low_watermark_and_removes_files(env: Env) -> None:
    tasks = []
    for n in range(4):
        tasks.append(await add_task(env.store, n))
        env.clock.advance(10)
    tasks[0].touch()  # the oldest is read again: now the most recently used
    collector = env.collector()  # quota 256 KiB; 4 x 64 KiB = 256 KiB > 90 %
    quota = collector.quota
    assert env.store.used_bytes() == 4 * TASK_SIZE
    assert env.metrics.cache_quota._value.get() == quota

    evicted = await collector.collect()

    assert evicted == [task_id(1), task_id(2)]  # LRU order, skipping the touched task 0
    assert env.store.used_bytes() == 2 * TASK_SIZE <= LOW * quota
    assert env.metrics.cache_used._value.get() == 2 * TASK_SIZE
    for task in (tasks[1], tasks[2]):
        assert task.deleted
        assert not task.directory.exists()
        assert env.store.get(task.task_id) is None
    for task in (tasks[0], tasks[3]):
        assert task.content_path.read_bytes() == content(int(task.url.rsplit("/", 1)[1]))
    assert evictions(env.metrics, "quota") == 2
    assert evictions(env.metrics, "ttl") == 0
    assert await collector.collect() == []  # now below the high watermark


async def test_collect_never_evicts_readers_or_running_tasks(env: Env) -> None:
    read = await add_task(env.store, 0)
    env.clock.advance(10)
    running = await add_task(env.store, 1, finish=False)
    env.clock.advance(10)
    await add_task(env.store, 2)
    env.clock.advance(10)
    newest = await add_task(env.store, 3)
    collector = env.collector()
    with read.reader():
        evicted = await collector.collect()
    assert evicted == [task_id(2), task_id(3)]
    assert read.directory.exists() and running.directory.exists()
    assert newest.deleted
    assert env.store.used_bytes() == 2 * TASK_SIZE


async def test_collect_expires_idle_tasks_without_a_quota(env: Env) -> None:
    old = await add_task(env.store, 0)
    env.clock.advance(3000)
    fresh = await add_task(env.store, 1)
    env.clock.advance(700)  # old idle 3700 s > 3600 s, fresh idle 700 s
    collector = env.collector(quota=0)
    assert await collector.collect() == [old.task_id]
    assert not old.directory.exists() and fresh.directory.exists()
    assert evictions(env.metrics, "ttl") == 1


async def test_collect_rechecks_a_task_that_got_a_reader_after_planning(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks = []
    for n in range(4):
        tasks.append(await add_task(env.store, n))
        env.clock.advance(10)
    collector = env.collector()
    assert collector.plan() == [(task_id(0), "quota"), (task_id(1), "quota")]
    real_delete = env.store.delete
    held: list[object] = []

    async def delete_then_a_reader_arrives(tid: str) -> None:
        await real_delete(tid)
        if not held:  # while the first eviction ran, someone opened task 1
            reader = tasks[1].reader()
            reader.__enter__()
            held.append(reader)

    monkeypatch.setattr(env.store, "delete", delete_then_a_reader_arrives)
    assert await collector.collect() == [task_id(0)]
    assert tasks[1].directory.exists()


async def test_ensure_room_evicts_for_the_incoming_bytes(env: Env) -> None:
    for n in range(3):
        await add_task(env.store, n)
        env.clock.advance(10)
    collector = env.collector()  # 192 KiB used of 256 KiB
    await collector.ensure_room(TASK_SIZE // 2)  # 224 KiB <= 230.4 KiB (90 %): nothing to do
    assert env.store.used_bytes() == 3 * TASK_SIZE
    await collector.ensure_room(TASK_SIZE)  # 256 KiB > 90 %: down to 70 % counting the new bytes
    assert env.store.get(task_id(0)) is None and env.store.get(task_id(1)) is None
    assert env.store.used_bytes() + TASK_SIZE <= LOW * collector.quota
    assert evictions(env.metrics, "quota") == 2


async def test_ensure_room_raises_disk_full_when_nothing_can_be_evicted(env: Env) -> None:
    read = await add_task(env.store, 0)
    await add_task(env.store, 1, finish=False)  # being downloaded
    collector = env.collector(quota=3 * TASK_SIZE)
    with read.reader():
        with pytest.raises(DiskFull) as caught:
            await collector.ensure_room(TASK_SIZE + 1)
        message = str(caught.value)
        assert "cache quota 192.0 KiB (196608 bytes)" in message
        assert "raise cache_quota or free space" in message
        assert "1 tasks being read, 1 being downloaded" in message
        assert env.store.used_bytes() == 2 * TASK_SIZE  # nothing was evicted
        assert evictions(env.metrics, "quota") == 0
        await collector.ensure_room(TASK_SIZE)  # exactly fills the quota: admitted
        with pytest.raises(DiskFull):
            collector.reserve(TASK_SIZE + 1)
        collector.reserve(TASK_SIZE)
    # Once the reader is gone, the same request evicts the finished task and fits.
    await collector.ensure_room(TASK_SIZE + 1)
    assert read.deleted
    assert evictions(env.metrics, "quota") == 1


async def test_no_quota_admits_everything(env: Env) -> None:
    await add_task(env.store, 0)
    collector = env.collector(quota=0)
    await collector.ensure_room(1 << 40)
    collector.reserve(1 << 40)
    assert env.store.get(task_id(0)) is not None


class GatedClock(ManualClock):
    """A clock whose sleep waits for the test to release it: each release is one GC round."""

    def __init__(self, start: float) -> None:
        super().__init__(start)
        self.sleeps: list[float] = []
        self.asleep = asyncio.Event()
        self._release = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.asleep.set()
        await self._release.wait()
        self._release.clear()
        self.now += seconds

    async def tick(self) -> None:
        """Let one sleep end and wait until the loop sleeps again (its round is over)."""
        self.asleep.clear()
        self._release.set()
        await self.asleep.wait()


async def wait_for(event_wait: Callable[[], Awaitable[object]]) -> None:
    await asyncio.wait_for(event_wait(), timeout=5.0)


async def test_run_collects_every_interval_until_cancelled(tmp_path: Path) -> None:
    clock = GatedClock(NOW)
    metrics = DaemonMetrics()
    store = PieceStore(tmp_path, clock=clock, metrics=metrics)
    store.load()
    old = await add_task(store, 0)
    clock.advance(50)
    fresh = await add_task(store, 1)
    collector = CacheCollector(store, quota=0, high_watermark=HIGH, low_watermark=LOW, task_ttl=100.0,
                               interval=30.0, metrics=metrics, clock=clock)
    runner = asyncio.create_task(collector.run())
    try:
        await wait_for(clock.asleep.wait)
        await wait_for(clock.tick)  # t+30: old idle 80 s
        assert store.get(old.task_id) is not None
        await wait_for(clock.tick)  # t+60: old idle 110 s > 100 s
        assert store.get(old.task_id) is None and store.get(fresh.task_id) is not None
        assert clock.sleeps == [30.0, 30.0, 30.0]
        assert evictions(metrics, "ttl") == 1
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner


def test_collector_rejects_bad_settings(tmp_path: Path) -> None:
    store = PieceStore(tmp_path)
    with pytest.raises(ValueError, match="watermark"):
        CacheCollector(store, quota=10, high_watermark=0.5, low_watermark=0.6, task_ttl=1, interval=1)
    with pytest.raises(ValueError, match="negative"):
        CacheCollector(store, quota=-1, high_watermark=0.9, low_watermark=0.7, task_ttl=1, interval=1)
    with pytest.raises(ValueError, match="interval"):
        CacheCollector(store, quota=10, high_watermark=0.9, low_watermark=0.7, task_ttl=1, interval=0)
