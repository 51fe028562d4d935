"""Issue 11's scheduler rules on a manual clock: a seed serves a few children while normal parents
can be offered (super-seeding), and a peer keeps gaining parents while the swarm grows."""

from __future__ import annotations

import pytest

from scheduler.core import (
    MESH_PARENT_LIMIT,
    PUSH_LIMIT,
    RANGE_READER_PUSH_LIMIT,
    SendNeedBackToSource,
    SendNormal,
    TriggerSeed,
)
from scheduler.scheduling import SEED_CHILD_LIMIT
from tests.unit.test_scheduler_core import DIGEST, PIECE, World, kinds, parents_of


def seeded_world() -> World:
    """A seed back-sourcing the task, with SEED_CHILD_LIMIT children already taking from it."""
    w = World(retry_interval=1.0, retry_back_to_source_limit=2, retry_limit=4)
    w.source("seed-peer", pieces=1, host=w.host("seed", seed=True))
    for i in range(SEED_CHILD_LIMIT):
        assert parents_of(w.register(f"c{i}")[0]) == ["seed-peer"]
    return w


# (seconds a newcomer has waited at the tick, what it gets)
@pytest.mark.parametrize(("waited", "expected"), [
    (0.0, []),  # parked: the seed's children are about to become parents
    (1.0, []),
    (2.0, ["SendNormal"]),  # would go back to source now: the busy seed instead, never the origin
])
def test_a_busy_seed_is_the_last_resort_of_a_waiting_peer(waited: float, expected: list[str]) -> None:
    w = seeded_world()
    assert w.register("late") == []  # parked, not given the busy seed
    w.clock.advance(waited)
    decisions = [d for d in w.core.tick() if d.peer_id == "late"]
    assert kinds(decisions) == expected
    assert not any(isinstance(d, SendNeedBackToSource) for d in decisions)
    if expected:
        assert parents_of(decisions[0]) == ["seed-peer"]


def test_a_waiting_peer_gets_a_normal_parent_before_the_busy_seed() -> None:
    w = seeded_world()
    assert w.register("late") == []
    w.core.download_started("c0")
    decisions = w.core.piece_finished("c0", 0, 0, PIECE, "seed-peer", 0.1)
    offered = {d.peer_id: parents_of(d) for d in decisions if isinstance(d, SendNormal)}
    assert offered["late"] == ["c0"]


def test_a_seed_with_room_is_offered_at_once() -> None:
    w = World()
    w.source("seed-peer", pieces=1, host=w.host("seed", seed=True))
    assert parents_of(w.register("first")[0]) == ["seed-peer"]


def test_a_running_peer_keeps_gaining_parents_past_the_candidate_limit() -> None:
    w = World(candidate_parent_limit=3)
    w.source("src", pieces=4, host=w.host("src", slots=1000))
    w.running("child", "src", pieces=0)
    for i in range(6):
        w.running(f"p{i}", "src", pieces=1)  # each is pushed to `child` as it gets a piece
    parents = w.core.stat_peer("child").parent_ids
    assert len(parents) == 7 > 3
    assert set(parents) == {"src", *(f"p{i}" for i in range(6))}


def test_the_mesh_stops_at_its_limit() -> None:
    w = World(candidate_parent_limit=3)
    w.source("src", pieces=4, host=w.host("src", slots=1000))
    w.running("child", "src", pieces=0)
    for i in range(MESH_PARENT_LIMIT + 3):
        # back-sourcing parents: no hungry peers themselves, so every push goes to `child`
        w.source(f"p{i}", pieces=1)
    assert len(w.core.stat_peer("child").parent_ids) == MESH_PARENT_LIMIT


def test_a_waiting_peer_takes_a_child_of_the_busy_seed_that_has_no_piece_yet() -> None:
    w = seeded_world()
    for i in range(SEED_CHILD_LIMIT):
        w.core.download_started(f"c{i}")  # running, nothing received yet
    decisions = w.register("late")
    assert kinds(decisions) == ["SendNormal"]
    parents = parents_of(decisions[0])
    assert parents and all(p.startswith("c") for p in parents)  # not the seed, not the origin
    # and its pieces reach "late" as they arrive: c0 is its parent in the scheduler's graph too
    assert set(w.core.stat_peer("late").parent_ids) == set(parents)


def test_a_peer_fed_by_no_one_is_no_parent_to_come() -> None:
    w = World()
    w.source("seed-peer", pieces=1, host=w.host("seed", seed=True))
    for i in range(SEED_CHILD_LIMIT):
        w.register(f"c{i}")  # children of the seed, but never started (RECEIVED_NORMAL)
    assert w.register("late") == []  # parked


def test_a_lazy_reader_gets_the_busy_seed_at_once() -> None:
    # Its readers' demands for pieces nobody has reach the origin only through a seed.
    w = seeded_world()
    assert "seed-peer" in parents_of(w.register("lazy", ranged=True, prefetch=False, range_length=4096)[0])


def test_a_lazy_read_triggers_the_seed_for_demand_and_a_whole_download_for_everything() -> None:
    w = World(seed_peer=("10.9.9.9:4000",))
    (lazy,) = w.register("a", ranged=True, prefetch=False, range_length=4096)
    assert isinstance(lazy, TriggerSeed) and lazy.download.lazy and lazy.download.need_back_to_source
    assert lazy.download.range_length == 0
    # the next lazy reader waits for the seed; no second trigger
    assert w.register("b", ranged=True, prefetch=False, range_length=4096) == []
    (whole,) = [d for d in w.register("c") if isinstance(d, TriggerSeed)]
    assert whole.address == lazy.address and not whole.download.lazy and whole.download.need_back_to_source
    assert not any(isinstance(d, TriggerSeed) for d in w.register("d"))  # once


