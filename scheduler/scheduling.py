"""Candidate-parent filtering and scoring: pure functions over :mod:`scheduler.resource` records.

A parent is first *filtered* (may it serve this child at all?) and then *scored* with named
weights (which of the acceptable ones are best?). Only a bounded random sample of the task's
eligible parents is looked at, so the work per schedule does not grow with the task.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum

from scheduler.resource import Peer, PeerState, Task

# Scoring weights; they sum to 1 so a score is in [0, 1].
WEIGHT_FINISHED_PIECES = 0.25  # how much of the content the parent already has
WEIGHT_UPLOAD_SUCCESS = 0.15  # pieces it served well / pieces it was asked for
WEIGHT_FREE_UPLOAD_SLOTS = 0.15  # room left for one more child
WEIGHT_HOST_TYPE = 0.20  # normal peers first, so seeds are offloaded once peers have pieces
WEIGHT_IDC = 0.15  # same data center
WEIGHT_LOCATION = 0.10  # longest common prefix of "region|zone|rack"

# Super-seeding: a seed is offered to at most this many children at once while normal parents
# can be offered instead. Each of its children takes different pieces from it and passes them on,
# so a piece leaves the seed about once; a seed serving every child would carry the whole swarm.
SEED_CHILD_LIMIT = 4
# The same for a normal parent: one with this many children is offered only when no other parent
# is acceptable, so children spread over every uplink instead of crowding the first parent.
PARENT_CHILD_LIMIT = 8


def is_busy(parent: Peer) -> bool:
    """True when `parent` has as many children as its uplink should serve (see the limits above)."""
    return len(parent.children) >= (SEED_CHILD_LIMIT if parent.is_seed else PARENT_CHILD_LIMIT)

HOST_TYPE_SCORE_NORMAL = 1.0
HOST_TYPE_SCORE_SEED = 0.0
MAX_LOCATION_ELEMENTS = 5

# Bad parent: its last piece cost is an outlier against the costs before it.
BAD_PARENT_MIN_SAMPLES = 30  # from this many previous samples on, use the 3-sigma rule
BAD_PARENT_SIGMAS = 3.0
BAD_PARENT_MEAN_FACTOR = 20.0  # below that, an outlier is > 20x the mean


@dataclass(frozen=True, slots=True)
class Score:
    """The parts of a parent's score (each in [0, 1]) and their weighted sum."""

    finished_pieces: float
    upload_success: float
    free_upload_slots: float
    host_type: float
    idc: float
    location: float

    @property
    def total(self) -> float:
        return (
            WEIGHT_FINISHED_PIECES * self.finished_pieces
            + WEIGHT_UPLOAD_SUCCESS * self.upload_success
            + WEIGHT_FREE_UPLOAD_SLOTS * self.free_upload_slots
            + WEIGHT_HOST_TYPE * self.host_type
            + WEIGHT_IDC * self.idc
            + WEIGHT_LOCATION * self.location
        )


def is_bad_parent(parent: Peer) -> bool:
    """True when the last piece served by `parent` took abnormally long."""
    last = parent.upload_costs.last
    if last is None:
        return False
    n, mean, stddev = parent.upload_costs.previous_stats()
    if n == 0:
        return False
    if n >= BAD_PARENT_MIN_SAMPLES:
        return last > mean + BAD_PARENT_SIGMAS * stddev
    return last > BAD_PARENT_MEAN_FACTOR * mean


def rejection(child: Peer, parent: Peer) -> str | None:
    """Why `parent` may not serve `child`, or None when it may."""
    if parent is child:
        return "self"
    if parent.host is child.host:
        return "same host"
    if parent.id in child.blocklist:
        return "blocklisted"
    if not parent.eligible_parent:
        return f"not a parent in state {parent.state} with {parent.finished.count} pieces"
    if parent.host.free_upload_slots <= 0:
        return "no free upload slot"
    if is_bad_parent(parent):
        return "bad parent (piece cost outlier)"
    return None


def parents_to_come(child: Peer, task: Task, *, limit: int, visit: int, exclude: Collection[str] = ()) -> list[Peer]:
    """Up to `limit` peers with no piece yet that are being fed (directly or further down) by
    peers with pieces, nearest first, each with room for a child: a waiting `child` may take them
    as parents, their pieces announced as they arrive. Looks at no more than `visit` of them.

    Without them, a swarm whose seed has all the children it should serve makes every newcomer
    wait for a first piece two hops away, longer than it may wait before going to the origin.
    They come from ``Task.coming`` (running, fed, not busy, no piece), not from a walk down the
    tree: a walk from the seed looked at the first few hundred peers, all busy once a few
    thousand peers joined at once, and the rest waited for the seed (bench/swarm_sim.py).
    """
    found: list[Peer] = []
    for candidate in task.coming.neediest(visit):
        if (
            candidate is not child
            and candidate.host is not child.host
            and candidate.id not in exclude
            and candidate.id not in child.parents
            and candidate.id not in child.blocklist
            and candidate.host.free_upload_slots > 0
        ):
            found.append(candidate)
            if len(found) >= limit:
                break
    return found


