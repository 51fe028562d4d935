"""A failing origin, on a ManualClock: a bounded number of attempts per task, back-off between
them, and one clear failure for every peer waiting on the task (issue 13, defects 1 and 2)."""

from __future__ import annotations

from typing import Any

import pytest

from common.clock import ManualClock
from common.config import SchedulerConfig
from scheduler.core import Code, Decision, FailPeer, SchedulerCore, SendNeedBackToSource, TriggerSeed
from scheduler.resource import DownloadSpec, HostInfo, PeerState, TaskState
from scheduler.scheduling import OriginVerdict, origin_retry_delay, origin_verdict

TASK = "task-1"
URL = "http://origin.example/storm.bin"


class World:
    """A core with one normal host and, optionally, one seed whose every back-to-source fails."""

    def __init__(self, *, seeds: int = 1, status: int | None = None, **config: Any) -> None:
        config.setdefault("retry_interval", 0.5)
        self.status = status  # what the origin answers every attempt (None: it cannot be reached)
        self.clock = ManualClock()
        self.core = SchedulerCore(SchedulerConfig(**config), self.clock)
        self.core.announce_host(HostInfo(id="h-node", ip="10.0.0.1", port=4000))
        self.core.announce_host(HostInfo(id="h-other", ip="10.0.0.2", port=4000))
        for n in range(seeds):
            self.core.announce_host(HostInfo(id=f"h-seed{n}", ip=f"10.0.1.{n + 1}", type=1, port=4000))
        self.triggers = 0
        self.failed: dict[str, FailPeer] = {}
        self.back_to_source: list[str] = []

    def register(self, peer: str, host: str = "h-node", **download: Any) -> list[Decision]:
        decisions = self.core.register_peer(host, TASK, peer, DownloadSpec(url=URL, **download))
        self.handle(decisions)
        return decisions

    def handle(self, decisions: list[Decision]) -> None:
        """Carry decisions out like the service would; a triggered seed fails at the origin."""
        for decision in decisions:
            if isinstance(decision, FailPeer):
                self.failed[decision.peer_id] = decision
            elif isinstance(decision, SendNeedBackToSource):
                self.back_to_source.append(decision.peer_id)
            elif isinstance(decision, TriggerSeed):
                self.triggers += 1
                self.seed_fails(f"seed-peer-{self.triggers}")

    def seed_fails(self, peer: str) -> None:
        status = self.status
        host = next(h for h in self.core.hosts if h.startswith("h-seed"))
        self.core.register_peer(host, TASK, peer, DownloadSpec(url=URL, need_back_to_source=True))
        self.handle(self.core.back_to_source_started(peer))  # the seed is offered as a parent at once
        answer = f"origin answered {status} for {URL}" if status else f"cannot connect to {URL}: refused"
        self.core.back_to_source_piece_failed(peer, 0, status)
        self.handle(self.core.back_to_source_failed(peer, answer))

    def run(self, seconds: float) -> None:
        """Let `seconds` pass in ticks of the retry interval."""
        interval = self.core.config.retry_interval
        for _ in range(int(seconds / interval)):
            self.clock.advance(interval)
            self.handle(self.core.tick())


@pytest.mark.parametrize(
    ("status", "failures", "limit", "verdict"),
    [
        (404, 1, 3, OriginVerdict.FAIL),  # the same request gets the same answer
        (410, 1, 3, OriginVerdict.FAIL),
        (400, 1, 3, OriginVerdict.FAIL),
        (401, 1, 3, OriginVerdict.FAIL_WAITING),  # about credentials: the next client may have others
        (403, 1, 3, OriginVerdict.FAIL_WAITING),
        (407, 2, 3, OriginVerdict.FAIL_WAITING),
        (408, 1, 3, OriginVerdict.RETRY),  # timed out / rate limited: nothing final
        (429, 2, 3, OriginVerdict.RETRY),
        (429, 3, 3, OriginVerdict.FAIL),
        (500, 1, 3, OriginVerdict.RETRY),
        (503, 2, 3, OriginVerdict.RETRY),
        (503, 3, 3, OriginVerdict.FAIL),
        (None, 1, 3, OriginVerdict.RETRY),  # refused, unknown host, reset
        (None, 3, 3, OriginVerdict.FAIL),
        (None, 1, 1, OriginVerdict.FAIL),
    ],
)
def test_origin_verdict(status: int | None, failures: int, limit: int, verdict: OriginVerdict) -> None:
    assert origin_verdict(status, failures, limit) is verdict


@pytest.mark.parametrize(("failures", "delay"), [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0)])
def test_origin_retry_delay_doubles(failures: int, delay: float) -> None:
    assert origin_retry_delay(failures, 1.0) == delay


