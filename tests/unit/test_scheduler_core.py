"""Table-driven tests of the pure scheduling core on a ManualClock."""

from __future__ import annotations

from typing import Any

import pytest

import scheduler.core as core_module
from common import hashring
from common.clock import ManualClock
from common.config import SchedulerConfig
from common.errors import PeerNotFound, TaskNotFound
from scheduler.core import (
    PUSH_LIMIT,
    Code,
    Decision,
    FailPeer,
    SchedulerCore,
    SendEmpty,
    SendNormal,
    TriggerSeed,
)
from scheduler.resource import (
    PEER_TRANSITIONS,
    DownloadSpec,
    HostInfo,
    InvalidTransition,
    Peer,
    PeerEvent,
    PeerState,
)
from scheduler.scheduling import (
    BAD_PARENT_MIN_SAMPLES,
    is_bad_parent,
    location_affinity,
    rejection,
    score,
)

TASK = "task-1"
DIGEST = "xxh3:" + "ab" * 16
PIECE = 4 * 1024 * 1024


class World:
    """A core on a manual clock, with shorthands for hosts and peers."""

    def __init__(self, **config: Any) -> None:
        config.setdefault("retry_interval", 1.0)
        self.clock = ManualClock()
        self.core = SchedulerCore(SchedulerConfig(**config), self.clock)

    def host(self, name: str, *, seed: bool = False, idc: str = "", location: str = "", slots: int = 0,
             port: int = 4000) -> str:
        info = HostInfo(id=f"h-{name}", ip=f"10.0.0.{len(self.core.hosts) + 1}", hostname=name,
                        type=1 if seed else 0, port=port, download_port=4005, idc=idc, location=location,
                        upload_slots=slots)
        self.core.announce_host(info)
        return info.id

    def register(
        self, peer: str, host: str | None = None, task: str = TASK, **download: Any
    ) -> list[Decision]:
        host_id = host if host is not None else self.host(peer)
        return self.core.register_peer(host_id, task, peer, DownloadSpec(url="https://r/blob", **download))

    def source(self, peer: str, pieces: int = 1, host: str | None = None, task: str = TASK) -> Peer:
        """A peer the scheduler sent to the origin that back-sourced `pieces` pieces (still running).

        A shorthand: it asks for back-to-source itself and is then marked as if the scheduler had
        sent it (the real path, a peer without parents nor seeds, is tested on its own)."""
        self.register(peer, host, task, need_back_to_source=True)
        self.core.peers[peer].defines_content = True
        self.core.back_to_source_started(peer)
        for n in range(pieces):
            self.core.back_to_source_piece_finished(peer, n, n * PIECE, PIECE, f"{DIGEST}{n}")
        return self.core.peers[peer]

    def running(self, peer: str, parent: str, pieces: int = 1, host: str | None = None) -> Peer:
        """A peer that got `pieces` pieces from `parent`."""
        decisions = self.register(peer, host)
        assert isinstance(decisions[0], SendNormal), decisions
        self.core.download_started(peer)
        for n in range(pieces):
            self.core.piece_finished(peer, n, n * PIECE, PIECE, parent, 0.1)
        return self.core.peers[peer]


def kinds(decisions: list[Decision]) -> list[str]:
    return [type(d).__name__ for d in decisions]


def parents_of(decision: Decision) -> list[str]:
    assert isinstance(decision, SendNormal), decision
    return [c.peer_id for c in decision.candidates]


# --------------------------------------------------------------------------------------------
# Lifecycle tables


