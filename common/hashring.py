"""Consistent choice of one member per key (rendezvous hashing).

Adding or removing a member only moves the keys that member owned, which is what we need for
"which scheduler owns this task" and "which seed back-sources this task".
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash


def _weight(member: str, key: str) -> int:
    return xxhash.xxh3_64_intdigest(f"{member}\x00{key}".encode())


def rank(members: Sequence[str], key: str) -> list[str]:
    """Members ordered by preference for `key` (first is the owner)."""
    return sorted(members, key=lambda member: _weight(member, key), reverse=True)


def choose(members: Sequence[str], key: str) -> str | None:
    """The member that owns `key`, or None when there are none."""
    if not members:
        return None
    return max(members, key=lambda member: _weight(member, key))