@pytest.mark.parametrize(
    ("status", "attempts"),
    [(404, 1), (410, 1), (401, 1), (None, 3), (503, 3), (429, 3)],
    ids=["404", "410", "401", "refused", "503", "429"],
)
def test_a_failing_origin_is_tried_a_bounded_number_of_times(status: int | None, attempts: int) -> None:
    w = World(status=status)
    w.register("a")
    w.run(60)  # far longer than every retry and wait window
    assert w.triggers == attempts
    assert w.back_to_source == []  # the waiting peer never went to the origin on its own
    failure = w.failed["a"]
    assert failure.code is Code.FAILED_PRECONDITION
    assert URL in failure.message
    assert (f"after {attempts} attempts" in failure.message) == (attempts > 1)
    assert w.core.peers["a"].state is PeerState.FAILED


def test_waiting_peers_fail_together_with_the_origins_answer() -> None:
    w = World()
    decisions = w.core.register_peer("h-node", TASK, "a", DownloadSpec(url=URL))
    assert isinstance(decisions[0], TriggerSeed)
    assert w.core.register_peer("h-node", TASK, "b", DownloadSpec(url=URL)) == []  # waits for the same seed
    w.core.register_peer("h-seed0", TASK, "s", DownloadSpec(url=URL, need_back_to_source=True))
    w.core.back_to_source_started("s")
    w.core.back_to_source_piece_failed("s", 0, 404)
    decisions = w.core.back_to_source_failed("s", f"origin answered 404 Not Found for {URL}")
    assert sorted((d.peer_id, d.code, d.message) for d in decisions if isinstance(d, FailPeer)) == [
        ("a", Code.FAILED_PRECONDITION, f"origin answered 404 Not Found for {URL}"),
        ("b", Code.FAILED_PRECONDITION, f"origin answered 404 Not Found for {URL}"),
    ]
    assert len(decisions) == 2
    assert w.core.stat_task(TASK).state == TaskState.FAILED.value


def test_a_failed_task_fails_new_downloads_until_the_backoff_ends() -> None:
    w = World(status=404, failed_task_backoff=30.0)
    w.register("a")
    w.run(5)
    assert w.triggers == 1
    w.clock.advance(10)
    decisions = w.register("b")  # a later dfget of the same URL: no new attempt
    assert [type(d) for d in decisions] == [FailPeer]
    failure = decisions[0]
    assert isinstance(failure, FailPeer) and failure.code is Code.FAILED_PRECONDITION
    assert f"origin answered 404 for {URL}" in failure.message  # (the test seed's own words)
    assert "asked again after 15s" in failure.message
    assert w.triggers == 1
    assert "b" not in w.core.peers  # nothing to clean up later
    w.clock.advance(15)
    w.register("c")  # the back-off is over: one new round
    assert w.triggers == 2


def test_credential_refusals_do_not_lock_out_the_next_client() -> None:
    w = World(status=401)
    w.register("a")
    assert w.triggers == 1 and "a" in w.failed
    w.register("b")  # another client (other credentials) may try at once
    assert w.triggers == 2


def test_a_success_starts_a_new_round() -> None:
    w = World(origin_attempt_limit=2)
    w.register("a")
    assert w.triggers == 1  # failed once (refused); the next attempt after the back-off
    w.clock.advance(1.0)
    (trigger,) = w.core.tick()
    assert isinstance(trigger, TriggerSeed)
    w.core.register_peer("h-seed0", TASK, "s", DownloadSpec(url=URL, need_back_to_source=True))
    w.core.back_to_source_started("s")
    w.core.back_to_source_piece_finished("s", 0, 0, 10, "xxh3:" + "ab" * 16)
    w.core.back_to_source_finished("s")
    task = w.core.tasks[TASK]
    assert (task.origin_failures, task.origin_error, task.retry_at) == (0, "", None)


def test_seed_trigger_never_carries_disable_back_to_source() -> None:
    w = World()
    (trigger,) = w.core.register_peer("h-node", TASK, "a", DownloadSpec(url=URL, disable_back_to_source=True))
    assert isinstance(trigger, TriggerSeed)
    assert trigger.download.need_back_to_source is True
    assert trigger.download.disable_back_to_source is False  # the seed may go to the origin; the peer may not


def test_disabled_back_to_source_without_seed_names_the_reason() -> None:
    w = World(seeds=0)
    assert w.register("a", disable_back_to_source=True) == []
    w.run(10)
    assert w.back_to_source == []
    failure = w.failed["a"]
    assert failure.code is Code.RESOURCE_EXHAUSTED
    assert "back-to-source is disabled" in failure.message
    assert "no seed peer is available" in failure.message
    assert "scheduler" not in failure.message


def test_without_seeds_the_peers_are_the_attempts() -> None:
    w = World(seeds=0)
    assert [type(d) for d in w.register("a")] == [SendNeedBackToSource]
    assert w.register("b", host="h-other") == []  # a is at the origin: b waits for it
    w.core.back_to_source_started("a")
    w.core.back_to_source_piece_failed("a", 0, None)
    assert w.core.back_to_source_failed("a", f"cannot connect to {URL}") == []  # retry after the back-off
    w.clock.advance(0.5)
    assert w.core.tick() == []
    w.clock.advance(0.5)
    assert [type(d) for d in w.core.tick()] == [SendNeedBackToSource]  # b is the second attempt
