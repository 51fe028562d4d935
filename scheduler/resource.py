"""What the scheduler knows: hosts, tasks, peers, their pieces, and their lifecycles.

Everything here is plain data with indexes; there is no I/O and no clock (times are passed in).
The peer and task lifecycles are tables (:data:`PEER_TRANSITIONS`, :data:`TASK_TRANSITIONS`):
a transition not in its table raises :class:`InvalidTransition`.

Indexes kept so that per-message work is O(candidates), not O(peers in the task):

- ``Task.parents``: peers of the task that may be offered as parents right now;
- ``Task.hungry``: peers downloading from parents that have fewer parents than wanted, by how
  many normal (non-seed) parents they have, so the neediest are served first;
- ``Task.waiting``: peers with no parent yet, waiting for one (or for a retry);
- ``Task.coming``: running peers with no piece yet that are fed by a parent and have room for
  children (parents to come, for a waiting peer), by their distance in hops from a peer that has
  pieces, nearest first;
- ``Task.pieces``: piece number -> (offset, length, digest), from back-to-source reports only;
- ``Host.peers``: the peers living on a host.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

from common.errors import InvalidTransition as InvalidTransition
from common.hosts import HostType, default_upload_slots

# Piece costs kept per parent for the bad-parent test.
PIECE_COST_WINDOW = 100


# --------------------------------------------------------------------------------------------
# Lifecycles
# --------------------------------------------------------------------------------------------


class PeerState(StrEnum):
    """Where a peer is in its download (values are what ``common.v2.Peer.state`` carries)."""

    PENDING = "Pending"
    RECEIVED_NORMAL = "ReceivedNormal"
    RECEIVED_BACK_TO_SOURCE = "ReceivedBackToSource"
    RECEIVED_EMPTY = "ReceivedEmpty"
    RUNNING = "Running"
    BACK_TO_SOURCE = "BackToSource"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    LEAVE = "Leave"


class PeerEvent(StrEnum):
    """What can happen to a peer."""

    SCHEDULE_NORMAL = "ScheduleNormal"  # the scheduler sent candidate parents
    SCHEDULE_BACK_TO_SOURCE = "ScheduleBackToSource"  # the scheduler said: go to the origin
    SCHEDULE_EMPTY = "ScheduleEmpty"  # the scheduler said: the content is empty
    DOWNLOAD = "Download"  # the peer started downloading from parents
    DOWNLOAD_BACK_TO_SOURCE = "DownloadBackToSource"  # the peer started downloading from the origin
    SUCCEED = "Succeed"
    FAIL = "Fail"
    LEAVE = "Leave"


_P = PeerState
_E = PeerEvent

# (state, event) -> next state. Anything missing is illegal.
PEER_TRANSITIONS: Mapping[tuple[PeerState, PeerEvent], PeerState] = {
    (_P.PENDING, _E.SCHEDULE_NORMAL): _P.RECEIVED_NORMAL,
    (_P.PENDING, _E.SCHEDULE_BACK_TO_SOURCE): _P.RECEIVED_BACK_TO_SOURCE,
    (_P.PENDING, _E.SCHEDULE_EMPTY): _P.RECEIVED_EMPTY,
    # a peer whose schedule timeout fired may go to the origin on its own
    (_P.PENDING, _E.DOWNLOAD_BACK_TO_SOURCE): _P.BACK_TO_SOURCE,
    (_P.PENDING, _E.FAIL): _P.FAILED,
    (_P.PENDING, _E.LEAVE): _P.LEAVE,
    (_P.RECEIVED_NORMAL, _E.SCHEDULE_NORMAL): _P.RECEIVED_NORMAL,
    (_P.RECEIVED_NORMAL, _E.SCHEDULE_BACK_TO_SOURCE): _P.RECEIVED_BACK_TO_SOURCE,
    (_P.RECEIVED_NORMAL, _E.DOWNLOAD): _P.RUNNING,
    (_P.RECEIVED_NORMAL, _E.DOWNLOAD_BACK_TO_SOURCE): _P.BACK_TO_SOURCE,
    (_P.RECEIVED_NORMAL, _E.SUCCEED): _P.SUCCEEDED,  # e.g. it had the content already
    (_P.RECEIVED_NORMAL, _E.FAIL): _P.FAILED,
    (_P.RECEIVED_NORMAL, _E.LEAVE): _P.LEAVE,
    (_P.RECEIVED_BACK_TO_SOURCE, _E.SCHEDULE_BACK_TO_SOURCE): _P.RECEIVED_BACK_TO_SOURCE,
    (_P.RECEIVED_BACK_TO_SOURCE, _E.DOWNLOAD_BACK_TO_SOURCE): _P.BACK_TO_SOURCE,
    (_P.RECEIVED_BACK_TO_SOURCE, _E.SUCCEED): _P.SUCCEEDED,
    (_P.RECEIVED_BACK_TO_SOURCE, _E.FAIL): _P.FAILED,
    (_P.RECEIVED_BACK_TO_SOURCE, _E.LEAVE): _P.LEAVE,
    (_P.RECEIVED_EMPTY, _E.DOWNLOAD): _P.RUNNING,
    (_P.RECEIVED_EMPTY, _E.DOWNLOAD_BACK_TO_SOURCE): _P.BACK_TO_SOURCE,
    (_P.RECEIVED_EMPTY, _E.SUCCEED): _P.SUCCEEDED,
    (_P.RECEIVED_EMPTY, _E.FAIL): _P.FAILED,
    (_P.RECEIVED_EMPTY, _E.LEAVE): _P.LEAVE,
    # a running peer keeps its pieces (and stays a parent) until it really switches to the origin
    (_P.RUNNING, _E.SCHEDULE_NORMAL): _P.RUNNING,
    (_P.RUNNING, _E.SCHEDULE_BACK_TO_SOURCE): _P.RUNNING,
    (_P.RUNNING, _E.DOWNLOAD): _P.RUNNING,
    (_P.RUNNING, _E.DOWNLOAD_BACK_TO_SOURCE): _P.BACK_TO_SOURCE,
    (_P.RUNNING, _E.SUCCEED): _P.SUCCEEDED,
    (_P.RUNNING, _E.FAIL): _P.FAILED,
    (_P.RUNNING, _E.LEAVE): _P.LEAVE,
    (_P.BACK_TO_SOURCE, _E.DOWNLOAD_BACK_TO_SOURCE): _P.BACK_TO_SOURCE,
    (_P.BACK_TO_SOURCE, _E.SUCCEED): _P.SUCCEEDED,
    (_P.BACK_TO_SOURCE, _E.FAIL): _P.FAILED,
    (_P.BACK_TO_SOURCE, _E.LEAVE): _P.LEAVE,
    (_P.SUCCEEDED, _E.FAIL): _P.FAILED,
    (_P.SUCCEEDED, _E.LEAVE): _P.LEAVE,
    (_P.FAILED, _E.LEAVE): _P.LEAVE,
}

# States in which a peer holds (or is fetching) content another peer can download.
PARENT_STATES = frozenset({PeerState.RUNNING, PeerState.BACK_TO_SOURCE, PeerState.SUCCEEDED})
# States in which a peer is done (no more scheduling for it).
TERMINAL_STATES = frozenset({PeerState.SUCCEEDED, PeerState.FAILED, PeerState.LEAVE})
# States in which a peer that was told to back-source is still fetching from the origin.
FETCHING_STATES = frozenset(
    {PeerState.PENDING, PeerState.RECEIVED_BACK_TO_SOURCE, PeerState.RUNNING, PeerState.BACK_TO_SOURCE}
)


class TaskState(StrEnum):
    """Where a task is (values are what ``common.v2.Task.state`` carries)."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    LEAVE = "Leave"


