"""The scheduling core: events in, decisions out. Pure and synchronous.

:class:`SchedulerCore` owns the hosts, tasks and peers (:mod:`scheduler.resource`). Each public
method takes one event (a host announced, a peer registered, a piece finished, time passed) and
returns the decisions it leads to (:data:`Decision`); the gRPC service sends them. Nothing here
does I/O or sleeps; time comes from the injected :class:`~common.clock.Clock` and randomness from
an injected :class:`random.Random`, so the same inputs give the same decisions.

Policy in short:

- a registering peer gets candidate parents (filtered and scored by :mod:`scheduler.scheduling`);
- with none, and nobody fetching the task yet, a seed is triggered (rendezvous hash of the task id
  among the available seeds) and the peer waits; without seeds it goes back to source, within the
  task's back-to-source limit;
- a waiting peer is offered parents as soon as one appears; :meth:`SchedulerCore.tick` sends it
  back to source after ``retry_back_to_source_limit`` retry intervals and fails it after
  ``retry_limit``;
- a peer that becomes a parent is pushed to a few children of the task that lack parents.

Origin failures (a seed or a peer reports that its back-to-source failed, with the origin's HTTP
status when it answered one; :func:`scheduler.scheduling.origin_verdict` judges it):

- a definite 4xx (404, 410, ...) fails the task at once: every peer waiting on it ends with the
  origin's answer (``FAILED_PRECONDITION``), and for ``failed_task_backoff`` new downloads of the
  task fail the same way without anyone asking the origin; the first download after that starts
  a new round. A 401/403/407 fails the waiting peers but not later downloads (other clients may
  bring other credentials);
- anything else (5xx, refused, unknown host, timed out) is retried: the waiting peers keep
  waiting, and the next attempt (a seed trigger, or a peer sent back to source) starts
  ``origin_retry_backoff`` later, doubled at each failure, until ``origin_attempt_limit``
  attempts have failed; then the task fails as above;
- a peer never goes to the origin on its own because the attempt of another failed: the round's
  verdict, not the waiting time, decides what happens to the peers waiting on it.

Who may do what (every event carries its :class:`Caller`: the identity its mutual-TLS certificate
proves, :mod:`common.identity`, or none in plaintext, and the IP it came from):

- a host record belongs to the identity that announced it (:attr:`Caller.owner`); only that
  identity may announce it again, register peers on it or delete it. A per-host certificate
  (``<hostname>.<role>.damselfly``) only announces its own hostname;
- a seed is a host the scheduler trusts to fetch for everyone: with TLS, one whose certificate
  proves the ``seed`` role; in plaintext, one whose address is in ``--seed-peer``. Any other host
  announcing a seed type is refused, so triggers (and the clients' credentials in them) only go to
  configured or proven seeds;
- only a peer the scheduler sent to the origin (``need_back_to_source`` answer) or a seed defines
  a task's piece digests and geometry; a peer that went to the origin on its own, or asked to,
  fetches for itself only. Its pieces count only where they agree with the defining ones;
- piece reports are checked against that geometry (offsets on one piece length, at most
  ``MAX_PIECE_COUNT`` pieces, lengths within ``MAX_PIECE_LENGTH``); a report or a registration that
  disagrees is refused (``INVALID_ARGUMENT``);
- a parent is demoted for a task only on failure reports of ``FAILED_BY_LIMIT`` different
  identities: one client cannot take a parent away from everyone (in plaintext, where nothing
  is proven, of different hosts: there one client can announce several and do it);
- ``DeleteHost`` (of another's host), ``DeleteTask``, ``DeletePeer``, ``ListHosts`` and preheat need
  the ``admin`` role; in plaintext, a caller on loopback (there is no identity to check);
- state is bounded: ``max_hosts_per_client`` hosts per identity, ``max_peers_per_host`` peers per
  host (its oldest finished ones are forgotten first), ``max_streams_per_client`` streams per
  identity; failed peers are forgotten after ``FAILED_PEER_TTL``, tasks without peers after
  ``ABANDONED_TASK_TTL``.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import random
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, replace
from enum import StrEnum

from common import hashring
from common.clock import Clock
from common.config import SchedulerConfig, split_address
from common.download import Priority
from common.errors import HostNotFound, PeerNotFound, PermissionDenied, QuotaExceeded, TaskNotFound
from common.identity import Identity, Role
from common.pieces import DEFAULT_MIN_PIECE_LENGTH, MAX_PIECE_COUNT, MAX_PIECE_LENGTH
from scheduler.resource import (
    FETCHING_STATES,
    TERMINAL_STATES,
    DownloadSpec,
    Host,
    HostInfo,
    InvalidTransition,
    Peer,
    PeerEvent,
    PeerState,
    PieceRecord,
    Task,
    TaskEvent,
    TaskState,
)
from scheduler.scheduling import (
    OriginVerdict,
    is_bad_parent,
    is_busy,
    origin_retry_delay,
    origin_verdict,
    parents_to_come,
    rejection,
    select_parents,
)

log = logging.getLogger(__name__)

# A new parent wakes at most this many waiting peers of its task at once (the rest wait for the
# next parent or the next tick), and is pushed to at most PUSH_LIMIT running children, looking at
# no more than PUSH_SCAN of them.
WAKE_LIMIT = 64
PUSH_LIMIT = 8
PUSH_SCAN = 32
# A peer reading the blob in Range reads (nydusd) holds the pieces its readers happened to ask for,
# and a neighbour learns that it has one only from its announcements, as its child: otherwise it
# asks the seed again. So a Range reader's new parent is pushed to as many children as the mesh
# takes (bench/lazyload.py, N=16: the seed sent the hot pieces 4.7 times each with PUSH_LIMIT,
# 2.2 times with this).
RANGE_READER_PUSH_LIMIT = 15
# The fetcher brought in for lost pieces is made a parent of this many peers still downloading;
# the mesh carries the pieces on from them, as from a seed's few children. All of them gave the
# same completion times in bench/swarm_sim.py (16 to 1,000 peers, a seed killed or leaving), and
# put thousands of piece streams on one daemon.
LOST_PIECES_CHILDREN = 16
# A parent reported failed (not temporarily) by children of this many different identities
# (Caller.owner of their hosts) is not offered again for the task. One report only blocklists the
# parent for the child that made it: a single client must not take a parent away from everyone.
FAILED_BY_LIMIT = 2
# The mesh grows with the swarm: a schedule offers candidate_parent_limit parents, and a peer
# keeps being pushed new ones (as other peers get their first piece) until it has
# MESH_PARENT_LIMIT (or the candidate limit, if higher). Three parents each left most uplinks idle
# (bench/swarm_sim.py, N=16, 64 MiB, with the rest of issue 11: 23 s with 3, 13 s with 15).
MESH_PARENT_LIMIT = 15
# Peers looked at when a waiting peer is given parents that have no piece yet (parents_to_come).
PARENTS_TO_COME_VISIT = 32
# Hops counted for a parent to come (Task.coming files them nearest first; deeper is all the same).
MAX_HOPS = 16
# A failed peer is forgotten this long after its last event (it serves nobody); a task with no
# peer left is forgotten this long after its last event (unless its origin failure still stands).
FAILED_PEER_TTL = 300.0
PLAINTEXT_OWNER = "plaintext@"  # the owner of a host announced without TLS: its IP is all there is
ABANDONED_TASK_TTL = 600.0


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def ip_of_grpc_peer(peer: str) -> str:
    """The IP in a gRPC peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``); '' for others."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return ""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent an event: the identity its certificate proves (None: plaintext, or TLS without a
    client certificate) and the IP it came from. :data:`SYSTEM` is the process itself (simulators,
    tests of the scheduling policy), allowed everything."""

    identity: Identity | None
    ip: str = ""
    system: bool = False

    @property
    def owner(self) -> str:
        """Whom a host record belongs to: a per-host certificate by itself; a shared certificate or
        no certificate together with the IP it came from (all that tells its holders apart)."""
        if self.identity is None:
            return f"{PLAINTEXT_OWNER}{self.ip}"
        if self.identity.hostname:
            return f"{self.identity.hostname}.{self.identity.role}"
        return f"{self.identity.role}@{self.ip}"

    @property
    def is_admin(self) -> bool:
        """May list and delete anything: the admin role; in plaintext, a caller on loopback."""
        if self.system:
            return True
        if self.identity is None:
            return _is_loopback(self.ip)
        return self.identity.role is Role.ADMIN

    def describe(self) -> str:
        if self.identity is None:
            return f"a plaintext caller at {self.ip or 'an unknown address'}"
        return f"{self.identity.hostname + '.' if self.identity.hostname else ''}{self.identity.role}.damselfly " \
               f"at {self.ip or 'an unknown address'}"


SYSTEM = Caller(None, system=True)


def stream_message_problem(bound_peer_id: str, peer_id: str, is_register: bool) -> str:
    """Why a message may not be read on an AnnouncePeer stream bound to `bound_peer_id` ('' when
    none yet); '' when it may. A stream speaks for the one peer it registered, and nothing else."""
    if not bound_peer_id:
        if not is_register:
            return (f"the first message of an AnnouncePeer stream must register its peer; "
                    f"got another message for peer {peer_id!r}")
        if not peer_id:
            return "register_peer_request without a peer_id"
        return ""
    if peer_id != bound_peer_id:
        return (f"this AnnouncePeer stream belongs to peer {bound_peer_id}; a message for peer {peer_id} "
                "must go on that peer's own stream")
    return ""


def _seed_download(download: DownloadSpec) -> DownloadSpec:
    """What a seed is triggered with for `download`: a back-to-source of the whole content, or
    (a lazy read) of what children demand. Seeds fetch for everyone: a peer's
    disable_back_to_source is about that peer only."""
    return replace(download, need_back_to_source=True, disable_back_to_source=False, range_start=0, range_length=0)


def geometry_problem(piece_length: int, number: int, offset: int, length: int) -> str:
    """Why a piece report does not fit a task cut in `piece_length` pieces (0: not known yet)."""
    if not 0 <= number < MAX_PIECE_COUNT:
        return f"piece number {number} is outside 0..{MAX_PIECE_COUNT - 1}"
    if not 0 < length <= MAX_PIECE_LENGTH:
        return f"piece {number} has length {length}, outside 1..{MAX_PIECE_LENGTH}"
    if offset < 0:
        return f"piece {number} has a negative offset {offset}"
    if piece_length and (offset != number * piece_length or length > piece_length):
        return (f"piece {number} at offset {offset} with length {length} does not fit the task's "
                f"{piece_length}-byte pieces")
    if not piece_length and number > 0 and offset % number:
        return f"piece {number} at offset {offset} is not on a whole piece length"
    return ""


def requested_piece_length_problem(piece_length: int) -> str:
    """Why a download's requested piece length is refused ('' when 0, i.e. none, or in bounds)."""
    if piece_length and not DEFAULT_MIN_PIECE_LENGTH <= piece_length <= MAX_PIECE_LENGTH:
        return (f"piece length {piece_length} is outside {DEFAULT_MIN_PIECE_LENGTH}..{MAX_PIECE_LENGTH} bytes; "
                "leave it unset to let the content's size decide")
    return ""