def location_affinity(a: str, b: str) -> float:
    """Share of the longest common prefix of two ``|``-separated locations."""
    if not a or not b:
        return 0.0
    left = a.split("|")[:MAX_LOCATION_ELEMENTS]
    right = b.split("|")[:MAX_LOCATION_ELEMENTS]
    common = 0
    for x, y in zip(left, right, strict=False):
        if x != y:
            break
        common += 1
    return common / max(len(left), len(right))


def score(child: Peer, parent: Peer) -> Score:
    """How good `parent` is for `child` (filtering is separate: see :func:`rejection`)."""
    task = parent.task
    if parent.state is PeerState.SUCCEEDED:
        finished = 1.0
    else:
        total = task.piece_count or max(task.max_finished, 1)
        finished = min(1.0, parent.finished.count / total)
    asked = parent.upload_succeeded + parent.upload_failed
    success = 1.0 if asked == 0 else parent.upload_succeeded / asked
    limit = parent.host.upload_limit
    free = max(0.0, min(1.0, parent.host.free_upload_slots / limit)) if limit > 0 else 0.0
    host_type = HOST_TYPE_SCORE_SEED if parent.is_seed else HOST_TYPE_SCORE_NORMAL
    child_info, parent_info = child.host.info, parent.host.info
    idc = 1.0 if child_info.idc and child_info.idc == parent_info.idc else 0.0
    location = location_affinity(child_info.location, parent_info.location)
    return Score(finished, success, free, host_type, idc, location)


def select_parents(
    child: Peer,
    task: Task,
    *,
    limit: int,
    sample: int,
    rng: random.Random,
    exclude: Collection[str] = (),
    busy_fallback: bool = True,
) -> list[Peer]:
    """The best `limit` parents for `child` among a random `sample` of the task's eligible parents.

    A busy parent (:func:`is_busy`; a seed with :data:`SEED_CHILD_LIMIT` children) is offered
    only when no normal parent with room is acceptable and `busy_fallback` is set: a seed is the
    last resort, not everyone's main parent.
    """
    accepted: list[tuple[float, str, Peer]] = []
    busy: list[Peer] = []
    for parent in task.parents.sample(sample, rng):
        if parent.id in exclude or rejection(child, parent) is not None:
            continue
        if is_busy(parent):
            busy.append(parent)
            continue
        accepted.append((-score(child, parent).total, parent.id, parent))
    if busy_fallback and not any(not parent.is_seed for _, _, parent in accepted):
        # busy normal parents before a busy seed: the seed is everyone's parent only when it is alone
        fallback = [parent for parent in busy if not parent.is_seed] or busy
        accepted += [(-score(child, parent).total, parent.id, parent) for parent in fallback]
    accepted.sort(key=lambda item: (item[0], item[1]))
    return [parent for _, _, parent in accepted[:limit]]


# --------------------------------------------------------------------------------------------
# A failed back-to-source: retry the origin, or fail the task


class OriginVerdict(StrEnum):
    """What a failed back-to-source of a task leads to."""

    RETRY = "retry"  # try the origin again after a back-off; the waiting peers keep waiting
    FAIL = "fail"  # the task fails: every waiting peer gets the origin's answer, new downloads too for a while
    FAIL_WAITING = "fail_waiting"  # the waiting peers get the answer; a new download tries again


# 4xx answers that say nothing final about the content: the request timed out, or was rate limited.
RETRYABLE_CLIENT_STATUSES = frozenset({408, 425, 429})
# 4xx answers about the credentials of the request, not the content: another client may be let in.
CREDENTIAL_STATUSES = frozenset({401, 403, 407})


def origin_verdict(status: int | None, failures: int, attempt_limit: int) -> OriginVerdict:
    """The verdict after the `failures`-th failed back-to-source of a task in a row.

    `status` is the HTTP status the origin answered, None when it was not reached (refused,
    unknown host, reset, timed out). An origin that answered a definite 4xx is not asked again:
    the same request would get the same answer. Anything else is retried until `attempt_limit`
    attempts have failed.
    """
    if status is not None and 400 <= status < 500 and status not in RETRYABLE_CLIENT_STATUSES:
        return OriginVerdict.FAIL_WAITING if status in CREDENTIAL_STATUSES else OriginVerdict.FAIL
    if failures >= attempt_limit:
        return OriginVerdict.FAIL
    return OriginVerdict.RETRY


def origin_retry_delay(failures: int, backoff: float) -> float:
    """Back-off before the next attempt after `failures` failed ones: `backoff`, doubled each time."""
    return backoff * 2.0 ** max(0, failures - 1)
