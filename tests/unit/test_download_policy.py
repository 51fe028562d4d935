"""Table-driven tests of the pure download policy on a ManualClock: no sockets, no sleeps."""

from __future__ import annotations

import random
from typing import Any

import pytest

from common.clock import ManualClock
from peer.download import policy as policy_module
from peer.download.policy import (
    PARENT_BUSY_BACKOFF,
    PARENT_FAILURE_LIMIT,
    PARENT_PIECE_LIMIT,
    SEED_PIECE_LIMIT,
    SEED_PIECE_LIMIT_WITH_PEERS,
    BackToSource,
    Command,
    DownloadPolicy,
    DropParent,
    FetchPiece,
    Finished,
    GiveUp,
    ReportPieceFailed,
    Reschedule,
)

SCHEDULE_TIMEOUT = 10.0


def policy(pieces: int | None = 8, *, concurrent: int = 16, everything: bool = True, seed: int = 0,
           **parents: bool) -> DownloadPolicy:
    """A policy on a manual clock; ``parents`` maps parent id -> is_seed."""
    p = DownloadPolicy(peer_id="me", clock=ManualClock(), rng=random.Random(seed), concurrent_pieces=concurrent,
                       schedule_timeout=SCHEDULE_TIMEOUT, want_everything=everything)
    if pieces is not None:
        p.content_info(pieces)
    for parent_id, is_seed in parents.items():
        assert p.add_parent(parent_id, is_seed=is_seed)
    return p


def has(p: DownloadPolicy, parent_id: str, numbers: Any) -> None:
    for number in numbers:
        p.parent_has(parent_id, number)


def fetches(commands: list[Command]) -> list[tuple[int, str]]:
    return [(c.number, c.parent_id) for c in commands if isinstance(c, FetchPiece)]


def kinds(commands: list[Command]) -> list[str]:
    return [type(c).__name__ for c in commands]


def advance(p: DownloadPolicy, seconds: float) -> None:
    clock = p.clock
    assert isinstance(clock, ManualClock)
    clock.advance(seconds)


# -- finishing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("pieces", "finished", "everything", "wanted", "done"), [
    (4, [0, 1, 2, 3], True, [], True),
    (4, [0, 1, 2], True, [], False),
    (4, [1], False, [1], True),
    (4, [1], False, [1, 2], False),
    (0, [], True, [], True),  # empty content: nothing to fetch
])
def test_finished_when_every_wanted_piece_is_here(
    pieces: int, finished: list[int], everything: bool, wanted: list[int], done: bool
) -> None:
    p = policy(None, everything=everything)
    p.content_info(pieces, finished)
    p.want(wanted)
    assert (p.next_commands() == [Finished()]) is done


def test_nothing_is_fetched_before_the_content_is_known() -> None:
    p = policy(None, a=False, b=False)
    has(p, "a", range(4))
    has(p, "b", range(4))
    assert fetches(p.next_commands()) == []
    p.content_info(4)
    assert sorted(n for n, _ in fetches(p.next_commands())) == [0, 1, 2, 3]


def test_a_range_read_without_prefetch_fetches_only_its_pieces() -> None:
    p = policy(8, everything=False, a=False)
    has(p, "a", range(8))
    p.want([2, 3])
    assert sorted(n for n, _ in fetches(p.next_commands())) == [2, 3]
    p.piece_succeeded(2, "a")
    p.piece_succeeded(3, "a")
    assert p.next_commands() == [Finished()]


def test_want_all_turns_a_range_download_into_a_whole_one() -> None:
    p = policy(4, everything=False, a=False, b=False)
    has(p, "a", range(4))
    has(p, "b", range(4))
    p.want([0])
    p.want_all()
    assert sorted(n for n, _ in fetches(p.next_commands())) == [0, 1, 2, 3]


def test_missing_lists_wanted_pieces_not_here_in_order() -> None:
    p = policy(None)
    p.content_info(6, [1, 4])
    assert p.missing() == [0, 2, 3, 5]


# -- piece order ---------------------------------------------------------------------------------