@pytest.mark.parametrize(
    ("events", "final"),
    [
        ([PeerEvent.SCHEDULE_NORMAL, PeerEvent.DOWNLOAD, PeerEvent.SUCCEED, PeerEvent.LEAVE],
         PeerState.LEAVE),
        ([PeerEvent.SCHEDULE_BACK_TO_SOURCE, PeerEvent.DOWNLOAD_BACK_TO_SOURCE, PeerEvent.SUCCEED],
         PeerState.SUCCEEDED),
        ([PeerEvent.SCHEDULE_NORMAL, PeerEvent.DOWNLOAD, PeerEvent.SCHEDULE_BACK_TO_SOURCE,
          PeerEvent.DOWNLOAD_BACK_TO_SOURCE], PeerState.BACK_TO_SOURCE),
        ([PeerEvent.SCHEDULE_EMPTY, PeerEvent.SUCCEED], PeerState.SUCCEEDED),
        ([PeerEvent.FAIL, PeerEvent.LEAVE], PeerState.LEAVE),
    ],
)
def test_peer_lifecycle_legal(events: list[PeerEvent], final: PeerState) -> None:
    w = World()
    w.register("p", need_back_to_source=True)
    peer = w.core.peers["p"]
    peer.state = PeerState.PENDING
    for event in events:
        peer.transition(event, 0.0)
    assert peer.state is final


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (PeerState.PENDING, PeerEvent.DOWNLOAD),
        (PeerState.PENDING, PeerEvent.SUCCEED),
        (PeerState.RECEIVED_BACK_TO_SOURCE, PeerEvent.SCHEDULE_NORMAL),
        (PeerState.SUCCEEDED, PeerEvent.DOWNLOAD),
        (PeerState.FAILED, PeerEvent.SUCCEED),
        (PeerState.LEAVE, PeerEvent.FAIL),
    ],
)
def test_peer_lifecycle_illegal_raises(state: PeerState, event: PeerEvent) -> None:
    assert (state, event) not in PEER_TRANSITIONS
    w = World()
    w.register("p", need_back_to_source=True)
    peer = w.core.peers["p"]
    peer.state = state
    with pytest.raises(InvalidTransition, match=f"event {event} is not allowed in state {state}"):
        peer.transition(event, 0.0)


def test_illegal_event_from_the_wire_fails_the_peer() -> None:
    w = World()
    w.host("other")
    w.register("p")  # no seed: told to back-source
    decisions = w.core.download_started("p")  # but it claims to download from parents
    assert kinds(decisions) == ["FailPeer"]
    assert decisions[0].code is Code.FAILED_PRECONDITION  # type: ignore[union-attr]
    assert w.core.peers["p"].state is PeerState.FAILED


# --------------------------------------------------------------------------------------------
# Filtering and scoring


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("ok", None),
        ("same host", "same host"),
        ("blocklisted", "blocklisted"),
        ("no pieces", "not a parent"),
        ("no slots", "no free upload slot"),
        ("descendant", None),  # pieces trade both ways: a child's child may be its parent
        ("demoted", "not a parent"),
        ("seed back-sourcing without pieces", None),
        ("normal back-sourcing without pieces", "not a parent"),
    ],
)
def test_filter(case: str, expected: str | None) -> None:
    w = World()
    slots = 1 if case == "no slots" else 0
    parent_host = w.host("parent", seed=case.startswith("seed"), slots=slots)
    pieces = 0 if case in ("no pieces", "seed back-sourcing without pieces",
                           "normal back-sourcing without pieces") else 2
    parent = w.source("parent", pieces=pieces, host=parent_host)
    if case == "no pieces":
        parent.state = PeerState.RUNNING
    child_host = parent_host if case == "same host" else w.host("child")
    w.register("child", child_host, need_back_to_source=True)
    child = w.core.peers["child"]
    if case == "blocklisted":
        child.blocklist.add("parent")
    if case == "no slots":
        parent.host.child_edges = 1
    if case == "descendant":
        child.children[parent.id] = parent
    if case == "demoted":
        parent.demoted = True
    reason = rejection(child, parent)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


@pytest.mark.parametrize(
    ("costs", "bad"),
    [
        ([], False),
        ([1.0], False),
        ([1.0, 1.0, 1.0, 19.0], False),  # few samples: 19x the mean is fine
        ([1.0, 1.0, 1.0, 21.0], True),  # few samples: > 20x the mean is bad
        ([1.0] * BAD_PARENT_MIN_SAMPLES + [1.0], False),
        ([1.0, 2.0] * 15 + [3.0], False),  # within mean + 3 sigma (1.5 + 1.5)
        ([1.0, 2.0] * 15 + [3.1], True),  # >= 30 samples: beyond mean + 3 sigma
        ([1.0, 2.0] * 15 + [10.0], True),
    ],
)
def test_bad_parent_outliers(costs: list[float], bad: bool) -> None:
    w = World()
    parent = w.source("parent")
    for cost in costs:
        parent.upload_costs.add(cost)
    assert is_bad_parent(parent) is bad


