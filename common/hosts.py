"""Host types and the profile that goes with each: the one place that says what a seed is.

The numbers are Dragonfly's ``common.v2.Host.type`` values. A seed (``--seed``) announces
itself as a super seed, gets more upload slots by default, and has its own host id (suffix
``-seed``), so a seed and a dfdaemon on the same node are two hosts to the scheduler.
"""

from __future__ import annotations

from enum import IntEnum


class HostType(IntEnum):
    NORMAL = 0
    SUPER_SEED = 1
    STRONG_SEED = 2
    WEAK_SEED = 3

    @property
    def is_seed(self) -> bool:
        return self is not HostType.NORMAL

    @classmethod
    def of(cls, value: int) -> HostType:
        """The type a host announced; an unknown number counts as a seed (it is not NORMAL)."""
        try:
            return cls(value)
        except ValueError:
            return cls.SUPER_SEED


# Upload slots of a host that does not say (config upload_slots 0, or max_tx_bandwidth 0).
DEFAULT_NORMAL_UPLOAD_SLOTS = 200
DEFAULT_SEED_UPLOAD_SLOTS = 2000
SEED_HOST_ID_SUFFIX = "-seed"


def default_upload_slots(is_seed: bool) -> int:
    return DEFAULT_SEED_UPLOAD_SLOTS if is_seed else DEFAULT_NORMAL_UPLOAD_SLOTS


def announced_type(is_seed: bool) -> HostType:
    """The type this daemon announces: seeds are super seeds (they back-source on trigger)."""
    return HostType.SUPER_SEED if is_seed else HostType.NORMAL