def test_prioritized_pieces_go_first_in_number_order() -> None:
    p = policy(32, concurrent=3, a=False, b=False)
    has(p, "a", range(32))
    has(p, "b", range(32))
    p.prioritize([20, 7, 13])
    assert [n for n, _ in fetches(p.next_commands())] == [7, 13, 20]


def test_the_rest_goes_in_an_order_shuffled_per_peer() -> None:
    orders = []
    for seed in (1, 2):
        p = policy(64, concurrent=8, seed=seed, a=False)
        has(p, "a", range(64))
        orders.append([n for n, _ in fetches(p.next_commands())])
    assert orders[0] != orders[1], "two peers fetch different pieces first, so they can trade"
    assert orders[0] != sorted(orders[0]) or orders[1] != sorted(orders[1])


def test_the_same_seed_gives_the_same_decisions() -> None:
    runs = []
    for _ in range(2):
        p = policy(64, concurrent=8, seed=7, a=False, b=False)
        has(p, "a", range(64))
        has(p, "b", range(64))
        runs.append(p.next_commands())
    assert runs[0] == runs[1]


def test_pieces_no_parent_has_are_not_fetched() -> None:
    p = policy(8, a=False)
    has(p, "a", [5])
    assert fetches(p.next_commands()) == [(5, "a")]


def test_finished_and_in_flight_pieces_are_not_fetched_again() -> None:
    p = policy(None, a=False, b=False)
    p.content_info(4, [0])
    has(p, "a", range(4))
    has(p, "b", range(4))
    first = fetches(p.next_commands())
    assert sorted(n for n, _ in first) == [1, 2, 3]
    assert fetches(p.next_commands()) == []


def test_back_to_source_order_takes_prioritized_pieces_first() -> None:
    p = policy(8)
    p.prioritize([6])
    queue = [0, 1, 6, 7]
    assert [p.next_origin_piece(queue) for _ in range(4)] == [6, 0, 1, 7]


# -- limits --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("concurrent", "parents", "expected"), [
    (16, {"a": False}, PARENT_PIECE_LIMIT),
    (1, {"a": False}, 1),
    (16, {"a": False, "b": False}, 2 * PARENT_PIECE_LIMIT),
    (3, {f"p{i}": False for i in range(8)}, 3),
    (16, {"s": True}, SEED_PIECE_LIMIT),
])
def test_pieces_in_flight_are_bounded_per_task_and_per_parent(
    concurrent: int, parents: dict[str, bool], expected: int
) -> None:
    p = policy(64, concurrent=concurrent, **parents)
    for parent_id in parents:
        has(p, parent_id, range(64))
    assert len(fetches(p.next_commands())) == expected


def test_a_finished_piece_frees_a_slot_for_the_next() -> None:
    p = policy(64, concurrent=2, a=False)
    has(p, "a", range(64))
    first = fetches(p.next_commands())
    assert len(first) == 2
    p.piece_succeeded(first[0][0], "a")
    assert len(fetches(p.next_commands())) == 1


def test_the_least_busy_holder_gets_the_piece() -> None:
    p = policy(64, concurrent=3, a=False, b=False)
    has(p, "a", range(64))
    has(p, "b", range(64))
    chosen = [parent for _, parent in fetches(p.next_commands())]
    assert sorted(chosen) in (["a", "a", "b"], ["a", "b", "b"])


# -- seeds are the last resort -------------------------------------------------------------------


def test_normal_parents_are_preferred_over_a_seed() -> None:
    p = policy(4, s=True, a=False)
    has(p, "s", range(4))
    has(p, "a", range(4))
    assert {parent for _, parent in fetches(p.next_commands())} == {"a"}


def test_a_piece_only_the_seed_has_comes_from_it_while_peers_keep_us_busy() -> None:
    p = policy(8, s=True, a=False)
    has(p, "a", [0, 1])
    assert sorted(fetches(p.next_commands())) == [(0, "a"), (1, "a")]
    has(p, "s", range(8))
    # super-seeding: pieces no normal parent has leave the seed (one at a time), those a normal
    # parent has never do, while the normal parent keeps us busy
    seeded = fetches(p.next_commands())
    assert len(seeded) == SEED_PIECE_LIMIT_WITH_PEERS
    assert all(parent == "s" and number >= 2 for number, parent in seeded)


