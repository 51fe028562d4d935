"""Demand in the pure download policy, on a ManualClock: a reader's unannounced pieces are asked of
a seed, and the back-sourcer's origin queue puts them first (issue 10)."""

from __future__ import annotations

import random

import pytest

from common.clock import ManualClock
from peer.download.policy import (
    BACKGROUND_PIECES_UNDER_DEMAND,
    BACKGROUND_UNDER_DEMAND,
    DEMAND_LIMIT,
    DEMAND_RETRY,
    ORIGIN,
    ORIGIN_FALLBACK_WAIT,
    PARENT_BUSY_BACKOFF,
    READERS_QUIET,
    DownloadPolicy,
    DropParent,
    FetchFromOrigin,
    FetchPiece,
    ReportPieceFailed,
)


def policy(pieces: int = 16, *, everything: bool = True, concurrent: int = 16, **parents: bool) -> DownloadPolicy:
    """A policy on a manual clock; ``parents`` maps parent id -> is_seed."""
    p = DownloadPolicy(peer_id="me", clock=ManualClock(), rng=random.Random(0), concurrent_pieces=concurrent,
                       schedule_timeout=10.0, want_everything=everything)
    p.content_info(pieces)
    for parent_id, is_seed in parents.items():
        assert p.add_parent(parent_id, is_seed=is_seed)
    return p


def fetches(p: DownloadPolicy) -> list[tuple[int, str]]:
    return [(c.number, c.parent_id) for c in p.next_commands() if isinstance(c, FetchPiece)]


def advance(p: DownloadPolicy, seconds: float) -> None:
    assert isinstance(p.clock, ManualClock)
    p.clock.advance(seconds)


# -- a child asks a seed for what a reader waits for --------------------------------------------


@pytest.mark.parametrize(("parents", "prioritized", "announced", "expected"), [
    # a seed that announced nothing yet is asked for the waiting pieces, in number order
    ({"seed": True}, [9, 3], {}, [(3, "seed"), (9, "seed")]),
    # without a reader waiting, nothing is asked before it is announced
    ({"seed": True}, [], {}, []),
    # a normal parent is never asked for a piece it did not announce
    ({"peer": False}, [3], {}, []),
    # an announced piece goes the normal way (to its holder), the other is demanded of the seed
    ({"seed": True, "peer": False}, [3, 4], {3: "peer"}, [(3, "peer"), (4, "seed")]),
    # with two seeds, the demands are spread
    ({"s1": True, "s2": True}, [1, 2], {}, [(1, "s1"), (2, "s2")]),
])
def test_waiting_pieces_no_parent_announced_are_asked_of_a_seed(
        parents: dict[str, bool], prioritized: list[int], announced: dict[int, str],
        expected: list[tuple[int, str]]) -> None:
    p = policy(**parents)
    for number, holder in announced.items():
        p.parent_has(holder, number)
    p.prioritize(prioritized)
    if not prioritized:
        p.want_everything = False  # nothing wanted: only the demand rule could fetch anything
    assert sorted(fetches(p)) == sorted(expected)


def test_only_wanted_pieces_are_demanded_in_a_range_download() -> None:
    p = policy(everything=False, seed=True)
    p.want([2])
    p.prioritize([2, 5])  # 5 is not wanted by this download
    assert fetches(p) == [(2, "seed")]


def test_demands_are_bounded_and_not_repeated_while_in_flight() -> None:
    p = policy(pieces=32, seed=True)
    p.prioritize(range(32))
    first = fetches(p)
    assert len(first) == DEMAND_LIMIT
    assert fetches(p) == []  # all still in flight
    p.piece_succeeded(first[0][0], "seed")
    assert fetches(p) == [(DEMAND_LIMIT, "seed")]  # one done: the next waiting piece


def test_demands_do_not_take_the_seeds_slots_for_announced_pieces() -> None:
    p = policy(seed=True)
    p.prioritize(range(8))
    assert len(fetches(p)) == 8
    p.parent_has("seed", 12)
    assert fetches(p) == [(12, "seed")]  # the seed's own piece limit is untouched by the demands


def test_a_refused_demand_is_asked_again_later_without_blaming_the_seed() -> None:
    p = policy(seed=True)
    p.prioritize([4])
    assert fetches(p) == [(4, "seed")]
    # refused three times (HTTP 404: not fetched there, or not in time): never reported, never dropped
    for _ in range(3):
        assert p.piece_failed(4, "seed", "HTTP 404", integrity=False) == []
        assert fetches(p) == []
        advance(p, DEMAND_RETRY - 0.01)
        assert fetches(p) == []
        advance(p, 0.01)
        assert fetches(p) == [(4, "seed")]
    assert "seed" in p.parents and p.parents["seed"].failures == 0