class TaskEvent(StrEnum):
    """What can happen to a task."""

    DOWNLOAD = "Download"  # a peer started fetching it
    SUCCEED = "Succeed"  # a peer has all of it
    FAIL = "Fail"  # the last peer fetching it from the origin failed
    LEAVE = "Leave"


_T = TaskState
_TE = TaskEvent

TASK_TRANSITIONS: Mapping[tuple[TaskState, TaskEvent], TaskState] = {
    (_T.PENDING, _TE.DOWNLOAD): _T.RUNNING,
    (_T.FAILED, _TE.DOWNLOAD): _T.RUNNING,
    (_T.LEAVE, _TE.DOWNLOAD): _T.RUNNING,
    (_T.RUNNING, _TE.DOWNLOAD): _T.RUNNING,
    (_T.SUCCEEDED, _TE.DOWNLOAD): _T.SUCCEEDED,  # more downloads of a complete task
    (_T.PENDING, _TE.SUCCEED): _T.SUCCEEDED,
    (_T.RUNNING, _TE.SUCCEED): _T.SUCCEEDED,
    (_T.FAILED, _TE.SUCCEED): _T.SUCCEEDED,
    (_T.SUCCEEDED, _TE.SUCCEED): _T.SUCCEEDED,
    (_T.PENDING, _TE.FAIL): _T.FAILED,
    (_T.RUNNING, _TE.FAIL): _T.FAILED,
    (_T.FAILED, _TE.FAIL): _T.FAILED,
    (_T.PENDING, _TE.LEAVE): _T.LEAVE,
    (_T.RUNNING, _TE.LEAVE): _T.LEAVE,
    (_T.SUCCEEDED, _TE.LEAVE): _T.LEAVE,
    (_T.FAILED, _TE.LEAVE): _T.LEAVE,
}