def test_the_seed_is_used_when_normal_parents_leave_us_idle() -> None:
    p = policy(8, s=True, a=False)
    has(p, "s", range(8))
    # "a" has nothing yet: the seed gets one piece at a time while a normal parent exists
    assert len(fetches(p.next_commands())) == SEED_PIECE_LIMIT_WITH_PEERS


def test_a_prioritized_piece_comes_from_the_seed_even_when_peers_are_busy() -> None:
    p = policy(8, s=True, a=False)
    has(p, "s", range(8))
    has(p, "a", [0])
    p.prioritize([5])
    assert sorted(fetches(p.next_commands())) == [(0, "a"), (5, "s")]


def test_a_reader_waits_for_a_busy_normal_holder_rather_than_load_the_seed() -> None:
    # Sixteen lazy readers each taking their hot pieces from the seed made it send 13x what was
    # read (bench/lazyload.py); the seed's uplink is for what nobody else has.
    p = policy(8, s=True, a=False)
    has(p, "s", range(8))
    has(p, "a", [0, 1, 2])
    p.prioritize([0, 1, 2])
    got = fetches(p.next_commands())
    assert [f for f in got if f[1] == "a"] == [(0, "a"), (1, "a")]  # a's two slots
    assert (2, "s") not in got  # 2 waits for a
    assert len([f for f in got if f[1] == "s"]) == SEED_PIECE_LIMIT_WITH_PEERS  # a piece only the seed has


def test_a_seed_alone_gets_its_own_limit() -> None:
    p = policy(8, s=True)
    has(p, "s", range(8))
    assert len(fetches(p.next_commands())) == SEED_PIECE_LIMIT


# -- parents -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("parent_id", "added"), [("new", True), ("me", False), ("a", False), ("bad", False)])
def test_add_parent_skips_itself_known_and_blocked_parents(parent_id: str, added: bool) -> None:
    p = policy(4, a=False, bad=False)
    p.piece_failed(0, "bad", "wrong bytes", integrity=True)
    assert p.add_parent(parent_id, is_seed=False) is added


def test_an_integrity_failure_drops_the_parent_at_once() -> None:
    p = policy(4, a=False, b=False)
    has(p, "a", range(4))
    p.next_commands()
    commands = p.piece_failed(0, "a", "digest mismatch", integrity=True)
    assert commands == [ReportPieceFailed(0, "a", temporary=False), DropParent("a", "digest mismatch"),
                        Reschedule("parent a dropped: digest mismatch", ("a",))]
    assert "a" not in p.parents and "a" in p.blocked
    assert all("a" not in holders for holders in p.holders.values())


def test_other_failures_drop_the_parent_after_the_limit() -> None:
    p = policy(8, a=False)
    has(p, "a", range(8))
    p.next_commands()
    for attempt in range(1, PARENT_FAILURE_LIMIT + 1):
        commands = p.piece_failed(attempt, "a", "HTTP 503", integrity=False)
        assert commands[0] == ReportPieceFailed(attempt, "a", temporary=True)
        assert (DropParent("a", "HTTP 503") in commands) is (attempt == PARENT_FAILURE_LIMIT)


def test_a_failed_piece_is_fetched_again_from_another_holder() -> None:
    p = policy(1, a=False, b=False)
    has(p, "a", [0])
    assert fetches(p.next_commands()) == [(0, "a")]
    has(p, "b", [0])
    p.piece_failed(0, "a", "bad", integrity=True)
    assert fetches(p.next_commands()) == [(0, "b")]


def test_a_parent_that_ends_in_error_is_reported_and_dropped() -> None:
    p = policy(None, a=False)
    p.content_info(4, [0, 1])
    commands = p.parent_ended("a", "UNAVAILABLE: connection refused")
    assert kinds(commands) == ["ReportPieceFailed", "DropParent", "Reschedule"]
    assert commands[0] == ReportPieceFailed(2, "a", temporary=False)  # the first missing piece