class Code(StrEnum):
    """gRPC status codes the core asks the service to end a stream with (names of grpc.StatusCode)."""

    NOT_FOUND = "NOT_FOUND"  # unknown host on register (the peer re-announces it), unknown peer
    # The download cannot succeed now and the peer must not try another way: the task failed at
    # the origin (the message is the origin's answer), or an event its lifecycle does not allow.
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # no parent in time and no back-to-source allowed
    ABORTED = "ABORTED"  # the peer was removed (its host left, it registered again, deleted)
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    PERMISSION_DENIED = "PERMISSION_DENIED"  # the caller's identity may not act for that host or peer


@dataclass(frozen=True, slots=True)
class Candidate:
    """A parent offered to a child, with the pieces it has (and their relayed digests)."""

    peer_id: str
    task_id: str
    state: str
    host: HostInfo
    pieces: tuple[PieceRecord, ...]


@dataclass(frozen=True, slots=True)
class SendNormal:
    """Send ``normal_task_response``: these parents (added to any the peer already has)."""

    peer_id: str
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True, slots=True)
class SendNeedBackToSource:
    """Send ``need_back_to_source_response``."""

    peer_id: str
    description: str


@dataclass(frozen=True, slots=True)
class SendEmpty:
    """Send ``empty_task_response``: the content is empty."""

    peer_id: str


@dataclass(frozen=True, slots=True)
class TriggerSeed:
    """Call ``DfdaemonUpload.DownloadTask`` on the seed at `address` for this download."""

    address: str
    task_id: str
    download: DownloadSpec  # need_back_to_source is set


@dataclass(frozen=True, slots=True)
class FailPeer:
    """End the peer's stream with this status."""

    peer_id: str
    code: Code
    message: str


