"""Dragonfly's download priorities, on a ManualClock: what the scheduler does for a task no peer
has yet (LEVEL1 forbidden, LEVEL2 peers only, LEVEL3 this peer to the origin, LEVEL0/4-6 a seed),
and that a task someone already brings in is scheduled normally at every level."""

from __future__ import annotations

import pytest

from common.clock import ManualClock
from common.config import SchedulerConfig
from common.download import Priority
from scheduler.core import Code, Decision, FailPeer, SchedulerCore, SendNeedBackToSource, SendNormal, TriggerSeed
from scheduler.resource import DownloadSpec, HostInfo, PeerState

TASK = "task-p"
URL = "http://origin.example/p.bin"
PIECE = 4 << 20


def core_with(seeds: int) -> SchedulerCore:
    core = SchedulerCore(SchedulerConfig(), ManualClock())
    core.announce_host(HostInfo(id="h-a", ip="10.0.0.1", port=4000))
    core.announce_host(HostInfo(id="h-b", ip="10.0.0.2", port=4000))
    for n in range(seeds):
        core.announce_host(HostInfo(id=f"h-seed{n}", ip=f"10.0.1.{n + 1}", type=1, port=4000))
    return core


def register(core: SchedulerCore, peer: str, level: int, host: str = "h-a") -> list[Decision]:
    return core.register_peer(host, TASK, peer, DownloadSpec(url=URL, priority=level))


@pytest.mark.parametrize(
    ("level", "seeds", "expected"),
    [
        (Priority.LEVEL0, 1, TriggerSeed),
        (Priority.LEVEL6, 1, TriggerSeed),
        (Priority.LEVEL5, 1, TriggerSeed),
        (Priority.LEVEL4, 1, TriggerSeed),
        (Priority.LEVEL3, 1, SendNeedBackToSource),  # this peer itself, even with a seed
        (Priority.LEVEL2, 1, FailPeer),
        (Priority.LEVEL1, 1, FailPeer),
        (Priority.LEVEL6, 0, SendNeedBackToSource),  # no seed: the peer goes itself
        (Priority.LEVEL4, 0, SendNeedBackToSource),
        (Priority.LEVEL2, 0, FailPeer),
        (Priority.LEVEL1, 0, FailPeer),
    ],
)
def test_a_new_task_at_each_priority(level: Priority, seeds: int, expected: type) -> None:
    core = core_with(seeds)
    decisions = register(core, "p1", level)
    assert [type(d) for d in decisions] == [expected]
    if expected is FailPeer:
        failed = decisions[0]
        assert isinstance(failed, FailPeer)
        assert failed.code is Code.FAILED_PRECONDITION
        assert f"LEVEL{int(level)}" in failed.message and TASK in failed.message
        assert core.peers["p1"].state is PeerState.FAILED


def test_the_refusals_say_what_to_do_instead() -> None:
    forbidden = register(core_with(1), "p1", Priority.LEVEL1)[0]
    peers_only = register(core_with(1), "p1", Priority.LEVEL2)[0]
    assert isinstance(forbidden, FailPeer) and "forbids" in forbidden.message and "-p 6" in forbidden.message
    assert isinstance(peers_only, FailPeer) and "peers only" in peers_only.message and "-p 3" in peers_only.message


@pytest.mark.parametrize("level", [Priority.LEVEL1, Priority.LEVEL2, Priority.LEVEL3])
def test_a_task_already_coming_in_is_scheduled_normally_at_every_level(level: Priority) -> None:
    core = core_with(1)
    assert [type(d) for d in register(core, "first", Priority.LEVEL6)] == [TriggerSeed]
    # While the seed fetches, a low-priority peer waits for it rather than being refused...
    assert register(core, "late", level, host="h-b") == []
    assert core.peers["late"].state is not PeerState.FAILED
    # ...and gets the seed as a parent once the seed is at the origin.
    core.register_peer("h-seed0", TASK, "seed-peer", DownloadSpec(url=URL, need_back_to_source=True))
    decisions = core.back_to_source_started("seed-peer")
    decisions += core.back_to_source_piece_finished("seed-peer", 0, 0, PIECE, "xxh3:0")
    offered = {d.peer_id: d for d in decisions if isinstance(d, SendNormal)}
    assert "late" in offered
    assert [c.peer_id for c in offered["late"].candidates] == ["seed-peer"]


def test_level3_without_back_to_source_allowed_waits_instead() -> None:
    core = core_with(0)
    decisions = core.register_peer("h-a", TASK, "p1", DownloadSpec(url=URL, priority=Priority.LEVEL3,
                                                                   disable_back_to_source=True))
    assert not any(isinstance(d, SendNeedBackToSource) for d in decisions)