def test_a_parent_that_ends_cleanly_stays_but_offers_nothing_new() -> None:
    p = policy(4, a=False)
    has(p, "a", [0])
    assert p.parent_ended("a") == []
    assert "a" in p.parents and not p.has_live_parent()
    assert fetches(p.next_commands()) == [(0, "a")]


def test_events_about_unknown_parents_are_ignored() -> None:
    p = policy(4)
    p.parent_has("ghost", 0)
    assert p.parent_ended("ghost", "gone") == []
    assert p.piece_failed(0, "ghost", "x", integrity=True) == []
    assert p.holders == {}


def test_a_late_result_from_a_dropped_parent_changes_nothing() -> None:
    p = policy(4, a=False, b=False)
    has(p, "a", range(4))
    has(p, "b", range(4))
    p.next_commands()
    p.piece_failed(0, "a", "bad", integrity=True)
    in_flight = dict(p.in_flight)
    assert p.piece_failed(1, "a", "bad", integrity=True) == []
    assert {n: parent for n, parent in p.in_flight.items() if parent == "b"} == {
        n: parent for n, parent in in_flight.items() if parent == "b"}


# -- stalls, reschedule, back-to-source ----------------------------------------------------------


def test_stall_asks_once_for_parents_then_backs_to_source_after_the_timeout() -> None:
    p = policy(4, a=False)
    p.parent_ended("a")  # nothing more will come
    assert p.next_commands() == [Reschedule("parents have no more pieces for us")]
    assert p.next_commands() == []  # asked once; waiting
    advance(p, SCHEDULE_TIMEOUT)
    assert p.next_commands() == []
    advance(p, 0.1)
    assert p.next_commands() == [BackToSource("parents could not provide every piece")]


def test_new_work_ends_a_stall() -> None:
    p = policy(4)
    assert kinds(p.next_commands()) == ["Reschedule"]
    advance(p, SCHEDULE_TIMEOUT - 1)
    assert p.add_parent("a", is_seed=False)
    has(p, "a", [0])
    assert fetches(p.next_commands()) == [(0, "a")]
    assert p.stalled_since is None
    p.piece_succeeded(0, "a")
    p.parent_ended("a")
    advance(p, SCHEDULE_TIMEOUT - 1)  # a new stall starts its own clock
    assert p.next_commands() == []


def starved() -> DownloadPolicy:
    """A whole download whose one live parent has announced nothing it lacks (piece 0, fetched)."""
    p = policy(4, a=False)
    has(p, "a", [0])
    assert fetches(p.next_commands()) == [(0, "a")]
    p.piece_succeeded(0, "a")
    assert p.next_commands() == []  # starved from now: the parent may get more from its own
    return p


@pytest.mark.parametrize(
    ("scheduler_alive", "expected"),
    [
        (True, Reschedule(f"for {SCHEDULE_TIMEOUT:.0f}s no parent has had a piece this peer lacks")),
        (False, BackToSource(f"for {SCHEDULE_TIMEOUT:.0f}s no parent had a piece this peer lacks, and the "
                             "scheduler is gone")),
    ],
)
def test_live_parents_with_nothing_new_for_the_timeout_are_a_starvation(
        scheduler_alive: bool, expected: Command) -> None:
    p = starved()
    if not scheduler_alive:
        p.scheduler_lost()
    advance(p, SCHEDULE_TIMEOUT - 0.1)
    assert p.next_commands() == []
    assert p.next_wake() == pytest.approx(p.clock.time() + 0.1)  # the engine looks again then
    advance(p, 0.1)
    assert p.next_commands() == [expected]


def test_a_starved_peer_asks_the_scheduler_again_after_as_long() -> None:
    p = starved()
    advance(p, SCHEDULE_TIMEOUT)
    assert kinds(p.next_commands()) == ["Reschedule"]
    assert p.next_commands() == []
    advance(p, SCHEDULE_TIMEOUT)
    assert kinds(p.next_commands()) == ["Reschedule"]