@pytest.mark.parametrize(
    ("a", "b", "affinity"),
    [
        ("", "r1", 0.0),
        ("r1|z1|k1", "r1|z1|k1", 1.0),
        ("r1|z1|k1", "r1|z1|k2", 2 / 3),
        ("r1|z1", "r1|z1|k2", 2 / 3),
        ("r1|z1", "r2|z1", 0.0),
    ],
)
def test_location_affinity(a: str, b: str, affinity: float) -> None:
    assert location_affinity(a, b) == pytest.approx(affinity)


@pytest.mark.parametrize(
    ("better", "worse"),
    [
        ({"idc": "dc1"}, {"idc": "dc2"}),
        ({"location": "r1|z1"}, {"location": "r1|z2"}),
        ({"seed": False}, {"seed": True}),
        ({"pieces": 8}, {"pieces": 2}),
    ],
)
def test_score_prefers(better: dict[str, Any], worse: dict[str, Any]) -> None:
    w = World()
    child_host = w.host("child", idc="dc1", location="r1|z1")
    parents = {}
    for name, spec in (("better", better), ("worse", worse)):
        host = w.host(name, seed=spec.get("seed", False), idc=spec.get("idc", ""),
                      location=spec.get("location", ""))
        parents[name] = w.source(name, pieces=spec.get("pieces", 4), host=host)
    w.register("child", child_host, need_back_to_source=True)
    child = w.core.peers["child"]
    assert score(child, parents["better"]).total > score(child, parents["worse"]).total


def test_candidates_are_the_best_three_with_digests() -> None:
    w = World()
    for i in range(5):
        w.source(f"s{i}", pieces=i + 1)
    decisions = w.register("child")
    assert parents_of(decisions[0]) == ["s4", "s3", "s2"]
    candidate = decisions[0].candidates[0]  # type: ignore[union-attr]
    assert [(p.number, p.digest) for p in candidate.pieces] == [(n, f"{DIGEST}{n}") for n in range(5)]
    assert candidate.host.id == "h-s4"
    assert w.core.stat_peer("child").parent_ids == ("s4", "s3", "s2")


def test_seed_is_offloaded_once_normal_peers_have_pieces() -> None:
    w = World()
    seed = w.host("seed", seed=True)
    w.source("seed-peer", pieces=10, host=seed)
    w.running("a", "seed-peer", pieces=10)
    w.running("b", "seed-peer", pieces=10)
    w.running("c", "seed-peer", pieces=10)
    offered = parents_of(w.register("d")[0])
    # The three best are the normal peers; the seed only follows as the one source of piece
    # digests a child may use while the scheduler is away (and as a last resort).
    assert sorted(offered[:3]) == ["a", "b", "c"]
    assert offered[3:] == ["seed-peer"]


def test_a_child_without_a_seed_parent_gets_one_and_only_one() -> None:
    w = World()
    seed = w.host("seed", seed=True)
    w.source("seed-peer", pieces=10, host=seed)
    w.running("a", "seed-peer", pieces=10)
    first = parents_of(w.register("d")[0])
    assert first.count("seed-peer") == 1
    w.running("b", "seed-peer", pieces=10)
    pushed = [parents_of(d) for d in w.core.piece_finished("b", 9, 0, 1, "seed-peer") if hasattr(d, "candidates")]
    assert all("seed-peer" not in offered for offered in pushed), "a child that has a seed gets no second copy"


# --------------------------------------------------------------------------------------------
# Register, back-to-source and seeds


def test_register_needs_an_announced_host() -> None:
    w = World()
    decisions = w.core.register_peer("h-ghost", TASK, "p", DownloadSpec(url="https://r/blob"))
    assert decisions == [FailPeer("p", Code.NOT_FOUND, "host h-ghost not found")]


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("nothing", "SendNeedBackToSource"),  # no seed, no parent
        ("need back-to-source", "SendNeedBackToSource"),
        ("seed configured", "TriggerSeed"),
        ("seed announced", "TriggerSeed"),
        ("source fetching", ""),  # someone is at the origin already: wait for it
        ("source has a piece", "SendNormal"),
        ("registering host is a seed", "SendNeedBackToSource"),
    ],
)
def test_register_decision(setup: str, expected: str) -> None:
    w = World(seed_peer=("10.9.9.9:4000",) if setup == "seed configured" else ())
    if setup == "seed announced":
        w.host("seed", seed=True)
    if setup == "source fetching":
        w.source("src", pieces=0)
    if setup == "source has a piece":
        w.source("src", pieces=1)
    host = w.host("me", seed=setup == "registering host is a seed")
    decisions = w.register("me", host, need_back_to_source=setup == "need back-to-source")
    assert kinds(decisions) == ([expected] if expected else [])
    if not expected:
        assert w.core.waiting_count == 1


