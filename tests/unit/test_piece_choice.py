"""Issue 11's piece choice in the download policy: rarest first among the parents a peer sees,
and a seed kept to one piece at a time once normal parents exist."""

from __future__ import annotations

import random

import pytest

from common.clock import ManualClock
from peer.download.policy import PARENT_BUSY_BACKOFF, SEED_PIECE_LIMIT, DownloadPolicy, FetchPiece


def policy(pieces: int = 4, concurrent: int = 16) -> DownloadPolicy:
    p = DownloadPolicy(peer_id="me", clock=ManualClock(), rng=random.Random(7), concurrent_pieces=concurrent,
                       schedule_timeout=10.0)
    p.content_info(pieces)
    return p


# holders per parent -> the piece fetched first (one piece at a time)
@pytest.mark.parametrize(("holdings", "first"), [
    ({"a": [0, 1, 2], "b": [0, 1], "c": [0]}, 2),  # 2 has one holder, 1 two, 0 three
    ({"a": [3, 1], "b": [3], "c": [3]}, 1),
    ({"a": [0], "b": [0, 2], "c": [0, 2]}, 2),  # 0 is everywhere, 2 rarer
])
def test_the_rarest_piece_goes_first(holdings: dict[str, list[int]], first: int) -> None:
    for seed in range(10):  # whatever the peer's own shuffled order
        p = DownloadPolicy(peer_id="me", clock=ManualClock(), rng=random.Random(seed), concurrent_pieces=1,
                           schedule_timeout=10.0)
        p.content_info(4)
        for parent, numbers in holdings.items():
            p.add_parent(parent, is_seed=False)
            for n in numbers:
                p.parent_has(parent, n)
        (command,) = p.next_commands()
        assert isinstance(command, FetchPiece) and command.number == first, seed


def test_equally_rare_pieces_are_taken_in_each_peers_own_order() -> None:
    firsts = set()
    for seed in range(20):
        p = DownloadPolicy(peer_id=f"me{seed}", clock=ManualClock(), rng=random.Random(seed), concurrent_pieces=1,
                           schedule_timeout=10.0)
        p.content_info(8)
        p.add_parent("a", is_seed=False)
        for n in range(8):
            p.parent_has("a", n)
        (command,) = p.next_commands()
        assert isinstance(command, FetchPiece)
        firsts.add(command.number)
    assert len(firsts) >= 4  # neighbours start on different pieces


def test_a_lone_seed_serves_one_piece_at_a_time() -> None:
    p = policy(pieces=8)
    p.add_parent("seed", is_seed=True)
    for n in range(8):
        p.parent_has("seed", n)
    fetched = [c for c in p.next_commands() if isinstance(c, FetchPiece)]
    # a seed's uplink is shared by its children: several pieces at once from it finish late, all together
    assert len(fetched) == SEED_PIECE_LIMIT == 1


def test_a_busy_parent_is_left_alone_for_a_while_and_its_piece_taken_elsewhere() -> None:
    p = policy(pieces=2, concurrent=1)
    for parent in ("a", "b"):
        p.add_parent(parent, is_seed=False)
    p.parent_has("a", 0)
    (first,) = p.next_commands()
    assert isinstance(first, FetchPiece) and (first.number, first.parent_id) == (0, "a")
    p.piece_busy(0, "a")  # its uplink is full: no failure, no report
    assert p.parents["a"].failures == 0 and 0 not in p.in_flight
    assert p.next_commands() == []  # only a has piece 0
    assert p.next_wake() == pytest.approx(p.clock.time() + PARENT_BUSY_BACKOFF)
    p.parent_has("b", 0)
    (second,) = p.next_commands()
    assert isinstance(second, FetchPiece) and (second.number, second.parent_id) == (0, "b")
    p.piece_busy(0, "b")
    assert isinstance(p.clock, ManualClock)
    p.clock.advance(PARENT_BUSY_BACKOFF)
    assert p.next_wake() is None
    (third,) = p.next_commands()
    assert isinstance(third, FetchPiece) and third.number == 0