def test_an_announcement_ends_a_starvation_and_the_next_one_starts_its_own_clock() -> None:
    p = starved()
    advance(p, SCHEDULE_TIMEOUT - 1)
    has(p, "a", [1])
    assert fetches(p.next_commands()) == [(1, "a")]
    advance(p, 2)  # in flight: not starved
    assert p.next_commands() == []
    p.piece_succeeded(1, "a")
    assert p.next_commands() == []
    advance(p, SCHEDULE_TIMEOUT - 0.1)
    assert p.next_commands() == []


def test_a_range_read_without_prefetch_is_never_starved() -> None:
    p = policy(4, everything=False, a=False)  # it wants only what its readers ask for
    p.want([2])
    advance(p, 10 * SCHEDULE_TIMEOUT)
    assert p.next_commands() == []
    assert p.next_wake() is None


def test_without_the_scheduler_a_stall_backs_to_source_at_once() -> None:
    p = policy(4)
    p.scheduler_lost()
    assert p.next_commands() == [BackToSource("parents could not provide every piece")]


def test_the_scheduler_saying_back_to_source_wins() -> None:
    p = policy(4, a=False)
    has(p, "a", range(4))
    p.scheduler_says_back_to_source("")
    assert p.next_commands() == [BackToSource("scheduler said so")]


def test_pieces_in_flight_are_not_a_stall() -> None:
    p = policy(4, a=False)
    has(p, "a", [0])
    p.next_commands()
    p.parent_ended("a")
    advance(p, 10 * SCHEDULE_TIMEOUT)
    assert p.next_commands() == []


def test_a_failed_task_gives_up_instead_of_going_to_the_origin() -> None:
    p = policy(4, a=False)
    has(p, "a", range(2))
    p.next_commands()
    p.scheduler_failed_task("origin answered 404 Not Found for http://o/x")
    assert p.next_commands() == [GiveUp("origin answered 404 Not Found for http://o/x")]
    advance(p, SCHEDULE_TIMEOUT * 10)
    assert kinds(p.next_commands()) == ["GiveUp"]  # never BackToSource: that would ask the origin again


def test_a_finished_download_ignores_a_late_task_failure() -> None:
    p = policy(1)
    p.piece_succeeded(0, "")
    p.scheduler_failed_task("origin answered 404 Not Found for http://o/x")
    assert p.next_commands() == [Finished()]


# -- after a dispatch that found nothing more, only announcements are looked at -------------------


@pytest.mark.parametrize(("scenario", "expected"), [
    # the parent that announces has a free slot: its piece is fetched at once
    ("announce from free parent", [(5, "b")]),
    # the announcer is full (PARENT_PIECE_LIMIT pieces in flight): nothing, as a full dispatch says
    ("announce from full parent", []),
    # a piece already here is announced: nothing
    ("announce finished piece", []),
    # a busy parent's backoff ends with no event at all: what it announced before is fetched then
    ("busy parent's backoff ends", [(6, "c")]),
])
def test_announcements_after_an_idle_dispatch_give_the_decisions_of_a_full_one(
    scenario: str, expected: list[tuple[int, str]]
) -> None:
    p = policy(8, a=False, b=False, c=False)
    has(p, "a", range(PARENT_PIECE_LIMIT))
    p.piece_succeeded(7, "a")  # a piece of our own, not from a parent's slot
    assert sorted(fetches(p.next_commands())) == [(n, "a") for n in range(PARENT_PIECE_LIMIT)]  # "a" is full
    has(p, "c", [6])
    assert fetches(p.next_commands()) == [(6, "c")]  # "c" is asked for piece 6 ...
    p.piece_busy(6, "c")  # ... and says its uplink is full: left alone for PARENT_BUSY_BACKOFF
    assert fetches(p.next_commands()) == []  # nothing else to fetch: the policy is idle
    if scenario == "announce from free parent":
        p.parent_has("b", 5)
    elif scenario == "announce from full parent":
        p.parent_has("a", 5)
    elif scenario == "announce finished piece":
        p.parent_has("b", 7)
    else:
        assert isinstance(p.clock, ManualClock)
        p.clock.advance(PARENT_BUSY_BACKOFF)
    assert fetches(p.next_commands()) == expected