def test_seed_trigger_hash_choice_headers_and_single_flight() -> None:
    seeds = ("10.0.1.1:4000", "10.0.1.2:4000", "10.0.1.3:4000")
    w = World(seed_peer=seeds)
    headers = {"Authorization": "Bearer secret", "X-Custom": "1"}
    decisions = w.register("a", request_header=headers, digest="sha256:" + "0" * 64, tag="t", range_length=10)
    (trigger,) = decisions
    assert isinstance(trigger, TriggerSeed)
    assert trigger.address == hashring.choose(list(seeds), TASK)
    assert trigger.task_id == TASK
    assert trigger.download.need_back_to_source is True
    assert dict(trigger.download.request_header) == headers
    assert (trigger.download.digest, trigger.download.tag, trigger.download.range_length) == (
        "sha256:" + "0" * 64, "t", 0)
    # a second peer while the trigger is in flight waits: no second trigger
    assert w.register("b") == []
    assert w.core.waiting_count == 2
    # other tasks hash independently
    other = w.register("c", task="task-2")
    assert isinstance(other[0], TriggerSeed) and other[0].address == hashring.choose(list(seeds), "task-2")


def test_seed_trigger_failure_cools_the_seed_down() -> None:
    seeds = ("10.0.1.1:4000", "10.0.1.2:4000", "10.0.1.3:4000")
    w = World(seed_peer=seeds, seed_cooldown=30.0)
    (first,) = w.register("a")
    assert isinstance(first, TriggerSeed)
    (second,) = w.core.seed_trigger_failed(first.address, TASK)
    assert isinstance(second, TriggerSeed)
    assert second.address == hashring.rank(list(seeds), TASK)[1]
    assert first.address not in w.core.available_seeds()
    w.clock.advance(31.0)
    assert first.address in w.core.available_seeds()


def test_a_seed_that_announces_itself_ends_its_cool_down() -> None:
    w = World(seed_cooldown=30.0)
    seed_host = w.host("seed", seed=True)
    address = w.core.hosts[seed_host].info.grpc_address
    assert w.core.available_seed_host_count == 1
    w.core.seed_trigger_failed(address)
    assert address not in w.core.available_seeds()
    assert w.core.available_seed_host_count == 0
    w.clock.advance(1.0)
    w.core.announce_host(w.core.hosts[seed_host].info)  # restarted within the cool-down
    assert address in w.core.available_seeds()
    assert w.core.available_seed_host_count == 1
    (trigger,) = w.register("a")
    assert isinstance(trigger, TriggerSeed) and trigger.address == address


def test_a_normal_host_announcing_does_not_end_a_seed_cool_down() -> None:
    w = World(seed_peer=("10.0.1.1:4000",), seed_cooldown=30.0)
    w.core.seed_trigger_failed("10.0.1.1:4000")
    w.host("peer")
    assert w.core.available_seeds() == []


def test_seed_trigger_failure_without_other_seed_goes_back_to_source() -> None:
    w = World(seed_peer=("10.0.1.1:4000",))
    w.register("a")
    assert kinds(w.core.seed_trigger_failed("10.0.1.1:4000", TASK)) == ["SendNeedBackToSource"]


def test_seed_peer_back_to_source_started_wakes_waiting_peers() -> None:
    w = World()
    seed_host = w.host("seed", seed=True)
    (trigger,) = w.register("a")
    assert isinstance(trigger, TriggerSeed) and trigger.address == "10.0.0.1:4000"
    assert w.register("b") == []
    # the seed registers its own peer with the download the trigger carried
    decisions = w.core.register_peer(seed_host, TASK, "seed-peer", trigger.download)
    assert kinds(decisions) == ["SendNeedBackToSource"]
    woken = w.core.back_to_source_started("seed-peer")
    assert sorted(d.peer_id for d in woken) == ["a", "b"]  # type: ignore[union-attr]
    assert all(parents_of(d) == ["seed-peer"] for d in woken)
    assert w.core.waiting_count == 0


