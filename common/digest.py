"""Digests: sha256 for whole contents, xxh3-128 for pieces.

Digest strings are ``algorithm:lowercase-hex``; piece digests use the algorithm name
``xxh3`` (xxh3-128).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Protocol

import xxhash

from common.errors import InvalidRequest

PIECE_DIGEST_ALGORITHM = "xxh3"
_DIGEST_RE = re.compile(r"^(sha256|sha512|xxh3):([0-9a-f]+)$")
_HEX_LENGTH = {"sha256": 64, "sha512": 128, "xxh3": 32}


class Hasher(Protocol):
    """What hashlib and xxhash objects have in common."""

    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


def parse_digest(text: str) -> tuple[str, str]:
    """Split and validate ``algo:hex``; raises InvalidRequest naming what is wrong."""
    match = _DIGEST_RE.match(text.strip().lower())
    if not match:
        raise InvalidRequest(f"digest {text!r} is not of the form sha256:<64 hex digits>")
    algorithm, hexdigest = match.groups()
    if len(hexdigest) != _HEX_LENGTH[algorithm]:
        raise InvalidRequest(
            f"digest {text!r}: {algorithm} needs {_HEX_LENGTH[algorithm]} hex digits, got {len(hexdigest)}"
        )
    return algorithm, hexdigest


def new_hasher(algorithm: str) -> Hasher:
    """A streaming hasher for one of the supported algorithms."""
    if algorithm == PIECE_DIGEST_ALGORITHM:
        return xxhash.xxh3_128()
    if algorithm in ("sha256", "sha512"):
        return hashlib.new(algorithm)
    raise InvalidRequest(f"unsupported digest algorithm {algorithm!r}")


def new_piece_hasher() -> Hasher:
    """A streaming xxh3-128 hasher for one piece."""
    return new_hasher(PIECE_DIGEST_ALGORITHM)


def format_digest(algorithm: str, hasher: Hasher) -> str:
    """``algo:hex`` of a finished hasher."""
    return f"{algorithm}:{hasher.hexdigest()}"


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """``algo:hex`` of a whole file, read in 4 MiB chunks (call it in a thread for big files)."""
    hasher = new_hasher(algorithm)
    with open(path, "rb") as file:
        while chunk := file.read(4 << 20):
            hasher.update(chunk)
    return format_digest(algorithm, hasher)


def piece_digest(data: bytes | memoryview) -> str:
    """xxh3-128 digest string of one whole piece held in memory (tests, small pieces)."""
    hasher = new_piece_hasher()
    hasher.update(data)
    return format_digest(PIECE_DIGEST_ALGORITHM, hasher)
