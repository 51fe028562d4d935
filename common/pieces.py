"""Piece arithmetic: how a content of N bytes is cut into numbered pieces."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024
# The bounds any piece length must keep (what a parent's claim or a client's request is held to).
MIN_PIECE_LENGTH = MIB // 2
MAX_PIECE_LENGTH = 64 * MIB
# Dragonfly's range: the default is size/500 within 4 MiB .. 64 MiB, and a client may ask for no
# less than 4 MiB (smaller pieces are ours to choose, below).
DEFAULT_MIN_PIECE_LENGTH = 4 * MIB
TARGET_PIECE_COUNT = 500
# A content gets at least this many pieces while they stay >= SWARM_MIN_PIECE_LENGTH: four per
# node of a 16-node swarm, so every peer has pieces to trade (issue 11; 16 pieces of 4 MiB for
# 64 MiB left most uplinks idle while the last pieces travelled).
SWARM_PIECE_COUNT = 64
SWARM_MIN_PIECE_LENGTH = 1 * MIB
# A content read in Range reads (nydusd) is cut in pieces of half nydusd's 1 MiB chunk: a cold
# read waits for a piece twice (origin -> seed, seed or peer -> node, each stored and verified
# before it moves on), and a piece of half the size halves that wait (bench/lazyload.py, N=1:
# trace 2.8 -> 2.2 s, read p99 478 -> 255 ms; the origin sends 1.85 -> 1.49 x the bytes read). It
# costs CPU per byte: at N=16 on 2 shared cores the traces got slower (11.5 -> 14.7 s median).
LAZY_PIECE_LENGTH = MIB // 2
# No task has more pieces than this (1 TiB at the largest piece length): the scheduler refuses a
# piece number or a geometry beyond it, so a report cannot make it (or a peer) hold huge bitmaps.
MAX_PIECE_COUNT = 16384


def piece_length_for(content_length: int | None, *, lazy: bool = False) -> int:
    """Piece length for a content: :data:`LAZY_PIECE_LENGTH` when it is read lazily; otherwise the
    next power of two of size/500 within [4 MiB, 64 MiB], halved (down to 1 MiB) until the content
    has :data:`SWARM_PIECE_COUNT` pieces."""
    if lazy:
        return LAZY_PIECE_LENGTH
    if content_length is None or content_length <= 0:
        return DEFAULT_MIN_PIECE_LENGTH
    wanted = -(-content_length // TARGET_PIECE_COUNT)  # ceil division
    length = max(DEFAULT_MIN_PIECE_LENGTH, min(MAX_PIECE_LENGTH, 1 << (wanted - 1).bit_length()))
    while length > SWARM_MIN_PIECE_LENGTH and piece_count(content_length, length) < SWARM_PIECE_COUNT:
        length //= 2
    return length


def piece_count(content_length: int, piece_length: int) -> int:
    """Number of pieces of a content (0 for an empty one)."""
    if content_length < 0 or piece_length <= 0:
        raise ValueError(f"bad sizes: content {content_length}, piece {piece_length}")
    return -(-content_length // piece_length)


@dataclass(frozen=True, slots=True)
class PieceSpan:
    """Where piece `number` lies in the content."""

    number: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        """Offset one past the last byte."""
        return self.offset + self.length


def piece_span(number: int, content_length: int, piece_length: int) -> PieceSpan:
    """The byte span of one piece; raises ValueError for a number outside the content."""
    count = piece_count(content_length, piece_length)
    if not 0 <= number < count:
        raise ValueError(f"piece {number} outside 0..{count - 1}")
    offset = number * piece_length
    return PieceSpan(number, offset, min(piece_length, content_length - offset))


def pieces_covering(start: int, length: int, content_length: int, piece_length: int) -> range:
    """Piece numbers that hold bytes [start, start+length) of the content."""
    if length <= 0 or start >= content_length:
        return range(0)
    end = min(start + length, content_length)
    return range(start // piece_length, (end - 1) // piece_length + 1)
