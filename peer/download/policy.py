"""The download policy of one task on one node: which piece next, from which parent, and when to
give up on parents. Pure and synchronous: no asyncio, no sockets, no disk, no protobuf.

The engine (:mod:`peer.download.engine`) feeds it events — the content's size became known, a parent
joined / has a piece / went away, a piece arrived or failed, a reader waits for pieces, the
scheduler stream ended or said "back to source" — and carries out the commands it returns:

- :class:`FetchPiece` — start fetching a piece from a parent;
- :class:`ReportPieceFailed` — tell the scheduler a piece from a parent failed;
- :class:`DropParent` — stop using a parent for this task (its session is cancelled);
- :class:`Reschedule` — ask the scheduler for other parents;
- :class:`BackToSource` — stop using parents and fetch what is missing from the origin;
- :class:`GiveUp` — the scheduler failed the task (its origin refused it): fail the download;
- :class:`FetchFromOrigin` — fetch one piece from the origin for this node only;
- :class:`Finished` — every wanted piece is here.

Time comes from an injected :class:`~common.clock.Clock` and every random choice from an
injected :class:`random.Random`, so a test (or a simulator of many peers) drives it step by step.

The rules, each tested in ``tests/unit/test_download_policy.py``:

- Pieces a reader waits for (prioritized) go first, in order; the rest rarest first among this
  peer's parents, equals in an order shuffled per peer, so neighbours fetch different pieces and
  can trade them.
- At most ``concurrent_pieces`` pieces in flight, and per parent at most
  :data:`PARENT_PIECE_LIMIT` (normal) or :data:`SEED_PIECE_LIMIT` (seed;
  :data:`SEED_PIECE_LIMIT_WITH_PEERS` once a normal parent exists).
- Seeds are the last resort: while a normal parent keeps this peer busy, a seed serves only
  pieces no normal parent has (super-seeding: a piece leaves the seed for the swarm, not again
  for each child); a reader's piece a normal parent has waits for that parent too.
- Among holders: normal before seed, then the least busy, ties broken at random.
- A piece that fails its digest drops its parent at once; other failures drop it after
  :data:`PARENT_FAILURE_LIMIT`. A parent whose session ends in an error is reported and dropped.
  A dropped parent is blocked for the task and the scheduler is asked for others.
- Stalled (nothing in flight, no live parent that could still announce a piece): ask the
  scheduler once for new parents; back to source after ``schedule_timeout`` of stall, or at once
  when the scheduler stream is gone.
- Starved (a whole download, nothing in flight, live parents, but none has announced a piece this
  peer lacks) for ``schedule_timeout``: ask the scheduler for parents again (and again after as
  long), or with the scheduler gone, go to the origin. Parents usually get more from their own;
  not when the pieces left with a fetcher that died — the scheduler brings in a new one, and this
  is the net under that.
- The scheduler failed the task (the origin refused it, for every peer): give up at once, never
  back to source: that would ask the same origin again.
- Demand (:meth:`DownloadPolicy._demand_unannounced`): a piece a reader waits for that no parent
  has announced is asked of a live seed anyway (the seed moves it to the front of its origin
  queue and answers once it is there), at most :data:`DEMAND_LIMIT` at once. A seed that cannot
  answer one is not at fault: the piece is asked again :data:`DEMAND_RETRY` later.
- No seed to ask (:meth:`DownloadPolicy._origin_fallback`): in a Range download without
  prefetch, a piece a reader has waited :data:`ORIGIN_FALLBACK_WAIT` for, that no parent
  announced, is fetched from the origin by this node for itself (unless back-to-source is
  forbidden): parents that read other parts of the blob may never get it. A failure waits as long
  again. Whole downloads do not: every parent gets every piece, and a stall reschedules.
- The origin queue (:meth:`DownloadPolicy.next_origin_fetch`): demanded pieces start at once; the
  whole-blob rest keeps at most :data:`BACKGROUND_UNDER_DEMAND` fetches going while demand waits,
  and :data:`BACKGROUND_PIECES_UNDER_DEMAND` at any time in a blob read in Range reads, where it
  starts only once the readers have asked for nothing for :data:`READERS_QUIET`.
- The same from parents: while a reader waits, or always in a blob read in Range reads, at most
  :data:`BACKGROUND_PIECES_UNDER_DEMAND` pieces nobody waits for are in flight; in a blob read in
  Range reads none starts until the readers have asked for nothing for :data:`READERS_QUIET`.
- A parent whose uplink is full says so (:meth:`DownloadPolicy.piece_busy`): no failure; it is
  left alone for :data:`PARENT_BUSY_BACKOFF` and other holders are asked meanwhile
  (:meth:`DownloadPolicy.next_wake` says when to look again).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from common.clock import Clock

# Pieces in flight from one parent. Few, so a piece arrives whole soon and can be passed on (a
# piece shared with many others on one uplink arrives late, with all the others); the child has
# many parents (bench/swarm_sim.py, N=16, 256 MiB: 8 -> 2 per parent took 52 s to 33 s). A seed
# serves one at a time to each child: its uplink is shared by all of them.
PARENT_PIECE_LIMIT = 2
SEED_PIECE_LIMIT = 1
SEED_PIECE_LIMIT_WITH_PEERS = 1
# A parent that answered "all my upload slots are taken" is not asked again for this long.
PARENT_BUSY_BACKOFF = 0.2
# A parent that failed this many pieces of the task is dropped and reported to the scheduler.
PARENT_FAILURE_LIMIT = 2
# While a reader waits for pieces, or may come back any moment (a blob read in Range reads, with
# prefetch), at most this many other pieces (prefetch, the whole blob) are fetched at once: the
# downlink is the reader's, and a read that arrives finds no queue of prefetch pieces before it.
BACKGROUND_PIECES_UNDER_DEMAND = 2
# A blob read lazily (Range reads) with prefetch: the pieces nobody asked for start only once the
# readers have asked for nothing for this long. A cold start's reads come in bursts; between two
# reads of a burst, prefetch pieces took the uplinks, the downlink and, on a crowded node, the CPU
# (bench/lazyload.py, N=16 with prefetch: trace max 11.7-12.0 s against 8.5-10.4 s without prefetch
# in the same runs, 1,700 "busy" answers; held back: 8.8-9.4 s against 8.2-9.1 s, ~200 answers).
READERS_QUIET = 1.0
# Pieces a reader waits for that are asked of a seed before it announced them, at once per task.
DEMAND_LIMIT = 8
# A demand the seed could not answer (it does not fetch the piece, or not in time) is retried this
# much later; the seed is not blamed.
DEMAND_RETRY = 1.0
# Whole-blob origin fetches kept going while a reader's pieces wait for the origin link.
BACKGROUND_UNDER_DEMAND = 1
# A reader that waited this long for a piece no parent announced, with no seed among the parents
# to ask for it, has this node fetch it from the origin (the parents may never get it).
ORIGIN_FALLBACK_WAIT = 3.0
# Who a piece fetched from the origin by this node for itself is in flight from.
ORIGIN = "origin"


# -- commands ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchPiece:
    number: int
    parent_id: str


@dataclass(frozen=True)
class ReportPieceFailed:
    """``temporary`` False means: do not offer this parent to me again."""

    number: int
    parent_id: str
    temporary: bool


@dataclass(frozen=True)
class DropParent:
    parent_id: str
    reason: str


@dataclass(frozen=True)
class Reschedule:
    description: str
    blocked: tuple[str, ...] = ()


@dataclass(frozen=True)
class BackToSource:
    reason: str


@dataclass(frozen=True)
class GiveUp:
    reason: str


@dataclass(frozen=True)
class Finished:
    pass


@dataclass(frozen=True)
class FetchFromOrigin:
    """Fetch one piece from the origin for this node only (a reader waits; no seed to ask)."""

    number: int


Command = (FetchPiece | ReportPieceFailed | DropParent | Reschedule | BackToSource | GiveUp | Finished
           | FetchFromOrigin)


# -- state ---------------------------------------------------------------------------------------


@dataclass
class ParentState:
    """A candidate parent as this child sees it."""

    peer_id: str
    is_seed: bool
    in_flight: int = 0
    failures: int = 0
    # False once its piece announcements ended: it will not offer anything new.
    live: bool = True
    # Until when it is not asked for pieces: its uplink was full (it answered "busy").
    busy_until: float = 0.0


@dataclass
class DownloadPolicy:
    """Decides the next steps of one task's download; see the module docstring."""

    peer_id: str
    clock: Clock
    rng: random.Random
    concurrent_pieces: int
    schedule_timeout: float
    # Fetch every piece (True), or only those asked for with want() (a Range read, prefetch off).
    want_everything: bool = True
    piece_count: int | None = None
    parents: dict[str, ParentState] = field(default_factory=dict)
    blocked: set[str] = field(default_factory=set)
    holders: dict[int, set[str]] = field(default_factory=dict)
    # The same the other way: per parent (each has an entry), the pieces it announced that are not
    # finished here.
    held: dict[str, set[int]] = field(default_factory=dict)
    in_flight: dict[int, str] = field(default_factory=dict)  # piece -> parent
    finished: set[int] = field(default_factory=set)
    priority: set[int] = field(default_factory=set)
    wanted: set[int] = field(default_factory=set)
    scheduler_alive: bool = True
    stalled_since: float | None = None
    starved_since: float | None = None
    asked_reschedule: bool = False
    back_to_source_reason: str = ""
    task_failure: str = ""
    # Pieces in flight as a demand (asked of a seed that had not announced them), and when a
    # refused one may be asked again.
    demanded: set[int] = field(default_factory=set)
    demand_retry_at: dict[int, float] = field(default_factory=dict)
    # When a reader started waiting for each prioritized piece; whether this node may fetch a
    # piece from the origin itself (its request allows back-to-source).
    waiting_since: dict[int, float] = field(default_factory=dict)
    origin_allowed: bool = True
    # The blob is read in Range reads (nydusd): readers come and go, whole-blob fetching stays behind.
    read_lazily: bool = False
    # When a reader last asked for pieces (prioritize).
    last_read_at: float | None = None
    # After a dispatch nothing more could be fetched: until something else changes, only these can
    # make a fetch possible: new announcements; parents that gained room (a backoff or a transfer
    # ended); pieces no longer in flight. When that dispatch stopped at the concurrency or the
    # background limit (_dispatch_limited), any transfer that ends changes everything.
    _idle: bool = field(default=False, init=False, repr=False)
    _dispatch_limited: bool = field(default=False, init=False, repr=False)
    _announced: list[tuple[str, int]] = field(default_factory=list, init=False, repr=False)
    _gained_room: list[str] = field(default_factory=list, init=False, repr=False)
    _unsettled: list[int] = field(default_factory=list, init=False, repr=False)
    # Kept up to date as parents come, go and take pieces, so a dispatch (after every event) does not
    # scan every parent: the normal parents; those of them with pieces in flight; the parents with a
    # slot free (below their piece limit; backing off or not); and the parents that answered busy,
    # with when their backoff ends (those past it are pruned when looked at).
    _normal_parents: set[str] = field(default_factory=set, init=False, repr=False)
    _loaded_normal_parents: set[str] = field(default_factory=set, init=False, repr=False)
    _parents_with_slot: set[str] = field(default_factory=set, init=False, repr=False)
    _backing_off: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _first_backoff_end: float = field(default=float("inf"), init=False, repr=False)  # at most the earliest
    # Set when a dispatch held pieces back because readers were active: when it may start them.
    _background_held_until: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._order_salt = self.rng.random()

    # -- what is known -----------------------------------------------------------------------

    @property
    def content_known(self) -> bool:
        return self.piece_count is not None

    def wanted_pieces(self) -> Iterable[int]:
        if self.piece_count is None:
            return ()
        return range(self.piece_count) if self.want_everything else sorted(self.wanted)

    def missing(self) -> list[int]:
        """Wanted pieces not here yet, in number order."""
        return [n for n in self.wanted_pieces() if n not in self.finished]

    def is_finished(self) -> bool:
        if self.piece_count is None:
            return False
        if not self.want_everything:
            return self.wanted <= self.finished
        # Asked after every event: count first, and only a full count is checked piece by piece.
        return len(self.finished) >= self.piece_count and not self.missing()

    def has_live_parent(self) -> bool:
        """True while some parent may still announce a piece."""
        return any(parent.live for parent in self.parents.values())

    # -- events ------------------------------------------------------------------------------

    def content_info(self, piece_count: int, finished: Iterable[int] = ()) -> None:
        """The content's geometry is known; `finished` are the pieces already on disk."""
        self.piece_count = piece_count
        self.finished.update(finished)
        self._changed()

    def want(self, numbers: Iterable[int]) -> None:
        """Fetch these pieces too (a Range read joined)."""
        self.wanted.update(numbers)
        self._changed()

    def want_all(self) -> None:
        """Fetch every piece after all (a whole read or a prefetch joined)."""
        self.want_everything = True
        self._changed()

    def prioritize(self, numbers: Iterable[int]) -> None:
        """A reader waits for these pieces: they go before all others."""
        numbers = list(numbers)
        self.priority.update(numbers)
        now = self.clock.time()
        for number in numbers:
            self.waiting_since.setdefault(number, now)
        if numbers:
            self.last_read_at = now
        self._changed()

    def whole_read_joined(self) -> None:
        """A whole read (dfget, a pull) joined a blob read in Range reads: it is not read lazily
        any more, and the pieces nobody waits for stop waiting for its readers to go quiet."""
        self.read_lazily = False
        self._background_held_until = None
        self._changed()

    def reader_waits_for(self, number: int) -> bool:
        """Whether a reader waits for piece `number` (its request says so: parents send it first)."""
        return number in self.priority

    def add_parent(self, peer_id: str, *, is_seed: bool) -> bool:
        """A candidate parent from the scheduler; False when it is known, blocked or this peer."""
        if peer_id in self.parents or peer_id in self.blocked or peer_id == self.peer_id:
            return False
        self.parents[peer_id] = ParentState(peer_id, is_seed)
        self.held[peer_id] = set()
        if not is_seed:
            self._normal_parents.add(peer_id)
        self._count_all_loads()  # the first normal parent changes a seed's limit
        self._changed()
        return True

    def parent_has(self, parent_id: str, number: int) -> None:
        if parent_id in self.parents and number not in self.finished:
            holders = self.holders.get(number)
            if holders is None:
                self.holders[number] = {parent_id}
            else:
                holders.add(parent_id)
            self.held[parent_id].add(number)
            if self._idle:
                self._announced.append((parent_id, number))

    def parent_ended(self, parent_id: str, error: str = "") -> list[Command]:
        """A parent's piece announcements ended: cleanly (it has all it will have) or in error."""
        parent = self.parents.get(parent_id)
        if parent is None:
            return []
        parent.live = False
        if not error:
            return []
        # Tell the scheduler the parent failed us, so it stops offering a dead node.
        missing = self.missing()
        report = ReportPieceFailed(missing[0] if missing else 0, parent_id, temporary=False)
        return [report, *self._drop(parent, error)]

    def piece_succeeded(self, number: int, parent_id: str) -> None:
        if self.demanded and self._demand_settled(number, parent_id):
            self._changed()
        else:
            self._settle(number, parent_id)
        self.finished.add(number)
        # who else has it no longer matters: keeps _dispatch's work small
        for holder in self.holders.pop(number, ()):
            self.held[holder].discard(number)

    def piece_failed(self, number: int, parent_id: str, error: str, *, integrity: bool) -> list[Command]:
        """A piece from `parent_id` failed; `integrity` when its bytes did not match the digest."""
        self._changed()
        if self._demand_settled(number, parent_id):
            return self._demand_failed(number, parent_id, error, integrity=integrity)
        if parent_id == ORIGIN:
            self.waiting_since[number] = self.clock.time()  # ask the origin again only after as long
        parent = self._settle(number, parent_id)
        if parent is None:
            return []
        commands: list[Command] = [ReportPieceFailed(number, parent_id, temporary=not integrity)]
        parent.failures += 1
        if integrity or parent.failures >= PARENT_FAILURE_LIMIT:
            commands += self._drop(parent, error)
        return commands

    def piece_busy(self, number: int, parent_id: str) -> None:
        """The parent's upload slots were all taken, or (a seed) it just sent this piece to another
        child, who will pass it on: no failure; other holders are asked meanwhile, and this parent
        (for a demand: this piece of it) again after :data:`PARENT_BUSY_BACKOFF`."""
        until = self.clock.time() + PARENT_BUSY_BACKOFF
        if self.demanded and self._demand_settled(number, parent_id):
            self._changed()
            self.demand_retry_at[number] = until
            return
        parent = self._settle(number, parent_id)
        if parent is not None:
            parent.busy_until = until
            self._backing_off[parent_id] = until
            if until < self._first_backoff_end:
                self._first_backoff_end = until

    def next_wake(self) -> float | None:
        """When a busy parent or a refused demand may be asked again (the next decision point)."""
        now = self.clock.time()
        times = list(self._backing_off_now(now).values())  # (each still backing off: later than now)
        if self.demand_retry_at:  # (rarely any: only readers' pieces a seed could not answer)
            times += [t for n, t in self.demand_retry_at.items() if t > now and n not in self.finished]
        if self._background_held_until is not None and self._background_held_until > now:
            times.append(self._background_held_until)
        if self.starved_since is not None and self.starved_since + self.schedule_timeout > now:
            times.append(self.starved_since + self.schedule_timeout)  # (past it, next_commands acts)
        return min(times) if times else None

    def scheduler_lost(self) -> None:
        self.scheduler_alive = False

    def scheduler_says_back_to_source(self, reason: str) -> None:
        self.back_to_source_reason = reason or "scheduler said so"

    def scheduler_failed_task(self, reason: str) -> None:
        """The scheduler failed the task for everyone (the origin's answer is `reason`)."""
        self.scheduler_alive = False
        self.task_failure = reason or "the scheduler failed the task"

    # -- decisions ---------------------------------------------------------------------------

    def next_commands(self) -> list[Command]:
        """What to do now: finish, fetch pieces, ask for parents, go back to source, or give up."""
        if self.task_failure and not self.is_finished():
            return [GiveUp(self.task_failure)]
        if self.back_to_source_reason:
            return [BackToSource(self.back_to_source_reason)]
        if self.is_finished():
            return [Finished()]
        commands: list[Command] = list(self._dispatch())
        if self.priority:  # both serve only pieces a reader waits for
            commands += self._demand_unannounced()
            commands += self._origin_fallback()
        now = self.clock.time()
        if self.in_flight or self.has_live_parent():
            self.stalled_since = None
            return commands + self._starvation(now)
        self.starved_since = None
        # Nothing to do with the parents we have: ask for more, then fall back to the origin.
        if self.stalled_since is None:
            self.stalled_since = now
            if self.scheduler_alive and not self.asked_reschedule:
                self.asked_reschedule = True
                commands.append(Reschedule("parents have no more pieces for us"))
        if not self.scheduler_alive or now - self.stalled_since > self.schedule_timeout:
            commands.append(BackToSource("parents could not provide every piece"))
        return commands

    def _starvation(self, now: float) -> list[Command]:
        """The starved rule (see the module's docs): what to do, if anything, about live parents
        that have announced nothing this peer lacks."""
        if self.in_flight or not self.want_everything or any(self.held.values()):
            self.starved_since = None
            return []
        if self.starved_since is None:
            self.starved_since = now
        waited = now - self.starved_since
        if waited < self.schedule_timeout:
            return []
        if not self.scheduler_alive:
            return [BackToSource(f"for {waited:.0f}s no parent had a piece this peer lacks, and the scheduler "
                                 "is gone")]
        self.starved_since = now  # ask again after as long
        return [Reschedule(f"for {waited:.0f}s no parent has had a piece this peer lacks")]

    def next_origin_piece(self, queue: list[int]) -> int:
        """Take the next piece to back-source from `queue`: a prioritized one if any, else the first."""
        for index, number in enumerate(queue):
            if number in self.priority:
                return queue.pop(index)
        return queue.pop(0)

    def next_origin_fetch(self, queue: list[int], running: Iterable[int], limit: int) -> int | None:
        """Take the next piece to start fetching from the origin out of `queue`; None: start none now.

        A piece a reader waits for starts at once (up to `limit` such running); the rest of the
        blob fills `limit` only while no demand waits or runs, and keeps
        :data:`BACKGROUND_UNDER_DEMAND` fetches going beside it, so the origin link is the readers'.
        """
        running_now = list(running)
        demand_running = sum(1 for n in running_now if n in self.priority)
        queued = set(queue) if self.priority else set()
        demand_queued = [n for n in self.priority if n in queued]
        if demand_queued and demand_running < limit:
            number = min(demand_queued)
            queue.remove(number)
            return number
        background_running = len(running_now) - demand_running
        cap = BACKGROUND_UNDER_DEMAND if demand_queued or demand_running else limit
        if self.read_lazily:
            hold = self._hold_background_for_readers(self.clock.time())
            cap = 0 if hold else min(cap, BACKGROUND_PIECES_UNDER_DEMAND)
        if queue and background_running < cap and len(running_now) < limit:
            return queue.pop(0)
        return None

    def _hold_background_for_readers(self, now: float) -> bool:
        """In a blob read lazily: True while its readers asked for pieces within READERS_QUIET
        (the pieces nobody asked for wait); notes when that ends for next_wake."""
        if not self.read_lazily or self.last_read_at is None:
            return False
        until = self.last_read_at + READERS_QUIET
        if now >= until:
            return False
        self._background_held_until = until
        return True

    def _demand_unannounced(self) -> list[FetchPiece]:
        """Ask a live seed for pieces a reader waits for that no parent announced yet."""
        if self.piece_count is None or not self.priority:
            return []
        # Each demand adds one to both counts.
        room = min(DEMAND_LIMIT - len(self.demanded), self.concurrent_pieces - len(self.in_flight))
        if room <= 0:
            return []
        # The readers' pieces pile up in `priority` as a blob is read: look at the missing ones
        # only (it is asked after every event while a reader waits).
        count = self.piece_count
        unannounced = [n for n in self.priority - self.finished
                       if n < count and n not in self.in_flight and not self.holders.get(n)]
        if not unannounced:
            return []
        seeds = [p for p in self.parents.values() if p.is_seed and p.live]
        if not seeds:
            return []
        now = self.clock.time()
        commands: list[FetchPiece] = []
        for number in sorted(unannounced):
            if room <= 0:
                break
            if not (self.want_everything or number in self.wanted) or self.demand_retry_at.get(number, 0.0) > now:
                continue
            room -= 1
            # Not counted in the seed's in_flight: a demand waits on the origin, not on the seed's
            # upload, and must not hold back the pieces the seed has announced.
            seed = min(seeds, key=lambda p: (sum(1 for n in self.demanded if self.in_flight.get(n) == p.peer_id),
                                             p.peer_id))
            self.in_flight[number] = seed.peer_id
            self.demanded.add(number)
            commands.append(FetchPiece(number, seed.peer_id))
        return commands

    def _origin_fallback(self) -> list[Command]:
        """Fetch from the origin what a reader waited too long for, when no parent has it and no
        seed can be asked for it."""
        if (self.piece_count is None or not self.priority or not self.origin_allowed or self.want_everything
                or any(p.is_seed and p.live for p in self.parents.values())):
            return []
        now = self.clock.time()
        commands: list[Command] = []
        for number in sorted(self.priority):
            if len(self.in_flight) >= self.concurrent_pieces:
                break
            if (number >= self.piece_count or number in self.finished or number in self.in_flight
                    or self.holders.get(number) or number not in self.wanted
                    or now - self.waiting_since.get(number, now) < ORIGIN_FALLBACK_WAIT):
                continue
            self.in_flight[number] = ORIGIN
            commands.append(FetchFromOrigin(number))
        return commands

    def _demand_settled(self, number: int, parent_id: str) -> bool:
        """End a demand's transfer; False when this transfer was no demand."""
        if number not in self.demanded or self.in_flight.get(number) != parent_id:
            return False
        self.demanded.discard(number)
        del self.in_flight[number]
        return True

    def _demand_failed(self, number: int, parent_id: str, error: str, *, integrity: bool) -> list[Command]:
        """A demanded piece did not come: wrong bytes drop the seed as any parent; anything else
        (it does not fetch the piece, or not in time) is asked again later, the seed not blamed."""
        parent = self.parents.get(parent_id)
        if integrity and parent is not None:
            return [ReportPieceFailed(number, parent_id, temporary=False), *self._drop(parent, error)]
        self.demand_retry_at[number] = self.clock.time() + DEMAND_RETRY
        return []

    def _changed(self) -> None:
        """Something a dispatch depends on changed: the next one looks at everything again."""
        self._idle = False
        self._forget_since_idle()

    def _forget_since_idle(self) -> None:
        self._announced.clear()
        self._gained_room.clear()
        self._unsettled.clear()

    def _dispatch(self) -> list[FetchPiece]:
        """Fetches to start now. This runs after every event, most of them a parent announcing a
        piece, a busy answer or a busy parent's backoff ending: when nothing else changed since a
        dispatch that found nothing more to fetch, only the pieces those events concern are looked
        at (the same decisions, at a fraction of the cost)."""
        if self.piece_count is None or len(self.in_flight) >= self.concurrent_pieces:
            return []
        now = self.clock.time()
        if self._background_held_until is not None and now >= self._background_held_until:
            self._background_held_until = None  # the readers went quiet: the held pieces may go
            self._changed()
        if not self._idle:
            fetches = self._dispatch_all(now)
        else:
            pieces = self._pieces_since_idle(now)
            fetches = self._dispatch_all(now, pieces) if pieces else []
        self._idle = True
        self._forget_since_idle()
        return fetches

    def _backing_off_now(self, now: float) -> dict[str, float]:
        """The parents that answered busy and are still backing off, with when that ends; those whose
        backoff ended are noted in _gained_room."""
        if now >= self._first_backoff_end:
            ended = [parent_id for parent_id, until in self._backing_off.items() if until <= now]
            for parent_id in ended:
                del self._backing_off[parent_id]
            self._gained_room += ended
            self._first_backoff_end = min(self._backing_off.values(), default=float("inf"))
        return self._backing_off

    def _seed_limit(self) -> int:
        return SEED_PIECE_LIMIT_WITH_PEERS if self._normal_parents else SEED_PIECE_LIMIT

    def _count_load(self, parent: ParentState) -> None:
        """Bring the sets that follow pieces in flight up to date after `parent`'s count changed: it has
        a slot free below its limit (backing off or not), it is a normal parent with pieces in flight."""
        peer_id = parent.peer_id
        if parent.in_flight < (self._seed_limit() if parent.is_seed else PARENT_PIECE_LIMIT):
            self._parents_with_slot.add(peer_id)
        else:
            self._parents_with_slot.discard(peer_id)
        if parent.in_flight and not parent.is_seed:
            self._loaded_normal_parents.add(peer_id)
        else:
            self._loaded_normal_parents.discard(peer_id)

    def _count_all_loads(self) -> None:
        """The same for every parent (a parent came or went: a seed's limit may have changed)."""
        self._parents_with_slot.clear()
        self._loaded_normal_parents.clear()
        for parent in self.parents.values():
            self._count_load(parent)

    def _free_parents(self, now: float) -> set[str]:
        """The parents that may be asked for one more piece now: a slot free, not backing off."""
        return self._parents_with_slot.difference(self._backing_off_now(now))

    def _pieces_since_idle(self, now: float) -> set[int]:
        """The pieces a dispatch may fetch now when the last one found nothing more: one a parent
        announced since, if that parent can take one; those of a parent that gained room since; one
        no longer in flight, if a parent that can take one holds it. Every other piece has no parent
        to go to, as at the last dispatch (parents only filled up or backed off since)."""
        # Loops rather than comprehensions: these lists hold a piece or two, and this runs after
        # nearly every event.
        backing_off = self._backing_off_now(now)
        with_slot, fetchable = self._parents_with_slot, self._fetchable
        pieces: set[int] = set()
        for parent_id, number in self._announced:
            if parent_id in with_slot and parent_id not in backing_off and fetchable(number):
                pieces.add(number)
        for parent_id in self._gained_room:
            if parent_id in with_slot and parent_id not in backing_off:
                pieces |= self._fetchable_among(self.held[parent_id])
        for number in self._unsettled:
            if fetchable(number):
                for holder in self.holders.get(number, ()):
                    if holder in with_slot and holder not in backing_off:
                        pieces.add(number)
                        break
        return pieces

    def _fetchable(self, number: int) -> bool:
        """The piece is wanted, not here and not in flight."""
        return (number not in self.finished and number not in self.in_flight
                and (self.want_everything or number in self.wanted))

    def _fetchable_among(self, numbers: set[int]) -> set[int]:
        """Those of `numbers` that are wanted, not here and not in flight (set operations that look
        up each of `numbers`, however many pieces are here)."""
        fetchable = numbers.difference(self.in_flight).difference(self.finished)
        if not self.want_everything:
            fetchable &= self.wanted
        return fetchable

    def _dispatch_all(self, now: float, pieces: set[int] | None = None) -> list[FetchPiece]:
        """Fetches to start now among `pieces`, or among every piece when None: the same as among
        every piece when the others cannot go anywhere (see _pieces_since_idle)."""
        # Only parents with a free slot can take a piece: with none, there is nothing to scan.
        self._dispatch_limited = False
        free = self._free_parents(now)
        if not free:
            return []
        # Pieces a free parent holds, by set operations on the parents' holdings (holders drops
        # finished pieces, so what is left is small; a scan in Python was the simulator's hot spot).
        if pieces is None:
            pieces = set()
            for parent_id in free:
                pieces |= self.held[parent_id]
        # (holders has every piece announced and not finished: each of these has its entry)
        fetchable = self._fetchable_among(pieces)
        ready = sorted(fetchable, key=self._order) if len(fetchable) > 1 else list(fetchable)
        peers_busy = bool(self._loaded_normal_parents)
        # While a reader waits, the rest of the blob keeps only a few transfers going.
        background_room = self.concurrent_pieces
        if self.read_lazily or not self.priority <= self.finished:
            cap = 0 if self._hold_background_for_readers(now) else BACKGROUND_PIECES_UNDER_DEMAND
            background_room = cap - sum(1 for n in self.in_flight if n not in self.priority)
        fetches: list[FetchPiece] = []
        for number in ready:
            if not free:
                break
            background = number not in self.priority
            if len(self.in_flight) >= self.concurrent_pieces or (background and background_room <= 0):
                self._dispatch_limited = True
                break  # (for the background limit: ready is sorted, only background pieces are left)
            holders = self.holders[number] & free
            if not holders:
                continue
            # A seed serves what no normal parent has, or a peer whose normal parents are idle;
            # a reader's piece too waits for a normal holder rather than load the seed's uplink,
            # which every reader's demands and the rarest pieces need.
            parent = self._pick_parent(holders, use_seed=not peers_busy or self._only_seeds_hold(number))
            if parent is None:
                continue
            peers_busy = peers_busy or not parent.is_seed
            background_room -= background
            parent.in_flight += 1
            self._count_load(parent)
            if parent.peer_id not in self._parents_with_slot:
                free.discard(parent.peer_id)
            self.in_flight[number] = parent.peer_id
            fetches.append(FetchPiece(number, parent.peer_id))
        return fetches

    def _order(self, number: int) -> tuple[int, int, int]:
        # Prioritized pieces first, in order; the rest rarest first (fewest holders among the
        # parents), equals in this peer's own shuffled order, so neighbours fetch different pieces.
        if number in self.priority:
            return (0, 0, number)
        return (1, len(self.holders.get(number, ())), hash((self._order_salt, number)))

    def _only_seeds_hold(self, number: int) -> bool:
        """No normal parent has the piece: a seed may serve it even while normal parents keep this
        peer busy (it leaves the seed for the swarm; the seed's uplink would idle otherwise)."""
        return self._normal_parents.isdisjoint(self.holders.get(number, ()))

    def _pick_parent(self, holders: set[str], *, use_seed: bool) -> ParentState | None:
        """Among `holders` (parents with a free slot), normal before seed, then the least busy."""
        candidates = []
        for parent_id in sorted(holders):
            parent = self.parents.get(parent_id)
            if parent is not None and (use_seed or not parent.is_seed):
                candidates.append(parent)
        if len(candidates) == 1:
            self.rng.random()  # min() below draws one per candidate: so does this, and later draws stay
            return candidates[0]
        if not candidates:
            return None
        return min(candidates, key=lambda p: (p.is_seed, p.in_flight, self.rng.random()))

    def _settle(self, number: int, parent_id: str) -> ParentState | None:
        if self.in_flight.get(number) == parent_id:
            del self.in_flight[number]
        parent = self.parents.get(parent_id)
        if parent is not None and parent.in_flight > 0:
            parent.in_flight -= 1
            self._count_load(parent)
        if self._dispatch_limited or not self._loaded_normal_parents:
            # A transfer under a limit may let any piece go; with no normal parent busy any more, a
            # seed may serve pieces normal parents hold: the next dispatch looks at everything.
            self._changed()
        else:
            self._unsettled.append(number)
            if parent is not None:
                self._gained_room.append(parent_id)
        return parent

    def _drop(self, parent: ParentState, reason: str) -> list[Command]:
        self._changed()
        del self.parents[parent.peer_id]
        self._normal_parents.discard(parent.peer_id)
        self._backing_off.pop(parent.peer_id, None)
        self._count_all_loads()
        self.blocked.add(parent.peer_id)
        for number in self.held.pop(parent.peer_id, ()):
            self.holders[number].discard(parent.peer_id)
        return [DropParent(parent.peer_id, reason),
                Reschedule(f"parent {parent.peer_id} dropped: {reason}", (parent.peer_id,))]