Decision = SendNormal | SendNeedBackToSource | SendEmpty | TriggerSeed | FailPeer
_Apply = Callable[[Peer], list[Decision]]


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """A task as ``StatTask`` shows it."""

    id: str
    download: DownloadSpec
    state: str
    content_length: int | None
    piece_count: int | None
    pieces: tuple[PieceRecord, ...]  # back-sourced pieces with their digests, by number
    peer_count: int
    has_available_peer: bool
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A peer as ``StatPeer`` shows it."""

    id: str
    task_id: str
    host: HostInfo
    state: str
    download: DownloadSpec
    pieces: tuple[PieceRecord, ...]
    parent_ids: tuple[str, ...]
    created_at: float
    updated_at: float


class SchedulerCore:
    """Hosts, tasks and peers, and every scheduling decision about them."""

    def __init__(self, config: SchedulerConfig, clock: Clock, rng: random.Random | None = None) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng if rng is not None else random.Random(0)
        self.hosts: dict[str, Host] = {}
        self.tasks: dict[str, Task] = {}
        self.peers: dict[str, Peer] = {}
        self._seed_hosts: dict[str, Host] = {}
        self._cooldown: dict[str, float] = {}  # seed address -> skipped until
        self._waiting: dict[str, Peer] = {}  # every waiting peer, oldest first
        self._hosts_by_owner: dict[str, set[str]] = {}
        self._streams_by_owner: dict[str, int] = {}

    # ----------------------------------------------------------------------------------------
    # Counts (gauges)

    @property
    def host_count(self) -> int:
        return len(self.hosts)

    @property
    def peer_count(self) -> int:
        return len(self.peers)

    @property
    def task_count(self) -> int:
        return len(self.tasks)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    # ----------------------------------------------------------------------------------------
    # Hosts

    def announce_host(self, info: HostInfo, caller: Caller = SYSTEM) -> list[Decision]:
        """A host (re)announced itself. Raises PermissionDenied for a host `caller` may not speak
        for (another identity's, or a seed it cannot prove), QuotaExceeded past its host limit."""
        now = self.clock.time()
        owner = f"system:{info.id}" if caller.system else caller.owner
        if not caller.system:
            self._check_host_identity(info, caller)
        host = self.hosts.get(info.id)
        if host is not None and host.owner != owner and self._proves_host(caller, host):
            # A record of a weaker identity (a shared certificate): the node's own certificate takes
            # it back, e.g. from a client that announced the node's host id first after a restart.
            return self.delete_host(host.id) + self.announce_host(info, caller)
        if host is not None and host.owner != owner:
            raise PermissionDenied(
                f"host {info.id} was announced by another identity; {caller.describe()} may not announce, "
                "register on or delete it (each node announces its own host id)")
        if host is None:
            if not caller.system:  # (the process itself has no limit, and is not counted)
                owned = self._hosts_by_owner.setdefault(owner, set())
                if len(owned) >= self.config.max_hosts_per_client:
                    raise QuotaExceeded(
                        f"{caller.describe()} already has {len(owned)} hosts announced (max_hosts_per_client); "
                        "delete unused ones or wait for them to expire")
                owned.add(info.id)
            host = Host(info, now, owner)
            self.hosts[info.id] = host
        else:
            host.info = info
            host.announced_at = now
        if info.is_seed:
            self._seed_hosts[info.id] = host
            # A seed that announces itself is up: a trigger that failed while it was down must
            # not keep it out of service for the rest of the cool-down.
            self._cooldown.pop(info.grpc_address, None)
        else:
            self._seed_hosts.pop(info.id, None)
        return []

    def _check_host_identity(self, info: HostInfo, caller: Caller) -> None:
        """Refuse a host announcement the caller's identity does not cover."""
        identity = caller.identity
        if identity is None:
            if info.is_seed and not self._configured_seed(info, caller):
                raise PermissionDenied(
                    f"host {info.id} announces itself as a seed, but this scheduler runs without mutual TLS "
                    f"and {info.grpc_address} is not one of its --seed-peer addresses: list the seed there, "
                    "or turn mutual TLS on and give the seed a certificate with CN seed.damselfly")
            return
        if identity.role not in (Role.PEER, Role.SEED):
            raise PermissionDenied(f"{caller.describe()} may not announce hosts (only peer and seed identities do)")
        if identity.hostname and identity.hostname != info.hostname.split(".")[0].lower():
            raise PermissionDenied(
                f"{caller.describe()} may only announce the host named {identity.hostname!r}, "
                f"not {info.hostname!r}")
        if info.is_seed and identity.role is not Role.SEED:
            raise PermissionDenied(
                f"host {info.id} announces itself as a seed, but {caller.describe()} does not prove the seed "
                "role: give the seed a certificate with CN seed.damselfly (or <hostname>.seed.damselfly)")

    @staticmethod
    def _proves_host(caller: Caller, host: Host) -> bool:
        """`caller` holds a per-host certificate (checked against the announced name already) and
        `host` belongs to an identity that proves no host: a shared certificate, or plaintext."""
        return caller.identity is not None and bool(caller.identity.hostname) and "@" in host.owner

    def _configured_seed(self, info: HostInfo, caller: Caller) -> bool:
        """In plaintext: `info` is one of the ``--seed-peer`` addresses, by IP, or by DNS name (its
        first label is the announced hostname, as a StatefulSet pod's) when announced from its own IP."""
        name = info.hostname.split(".")[0].lower()
        for address in self.config.seed_peer:
            host, port = split_address(address)
            if port != info.port:
                continue
            if host == info.ip or (caller.ip == info.ip and name and host.split(".")[0].lower() == name):
                return True
        return False

    def delete_host(self, host_id: str, caller: Caller = SYSTEM) -> list[Decision]:
        """A host left: forget it and its peers. Its own identity or an admin may delete it."""
        host = self.hosts.get(host_id)
        if host is None:
            return []
        if not caller.is_admin and host.owner != caller.owner:
            raise PermissionDenied(f"{caller.describe()} may not delete host {host_id}: only the identity that "
                                   "announced it, or an admin (CN admin.damselfly), may")
        del self.hosts[host_id]
        owned = self._hosts_by_owner.get(host.owner)
        if owned is not None:
            owned.discard(host_id)
            if not owned:
                del self._hosts_by_owner[host.owner]
        self._seed_hosts.pop(host_id, None)
        decisions: list[Decision] = []
        for peer in list(host.peers.values()):
            decisions += self._remove_peer(peer, f"host {host_id} left")
        return decisions

    def list_hosts(self, caller: Caller = SYSTEM) -> list[HostInfo]:
        self.require_admin(caller, "ListHosts")
        return [host.info for host in self.hosts.values()]

    @staticmethod
    def require_admin(caller: Caller, what: str) -> None:
        """Raise PermissionDenied unless `caller` is an admin."""
        if not caller.is_admin:
            how = ("a caller on loopback (the scheduler runs without mutual TLS)" if caller.identity is None
                   else "a certificate with CN admin.damselfly")
            raise PermissionDenied(f"{what} needs the admin role, which {caller.describe()} lacks: use {how}")

    def open_stream(self, caller: Caller) -> None:
        """An AnnouncePeer stream opened; QuotaExceeded past ``max_streams_per_client``."""
        if caller.system:
            return
        count = self._streams_by_owner.get(caller.owner, 0)
        if count >= self.config.max_streams_per_client:
            raise QuotaExceeded(f"{caller.describe()} already holds {count} AnnouncePeer streams "
                                "(max_streams_per_client); close finished ones")
        self._streams_by_owner[caller.owner] = count + 1

    def close_stream(self, caller: Caller) -> None:
        if caller.system:
            return
        count = self._streams_by_owner.get(caller.owner, 0) - 1
        if count > 0:
            self._streams_by_owner[caller.owner] = count
        else:
            self._streams_by_owner.pop(caller.owner, None)

    @property
    def available_seed_host_count(self) -> int:
        """Announced seed hosts that a trigger may go to now (not cooling down)."""
        now = self.clock.time()
        return sum(1 for host in self._seed_hosts.values()
                   if self._cooldown.get(host.info.grpc_address, 0.0) <= now)

    def available_seeds(self) -> list[str]:
        """``ip:port`` of seeds that may be triggered now: configured and announced, minus cool-down."""
        now = self.clock.time()
        addresses = set(self.config.seed_peer)
        addresses.update(host.info.grpc_address for host in self._seed_hosts.values())
        return sorted(a for a in addresses if self._cooldown.get(a, 0.0) <= now)

    # ----------------------------------------------------------------------------------------
    # Peer lifecycle events

    def register_peer(
        self, host_id: str, task_id: str, peer_id: str, download: DownloadSpec, caller: Caller = SYSTEM
    ) -> list[Decision]:
        """A peer asked for a download of `task_id` on `host_id` (a host `caller` announced)."""
        host = self.hosts.get(host_id)
        if host is None:  # not announced, or forgotten (a restart): the peer announces it and comes back
            return [FailPeer(peer_id, Code.NOT_FOUND, str(HostNotFound(host_id)))]
        if not caller.system and host.owner != caller.owner:
            return [FailPeer(peer_id, Code.PERMISSION_DENIED,
                             f"host {host_id} was announced by another identity; {caller.describe()} may only "
                             "register peers on hosts it announced")]
        old = self.peers.get(peer_id)
        if old is not None and not caller.system and old.host.owner != caller.owner:
            return [FailPeer(peer_id, Code.PERMISSION_DENIED,
                             f"peer id {peer_id} belongs to a peer of another identity; use a fresh peer id")]
        task = self.tasks.get(task_id)
        problem = requested_piece_length_problem(download.piece_length)
        if not problem and task is not None and task.piece_length_known and download.piece_length \
                and download.piece_length != task.piece_length:
            problem = (f"piece length {download.piece_length} disagrees with the {task.piece_length}-byte pieces "
                       f"task {task_id} is cut in; leave it unset")
        if problem:
            return [FailPeer(peer_id, Code.INVALID_ARGUMENT, problem)]
        decisions: list[Decision] = []
        if old is not None:  # a retry with the same id: start over (its stream is this one now)
            decisions += [d for d in self._remove_peer(old, "registered again")
                          if not (isinstance(d, FailPeer) and d.peer_id == peer_id)]
        room = self._make_room(host) if len(host.peers) >= self.config.max_peers_per_host else []
        if room is None:
            return [*decisions, FailPeer(
                peer_id, Code.RESOURCE_EXHAUSTED,
                f"host {host_id} already has {len(host.peers)} downloads in progress (max_peers_per_host); "
                "wait for some to finish")]
        decisions += room
        now = self.clock.time()
        task = self.tasks.get(task_id)
        if task is None:
            task = Task(task_id, download, now)
            self.tasks[task_id] = task
        elif task.failed_until is not None:
            if now < task.failed_until:  # the origin's answer stands: nobody asks it again yet
                return [*decisions, FailPeer(peer_id, Code.FAILED_PRECONDITION, self._failed_message(task, now))]
            self._new_origin_round(task)
        peer = Peer(peer_id, task, host, download, now)
        self.peers[peer_id] = peer
        task.peers[peer_id] = peer
        host.peers[peer_id] = peer
        task.transition(TaskEvent.DOWNLOAD, now)
        if peer.is_seed and task.seed_trigger is not None:
            task.seed_trigger = None  # the trigger arrived (or another seed took it on)
        if task.lazy_seed is not None and not download.lazy and not peer.is_seed:
            # The seed fetches only what lazy readers demand; this download wants every piece.
            decisions.append(TriggerSeed(task.lazy_seed, task.id, _seed_download(download)))
            task.lazy_seed = None
        if task.content_length == 0:
            peer.transition(PeerEvent.SCHEDULE_EMPTY, now)
            return [SendEmpty(peer_id)]
        if download.need_back_to_source:
            # Its own choice: it may fetch for itself, but only a seed's fetch defines the task.
            decisions.append(self._back_to_source(peer, "the download asked to go back to source",
                                                  defines_content=peer.is_seed))
            return decisions
        return decisions + self._schedule(peer)

    def owns_peer(self, peer_id: str, caller: Caller) -> bool:
        """The peer is registered, on a host of `caller`'s (its stream may speak for it)."""
        peer = self.peers.get(peer_id)
        return peer is not None and (caller.system or peer.host.owner == caller.owner)

    def _make_room(self, host: Host) -> list[Decision] | None:
        """Forget the oldest finished or failed peer of `host`; None when every one is active."""
        for peer in host.peers.values():
            if peer.state in TERMINAL_STATES:
                decisions = self._remove_peer(peer, "the host has too many peers")  # terminal: no stream to end
                task = peer.task
                if not task.peers and task.failed_until is None and self.tasks.get(task.id) is task:
                    del self.tasks[task.id]  # nothing left of it worth keeping: a churning client
                return decisions
        return None

    def download_started(self, peer_id: str) -> list[Decision]:
        """The peer started downloading from its parents."""
        return self._guard(peer_id, lambda peer: self._transition(peer, PeerEvent.DOWNLOAD))

    def back_to_source_started(self, peer_id: str) -> list[Decision]:
        """The peer started downloading from the origin."""
        return self._guard(peer_id, self._start_back_to_source)

    def piece_finished(
        self, peer_id: str, number: int, offset: int, length: int, parent_id: str = "", cost: float = 0.0
    ) -> list[Decision]:
        """The peer has piece `number`, fetched from `parent_id` in `cost` seconds."""

        def apply(peer: Peer) -> list[Decision]:
            record = peer.task.pieces.get(number)
            if record is None or record.offset != offset or record.length != length:  # (a known piece is fine)
                problem = geometry_problem(peer.task.piece_length, number, offset, length)
                if not problem and record is not None:
                    problem = (f"piece {number} of task {peer.task.id} is {record.length} bytes at "
                               f"{record.offset}, not {length} at {offset}")
                if problem:
                    return self._refuse_report(peer, problem)
            was_parent = peer.eligible_parent
            if peer.state in (PeerState.RECEIVED_NORMAL, PeerState.RECEIVED_EMPTY):
                peer.transition(PeerEvent.DOWNLOAD, self.clock.time())  # started implied
            self._record_piece(peer, number, offset, length)
            parent = self.peers.get(parent_id) if parent_id else None
            if parent is not None and parent.task is peer.task:
                parent.upload_succeeded += 1
                parent.upload_costs.add(cost)
            return self._parent_changed(peer, was_parent)

        return self._guard(peer_id, apply)

    def back_to_source_piece_finished(
        self, peer_id: str, number: int, offset: int, length: int, digest: str, cost: float = 0.0
    ) -> list[Decision]:
        """The peer fetched piece `number` from the origin. From a peer the scheduler sent there
        (or a seed), its digest and geometry define the piece; from any other, the piece counts
        only if it agrees with the defining report."""

        def apply(peer: Peer) -> list[Decision]:
            task = peer.task
            problem = geometry_problem(task.piece_length, number, offset, length)
            if problem:
                return self._refuse_report(peer, problem)
            decisions: list[Decision] = []
            if peer.state is not PeerState.BACK_TO_SOURCE and peer.can(PeerEvent.DOWNLOAD_BACK_TO_SOURCE):
                decisions += self._start_back_to_source(peer)  # started implied
            was_parent = peer.eligible_parent
            reported = PieceRecord(number, offset, length, digest)
            record = task.pieces.get(number)
            if record is None and peer.defines_content:  # the first defining report wins
                record = task.pieces[number] = reported
                self._learn_piece_length(task, number, offset)
            if record == reported:
                self._record_piece(peer, number, offset, length)
            # Otherwise the bytes are its own (it fetched for itself, or the origin changed since):
            # it keeps them, and serves them to nobody.
            return decisions + self._parent_changed(peer, was_parent)

        return self._guard(peer_id, apply)

    def _refuse_report(self, peer: Peer, problem: str) -> list[Decision]:
        """A report that breaks the task's geometry ends the reporting peer's download."""
        decisions: list[Decision] = [FailPeer(peer.id, Code.INVALID_ARGUMENT, problem)]
        if peer.state not in TERMINAL_STATES:
            decisions += self._fail(peer)
        return decisions

    @staticmethod
    def _learn_piece_length(task: Task, number: int, offset: int) -> None:
        """The piece length a defining report shows: certain from a piece past the first."""
        if number > 0 and not task.piece_length_known:
            task.piece_length = offset // number
            task.piece_length_known = True
        elif number == 0 and not task.piece_length:
            task.piece_length = task.pieces[0].length  # the first piece is a whole one unless it is the only one

    def piece_failed(
        self, peer_id: str, number: int, parent_id: str, temporary: bool = False
    ) -> list[Decision]:
        """The peer could not get piece `number` from `parent_id`.

        A temporary failure (the parent was busy) is not held against the parent; any other one
        blocklists it for this child and counts against it.
        """

        def apply(peer: Peer) -> list[Decision]:
            peer.updated_at = self.clock.time()
            parent = self.peers.get(parent_id) if parent_id else None
            if temporary or not parent_id:
                return []
            peer.blocklist.add(parent_id)
            if parent is None:
                return []
            self._unlink(peer, parent)
            self._update_hungry(peer)
            return self._count_parent_failure(parent, peer)

        return self._guard(peer_id, apply)

    def reschedule(
        self, peer_id: str, blocklisted: Iterable[str] = (), description: str = ""
    ) -> list[Decision]:
        """The peer's parents cannot give it what it needs: drop the listed ones, find others."""

        def apply(peer: Peer) -> list[Decision]:
            if peer.state in TERMINAL_STATES:
                return []
            if peer.state in (PeerState.BACK_TO_SOURCE, PeerState.RECEIVED_BACK_TO_SOURCE):
                return [SendNeedBackToSource(peer.id, "the peer was already told to go back to source")]
            peer.updated_at = self.clock.time()
            for parent_id in blocklisted:
                peer.blocklist.add(parent_id)
                parent = peer.parents.get(parent_id)
                if parent is not None:
                    self._unlink(peer, parent)
            self._update_hungry(peer)
            # (a peer whose parents had nothing for it for long asks too: pieces may be lost)
            sent = self._offer_parents(peer, exclude=peer.parents)
            if sent is not None:
                return [sent, *self._refetch(peer.task)]
            if self._fetching(peer.task, peer) and any(p.state not in TERMINAL_STATES for p in peer.parents.values()):
                # Its parents still download what someone brings in: they will have more. Not the
                # waiting room, whence a peer goes to the origin after a while: behind a slow
                # origin every starved peer would.
                return []
            return self._no_parent(peer) + self._refetch(peer.task)

        return self._guard(peer_id, apply)

    def peer_finished(self, peer_id: str) -> list[Decision]:
        """The peer has the whole content (downloaded from parents)."""
        return self._guard(peer_id, self._succeed)

    def back_to_source_finished(self, peer_id: str) -> list[Decision]:
        """The peer has the whole content (downloaded from the origin)."""

        def apply(peer: Peer) -> list[Decision]:
            decisions = self._succeed(peer)
            if peer.download.range_length == 0 and not peer.download.lazy and peer.defines_content:
                self._learn_content_length(peer)
            return decisions

        return self._guard(peer_id, apply)

    def peer_failed(self, peer_id: str, description: str = "") -> list[Decision]:
        """The peer gave up."""
        return self._guard(peer_id, lambda peer: self._fail(peer))

    def back_to_source_piece_failed(self, peer_id: str, number: int, status: int | None = None) -> list[Decision]:
        """The peer's origin refused piece `number` with HTTP `status` (None: it was not reached).

        The download's failure report follows; the status decides whether the origin is asked again.
        """

        def apply(peer: Peer) -> list[Decision]:
            peer.origin_status = status
            peer.updated_at = self.clock.time()
            return []

        return self._guard(peer_id, apply)

    def back_to_source_failed(self, peer_id: str, description: str = "") -> list[Decision]:
        """The peer could not fetch the content from the origin: retry it later, or fail the task."""

        def apply(peer: Peer) -> list[Decision]:
            decisions = self._fail(peer, refetch=False, fail_task=False)
            return decisions + self._origin_failed(peer, description)

        return self._guard(peer_id, apply)

    def stream_closed(self, peer_id: str) -> list[Decision]:
        """The peer's stream ended. Unless it had finished, the peer failed."""
        peer = self.peers.get(peer_id)
        if peer is None or peer.state in TERMINAL_STATES:
            return []
        return self._fail(peer)

    def delete_peer(self, peer_id: str, caller: Caller = SYSTEM) -> list[Decision]:
        """Forget a peer (``DeletePeer``; admins only)."""
        self.require_admin(caller, "DeletePeer")
        peer = self.peers.get(peer_id)
        if peer is None:
            raise PeerNotFound(peer_id)
        return self._remove_peer(peer, "peer deleted")

    def delete_task(self, task_id: str, caller: Caller = SYSTEM) -> list[Decision]:
        """Forget a task and its peers (``DeleteTask``; admins only)."""
        self.require_admin(caller, "DeleteTask")
        task = self.tasks.get(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        decisions: list[Decision] = []
        for peer in list(task.peers.values()):
            decisions += self._remove_peer(peer, f"task {task_id} deleted")
        task.transition(TaskEvent.LEAVE, self.clock.time())
        del self.tasks[task_id]
        return decisions

    # ----------------------------------------------------------------------------------------
    # Seeds, time, garbage

    def seed_trigger_failed(self, address: str, task_id: str | None = None) -> list[Decision]:
        """Triggering the seed at `address` failed: cool it down and find another way."""
        now = self.clock.time()
        self._cooldown[address] = now + self.config.seed_cooldown
        tasks = [self.tasks[task_id]] if task_id is not None and task_id in self.tasks else (
            list(self.tasks.values()) if task_id is None else [])
        decisions: list[Decision] = []
        for task in tasks:
            if task.seed_trigger is None or task.seed_trigger[0] != address:
                continue
            task.seed_trigger = None
            decisions += self._refetch(task)
        return decisions

    def tick(self) -> list[Decision]:
        """Retry waiting peers: new parents, a seed, back-to-source after a while, failure at last."""
        now = self.clock.time()
        self._cooldown = {a: until for a, until in self._cooldown.items() if until > now}
        decisions: list[Decision] = []
        for peer in list(self._waiting.values()):
            if peer.id not in self._waiting:
                continue  # scheduled meanwhile by an earlier decision of this tick
            decisions += self._schedule(peer)
        return decisions

    def gc(self) -> list[Decision]:
        """Forget peers, hosts and tasks whose time-to-live has passed."""
        now = self.clock.time()
        decisions: list[Decision] = []
        failed_ttl = min(FAILED_PEER_TTL, self.config.peer_ttl)
        expired = [peer for peer in self.peers.values()
                   if now - peer.updated_at > (failed_ttl if peer.state is PeerState.FAILED else self.config.peer_ttl)]
        # All of them first: a task whose fetcher expired is fetched again for live peers only.
        for peer in expired:
            decisions += self._remove_peer(peer, "peer expired", refetch=False)
        for task in {id(peer.task): peer.task for peer in expired}.values():
            decisions += self._refetch(task)
        for host in list(self.hosts.values()):
            if now - host.announced_at > self.config.host_ttl:
                decisions += self.delete_host(host.id)
        abandoned_ttl = min(ABANDONED_TASK_TTL, self.config.task_ttl)
        for task in list(self.tasks.values()):
            if task.failed_until is not None and now < task.failed_until:
                continue  # its origin's answer still stands for new downloads
            if not task.peers and now - task.updated_at > abandoned_ttl:
                task.transition(TaskEvent.LEAVE, now)
                del self.tasks[task.id]
        return decisions

    # ----------------------------------------------------------------------------------------
    # Queries

    def stat_task(self, task_id: str) -> TaskInfo:
        task = self.tasks.get(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return TaskInfo(
            id=task.id,
            download=task.download,
            state=task.state.value,
            content_length=task.content_length,
            piece_count=task.piece_count,
            pieces=tuple(task.pieces[n] for n in sorted(task.pieces)),
            peer_count=len(task.peers),
            has_available_peer=len(task.parents) > 0,
            created_at=task.created_at,
            updated_at=task.updated_at,
        )

    def stat_peer(self, peer_id: str) -> PeerInfo:
        peer = self.peers.get(peer_id)
        if peer is None:
            raise PeerNotFound(peer_id)
        return PeerInfo(
            id=peer.id,
            task_id=peer.task.id,
            host=peer.host.info,
            state=peer.state.value,
            download=peer.download,
            pieces=self._pieces_of(peer),
            parent_ids=tuple(peer.parents),
            created_at=peer.created_at,
            updated_at=peer.updated_at,
        )

    def stat_host(self, host_id: str) -> HostInfo:
        host = self.hosts.get(host_id)
        if host is None:
            raise HostNotFound(host_id)
        return host.info

    # ----------------------------------------------------------------------------------------
    # Scheduling

    def _schedule(self, peer: Peer, exclude: Collection[str] = ()) -> list[Decision]:
        """Parents for `peer` if there are any, else the no-parent policy."""
        sent = self._offer_parents(peer, exclude)
        if sent is not None:
            return [sent]
        return self._no_parent(peer)

    def _offer_parents(self, peer: Peer, exclude: Collection[str] = ()) -> SendNormal | None:
        task = peer.task
        if not task.parents:
            return None
        # A peer that waits for its first parent gets a busy parent (a seed with its children) only
        # when it would otherwise go back to source: until then those children become parents.
        waited = self.clock.time() - peer.waiting_since if peer.waiting_since is not None else 0.0
        patience = self.config.retry_back_to_source_limit * self.config.retry_interval
        first_parents = peer.state is PeerState.PENDING
        parents = select_parents(
            peer,
            task,
            limit=self.config.candidate_parent_limit,
            sample=self.config.filter_parent_limit,
            rng=self.rng,
            exclude=exclude,
            # A lazy reader's demands reach the origin through a seed: it does not wait for one.
            busy_fallback=not first_parents or waited >= patience or peer.download.lazy,
        )
        if not any(not parent.is_seed for parent in parents):
            # A seed only (or nothing): peers still receiving their first pieces serve as well, and
            # spare the seed's uplink. (A running peer that lost parents too: given the busy seed, a
            # few thousand such peers took it to its upload slot limit, and the next waiting ones
            # went to the origin.)
            coming = parents_to_come(peer, task, limit=self.config.candidate_parent_limit,
                                     visit=PARENTS_TO_COME_VISIT, exclude=exclude)
            parents = coming or parents
        if not parents:
            return None
        return self._send_normal(peer, parents)

    def _send_normal(self, peer: Peer, parents: list[Peer]) -> SendNormal:
        peer.transition(PeerEvent.SCHEDULE_NORMAL, self.clock.time())
        self._unpark(peer)
        seed = self._seed_for(peer, parents)
        if seed is not None:
            parents = [*parents, seed]
        for parent in parents:
            self._link(peer, parent)
        self._update_hungry(peer)
        return SendNormal(peer.id, tuple(self._candidate(parent) for parent in parents))

    @staticmethod
    def _seed_for(peer: Peer, parents: list[Peer]) -> Peer | None:
        """A seed holding the task, for a child that has none among its parents: the one parent
        whose piece digests a child may take when the scheduler is unreachable (a seed back-sourced
        what it holds), and the last resort for pieces no peer has. The download policy keeps a
        child's use of it to those pieces, one at a time; a busy seed (its child limit reached) is
        not added, so in a large swarm it stays the parent of a few (who pass its pieces on).
        A lazy reader gets a seed however busy: its readers' demands for pieces nobody has reach
        the origin through the seed, and demand is small."""
        if any(p.is_seed for p in parents) or any(p.is_seed for p in peer.parents.values()):
            return None
        for candidate in peer.task.back_to_source_peers.values():
            if (candidate.is_seed and candidate.eligible_parent and (peer.download.lazy or not is_busy(candidate))
                    and candidate.id not in peer.blocklist and rejection(peer, candidate) is None):
                return candidate
        return None

    def _no_parent(self, peer: Peer) -> list[Decision]:
        """No parent for `peer` now: trigger a seed, go back to source, wait, or give up."""
        task = peer.task
        now = self.clock.time()
        if peer.download.need_back_to_source or peer.is_seed:
            return [self._back_to_source(peer, "no parent holds the task")]
        if task.retry_at is not None:
            if now < task.retry_at:  # between two attempts of a failing origin: wait for the next
                self._park(peer)
                return []
            task.retry_at = None
        waited = now - peer.waiting_since if peer.waiting_since is not None else 0.0
        interval = self.config.retry_interval
        if not self._fetching(task, peer):
            # Nobody brings the task in: the download's priority says who may (Dragonfly's levels).
            level = peer.download.priority
            if level in (Priority.LEVEL1, Priority.LEVEL2):
                self._fail(peer, refetch=False, fail_task=False)
                return [FailPeer(peer.id, Code.FAILED_PRECONDITION, _refused_by_priority(task.id, level))]
            if level == Priority.LEVEL3 and self._may_back_to_source(peer):
                return [self._back_to_source(peer, "priority LEVEL3: this peer fetches a new task itself")]
            seeds = self.available_seeds()
            address = hashring.choose(seeds, task.id)
            if address is not None:
                task.seed_trigger = (address, now)
                task.lazy_seed = address if peer.download.lazy else None
                self._park(peer)
                return [TriggerSeed(address, task.id, _seed_download(peer.download))]
            if self._may_back_to_source(peer):
                return [self._back_to_source(peer, "no parent and no seed peer")]
        elif task.origin_failures:  # a retry of a failing origin is under way: its verdict decides
            self._park(peer)
            return []
        elif waited >= self.config.retry_back_to_source_limit * interval and self._may_back_to_source(peer):
            return [self._back_to_source(peer, f"no parent after {waited:.1f}s")]
        if waited >= self.config.retry_limit * interval:
            self._fail(peer, refetch=False)
            return [FailPeer(peer.id, Code.RESOURCE_EXHAUSTED, self._no_parent_message(peer, waited))]
        self._park(peer)
        return []

    def _no_parent_message(self, peer: Peer, waited: float) -> str:
        """Why a waiting peer gives up: what it was not allowed to do, and what was missing."""
        task = peer.task
        if peer.download.disable_back_to_source:
            message = (f"no peer could provide task {task.id} within {waited:.1f}s, and this download may not "
                       "go to the origin itself (back-to-source is disabled)")
            if not self.available_seeds():
                message += "; no seed peer is available to fetch it"
        else:
            message = (f"no peer could provide task {task.id} within {waited:.1f}s, and the task's "
                       f"back-to-source limit ({self.config.back_to_source_limit} peers) is reached")
        if task.origin_error:
            message += f"; the origin's last answer: {task.origin_error}"
        return message

    # ----------------------------------------------------------------------------------------
    # Origin failures

    def _origin_failed(self, peer: Peer, description: str) -> list[Decision]:
        """A back-to-source of the task failed: schedule the next attempt, or fail the task."""
        task = peer.task
        now = self.clock.time()
        task.origin_failures += 1
        task.origin_error = description or f"back-to-source by {peer.id} failed"
        if self._fetching(task):  # someone else is still at the origin: its outcome decides
            return []
        verdict = origin_verdict(peer.origin_status, task.origin_failures, self.config.origin_attempt_limit)
        if verdict is OriginVerdict.RETRY:
            task.retry_at = now + origin_retry_delay(task.origin_failures, self.config.origin_retry_backoff)
            for child in self._waiting_on_origin(task):
                self._park(child)  # a child of the failed fetcher waits for the next attempt like the rest
            return []
        attempts = task.origin_failures
        message = task.origin_error if attempts == 1 else f"{task.origin_error} (after {attempts} attempts)"
        decisions = self._fail_waiting_peers(task, message)
        if verdict is OriginVerdict.FAIL:
            if task.state is not TaskState.FAILED:
                task.transition(TaskEvent.FAIL, now)
            task.origin_error = message
            task.failed_until = now + self.config.failed_task_backoff
        else:  # credentials: the next client may be let in, so the next download starts afresh
            self._new_origin_round(task)
        return decisions

    def _fail_waiting_peers(self, task: Task, message: str) -> list[Decision]:
        """End every peer of `task` that waits for the content to come in from the origin."""
        decisions: list[Decision] = []
        for peer in self._waiting_on_origin(task):
            self._fail(peer, refetch=False, fail_task=False)
            decisions.append(FailPeer(peer.id, Code.FAILED_PRECONDITION, message))
        return decisions

    @staticmethod
    def _waiting_on_origin(task: Task) -> list[Peer]:
        """Peers of `task` that can only get the content once someone brings it in from the origin:
        not done, not at the origin themselves, without a parent that has everything."""
        waiting = []
        for peer in task.peers.values():
            if peer.state in TERMINAL_STATES or peer.state in (PeerState.RECEIVED_BACK_TO_SOURCE,
                                                               PeerState.BACK_TO_SOURCE):
                continue
            if any(parent.state is PeerState.SUCCEEDED for parent in peer.parents.values()):
                continue
            waiting.append(peer)
        return waiting

    def _failed_message(self, task: Task, now: float) -> str:
        assert task.failed_until is not None
        failed_at = task.failed_until - self.config.failed_task_backoff
        return (f"{task.origin_error} (the task failed {now - failed_at:.0f}s ago; the origin is asked "
                f"again after {task.failed_until - now:.0f}s)")

    @staticmethod
    def _new_origin_round(task: Task) -> None:
        """Forget the failures of the last round: the next attempt may ask the origin again."""
        task.origin_failures = 0
        task.origin_error = ""
        task.retry_at = None
        task.failed_until = None

    def _may_back_to_source(self, peer: Peer) -> bool:
        if peer.download.disable_back_to_source:
            return False
        return peer.id in peer.task.back_to_source_peers or (
            len(peer.task.back_to_source_peers) < self.config.back_to_source_limit)

    def _fetching(self, task: Task, child: Peer | None = None) -> bool:
        """Someone is bringing the task in: a seed trigger in flight or a peer at the origin
        (one that could later serve `child`: not blocklisted by it, not on its host)."""
        if task.seed_trigger is not None:
            expiry = self.config.retry_limit * self.config.retry_interval
            if self.clock.time() - task.seed_trigger[1] < expiry:
                return True
            task.seed_trigger = None
        for peer in task.back_to_source_peers.values():
            if peer.state not in FETCHING_STATES or peer is child:
                continue
            if child is None or (peer.id not in child.blocklist and peer.host is not child.host):
                return True
        return False

    def _back_to_source(self, peer: Peer, description: str, defines_content: bool = True) -> SendNeedBackToSource:
        now = self.clock.time()
        peer.transition(PeerEvent.SCHEDULE_BACK_TO_SOURCE, now)
        peer.defines_content = defines_content
        peer.task.back_to_source_peers[peer.id] = peer
        self._unpark(peer)
        peer.task.hungry.discard(peer.id)
        return SendNeedBackToSource(peer.id, description)

    def _refetch(self, task: Task) -> list[Decision]:
        """Nobody fetches the task any more: let the first waiting peer trigger a seed or back-source,
        and bring in a new fetcher for pieces that left with the last one."""
        if self._fetching(task):
            return []
        lost = self._pieces_lost(task)
        decisions: list[Decision] = []
        for peer in list(task.waiting.values()):
            decisions = self._schedule(peer)
            if decisions:
                break
        if lost:
            task.rescue_pending = True
            if not self._fetching(task):
                decisions += self._fetch_lost_pieces(task)
        return decisions

    # ----------------------------------------------------------------------------------------
    # Lost pieces
    #
    # A fetcher (a seed, or a peer sent to the origin) that leaves mid-download takes with it the
    # pieces only it had. The peers still downloading keep parents, and those parents keep
    # announcing what they have, but nobody will ever announce the lost pieces: without the
    # scheduler every such peer would wait until its own time-out and go to the origin, all at
    # once. Instead one new fetcher is brought in (a seed if one is available, else the running
    # peer that misses the fewest pieces) and made a parent of some of the peers still downloading.

    def _downloading_whole(self, task: Task) -> list[Peer]:
        """Peers of `task` fetching the whole content from parents (not waiting for any)."""
        return [peer for peer in task.peers.values()
                if peer.state in (PeerState.RECEIVED_NORMAL, PeerState.RUNNING) and not peer.download.ranged
                and peer.id not in task.back_to_source_peers]

    def _pieces_lost(self, task: Task) -> bool:
        """Some piece of `task` is on no peer that may serve it, and peers still need the whole
        content. With the piece count unknown (no whole back-to-source finished) any piece may be
        missing unless a peer has the whole content."""
        for holder in task.parents:
            if holder.state is PeerState.SUCCEEDED and not holder.download.ranged:
                return False
        if not self._downloading_whole(task):
            return False
        if task.piece_count is None:
            return True
        held: set[int] = set()
        for holder in task.parents:
            held.update(holder.finished)
            if len(held) >= task.piece_count:
                return False
        return True

    def _fetch_lost_pieces(self, task: Task) -> list[Decision]:
        """Trigger a seed for `task`, or send the peer that misses the fewest pieces to the origin."""
        downloading = self._downloading_whole(task)
        if not downloading:
            return []
        address = hashring.choose(self.available_seeds(), task.id)
        if address is not None:
            log.info("task %s: pieces lost with the peer that fetched them; %d peers still downloading; "
                     "triggering seed %s", task.id, len(downloading), address)
            task.seed_trigger = (address, self.clock.time())
            return [TriggerSeed(address, task.id, _seed_download(downloading[0].download))]
        allowed = [peer for peer in downloading if self._may_back_to_source(peer)]
        if not allowed:
            log.warning("task %s: pieces lost with the peer that fetched them, and none of the %d peers still "
                        "downloading may fetch them from the origin", task.id, len(downloading))
            return []  # each peer's own stall rules decide (none may reach the origin)
        fetcher = max(allowed, key=lambda peer: peer.finished.count)
        log.info("task %s: pieces lost with the peer that fetched them, and no seed available; %s (%d pieces) "
                 "fetches what it lacks from the origin", task.id, fetcher.id, fetcher.finished.count)
        return [self._back_to_source(fetcher, "the peer that fetched this task from the origin left with pieces "
                                              "nobody else has, and no seed peer is available: fetch what you lack")]

    def _adopt_downloading(self, fetcher: Peer) -> list[Decision]:
        """Make `fetcher`, the first to go to the origin since pieces were lost, a parent of up to
        LOST_PIECES_CHILDREN peers still downloading the whole task (they lack those pieces, and
        their parents may never get them but through it)."""
        task = fetcher.task
        task.rescue_pending = False
        decisions: list[Decision] = []
        for child in self._downloading_whole(task):
            if len(decisions) >= LOST_PIECES_CHILDREN:
                break
            if child.host is fetcher.host or fetcher.id in child.parents or fetcher.id in child.blocklist:
                continue
            decisions.append(self._send_normal(child, [fetcher]))
        return decisions

    # ----------------------------------------------------------------------------------------
    # Parents appearing and disappearing

    def _parent_changed(self, peer: Peer, was_parent: bool) -> list[Decision]:
        """React to `peer` becoming (or ceasing to be) a parent."""
        self._update_coming(peer)
        is_parent = peer.eligible_parent
        if is_parent == was_parent:
            return []
        task = peer.task
        if not is_parent:
            task.parents.discard(peer.id)
            return []
        task.parents.add(peer.id, peer)
        for child in list(peer.children.values()):
            self._update_coming(child)  # one hop from a peer with pieces now
        decisions: list[Decision] = []
        # waiting peers first: they have nothing at all
        for waiting in list(itertools.islice(task.waiting.values(), WAKE_LIMIT)):
            if peer.host.free_upload_slots <= 0:
                break
            sent = self._offer_parents(waiting)
            if sent is not None:
                decisions.append(sent)
        decisions += self._push(peer, RANGE_READER_PUSH_LIMIT if peer.download.ranged else PUSH_LIMIT)
        return decisions

    def _push(self, parent: Peer, limit: int = PUSH_LIMIT) -> list[Decision]:
        """Offer a parent to up to `limit` running children of its task that have too few parents,
        those with the fewest normal parents first (a child fed by a seed alone before all others)."""
        decisions: list[Decision] = []
        if is_bad_parent(parent) or limit <= 0:
            return decisions
        for child in parent.task.hungry.neediest(PUSH_SCAN):
            if len(decisions) >= limit or parent.host.free_upload_slots <= 0:
                break
            if (
                child is parent
                or child.host is parent.host
                or parent.id in child.parents
                or parent.id in child.blocklist
            ):
                continue
            decisions.append(self._send_normal(child, [parent]))
        return decisions

    def _count_parent_failure(self, parent: Peer, child: Peer) -> list[Decision]:
        """Count a child's report against `parent`; reported by enough, it is offered no more. A
        killed node's peer that had finished is still registered (its stream's end is a finished
        peer's normal end): its pieces may be lost with it, like a fetcher's that left."""
        parent.upload_failed += 1
        # Independent reporters: different identities (a per-host certificate, or a shared one from
        # another IP). Without TLS nothing is proven and each host counts (see the module's docs).
        parent.failed_by.add(child.host.id if child.host.owner.startswith(PLAINTEXT_OWNER) else child.host.owner)
        if len(parent.failed_by) >= FAILED_BY_LIMIT and not parent.demoted:
            parent.demoted = True
            log.info("task %s: parent %s reported failed by %d children's hosts; offered no more",
                     parent.task.id, parent.id, len(parent.failed_by))
            parent.task.parents.discard(parent.id)
            self._update_coming(parent)
            return self._refetch(parent.task)
        return []

    # ----------------------------------------------------------------------------------------
    # State changes

    def _transition(self, peer: Peer, event: PeerEvent) -> list[Decision]:
        was_parent = peer.eligible_parent
        peer.transition(event, self.clock.time())
        peer.task.updated_at = peer.updated_at
        self._update_hungry(peer)
        return self._parent_changed(peer, was_parent)

    def _start_back_to_source(self, peer: Peer) -> list[Decision]:
        task = peer.task
        was_parent = peer.eligible_parent
        peer.transition(PeerEvent.DOWNLOAD_BACK_TO_SOURCE, self.clock.time())
        task.updated_at = peer.updated_at
        task.back_to_source_peers[peer.id] = peer
        if peer.is_seed:
            task.seed_trigger = None
            peer.defines_content = True  # seeds are trusted to fetch for everyone
        self._unpark(peer)
        for parent in list(peer.parents.values()):
            self._unlink(peer, parent)
        task.hungry.discard(peer.id)
        decisions = self._parent_changed(peer, was_parent)
        if task.rescue_pending and (peer.is_seed or peer.defines_content):
            decisions += self._adopt_downloading(peer)
        return decisions

    def _record_piece(self, peer: Peer, number: int, offset: int, length: int) -> None:
        now = self.clock.time()
        task = peer.task
        peer.updated_at = task.updated_at = now
        if peer.finished.add(number):
            task.max_finished = max(task.max_finished, peer.finished.count)
        if number not in task.piece_spans:
            task.piece_spans[number] = (offset, length)

    def _succeed(self, peer: Peer) -> list[Decision]:
        was_parent = peer.eligible_parent
        now = self.clock.time()
        peer.transition(PeerEvent.SUCCEED, now)
        self._unpark(peer)
        for parent in list(peer.parents.values()):
            self._unlink(peer, parent)
        peer.task.hungry.discard(peer.id)
        peer.task.transition(TaskEvent.SUCCEED, now)
        self._new_origin_round(peer.task)
        return self._parent_changed(peer, was_parent)

    def _fail(self, peer: Peer, refetch: bool = True, fail_task: bool = True) -> list[Decision]:
        now = self.clock.time()
        task = peer.task
        peer.transition(PeerEvent.FAIL, now)
        self._detach(peer)
        if fail_task and peer.id in task.back_to_source_peers and task.state is TaskState.RUNNING \
                and not task.parents and not self._fetching(task):
            task.transition(TaskEvent.FAIL, now)
        return self._refetch(task) if refetch else []

    def _remove_peer(self, peer: Peer, reason: str, refetch: bool = True) -> list[Decision]:
        """Forget `peer` entirely; a peer still downloading has its stream ended."""
        decisions: list[Decision] = []
        task = peer.task
        if peer.state not in TERMINAL_STATES:
            decisions.append(FailPeer(peer.id, Code.ABORTED, reason))
        peer.transition(PeerEvent.LEAVE, self.clock.time())
        self._detach(peer)
        task.peers.pop(peer.id, None)
        task.back_to_source_peers.pop(peer.id, None)
        peer.host.peers.pop(peer.id, None)
        self.peers.pop(peer.id, None)
        return decisions + self._refetch(task) if refetch else decisions

    def _detach(self, peer: Peer) -> None:
        """Drop `peer` from every index and every edge (it keeps its record)."""
        task = peer.task
        self._unpark(peer)
        task.parents.discard(peer.id)
        task.hungry.discard(peer.id)
        task.coming.discard(peer.id)
        for parent in list(peer.parents.values()):
            self._unlink(peer, parent)
        for child in list(peer.children.values()):
            self._unlink(child, peer)
            self._update_hungry(child)

    def _learn_content_length(self, peer: Peer) -> None:
        """After a whole back-to-source download: the content is its pieces, if they are contiguous."""
        task = peer.task
        count = peer.finished.count
        end = 0
        for number in range(count):
            record = task.pieces.get(number)
            if record is None or number not in peer.finished or record.offset != end:
                return
            end = record.end
        task.content_length = end
        task.piece_count = count

    # ----------------------------------------------------------------------------------------
    # Indexes

    def _link(self, child: Peer, parent: Peer) -> None:
        if parent.id in child.parents:
            return
        child.parents[parent.id] = parent
        parent.children[child.id] = child
        parent.host.child_edges += 1
        self._update_coming(child)
        self._update_coming(parent)

    def _unlink(self, child: Peer, parent: Peer) -> None:
        if child.parents.pop(parent.id, None) is None:
            return
        parent.children.pop(child.id, None)
        parent.host.child_edges -= 1
        self._update_coming(child)
        self._update_coming(parent)

    @staticmethod
    def _update_coming(peer: Peer) -> None:
        """File `peer` in ``Task.coming`` while it is a parent to come (running, fed, no piece yet,
        room for a child), by its hops from a peer with pieces (the nearest of its parents' + 1)."""
        if (
            peer.state is PeerState.RUNNING
            and peer.parents
            and not peer.eligible_parent
            and not peer.demoted
            and not is_busy(peer)
        ):
            nearest = min(0 if parent.eligible_parent else parent.hops for parent in peer.parents.values())
            peer.hops = min(nearest + 1, MAX_HOPS)  # (a cycle of parents to come must not count up)
            peer.task.coming.file(peer, peer.hops)
        else:
            peer.task.coming.discard(peer.id)

    def _update_hungry(self, peer: Peer) -> None:
        wants_more = (
            peer.state in (PeerState.RECEIVED_NORMAL, PeerState.RUNNING)
            and len(peer.parents) < self._parent_limit(peer)
            and peer.id not in self._waiting
            and peer.id not in peer.task.back_to_source_peers
        )
        if wants_more:
            # filed by its normal parents: a child fed by a seed alone is among the neediest
            peer.task.hungry.file(peer, sum(1 for parent in peer.parents.values() if not parent.is_seed))
        else:
            peer.task.hungry.discard(peer.id)

    def _parent_limit(self, peer: Peer) -> int:
        """Parents `peer` may gather: pushed ones too, as the task's peers get pieces (MESH_PARENT_LIMIT)."""
        return max(self.config.candidate_parent_limit, MESH_PARENT_LIMIT)

    def _park(self, peer: Peer) -> None:
        if peer.waiting_since is None:
            peer.waiting_since = self.clock.time()
        peer.task.waiting[peer.id] = peer
        self._waiting[peer.id] = peer
        peer.task.hungry.discard(peer.id)

    def _unpark(self, peer: Peer) -> None:
        peer.waiting_since = None
        peer.task.waiting.pop(peer.id, None)
        self._waiting.pop(peer.id, None)

    # ----------------------------------------------------------------------------------------
    # Helpers

    def _guard(self, peer_id: str, apply: _Apply) -> list[Decision]:
        """Run `apply` on a known peer; an unknown peer or an illegal event ends its stream."""
        peer = self.peers.get(peer_id)
        if peer is None:
            return [FailPeer(peer_id, Code.NOT_FOUND, f"peer {peer_id} not registered; register it first")]
        try:
            return apply(peer)
        except InvalidTransition as exc:
            decisions: list[Decision] = [FailPeer(peer_id, Code.FAILED_PRECONDITION, str(exc))]
            if peer.state not in TERMINAL_STATES:
                decisions += self._fail(peer)
            return decisions

    def _pieces_of(self, peer: Peer) -> tuple[PieceRecord, ...]:
        task = peer.task
        records = []
        for number in peer.finished:
            record = task.pieces.get(number)
            if record is None:
                offset, length = task.piece_spans.get(number, (0, 0))
                record = PieceRecord(number, offset, length, "")
            records.append(record)
        return tuple(records)

    def _candidate(self, parent: Peer) -> Candidate:
        return Candidate(
            parent.id, parent.task.id, parent.state.value, parent.host.info, self._pieces_of(parent)
        )


def _refused_by_priority(task_id: str, level: int) -> str:
    """Why a download of a task nobody has is refused at this priority."""
    if level == Priority.LEVEL1:
        return f"task {task_id}: priority LEVEL1 forbids downloading it (ask with a higher priority, e.g. -p 6)"
    return (f"task {task_id}: no peer has it, and priority LEVEL2 allows peers only (no seed, no origin); "
            "ask with -p 3 or higher to fetch it")
