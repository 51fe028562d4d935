"""Which task geometry a child believes (peer.download.geometry): bounds, and the back-sourcer's word."""

from __future__ import annotations

import pytest

from common.pieces import (
    MAX_PIECE_COUNT,
    MAX_PIECE_LENGTH,
    MIB,
    MIN_PIECE_LENGTH,
    SWARM_MIN_PIECE_LENGTH,
    piece_count,
    piece_length_for,
)
from peer.download.geometry import (
    MAX_CONTENT_LENGTH,
    KnownPiece,
    SchedulerView,
    claim_problem,
    origin_piece_length,
    view_from_task,
)

SIZE = 10 * MIN_PIECE_LENGTH + 123  # 11 pieces of the smallest length
PIECE = MIN_PIECE_LENGTH
BACK_SOURCED = SchedulerView(SIZE, (KnownPiece(0, 0, PIECE), KnownPiece(10, 10 * PIECE, 123)))
HALF_WAY = SchedulerView(None, (KnownPiece(0, 0, PIECE), KnownPiece(3, 3 * PIECE, PIECE)))


@pytest.mark.parametrize(
    ("content_length", "piece_length", "view", "problem"),
    [
        (SIZE, PIECE, None, None),
        (SIZE, PIECE, BACK_SOURCED, None),
        (SIZE, PIECE, HALF_WAY, None),
        (SIZE, PIECE, SchedulerView(None), None),
        # the rogue parent: 2^40 bytes in 1-byte pieces
        (1 << 40, 1, None, "piece length 1 is outside"),
        (1 << 40, 1, BACK_SOURCED, "piece length 1 is outside"),
        (SIZE, MAX_PIECE_LENGTH * 2, None, "is outside"),
        (MAX_CONTENT_LENGTH + 1, MAX_PIECE_LENGTH, None, "content length"),
        (-1, PIECE, None, "content length"),
        (MAX_PIECE_COUNT * PIECE + 1, PIECE, None, "more than"),
        # cut short at a piece boundary: only the back-sourcer's word shows it
        (10 * PIECE, PIECE, BACK_SOURCED, "but the back-sourcer's is"),
        (4 * PIECE, PIECE, HALF_WAY, None),
        (3 * PIECE, PIECE, HALF_WAY, "reported piece 3"),
        (SIZE, 2 * PIECE, HALF_WAY, "piece 0 at"),
        (SIZE + 1, PIECE, SchedulerView(None, (KnownPiece(10, 10 * PIECE, 123),)), "piece 10 at"),
    ],
)
def test_claims(content_length: int, piece_length: int, view: SchedulerView | None, problem: str | None) -> None:
    found = claim_problem(content_length, piece_length, view)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_zero_bytes_in_the_schedulers_answer_mean_not_known_yet() -> None:
    assert view_from_task(0, ()).content_length is None
    assert view_from_task(SIZE, [KnownPiece(0, 0, PIECE)]) == SchedulerView(SIZE, (KnownPiece(0, 0, PIECE),))


@pytest.mark.parametrize(
    ("content_length", "requested", "expected"),
    [
        (SIZE, None, SWARM_MIN_PIECE_LENGTH),
        (SIZE, 8 * MIB, 8 * MIB),
        (MAX_PIECE_COUNT * MIN_PIECE_LENGTH + 1, MIN_PIECE_LENGTH, 2 * MIN_PIECE_LENGTH),  # grown to fit the cap
        (MAX_CONTENT_LENGTH, None, MAX_PIECE_LENGTH),
    ],
)
def test_origin_piece_length(content_length: int, requested: int | None, expected: int) -> None:
    length = origin_piece_length(content_length, requested)
    assert length == expected
    assert piece_count(content_length, length) <= MAX_PIECE_COUNT


def test_content_beyond_the_bounds_is_refused() -> None:
    with pytest.raises(ValueError, match="larger than"):
        origin_piece_length(MAX_CONTENT_LENGTH + 1, None)


@pytest.mark.parametrize(
    ("content_length", "lazy", "expected"),
    [
        (None, False, 4 * MIB),
        (9 * MIB, False, 1 * MIB),  # a small content: as many pieces as 1 MiB allows
        (64 * MIB, False, 1 * MIB),  # 64 pieces, not 16 of 4 MiB: every peer of 16 has some to trade
        (128 * MIB, False, 2 * MIB),
        (256 * MIB, False, 4 * MIB),  # Dragonfly's length, which already makes 64 pieces
        (4 * 1024 * MIB, False, 16 * MIB),  # size/500 rounded up to a power of two
        (256 * MIB, True, MIB // 2),  # read in Range reads: half nydusd's chunk size
        (4 * 1024 * MIB, True, MIB // 2),
    ],
)
def test_default_piece_lengths(content_length: int | None, lazy: bool, expected: int) -> None:
    assert piece_length_for(content_length, lazy=lazy) == expected
    if content_length:
        assert origin_piece_length(content_length, None, lazy=lazy) == expected


def test_a_huge_content_read_lazily_still_fits_the_piece_cap() -> None:
    length = origin_piece_length(MAX_PIECE_COUNT * MIN_PIECE_LENGTH + 1, None, lazy=True)
    assert length == 2 * MIN_PIECE_LENGTH