# --------------------------------------------------------------------------------------------
# Small containers
# --------------------------------------------------------------------------------------------

K = TypeVar("K")
V = TypeVar("V")


class IndexedMap(Generic[K, V]):
    """A dict that can also draw a random sample of its values in O(k): list + position index."""

    __slots__ = ("_keys", "_pos", "_values")

    def __init__(self) -> None:
        self._keys: list[K] = []
        self._values: list[V] = []
        self._pos: dict[K, int] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._pos

    def __iter__(self) -> Iterator[V]:
        return iter(list(self._values))

    def get(self, key: K) -> V | None:
        pos = self._pos.get(key)
        return None if pos is None else self._values[pos]

    def add(self, key: K, value: V) -> None:
        pos = self._pos.get(key)
        if pos is not None:
            self._values[pos] = value
            return
        self._pos[key] = len(self._keys)
        self._keys.append(key)
        self._values.append(value)

    def discard(self, key: K) -> None:
        pos = self._pos.pop(key, None)
        if pos is None:
            return
        last_key = self._keys.pop()
        last_value = self._values.pop()
        if pos < len(self._keys):  # move the last element into the hole
            self._keys[pos] = last_key
            self._values[pos] = last_value
            self._pos[last_key] = pos

    def sample(self, k: int, rng: random.Random) -> list[V]:
        """Up to `k` distinct values at random (all of them, in index order, when there are <= k)."""
        if len(self._values) <= k:
            return list(self._values)
        return rng.sample(self._values, k)

    def first(self, k: int) -> list[V]:
        """The first `k` values in index order."""
        return self._values[:k]


class NeedIndex:
    """Peers filed by a small count (``Task.hungry``: their normal parents; ``Task.coming``: hops
    from a peer with pieces), drawn lowest count first, oldest filed first within a count: every
    draw is O(k), and among equals the peer filed longest ago comes first."""

    __slots__ = ("_buckets", "_where")

    def __init__(self) -> None:
        self._buckets: list[dict[str, Peer]] = []
        self._where: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def file(self, peer: Peer, count: int) -> None:
        """Add `peer` under `count`, or move it there (to the end of that count) from where it was."""
        where = self._where.get(peer.id)
        if where == count:
            return
        if where is not None:
            del self._buckets[where][peer.id]
        while len(self._buckets) <= count:
            self._buckets.append({})
        self._buckets[count][peer.id] = peer
        self._where[peer.id] = count

    def discard(self, key: str) -> None:
        where = self._where.pop(key, None)
        if where is not None:
            del self._buckets[where][key]

    def neediest(self, k: int) -> list[Peer]:
        """Up to `k` peers, lowest count first."""
        found: list[Peer] = []
        for bucket in self._buckets:
            for peer in bucket.values():
                if len(found) >= k:
                    return found
                found.append(peer)
        return found