def test_a_demanded_piece_with_wrong_bytes_drops_the_seed() -> None:
    p = policy(seed=True)
    p.prioritize([4])
    fetches(p)
    commands = p.piece_failed(4, "seed", "digest mismatch", integrity=True)
    assert ReportPieceFailed(4, "seed", temporary=False) in commands
    assert any(isinstance(c, DropParent) for c in commands)
    assert "seed" not in p.parents


def test_a_demanded_piece_that_arrives_is_finished() -> None:
    p = policy(pieces=1, seed=True)
    p.prioritize([0])
    assert fetches(p) == [(0, "seed")]
    p.piece_succeeded(0, "seed")
    assert p.is_finished() and not p.in_flight and not p.demanded


def test_a_seed_whose_announcements_ended_is_not_asked() -> None:
    p = policy(seed=True)
    p.parent_ended("seed")
    p.prioritize([3])
    assert fetches(p) == []


# -- the back-sourcer's origin queue -------------------------------------------------------------


@pytest.mark.parametrize(("queue", "running", "prioritized", "limit", "started"), [
    # no demand: the blob in order, up to the limit
    ([0, 1, 2, 3], [], [], 2, [0, 1]),
    ([2, 3], [0, 1], [], 2, []),
    # a demanded piece starts at once, even with every slot taken by the blob
    ([2, 3, 9], [0, 1], [9], 2, [9]),
    # while demand waits or runs, the blob keeps only BACKGROUND_UNDER_DEMAND fetches going
    ([0, 1, 2, 9], [], [9], 4, [9, *range(BACKGROUND_UNDER_DEMAND)]),
    ([1, 2, 3], [0, 9], [9], 4, []),
    # demand itself is bounded by the limit
    ([5, 6, 7], [1, 2], [1, 2, 5, 6, 7], 2, []),
])
def test_origin_queue_puts_demand_first(queue: list[int], running: list[int], prioritized: list[int], limit: int,
                                        started: list[int]) -> None:
    p = policy()
    p.prioritize(prioritized)
    now_running = list(running)
    got = []
    while (number := p.next_origin_fetch(queue, now_running, limit)) is not None:
        got.append(number)
        now_running.append(number)
    assert got == started
    assert not set(got) & set(queue)  # what starts leaves the queue


def test_the_blob_fills_the_origin_link_again_once_demand_is_served() -> None:
    p = policy()
    p.prioritize([9])
    queue, running = [0, 1, 2, 3, 9], [9]
    queue.remove(9)
    assert p.next_origin_fetch(queue, running, 4) == 0
    assert p.next_origin_fetch(queue, [9, 0], 4) is None  # demand runs: one background fetch
    assert p.next_origin_fetch(queue, [0], 4) == 1  # demand done: the blob takes the link again


# -- no seed to ask: the node fetches a waiting piece from the origin itself ---------------------


def range_download(**parents: bool) -> DownloadPolicy:
    p = policy(everything=False, **parents)
    p.want([5])
    p.prioritize([5])
    return p


def origin_fetches(p: DownloadPolicy) -> list[int]:
    return [c.number for c in p.next_commands() if isinstance(c, FetchFromOrigin)]


def test_a_waiting_piece_no_parent_has_comes_from_the_origin_when_no_seed_can_be_asked() -> None:
    p = range_download(peer=False)
    advance(p, ORIGIN_FALLBACK_WAIT - 0.01)
    assert origin_fetches(p) == []  # the parents get their chance first
    advance(p, 0.01)
    assert origin_fetches(p) == [5]
    assert origin_fetches(p) == []  # in flight
    p.piece_succeeded(5, ORIGIN)
    assert p.is_finished()


def test_a_failed_origin_fetch_waits_as_long_again() -> None:
    p = range_download(peer=False)
    advance(p, ORIGIN_FALLBACK_WAIT)
    assert origin_fetches(p) == [5]
    assert p.piece_failed(5, ORIGIN, "HTTP 503", integrity=False) == []
    assert origin_fetches(p) == []
    advance(p, ORIGIN_FALLBACK_WAIT)
    assert origin_fetches(p) == [5]


@pytest.mark.parametrize("case", ["seed parent", "a parent has it", "back-to-source forbidden", "whole download"])
def test_no_origin_fetch_when_someone_else_can_give_the_piece(case: str) -> None:
    p = range_download(peer=False, seed=case == "seed parent")
    if case == "a parent has it":
        p.parent_has("peer", 5)
    if case == "back-to-source forbidden":
        p.origin_allowed = False
    if case == "whole download":
        p.want_all()
    advance(p, 10 * ORIGIN_FALLBACK_WAIT)
    assert origin_fetches(p) == []


def test_a_lazily_read_blob_keeps_its_origin_fetches_behind_readers() -> None:
    # Range reads with prefetch: the whole blob comes, but never more than a few pieces at once,
    # so a read that arrives does not queue behind a burst of prefetch on the origin link.
    p = policy()
    p.read_lazily = True
    queue, running = list(range(16)), []
    while (number := p.next_origin_fetch(queue, running, 8)) is not None:
        running.append(number)
    assert running == list(range(BACKGROUND_PIECES_UNDER_DEMAND))
    p.prioritize([9])
    assert p.next_origin_fetch(queue, running, 8) == 9  # a reader's piece still starts at once


