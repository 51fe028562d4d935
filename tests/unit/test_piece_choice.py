"""Issue 11's piece choice in the download policy: rarest first among the parents a peer sees,
and a seed kept to one piece at a time once normal parents exist."""

from __future__ import annotations

import random

import pytest

from common.clock import ManualClock
from peer.download.policy import SEED_PIECE_LIMIT, DownloadPolicy, FetchPiece


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