class Bitset:
    """Finished piece numbers of one peer: one bit per piece (10k peers x 500 pieces stays small)."""

    __slots__ = ("_bits", "count")

    def __init__(self) -> None:
        self._bits = bytearray()
        self.count = 0

    def add(self, number: int) -> bool:
        """Set bit `number`; True when it was not set before."""
        byte, bit = divmod(number, 8)
        if byte >= len(self._bits):
            self._bits.extend(bytes(byte + 1 - len(self._bits)))
        mask = 1 << bit
        if self._bits[byte] & mask:
            return False
        self._bits[byte] |= mask
        self.count += 1
        return True

    def __contains__(self, number: object) -> bool:
        if not isinstance(number, int) or number < 0:
            return False
        byte, bit = divmod(number, 8)
        return byte < len(self._bits) and bool(self._bits[byte] & (1 << bit))

    def __iter__(self) -> Iterator[int]:
        for byte, value in enumerate(self._bits):
            if value:
                for bit in range(8):
                    if value & (1 << bit):
                        yield byte * 8 + bit

    def __len__(self) -> int:
        return self.count


class CostWindow:
    """The last piece costs (seconds) with running sums for mean and standard deviation."""

    __slots__ = ("_costs", "_sum", "_sum_sq")

    def __init__(self, size: int = PIECE_COST_WINDOW) -> None:
        self._costs: deque[float] = deque(maxlen=size)
        self._sum = 0.0
        self._sum_sq = 0.0

    def add(self, cost: float) -> None:
        if len(self._costs) == self._costs.maxlen:
            old = self._costs[0]
            self._sum -= old
            self._sum_sq -= old * old
        self._costs.append(cost)
        self._sum += cost
        self._sum_sq += cost * cost

    def __len__(self) -> int:
        return len(self._costs)

    @property
    def last(self) -> float | None:
        return self._costs[-1] if self._costs else None

    def previous_stats(self) -> tuple[int, float, float]:
        """(count, mean, stddev) of the costs before the last one."""
        n = len(self._costs) - 1
        if n <= 0:
            return 0, 0.0, 0.0
        last = self._costs[-1]
        total = self._sum - last
        mean = total / n
        variance = max(0.0, (self._sum_sq - last * last) / n - mean * mean)
        return n, mean, math.sqrt(variance)


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostInfo:
    """What a host announces about itself (from ``common.v2.Host``)."""

    id: str
    ip: str
    hostname: str = ""
    type: int = HostType.NORMAL
    port: int = 0  # dfdaemon gRPC (DfdaemonUpload)
    download_port: int = 0  # HTTP piece server
    proxy_port: int = 0
    idc: str = ""
    location: str = ""
    upload_slots: int = 0  # 0: the default for the host type
    uploads_in_progress: int = 0
    raw: object = None  # the announced message, kept for the gRPC edge; the core never reads it

    @property
    def is_seed(self) -> bool:
        return HostType.of(self.type).is_seed

    @property
    def grpc_address(self) -> str:
        """``ip:port`` of its DfdaemonUpload service."""
        ip = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class DownloadSpec:
    """The download a peer registered with (from ``common.v2.Download``)."""

    url: str = ""
    digest: str = ""
    tag: str = ""
    application: str = ""
    priority: int = 0
    filtered_query_params: tuple[str, ...] = ()
    request_header: Mapping[str, str] = field(default_factory=dict)
    piece_length: int = 0
    range_start: int = 0
    range_length: int = 0  # 0: the whole content
    need_back_to_source: bool = False
    disable_back_to_source: bool = False
    task_type: int = 0
    # A Range read (read lazily, in small pieces); with prefetch off it wants only the pieces its
    # readers wait for (lazy).
    ranged: bool = False
    prefetch: bool = True

    @property
    def lazy(self) -> bool:
        """A Range read without prefetch: only the pieces its readers wait for."""
        return self.ranged and not self.prefetch


@dataclass(frozen=True, slots=True)
class PieceRecord:
    """One piece as the back-sourcing peer reported it."""

    number: int
    offset: int
    length: int
    digest: str

    @property
    def end(self) -> int:
        return self.offset + self.length


class Host:
    """A node running a dfdaemon (or a seed)."""

    def __init__(self, info: HostInfo, now: float, owner: str = "") -> None:
        self.info = info
        self.owner = owner  # the identity that announced it (scheduler.core.Caller.owner); only it may again
        self.created_at = now
        self.announced_at = now
        self.peers: dict[str, Peer] = {}
        self.child_edges = 0  # children currently assigned to peers on this host

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def upload_limit(self) -> int:
        if self.info.upload_slots > 0:
            return self.info.upload_slots
        return default_upload_slots(self.info.is_seed)

    @property
    def free_upload_slots(self) -> int:
        """Slots left: the limit minus what is in use (reported uploads or assigned children)."""
        return self.upload_limit - max(self.info.uploads_in_progress, self.child_edges)