# -- the dispatch's shortcuts and incremental sets give the decisions of a full look ---------------


class FullLookPolicy(DownloadPolicy):
    """The policy without its idle shortcut: every dispatch looks at every parent and piece."""

    def _dispatch(self) -> list[FetchPiece]:
        self._changed()  # as if the last dispatch had found more to do
        return super()._dispatch()


def assert_incremental_sets_match_a_rescan(p: DownloadPolicy) -> None:
    """The sets the policy keeps up to date, against what a scan of its parents says (no side effect)."""
    now = p.clock.time()
    normal = {parent_id for parent_id, parent in p.parents.items() if not parent.is_seed}
    seed_limit = policy_module.SEED_PIECE_LIMIT_WITH_PEERS if normal else policy_module.SEED_PIECE_LIMIT
    assert p._normal_parents == normal
    assert p._loaded_normal_parents == {parent_id for parent_id in normal if p.parents[parent_id].in_flight}
    assert p._parents_with_slot == {
        parent_id for parent_id, parent in p.parents.items()
        if parent.in_flight < (seed_limit if parent.is_seed else PARENT_PIECE_LIMIT)
    }
    backing_off = {parent_id: parent.busy_until for parent_id, parent in p.parents.items() if parent.busy_until > now}
    assert {parent_id: until for parent_id, until in p._backing_off.items() if until > now} == backing_off
    assert p._first_backoff_end <= min(backing_off.values(), default=float("inf"))


@pytest.mark.parametrize(("scenario", "expected"), [
    # "a" answers busy for piece 0; "b" has it and a free slot: asked at once
    ("busy, another holder free", [(0, "b")]),
    # "a" answers busy and nobody else has piece 0: nothing until its backoff ends
    ("busy, no other holder", []),
    # a transfer ends while the concurrency limit held pieces back: the next one goes
    ("transfer ends under the limit", [(2, "b")]),
    # the only busy normal parent's transfer ends: the seed may serve what normal parents hold
    ("last normal transfer ends", [(2, "s")]),
])
def test_a_transfer_that_ends_after_an_idle_dispatch_gives_the_decisions_of_a_full_one(
    scenario: str, expected: list[tuple[int, str]]
) -> None:
    if scenario == "busy, another holder free":
        p = policy(4, a=False, b=False, c=False)
        has(p, "a", [0])
        has(p, "c", [1])
        assert sorted(fetches(p.next_commands())) == [(0, "a"), (1, "c")]
        has(p, "b", [0])
        assert fetches(p.next_commands()) == []  # idle: piece 0 is in flight
        p.piece_busy(0, "a")
    elif scenario == "busy, no other holder":
        p = policy(4, a=False, b=False)
        has(p, "a", [0])
        has(p, "b", [1])
        assert sorted(fetches(p.next_commands())) == [(0, "a"), (1, "b")]
        p.piece_busy(0, "a")
    elif scenario == "transfer ends under the limit":
        p = policy(4, concurrent=2, a=False, b=False)
        p.prioritize([0, 1, 2])
        has(p, "a", [0])
        has(p, "b", [1, 2])
        assert fetches(p.next_commands()) == [(0, "a"), (1, "b")]  # piece 2 waits for the limit only
        p.piece_succeeded(0, "a")  # "a" has nothing more, piece 0 is here: only the limit changed
    else:
        p = policy(4, a=False, b=False, s=True)
        has(p, "a", [0])
        has(p, "b", [2])
        has(p, "s", [2])
        assert sorted(fetches(p.next_commands())) == [(0, "a"), (2, "b")]
        p.piece_busy(2, "b")
        assert fetches(p.next_commands()) == []  # "a" keeps us busy: piece 2 waits for "b", not the seed
        p.piece_succeeded(0, "a")
    assert fetches(p.next_commands()) == expected