# Lost pieces: the fetcher left with pieces nobody else has


def lost_pieces_world(**config: Any) -> World:
    """A fetcher `src` that back-sourced pieces 0-2 of a task and has gone; `b` holds 0-1 of them,
    `c` piece 0, both still downloading."""
    w = World(**config)
    w.source("src", pieces=3)
    w.running("b", "src", pieces=2)
    w.running("c", "src", pieces=1)
    return w


def test_pieces_lost_with_the_fetcher_send_the_fullest_peer_to_the_origin() -> None:
    w = lost_pieces_world()
    decisions = w.core.delete_host("h-src")
    assert kinds(decisions) == ["FailPeer", "SendNeedBackToSource"]
    assert decisions[1].peer_id == "b"  # type: ignore[union-attr]  # it misses the fewest pieces
    # c, still downloading, has b as a parent (here already through the mesh; else b's start
    # makes it one, as the seed's in the next test)
    w.core.back_to_source_started("b")
    assert "b" in w.core.peers["c"].parents


def test_pieces_lost_with_the_fetcher_trigger_a_seed_that_becomes_everyones_parent() -> None:
    w = lost_pieces_world()
    seed_host = w.host("seed", seed=True)
    decisions = w.core.delete_peer("src")
    assert kinds(decisions) == ["FailPeer", "TriggerSeed"]
    trigger = decisions[1]
    assert isinstance(trigger, TriggerSeed) and trigger.download.need_back_to_source
    assert kinds(w.core.register_peer(seed_host, TASK, "seed-peer", trigger.download)) == ["SendNeedBackToSource"]
    adopted = w.core.back_to_source_started("seed-peer")
    assert sorted(d.peer_id for d in adopted if isinstance(d, SendNormal)) == ["b", "c"]
    assert all("seed-peer" in w.core.peers[peer].parents for peer in ("b", "c"))
    # the next fetcher after that is an ordinary one: nobody is made its child
    w.source("d", pieces=1)
    assert not w.core.tasks[TASK].rescue_pending