class Task:
    """One content, shared by every peer downloading it."""

    def __init__(self, task_id: str, download: DownloadSpec, now: float) -> None:
        self.id = task_id
        self.download = download
        self.state = TaskState.PENDING
        self.created_at = now
        self.updated_at = now
        self.peers: dict[str, Peer] = {}
        self.parents: IndexedMap[str, Peer] = IndexedMap()
        self.hungry = NeedIndex()
        self.coming = NeedIndex()
        self.waiting: dict[str, Peer] = {}  # insertion order = waiting order
        self.back_to_source_peers: dict[str, Peer] = {}  # peers ever told (or choosing) to back-source
        self.pieces: dict[int, PieceRecord] = {}  # from back-source reports only
        self.piece_spans: dict[int, tuple[int, int]] = {}  # offset, length from any report
        # The piece length the back-sourcer's reports define (0: none yet); `piece_length_known`
        # once a piece past the first proved it (a lone first piece may be the short last one).
        self.piece_length = 0
        self.piece_length_known = False
        self.content_length: int | None = None
        self.piece_count: int | None = None
        self.max_finished = 0  # most pieces any peer of the task has
        self.seed_trigger: tuple[str, float] | None = None  # (address, when) of a trigger in flight
        # The seed triggered for a lazy read (it fetches only what children demand): it is
        # triggered again for the whole content when a download that wants it all joins.
        self.lazy_seed: str | None = None
        # Pieces were lost with a fetcher that left (scheduler.core: "Lost pieces"): the next peer to
        # start fetching from the origin becomes a parent of some of the peers still downloading the task.
        self.rescue_pending = False
        # The current back-to-source round (scheduler.core: "Origin failures"): attempts that
        # failed, the origin's last answer, when the next attempt may start, and, once the task
        # has failed, until when new downloads fail at once with that answer.
        self.origin_failures = 0
        self.origin_error = ""
        self.retry_at: float | None = None
        self.failed_until: float | None = None

    def transition(self, event: TaskEvent, now: float) -> None:
        next_state = TASK_TRANSITIONS.get((self.state, event))
        if next_state is None:
            raise InvalidTransition("task", self.id, self.state, event)
        self.state = next_state
        self.updated_at = now

    def can(self, event: TaskEvent) -> bool:
        return (self.state, event) in TASK_TRANSITIONS


class Peer:
    """One download of one task on one host."""

    def __init__(self, peer_id: str, task: Task, host: Host, download: DownloadSpec, now: float) -> None:
        self.id = peer_id
        self.task = task
        self.host = host
        self.download = download
        self.state = PeerState.PENDING
        self.created_at = now
        self.updated_at = now
        self.finished = Bitset()
        self.parents: dict[str, Peer] = {}
        self.children: dict[str, Peer] = {}
        self.blocklist: set[str] = set()
        self.upload_costs = CostWindow()  # costs children reported for pieces from this peer
        self.upload_succeeded = 0
        self.upload_failed = 0
        self.failed_by: set[str] = set()  # identities (Host.owner) of children it failed
        self.demoted = False  # reported bad by enough children: not offered again
        self.waiting_since: float | None = None
        self.hops = 0  # from a peer with pieces, while it has none (Task.coming)
        self.origin_status: int | None = None  # HTTP status of the origin's refusal it reported, if any
        # The scheduler sent it to the origin for the task (or it is a seed): its piece digests
        # and geometry define the task. A peer that went to the origin on its own never does.
        self.defines_content = False

    def transition(self, event: PeerEvent, now: float) -> None:
        next_state = PEER_TRANSITIONS.get((self.state, event))
        if next_state is None:
            raise InvalidTransition("peer", self.id, self.state, event)
        self.state = next_state
        self.updated_at = now

    def can(self, event: PeerEvent) -> bool:
        return (self.state, event) in PEER_TRANSITIONS

    @property
    def is_seed(self) -> bool:
        return self.host.info.is_seed

    @property
    def eligible_parent(self) -> bool:
        """May be offered as a parent: it has pieces (a seed back-sourcing counts with none)."""
        if self.demoted or self.state not in PARENT_STATES:
            return False
        if self.finished.count > 0:
            return True
        return self.is_seed and self.state is PeerState.BACK_TO_SOURCE