def mesh_world(children: list[tuple[int, bool]]) -> World:
    """Three normal sources and a seed, all with a piece, and running children `c0`, `c1`, ... in
    that order, each with the given number of normal parents and with the seed or without."""
    w = World(retry_interval=1.0)
    w.source("seed-peer", pieces=1, host=w.host("seed", seed=True))
    sources = [f"s{i}" for i in range(3)]
    for name in sources:
        w.source(name, pieces=1)
    # The children share a host: their failure reports are one reporter's and demote no parent.
    host = w.host("children")
    for i, (normal, with_seed) in enumerate(children):
        name = f"c{i}"
        offered = parents_of(w.register(name, host=host)[0])
        w.core.download_started(name)
        dropped = [p for p in offered if p in sources][normal:]
        dropped += ["seed-peer"] if "seed-peer" in offered and not with_seed else []
        for parent in dropped:  # it failed them: unlinked (the seed, when taken, frees a place)
            w.core.piece_failed(name, 0, parent)
        parents = w.core.stat_peer(name).parent_ids
        assert (len(set(parents) & set(sources)), "seed-peer" in parents) == (normal, with_seed)
    return w


# (children in registration order: (normal parents, fed by the seed too), whom a new parent is
# pushed to, in order). Fewest normal parents first, equals in the order they were filed; before,
# the first PUSH_SCAN children of the index were pushed to in index order, whatever they had, and
# in a swarm of 1,000 a late peer left with the seed alone waited a minute for a second parent.
@pytest.mark.parametrize(("children", "pushed"), [
    ([(3, False), (3, False), (0, True)], ["c2", "c0", "c1"]),
    ([(1, True), (0, False), (2, False)], ["c1", "c0", "c2"]),
    ([(2, False), (0, True), (0, True), (1, False)], ["c1", "c2", "c3", "c0"]),
    ([(3, False)] * PUSH_LIMIT + [(0, True)], ["c8", *(f"c{i}" for i in range(PUSH_LIMIT - 1))]),
])
def test_a_new_parent_goes_to_the_children_with_the_fewest_normal_parents(
    children: list[tuple[int, bool]], pushed: list[str]
) -> None:
    w = mesh_world(children)
    w.register("new", need_back_to_source=True)
    w.core.peers["new"].defines_content = True
    w.core.back_to_source_started("new")
    decisions = w.core.back_to_source_piece_finished("new", 0, 0, PIECE, f"{DIGEST}0")
    assert [d.peer_id for d in decisions if isinstance(d, SendNormal)] == pushed
    assert all(parents_of(d) == ["new"] for d in decisions if isinstance(d, SendNormal))


# (peers joining at once behind a busy seed, most hops from a peer with pieces among them). Each
# takes parents to come, nearest first, and none waits or piles onto the seed. Before, a walk
# from the seed looked at 256 peers: once those were all busy (here somewhere between 600 and
# 3,000 joiners), the rest waited, then took the busy seed at patience (at 5,000 peers x 256 MiB
# in bench/swarm_sim.py: 1,982 of them; the seed's upload slots ran out, and 199 peers went to
# the origin).
@pytest.mark.parametrize(("joining", "max_hops"), [(3, 2), (30, 3), (600, 6), (3000, 7)])
def test_a_crowd_joining_behind_a_busy_seed_takes_parents_to_come_nearest_first(joining: int, max_hops: int) -> None:
    w = seeded_world()
    for i in range(SEED_CHILD_LIMIT):
        w.core.download_started(f"c{i}")  # running, no piece yet
    for i in range(joining):
        (decision,) = w.register(f"j{i}")
        assert "seed-peer" not in parents_of(decision)
        w.core.download_started(f"j{i}")
    assert w.core.waiting_count == 0
    assert len(w.core.peers["seed-peer"].children) == SEED_CHILD_LIMIT
    assert max(w.core.peers[f"j{i}"].hops for i in range(joining)) == max_hops


# (the new parent reads the blob in Range reads, children waiting for more parents, how many it is
# pushed to). A Range reader's pieces are found only through its announcements, so it goes to up
# to RANGE_READER_PUSH_LIMIT children; a whole download's parent to PUSH_LIMIT (its pieces reach
# the others through the swarm anyway).
@pytest.mark.parametrize(("ranged", "children", "pushed"), [
    (True, 12, 12),
    (True, RANGE_READER_PUSH_LIMIT + 4, RANGE_READER_PUSH_LIMIT),
    (False, 12, PUSH_LIMIT),
])
def test_a_range_reader_with_its_first_piece_is_pushed_to_more_children(
    ranged: bool, children: int, pushed: int
) -> None:
    w = World(retry_interval=1.0)
    w.source("src", pieces=4, host=w.host("src", slots=1000))
    reading = {"ranged": True, "prefetch": False, "range_length": 4096} if ranged else {}
    for i in range(children):
        assert isinstance(w.register(f"c{i}", **reading)[0], SendNormal)
        w.core.download_started(f"c{i}")
    assert isinstance(w.register("new", **reading)[0], SendNormal)
    w.core.download_started("new")
    decisions = w.core.piece_finished("new", 0, 0, PIECE, "src", 0.1)  # its first piece: now a parent
    assert sum(1 for d in decisions if isinstance(d, SendNormal) and parents_of(d) == ["new"]) == pushed