@pytest.mark.parametrize(("walk_seed", "concurrent", "seed_limits", "everything", "lazily"), [
    (1, 16, (1, 1), True, False),
    (2, 4, (1, 1), True, False),
    (3, 2, (1, 1), True, False),
    (4, 3, (3, 1), True, False),  # a seed alone takes more than beside normal parents
    (5, 16, (1, 1), False, False),
    (6, 2, (2, 1), False, False),
    (7, 4, (1, 1), True, True),
    (8, 16, (1, 1), False, True),
])
def test_random_events_give_the_decisions_of_a_full_look_and_keep_the_sets_true(
    monkeypatch: pytest.MonkeyPatch, walk_seed: int, concurrent: int, seed_limits: tuple[int, int],
    everything: bool, lazily: bool
) -> None:
    """A walk of random events on the policy and on one without its shortcut: the same commands
    after every event, and the incremental sets always match a scan."""
    monkeypatch.setattr(policy_module, "SEED_PIECE_LIMIT", seed_limits[0])
    monkeypatch.setattr(policy_module, "SEED_PIECE_LIMIT_WITH_PEERS", seed_limits[1])
    walk = random.Random(walk_seed)
    clock = ManualClock()
    settings: dict[str, Any] = {"peer_id": "me", "clock": clock, "concurrent_pieces": concurrent,
                                "schedule_timeout": SCHEDULE_TIMEOUT, "want_everything": everything,
                                "read_lazily": lazily}
    fast = DownloadPolicy(rng=random.Random(walk_seed), **settings)
    full = FullLookPolicy(rng=random.Random(walk_seed), **settings)
    pieces = 12
    parent_ids = ["a", "b", "c", "d", "e", "f", "s", "t"]
    transfers: list[tuple[int, str]] = []
    both = (fast, full)
    for p in both:
        p.content_info(pieces)
        p.add_parent("s", is_seed=True)  # a seed alone first: the first normal parent changes its limit
    for _ in range(2000):
        event = walk.choice(["announce", "announce", "announce", "dispatch", "dispatch", "succeed", "busy",
                             "busy", "fail", "advance", "advance", "parent", "end", "wake", "want"])
        commands: list[list[Command]] = []
        if event == "announce":
            parent_id, number = walk.choice(parent_ids), walk.randrange(pieces)
            for p in both:
                p.parent_has(parent_id, number)
        elif event == "dispatch":
            commands = [p.next_commands() for p in both]
            transfers += [(c.number, c.parent_id) for c in commands[0] if isinstance(c, FetchPiece)]
        elif event in ("succeed", "busy", "fail") and transfers:
            number, parent_id = transfers.pop(walk.randrange(len(transfers)))
            integrity = walk.random() < 0.2
            for p in both:
                if event == "succeed":
                    p.piece_succeeded(number, parent_id)
                elif event == "busy":
                    p.piece_busy(number, parent_id)
                else:
                    commands.append(p.piece_failed(number, parent_id, "reset", integrity=integrity))
        elif event == "advance":
            clock.advance(walk.choice([0.05, 0.1, PARENT_BUSY_BACKOFF, 0.3]))
        elif event == "parent":
            parent_id, is_seed = walk.choice(parent_ids), walk.random() < 0.3
            assert fast.add_parent(parent_id, is_seed=is_seed) == full.add_parent(parent_id, is_seed=is_seed)
        elif event == "end":
            parent_id, error = walk.choice(parent_ids), walk.choice(["", "", "stream reset"])
            commands = [p.parent_ended(parent_id, error) for p in both]
        elif event == "wake":
            assert fast.next_wake() == full.next_wake()
        else:
            numbers = walk.sample(range(pieces), 2)
            for p in both:
                p.want(numbers[:1])
                p.prioritize(numbers[1:])
        if commands:
            assert commands[0] == commands[1], event
        assert fast.in_flight == full.in_flight
        assert_incremental_sets_match_a_rescan(fast)