def test_a_lazily_read_blob_fetches_the_rest_from_the_origin_once_its_readers_went_quiet() -> None:
    p = policy()
    p.read_lazily = True
    queue: list[int] = list(range(16))
    p.prioritize([9])  # a child's demand
    assert p.next_origin_fetch(queue, [], 8) == 9
    assert p.next_origin_fetch(queue, [9], 8) is None  # the origin link is the reader's
    p.piece_succeeded(9, ORIGIN)
    assert p.next_origin_fetch(queue, [], 8) is None  # no demand now, but one a moment ago
    assert p.next_wake() == pytest.approx(p.clock.time() + READERS_QUIET)
    advance(p, READERS_QUIET)
    running: list[int] = []
    while (number := p.next_origin_fetch(queue, running, 8)) is not None:
        running.append(number)
    assert running == list(range(BACKGROUND_PIECES_UNDER_DEMAND))


@pytest.mark.parametrize(("read_lazily", "waiting", "background"), [
    (False, [], 16),  # a whole download: every slot
    (False, [20], BACKGROUND_PIECES_UNDER_DEMAND),  # a reader waits: the rest stays behind
    (True, [], BACKGROUND_PIECES_UNDER_DEMAND),  # read in Range reads: the prefetch stays behind
])
def test_prefetch_stays_behind_readers_on_the_downlink(read_lazily: bool, waiting: list[int],
                                                       background: int) -> None:
    p = policy(pieces=32, a=False, b=False, c=False, d=False, e=False, f=False, g=False, h=False)
    p.read_lazily = read_lazily
    for parent in "abcdefgh":
        for number in range(32):
            p.parent_has(parent, number)
    p.prioritize(waiting)
    got = [number for number, _ in fetches(p)]
    assert set(waiting) <= set(got)  # the reader's pieces go, whatever the cap
    assert len([n for n in got if n not in waiting]) == background


def test_a_lazily_read_blob_prefetches_only_once_its_readers_went_quiet() -> None:
    """Range reads with prefetch: between the reads of a cold start no piece nobody asked for
    starts; once the readers asked for nothing for READERS_QUIET, the prefetch goes on (at the
    background limit), and the policy says when to look again."""
    p = policy(pieces=32, a=False, b=False, c=False, d=False)
    p.read_lazily = True
    for parent in "abcd":
        for number in range(32):
            p.parent_has(parent, number)
    p.prioritize([5])
    assert [number for number, _ in fetches(p)] == [5]  # the reader's piece alone
    p.piece_succeeded(5, p.in_flight[5])
    advance(p, READERS_QUIET / 2)
    p.prioritize([6])  # the next read of the burst (its piece: held back too until then)
    assert [number for number, _ in fetches(p)] == [6]
    p.piece_succeeded(6, p.in_flight[6])
    assert fetches(p) == []  # no reader waits, but they were active a moment ago
    assert p.next_wake() == pytest.approx(p.clock.time() + READERS_QUIET)
    advance(p, READERS_QUIET)
    assert len(fetches(p)) == BACKGROUND_PIECES_UNDER_DEMAND  # quiet: the prefetch goes on
    assert p.next_wake() is None


def test_a_whole_read_joining_a_lazily_read_blob_does_not_wait_for_its_readers() -> None:
    p = policy(pieces=32, concurrent=8, a=False, b=False, c=False, d=False)
    p.read_lazily = True
    for parent in "abcd":
        for number in range(32):
            p.parent_has(parent, number)
    p.prioritize([5])
    assert [number for number, _ in fetches(p)] == [5]
    p.piece_succeeded(5, p.in_flight[5])
    assert fetches(p) == []  # readers active a moment ago: the rest waits
    p.whole_read_joined()  # a dfget of the same blob
    assert len(fetches(p)) == 4 * 2  # every parent's slots (PARENT_PIECE_LIMIT) at once


def test_a_demand_the_seed_sent_to_another_child_is_asked_again_soon_without_blame() -> None:
    p = policy(everything=False, seed=True)
    p.want([3])
    p.prioritize([3])
    assert fetches(p) == [(3, "seed")]  # a demand: nobody announced it
    p.piece_busy(3, "seed")  # the seed sent it to another child, who will announce it
    assert p.parents["seed"].busy_until == 0.0 and p.parents["seed"].failures == 0
    assert fetches(p) == []
    assert p.next_wake() == pytest.approx(p.clock.time() + PARENT_BUSY_BACKOFF)
    advance(p, PARENT_BUSY_BACKOFF)
    assert fetches(p) == [(3, "seed")]