@pytest.mark.parametrize("limit", [0, 3])
def test_the_fetcher_for_lost_pieces_gets_a_bounded_number_of_children(
        monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    monkeypatch.setattr(core_module, "LOST_PIECES_CHILDREN", limit)
    w = lost_pieces_world()
    downloading = ["b", "c", *"defghijkl"]
    for name in downloading[2:]:
        w.running(name, "src", pieces=1)
    seed_host = w.host("seed", seed=True)
    trigger = w.core.delete_peer("src")[1]
    assert isinstance(trigger, TriggerSeed)
    w.core.register_peer(seed_host, TASK, "seed-peer", trigger.download)
    w.core.back_to_source_started("seed-peer")
    children = sum("seed-peer" in w.core.peers[name].parents for name in downloading)
    # a new seed is pushed to PUSH_LIMIT hungry children anyway; the lost pieces add `limit`
    assert children == min(PUSH_LIMIT + limit, len(downloading)), children


def _finish_src(w: World) -> None:
    w.core.back_to_source_finished("src")  # the piece count is known now: 3


def _c_gets_the_last_piece(w: World) -> None:
    _finish_src(w)
    w.core.piece_finished("c", 2, 2 * PIECE, PIECE, "src")


def _d_succeeds(w: World) -> None:
    w.running("d", "src", pieces=3)
    w.core.peer_finished("d")


def _another_fetcher(w: World) -> None:
    w.source("src2", pieces=0)


@pytest.mark.parametrize(
    "setup",
    [_c_gets_the_last_piece, _d_succeeds, _another_fetcher],
    ids=["the live peers hold every piece", "a peer has the whole content", "another peer still fetches"],
)
def test_no_fetcher_is_brought_in_when_no_piece_is_lost(setup: Any) -> None:
    w = lost_pieces_world()
    setup(w)
    assert not [d for d in w.core.delete_host("h-src") if not isinstance(d, FailPeer)]


def test_every_piece_lost_after_the_whole_fetch_finished_is_fetched_again() -> None:
    w = lost_pieces_world()
    _finish_src(w)  # src has the whole content, b and c do not have piece 2
    assert kinds(w.core.delete_host("h-src")) == ["SendNeedBackToSource"]  # (src itself had succeeded)


def test_a_finished_fetcher_reported_dead_by_two_children_is_replaced() -> None:
    # A killed node's finished peer stays registered: its stream's end is a finished peer's
    # normal end, and its host stays announced until its time-to-live passes.
    w = lost_pieces_world()
    _finish_src(w)
    assert w.core.stream_closed("src") == []
    assert w.core.piece_failed("c", 2, "src") == []  # one report: only c stops using it
    decisions = w.core.piece_failed("b", 2, "src")  # two: offered no more, and its pieces are lost
    assert kinds(decisions) == ["SendNeedBackToSource"]
    assert decisions[0].peer_id == "b"  # type: ignore[union-attr]


def test_a_starved_peer_whose_parents_still_download_is_not_sent_to_a_slow_origin() -> None:
    # The download policy asks again when its parents had nothing new for schedule_timeout: behind
    # a slow origin, that is every peer. While someone fetches and its parents still download, a
    # peer keeps them, and is not put among the waiting (who go to the origin after a while).
    w = World()
    w.source("src", pieces=1)
    w.running("a", "src", pieces=1)
    w.running("b", "src", pieces=1)
    assert set(w.core.peers["b"].parents) == {"src", "a"}
    assert w.core.reschedule("b") == []
    assert w.core.waiting_count == 0
    for _ in range(10):
        w.clock.advance(1.0)
        assert w.core.tick() == []


def test_expired_peers_are_not_sent_to_fetch_lost_pieces() -> None:
    w = lost_pieces_world(peer_ttl=100.0)
    w.clock.advance(150.0)
    for host in list(w.core.hosts.values()):
        w.core.announce_host(host.info)
    assert not [d for d in w.core.gc() if not isinstance(d, FailPeer)]
    assert w.core.peer_count == 0


@pytest.mark.parametrize(
    ("limit", "waited", "expected"),
    [
        (200, 3.0, []),  # fewer than retry_back_to_source_limit (4) intervals: keep waiting
        (200, 4.0, ["SendNeedBackToSource"]),
        (1, 4.0, []),  # limit reached: wait on
        (1, 5.0, ["FailPeer"]),  # retry_limit (5) intervals: give up
    ],
)
def test_waiting_retry_back_to_source_then_fail(limit: int, waited: float, expected: list[str]) -> None:
    w = World(back_to_source_limit=limit)
    w.source("src", pieces=0)  # fetching but no piece yet: others wait
    assert w.register("a") == []
    w.clock.advance(waited)
    decisions = w.core.tick()
    assert kinds(decisions) == expected
    if expected == ["FailPeer"]:
        assert decisions[0].code is Code.RESOURCE_EXHAUSTED  # type: ignore[union-attr]
        assert "back-to-source limit (1 peers) is reached" in decisions[0].message  # type: ignore[union-attr]
        assert w.core.peers["a"].state is PeerState.FAILED


def test_waiting_peer_gets_parent_on_first_piece() -> None:
    w = World()
    w.source("src", pieces=0)
    assert w.register("a") == []
    decisions = w.core.back_to_source_piece_finished("src", 0, 0, PIECE, DIGEST)
    assert [parents_of(d) for d in decisions] == [["src"]]
    assert decisions[0].peer_id == "a"  # type: ignore[union-attr]


def test_back_to_source_limit_without_seed() -> None:
    w = World(back_to_source_limit=2)
    w.register("a")
    w.core.back_to_source_failed("a")
    w.register("b")
    w.core.back_to_source_failed("b")
    assert w.register("c") == []  # 2 peers of the task back-sourced already
    assert w.core.waiting_count == 1


def test_fetcher_failure_lets_a_waiting_peer_back_source_after_the_backoff() -> None:
    w = World(origin_retry_backoff=2.0)
    w.register("a")
    w.core.back_to_source_started("a")
    assert w.register("b") == []
    assert w.core.back_to_source_failed("a", "origin 500") == []  # not at once: the origin just failed
    w.clock.advance(1.0)
    assert w.core.tick() == []
    w.clock.advance(1.0)
    assert kinds(w.core.tick()) == ["SendNeedBackToSource"]


def test_empty_content() -> None:
    w = World()
    w.register("a")
    w.core.back_to_source_started("a")
    w.core.back_to_source_finished("a")
    assert w.core.stat_task(TASK).content_length == 0
    assert w.register("b") == [SendEmpty("b")]


# --------------------------------------------------------------------------------------------
# Blocklist, failures, cycles, push


def test_piece_failure_blocklists_and_reschedule_finds_others() -> None:
    w = World(candidate_parent_limit=1)
    w.source("s1", pieces=3)
    w.source("s2", pieces=2)
    (first,) = w.register("child")
    assert parents_of(first) == ["s1"]
    assert w.core.piece_failed("child", 0, "s1") == []
    (again,) = w.core.reschedule("child")
    assert parents_of(again) == ["s2"]
    # no parent left, and the peers at the origin are blocklisted: back-source now
    assert kinds(w.core.reschedule("child", ["s2"])) == ["SendNeedBackToSource"]


def test_temporary_piece_failure_is_not_held_against_the_parent() -> None:
    w = World()
    w.source("s1")
    w.register("child")
    w.core.piece_failed("child", 0, "s1", temporary=True)
    assert "s1" not in w.core.peers["child"].blocklist
    assert w.core.peers["s1"].upload_failed == 0


def test_parent_failed_by_children_of_two_hosts_is_no_longer_offered_for_the_task() -> None:
    w = World()
    w.source("bad", pieces=5)
    w.source("good", pieces=1)
    w.register("c1")
    w.register("c2")
    w.core.piece_failed("c1", 0, "bad")
    w.core.piece_failed("c1", 1, "bad")  # the same child again: still one identity
    assert not w.core.peers["bad"].demoted  # one report blocklists it for c1 only
    w.core.piece_failed("c2", 0, "bad")
    assert w.core.peers["bad"].demoted
    (decision,) = w.register("c3")
    assert parents_of(decision) == ["good"]


def test_a_child_may_become_its_parents_parent() -> None:
    # Not a DAG: a child that got pieces its parent lacks (from elsewhere) serves them back. With
    # parents only upstream, the first peers served everyone and the last served no one
    # (bench/swarm_sim.py, 16 peers: peer uploads 0.00 .. 3.00 blobs, seed 2.33; both ways: seed 1.56).
    w = World()
    w.source("src", pieces=1)
    w.running("a", "src", pieces=1)
    (b,) = w.register("b")
    assert "a" in parents_of(b)
    w.core.download_started("b")
    decisions = w.core.piece_finished("b", 0, 0, PIECE, "a", 0.1)  # b is pushed to a, which lacks parents
    assert [parents_of(d) for d in decisions if d.peer_id == "a"] == [["b"]]
    assert "b" in w.core.stat_peer("a").parent_ids and "a" in w.core.stat_peer("b").parent_ids
    assert rejection(w.core.peers["a"], w.core.peers["b"]) is None


def test_new_parent_is_pushed_to_children_lacking_parents() -> None:
    w = World()
    w.source("src", pieces=1)
    for name in ("a", "b", "c"):
        w.running(name, "src", pieces=0)
    # a, b, c have one parent each (src and the others had no pieces)
    decisions = w.core.piece_finished("a", 0, 0, PIECE, "src", 0.1)
    pushed = {d.peer_id: parents_of(d) for d in decisions}
    assert pushed == {"b": ["a"], "c": ["a"]}
    assert w.core.stat_peer("b").parent_ids == ("src", "a")


def test_push_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # many children on one parent: no child cap (its own test is in test_swarm_mesh.py)
    monkeypatch.setattr("scheduler.scheduling.PARENT_CHILD_LIMIT", 1000)
    w = World()
    w.source("src", pieces=1, host=w.host("src", slots=1000))
    for i in range(PUSH_LIMIT + 5):
        w.running(f"c{i}", "src", pieces=0)
    decisions = w.core.piece_finished("c0", 0, 0, PIECE, "src", 0.1)
    assert len(decisions) == PUSH_LIMIT


def test_stream_closed_without_finish_fails_the_peer() -> None:
    w = World()
    w.source("src", pieces=2)
    w.core.stream_closed("src")
    assert w.core.stat_peer("src").state == "Failed"
    assert kinds(w.register("b")) == ["SendNeedBackToSource"]


def test_succeeded_peer_stays_a_parent_after_its_stream_closes() -> None:
    w = World()
    w.source("src", pieces=2)
    w.core.back_to_source_finished("src")
    w.core.stream_closed("src")
    assert parents_of(w.register("b")[0]) == ["src"]


# --------------------------------------------------------------------------------------------
# Digests


def test_only_back_to_source_digests_define_pieces() -> None:
    w = World()
    w.source("src", pieces=2)
    w.running("a", "src", pieces=2)
    w.core.piece_finished("a", 5, 5 * PIECE, PIECE, "src", 0.1)  # a piece nobody back-sourced
    info = w.core.stat_task(TASK)
    assert [(p.number, p.digest) for p in info.pieces] == [(0, f"{DIGEST}0"), (1, f"{DIGEST}1")]
    # a second back-sourcing peer cannot redefine a piece
    w.source("src2", pieces=0)
    w.core.back_to_source_piece_finished("src2", 0, 0, PIECE, "xxh3:" + "ff" * 16)
    assert w.core.stat_task(TASK).pieces[0].digest == f"{DIGEST}0"
    assert info.content_length is None
    w.core.back_to_source_finished("src")
    info = w.core.stat_task(TASK)
    assert (info.content_length, info.piece_count, info.state) == (2 * PIECE, 2, "Succeeded")


def test_stat_unknown() -> None:
    w = World()
    with pytest.raises(TaskNotFound):
        w.core.stat_task("nope")
    with pytest.raises(PeerNotFound):
        w.core.stat_peer("nope")
    assert kinds(w.core.piece_finished("nope", 0, 0, 1)) == ["FailPeer"]


# --------------------------------------------------------------------------------------------
# Deletion and GC


def test_delete_host_drops_its_peers() -> None:
    w = World()
    host = w.host("src")
    w.source("src", pieces=1, host=host)
    decisions = w.core.delete_host(host)
    assert decisions == [FailPeer("src", Code.ABORTED, "host h-src left")]
    assert "src" not in w.core.peers
    assert kinds(w.register("b")) == ["SendNeedBackToSource"]


def test_delete_task_and_peer() -> None:
    w = World()
    w.source("a", pieces=1)
    w.source("b", pieces=1)
    assert kinds(w.core.delete_peer("a")) == ["FailPeer"]
    assert w.core.stat_task(TASK).peer_count == 1
    w.core.delete_task(TASK)
    assert w.core.task_count == 0 and w.core.peer_count == 0


@pytest.mark.parametrize(
    ("advance", "announce_again", "hosts", "peers", "tasks"),
    [
        (50.0, False, 2, 2, 1),  # nothing expired
        (150.0, True, 2, 0, 1),  # peers expired (ttl 100), hosts re-announced, task still young
        (150.0, False, 0, 0, 1),  # hosts expired too (ttl 120): their peers go
        (250.0, True, 2, 0, 0),  # task expired (ttl 200 since its last activity)
    ],
)
def test_gc_by_ttls(advance: float, announce_again: bool, hosts: int, peers: int, tasks: int) -> None:
    w = World(peer_ttl=100.0, host_ttl=120.0, task_ttl=200.0)
    w.source("a", pieces=1)
    w.core.back_to_source_finished("a")
    w.register("b")
    w.clock.advance(advance)
    if announce_again:
        for host in list(w.core.hosts.values()):
            w.core.announce_host(host.info)
    w.core.gc()
    assert (w.core.host_count, w.core.peer_count, w.core.task_count) == (hosts, peers, tasks)


def test_deterministic() -> None:
    def run() -> list[Decision]:
        w = World()
        out: list[Decision] = []
        for i in range(40):
            w.source(f"s{i}", pieces=i % 5 + 1)
        for i in range(20):
            out += w.register(f"c{i}")
        return out

    assert run() == run()


def test_register_in_a_large_task_is_cheap() -> None:
    w = World(back_to_source_limit=1)
    w.source("src", pieces=1, host=w.host("src", slots=100_000))
    for i in range(2000):  # parents with a piece each (back-to-source ones: the mesh pushes none to them)
        w.source(f"p{i}", pieces=1)
    # filtering looks at a bounded sample, whatever the task size
    calls = 0
    import scheduler.scheduling as scheduling

    original = scheduling.rejection

    def counting(child: Peer, parent: Peer) -> str | None:
        nonlocal calls
        calls += 1
        return original(child, parent)

    scheduling.rejection = counting
    try:
        decisions = w.register("late")
    finally:
        scheduling.rejection = original
    assert kinds(decisions) == ["SendNormal"]
    assert calls <= w.core.config.filter_parent_limit
