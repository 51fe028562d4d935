"""A task's geometry (content length, piece length): who may define it, and what is believable.

Only the peer that back-sources a task learns its length from the origin; everyone else hears it
second-hand. A parent's ``StatTask`` is a claim, never a definition (issue 12 items 2 and 7): a
rogue parent that announced 2^40 bytes in 1-byte pieces, or a content cut short at a piece
boundary, would otherwise size every child's task. So a claim is checked here, purely:

* against bounds: the piece length within [MIN_PIECE_LENGTH, MAX_PIECE_LENGTH], at most
  MAX_PIECE_COUNT pieces;
* against what the scheduler relays from the back-sourcer (its ``StatTask``): the content length
  once the back-sourcer finished, and every piece it reported (number, offset, length) must sit
  exactly where the claimed geometry puts it.

The back-sourcer's own choice goes through :func:`origin_piece_length`, which keeps its pieces
within the same bounds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from common.pieces import MAX_PIECE_COUNT, MAX_PIECE_LENGTH, MIN_PIECE_LENGTH, piece_count, piece_length_for

# The largest content the piece bounds allow.
MAX_CONTENT_LENGTH = MAX_PIECE_COUNT * MAX_PIECE_LENGTH


@dataclass(frozen=True, slots=True)
class KnownPiece:
    """A piece as the back-sourcer reported it (relayed by the scheduler)."""

    number: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class SchedulerView:
    """What the scheduler knows of a task's geometry: its content length once known, and pieces."""

    content_length: int | None
    pieces: tuple[KnownPiece, ...] = ()

    @property
    def knows_anything(self) -> bool:
        return self.content_length is not None or bool(self.pieces)


def claim_problem(content_length: int, piece_length: int, view: SchedulerView | None) -> str | None:
    """Why a parent's geometry claim cannot be taken; None when it is believable."""
    if not MIN_PIECE_LENGTH <= piece_length <= MAX_PIECE_LENGTH:
        return f"piece length {piece_length} is outside {MIN_PIECE_LENGTH}..{MAX_PIECE_LENGTH}"
    if not 0 <= content_length <= MAX_CONTENT_LENGTH:
        return f"content length {content_length} is outside 0..{MAX_CONTENT_LENGTH}"
    count = piece_count(content_length, piece_length)
    if count > MAX_PIECE_COUNT:
        return f"{count} pieces of {piece_length} bytes: more than {MAX_PIECE_COUNT}"
    if view is None:
        return None
    if view.content_length is not None and view.content_length != content_length:
        return f"content length {content_length}, but the back-sourcer's is {view.content_length}"
    for piece in view.pieces:
        offset = piece.number * piece_length
        if piece.number >= count:
            return f"{count} pieces, but the back-sourcer reported piece {piece.number}"
        expected = min(piece_length, content_length - offset)
        if (piece.offset, piece.length) != (offset, expected):
            return (f"piece {piece.number} at {offset}+{expected}, but the back-sourcer reported "
                    f"{piece.offset}+{piece.length}")
    return None


def view_from_task(content_length: int, pieces: Iterable[KnownPiece]) -> SchedulerView:
    """The scheduler's ``StatTask`` answer as a :class:`SchedulerView` (0 bytes: not known yet;
    an empty content never gets here, the scheduler answers it with an empty task)."""
    return SchedulerView(content_length if content_length > 0 else None, tuple(pieces))


def origin_piece_length(content_length: int, requested: int | None, *, lazy: bool = False) -> int:
    """The back-sourcer's piece length: the requested one (or the default, smaller for a content
    read `lazy`), grown as needed so the content fits in MAX_PIECE_COUNT pieces. Raises ValueError
    for content beyond the bounds."""
    if content_length > MAX_CONTENT_LENGTH:
        raise ValueError(f"content of {content_length} bytes is larger than {MAX_CONTENT_LENGTH} "
                         f"({MAX_PIECE_COUNT} pieces of {MAX_PIECE_LENGTH})")
    length = requested or piece_length_for(content_length, lazy=lazy)
    while length < MAX_PIECE_LENGTH and piece_count(content_length, length) > MAX_PIECE_COUNT:
        length *= 2
    return min(length, MAX_PIECE_LENGTH)
