"""A deterministic discrete-event simulator of one swarm, driving the real scheduling core and the
real download policy.

    python bench/swarm_sim.py [--peers 1000] [--size-mib 256] [--node-rate 200mbit] \\
        [--origin-rate 200mbit] [--seed-rate 200mbit] [--leave 0.1] [--seeds 1] [--fail-seed-at S]

What is real: :class:`scheduler.core.SchedulerCore` (parents, seed triggers, back-to-source) and
one :class:`peer.download.policy.DownloadPolicy` per peer (which piece, from whom, when to give
up), with the daemon's default configuration. What is modelled: the network. Every host has an
uplink and a downlink; a piece transfer is a flow whose rate is its fair share of the sender's
uplink and of the receiver's downlink, whichever is smaller (TCP-like sharing at each end, without
the redistribution of a full max-min solver, so it errs on the slow side). Of the piece server,
what decides who sends: its swarm slots (a parent sending that many pieces answers others busy)
and a seed's super-seeding (a piece on its way to one child, and for the share window after, is
refused to the others). Messages (scheduler answers, piece announcements) arrive instantly, and
CPU is free unless ``--cores C --cpu-per-gib S`` give the machine: on the netns bench 18 processes
share 2 cores, and every transfer costs the machine CPU (receiving, hashing, writing, sending, the
kernel's copies and the veths): the model then has every flow also cross one shared link of
C / S GiB per second. Measure S on a bench row that is not CPU-bound (N=4: the machine's
busy share * cores * wall / GiB moved, origin included) and compare the CPU-bound rows. Time
is a :class:`~common.clock.ManualClock` advanced from event to event, and every random choice
comes from seeded generators: the same arguments give the same output (vary ``--random-seed`` to
see the spread; at N=16 one seed's result can differ from another's by 30 %, so compare policies
over a few).

The run: a seed host (or several) behind the origin's link, N peers starting at once; a share of
the peers (``--leave``) leaves at random moments mid-download, and optionally a seed host dies
(``--fail-seed-at``). Prints completion p50/p99/max against the lower bound
max(F/u_origin, N·F/(u_origin + N·u_node), F/d_node), origin bytes and the seed's upload, each
÷ the blob. A seed that dies takes with it the pieces no peer has yet; the scheduler then brings
in a new fetcher (``--peers 200 --size-mib 64 --fail-seed-at 3 --leave 0``: before, 200 of 200
never finished; now all by 6.3 s with origin 1.45x, or 7.0 s and 2.00x with ``--seeds 2``;
``--kill-seed-at 3``, where the scheduler learns of the death only from children's reports:
6.3 s, 1.45x).

Trying a policy: change the core or the policy module, run this, then confirm on the netns bench
(``bench/distribution.py``). Agreement so far (the policy of December 2026, N=16, every link
200 Mbit/s): 64 MiB 24.4 s here vs 24-26 s measured, 256 MiB 76.7 s vs 62 s. Issue 11's first
steps (a seed's children capped, parents that have no piece yet for waiting peers, a mesh that
grows to 15 parents, rarest-first, a seed serving what no normal parent has, 2 pieces in flight
per parent and 1 per seed), ``--leave 0 --random-seed 1..3``, max completion: 64 MiB 28.9-30.0 s
-> 12.2-12.8 s (seed upload 9.2-9.6x -> 2.5-2.8x), 256 MiB 77-83 s -> 33-34 s (4.5-4.8x ->
2.3-2.6x); 200 peers x 64 MiB 194 s -> 41 s; 1,000 peers x 64 MiB (10 % leaving) took over
10 minutes of CPU to simulate, now 11 s, finishing at 114 s with the seed still uploading 41x
(waiting peers fall back to it before a first piece is two hops away). Not yet confirmed on the
netns bench. Issue 11's scheduler fixes for large swarms (pushes to the children with the fewest
normal parents first; parents to come from an index, nearest first, not a walk of 256 peers
from the seed), 256 MiB, 10 % leaving, max completion: 1,000 peers 88.7 s -> 23.7 s (seed
upload 8.1x -> 1.8x), 2,000 peers 224 s -> 25.7 s (20.6x -> 1.9x), 5,000 peers 1,997 s (199
peers sent to the origin: 186 copies) -> 26 s (origin 1.00x, seed 1.8x); N=16 --leave 0:
64 MiB 5.6 s -> 5.2 s, 256 MiB 27.4 s -> 20.4 s (random seed 1).

With the machine modelled, calibrated on the N=4 rows of one hour (``--cores 2 --cpu-per-gib``
16.6 for 64 MiB and 11.7 for 256 MiB at 200 Mbit/s, 14.6 and 8.3 with 1 Gbit/s node links; the
commit of e5d9e78, 2026-12-07), the other rows of that hour agree within 3-21 %: N=16 64 MiB
9.3 s here vs 9.4 s measured, 256 MiB 27.4 vs 25.4; N=8 5.7 vs 7.2 and 19.0 vs 18.9; N=32 17.6
vs 20.0 and 50.1 vs 46.7; 1 Gbit/s N=16 8.2 vs 9.1 and 19.7 vs 20.3, N=32 15.4 vs 19.5 and 35.9
vs 41.5 (docs/benchmarks.md). Without it, N=16 x 256 MiB takes 17.3-18.1 s: the bench's
shortfall is the machine, not the policy. Every such flow shares one link, so each event
re-rates every flow: for bench-sized swarms only.

Cost: each flow start or end re-rates every flow on the two links it crosses, so a host with k
flows at once costs O(k) per event. With the policy before issue 11 every peer kept the seed as
a parent and the seed carried hundreds of flows: 200 peers took ~20 s of CPU, 1,000 peers over
10 minutes; with the seed's children capped, 1,000 peers x 64 MiB take ~11 s
(``tests/unit/test_swarm_sim.py``). Nearly all the rest is the download policy's
``next_commands``, once per event of a peer: a piece announced by a parent (skipped when the
child has the piece or fetches it already), a transfer ended, a busy parent's answer, the peer's
one wake-up timer. With the scheduler fixes above: 1,000 x 256 MiB ~26 CPU-s, 2,000 ~55 s,
5,000 ~173 s, 10,000 ~370 s (max 26.6 s, 2.47x the bound, origin 1.00x, seed 2.0x). Six in seven
piece requests are answered busy (the parent's upload slots are full), so most decisions follow
a busy answer or a backoff's end; with the policy's dispatch looking only at what changed since
one that found nothing, and stale completions cleared from the queue, the same runs take
1,000 x 256 MiB 15-18 CPU-s, 2,000 29-38 s, 10,000 269-275 s (the same outcome). What is left is
spread out: the event heap (a tenth at 3,000 peers), announcements, the policy's bookkeeping.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.clock import ManualClock
from common.config import DfdaemonConfig, SchedulerConfig
from common.hosts import HostType
from common.pieces import piece_count, piece_length_for
from peer.download.policy import (
    BackToSource,
    Command,
    DownloadPolicy,
    DropParent,
    FetchPiece,
    Finished,
    ReportPieceFailed,
    Reschedule,
)
from peer.upload.piece_server import DEFAULT_SHARE_WINDOW, DEFAULT_SWARM_SLOTS, ShareHolds
from scheduler.core import (
    Decision,
    FailPeer,
    SchedulerCore,
    SendEmpty,
    SendNeedBackToSource,
    SendNormal,
    TriggerSeed,
)
from scheduler.resource import DownloadSpec, HostInfo

MIB = 1024 * 1024
GIB = 1024 * MIB
TASK_ID = "t" * 64
URL = "https://registry.example/v2/bench/blobs/sha256:0"
REQUEST_RTT = 0.002  # a request answered at once (a parent with no free upload slot)
# The event queue is cleared of stale completions when it grows past twice its size after the last
# clearing (and this many events): most completions go stale, as flows are re-rated.
COMPACT_MIN_EVENTS = 4096
TICK = 0.5  # seconds between the scheduler's ticks (its retry interval)


def parse_rate(text: str) -> float:
    """A tc-style rate (``200mbit``, ``1gbit``) in bytes per second."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for suffix, scale in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale / 8
    raise argparse.ArgumentTypeError(f"rate {text!r}: write it as tc does, e.g. 200mbit or 1gbit")


# -- the network -----------------------------------------------------------------------------------


@dataclass(eq=False)
class Link:
    rate: float  # bytes per second
    # dicts, not sets: iteration in insertion order keeps runs deterministic (sets of objects
    # iterate in memory-address order)
    flows: dict[Flow, None] = field(default_factory=dict)
    sent: float = 0.0  # bytes that finished crossing it


@dataclass(eq=False)
class SimHost:
    id: str
    up: Link
    down: Link
    alive: bool = True
    # Pieces sent at once to children that may ask elsewhere (the piece server's swarm slots).
    upload_slots: int = 0
    # A seed's super-seeding, as its piece server keeps it (None: every child gets every piece).
    holds: ShareHolds | None = None


@dataclass(eq=False)
class Flow:
    src: SimHost
    dst: SimHost
    size: float
    on_done: Callable[[], None]
    on_fail: Callable[[str], None]
    left: float = 0.0
    rate: float = 0.0
    since: float = 0.0
    version: int = 0
    over: bool = False


class Network:
    """Flows between hosts, each at the smaller of its fair shares of the two links it crosses
    (and of the machine's CPU, when one is given: every flow crosses it too)."""

    def __init__(self, clock: ManualClock, machine: Link | None = None) -> None:
        self.clock = clock
        self.machine = machine
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = itertools.count()
        self._compact_above = COMPACT_MIN_EVENTS

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._sequence), action))
        if len(self._events) > self._compact_above:
            self._compact()

    def _compact(self) -> None:
        """Drop the completions that went stale (their flow ended or was re-rated since): they would
        do nothing when popped. The others keep their keys, so they pop in the same order; a smaller
        heap is cheaper to pop from (three in four completions go stale)."""
        self._events[:] = [event for event in self._events
                           if not (isinstance(event[2], _Completion) and event[2].stale())]
        heapq.heapify(self._events)
        self._compact_above = max(COMPACT_MIN_EVENTS, 2 * len(self._events))

    def start(self, src: SimHost, dst: SimHost, size: float, on_done: Callable[[], None],
              on_fail: Callable[[str], None]) -> Flow:
        flow = Flow(src, dst, size, on_done, on_fail, left=size, since=self.clock.now)
        if not (src.alive and dst.alive):
            self.at(self.clock.now, lambda: on_fail("connection refused"))
            flow.over = True
            return flow
        src.up.flows[flow] = None
        dst.down.flows[flow] = None
        if self.machine is not None:
            self.machine.flows[flow] = None
        self._rerate(self._sharing(flow))
        return flow

    def _sharing(self, flow: Flow) -> dict[Flow, None]:
        """The flows whose rate may change when `flow` starts or ends: those on its links."""
        if self.machine is not None:
            return self.machine.flows  # every flow shares the machine
        return flow.src.up.flows | flow.dst.down.flows

    def kill(self, host: SimHost) -> None:
        """The host is gone: every flow it takes part in fails."""
        host.alive = False
        broken = list(host.up.flows | host.down.flows)
        touched: dict[Flow, None] = {}
        for flow in broken:
            self._remove(flow)
            touched |= self._sharing(flow)
        self._rerate(touched)
        for flow in broken:
            flow.on_fail("connection reset by peer")

    def run(self, until: float) -> None:
        """Process events in time order until none are left or `until` passes."""
        events, clock, pop = self._events, self.clock, heapq.heappop  # locals: millions of rounds
        while events:
            when, _, action = pop(events)
            if when > until:
                break
            if when > clock.now:
                clock.now = when
            action()

    def _remove(self, flow: Flow) -> None:
        flow.over = True
        flow.src.up.flows.pop(flow, None)
        flow.dst.down.flows.pop(flow, None)
        if self.machine is not None:
            self.machine.flows.pop(flow, None)

    def _rerate(self, flows: Iterable[Flow]) -> None:
        now = self.clock.now
        for flow in flows:
            if flow.over:
                continue
            up, down = flow.src.up, flow.dst.down
            rate = min(up.rate / len(up.flows), down.rate / len(down.flows))
            if self.machine is not None:
                rate = min(rate, self.machine.rate / len(self.machine.flows))
            if rate == flow.rate:
                continue  # its completion event stands
            flow.left = max(0.0, flow.left - flow.rate * (now - flow.since))
            flow.since = now
            flow.rate = rate
            flow.version += 1
            self.at(now + flow.left / flow.rate, _Completion(self, flow, flow.version))

    def complete(self, flow: Flow) -> None:
        """The flow's last byte arrived."""
        self._remove(flow)
        flow.src.up.sent += flow.size
        self._rerate(self._sharing(flow))
        flow.on_done()


class _Completion:
    """The event of a flow's completion at its current rate; stale once the flow ended or was
    re-rated (a newer one stands)."""

    __slots__ = ("flow", "network", "version")

    def __init__(self, network: Network, flow: Flow, version: int) -> None:
        self.network, self.flow, self.version = network, flow, version

    def stale(self) -> bool:
        return self.flow.over or self.flow.version != self.version

    def __call__(self) -> None:
        if not self.stale():
            self.network.complete(self.flow)


# -- peers -----------------------------------------------------------------------------------------


@dataclass(eq=False)
class SimPeer:
    id: str
    host: SimHost
    policy: DownloadPolicy
    is_seed: bool
    started: float
    pieces: set[int] = field(default_factory=set)
    subscribers: dict[SimPeer, None] = field(default_factory=dict)  # children told of each new piece
    parents: dict[str, SimPeer] = field(default_factory=dict)
    flows: dict[int, Flow] = field(default_factory=dict)
    origin_queue: list[int] | None = None  # pieces left to back-source, once back-to-source began
    origin_workers: int = 0
    finished_at: float | None = None
    failed: str = ""
    wake_at: float | None = None  # its one pending timer (busy parents), as the engine's loop has


@dataclass
class Outcome:
    completions: list[float]  # seconds from start, of every peer that finished
    failed: int
    left: int
    origin_bytes: float
    seed_upload: float
    peer_uploads: list[float]
    events_seconds: float  # CPU seconds of the simulation itself


class Swarm:
    """One task, N peers, the scheduling core and the network between them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.clock = ManualClock(start=0.0)
        self.net = Network(self.clock, machine_cpu(args.cores, args.cpu_per_gib))
        self.rng = random.Random(args.random_seed)
        scheduler_config = SchedulerConfig(seed_peer=(), candidate_parent_limit=args.candidate_limit)
        self.core = SchedulerCore(scheduler_config, self.clock, random.Random(args.random_seed + 1))
        self.daemon = DfdaemonConfig()
        self.size = args.size_mib * MIB
        self.piece_length = piece_length_for(self.size)
        self.piece_count = piece_count(self.size, self.piece_length)
        origin_rate = parse_rate(args.origin_rate)
        self.origin = SimHost("origin", Link(origin_rate), Link(origin_rate))
        self.hosts: dict[str, SimHost] = {}
        self.peers: dict[str, SimPeer] = {}
        self.seed_addresses: dict[str, str] = {}  # seed grpc address -> host id
        self.left = 0
        seed_rate = parse_rate(args.seed_rate)
        for i in range(args.seeds):
            host_id = f"seed{i}"
            self._add_host(host_id, seed_rate, HostType.SUPER_SEED, ip=f"10.1.0.{i + 1}")
            self.seed_addresses[f"10.1.0.{i + 1}:4000"] = host_id
        node_rate = parse_rate(args.node_rate)
        for i in range(args.peers):
            self._add_host(f"n{i}", node_rate, HostType.NORMAL, ip=f"10.2.{i // 256}.{i % 256}")

    def _add_host(self, host_id: str, rate: float, kind: HostType, ip: str) -> None:
        holds = ShareHolds(DEFAULT_SHARE_WINDOW, self.clock) if kind is HostType.SUPER_SEED else None
        self.hosts[host_id] = SimHost(host_id, Link(rate), Link(rate), upload_slots=self.args.upload_slots,
                                      holds=holds)
        self.core.announce_host(HostInfo(id=host_id, ip=ip, type=kind, port=4000))

    # -- driving ------------------------------------------------------------------------------

    def run(self) -> Outcome:
        started = time.process_time()
        nodes = [f"n{i}" for i in range(self.args.peers)]
        for host_id in nodes:
            self.net.at(0.0, lambda h=host_id: self._register(h, is_seed=False))
        leaving = self.rng.sample(nodes, int(len(nodes) * self.args.leave))
        bound = self.lower_bound()
        for host_id in leaving:  # somewhere in the first half of an ideal run
            self.net.at(self.rng.uniform(0.1, 0.5) * bound, lambda h=host_id: self._leave(h))
        if self.args.fail_seed_at is not None:
            self.net.at(self.args.fail_seed_at, lambda: self._leave("seed0"))
        if self.args.kill_seed_at is not None:
            self.net.at(self.args.kill_seed_at, lambda: self._leave("seed0", announced=True))
        self._tick()
        self.net.run(until=self.args.deadline)
        completions = [p.finished_at - p.started for p in self.peers.values()
                       if not p.is_seed and p.finished_at is not None]
        failed = sum(1 for p in self.peers.values() if not p.is_seed and p.failed)
        seed_upload = sum(h.up.sent for h in self.hosts.values() if h.id.startswith("seed"))
        peer_uploads = [h.up.sent for h in self.hosts.values() if not h.id.startswith("seed")]
        return Outcome(completions, failed, self.left, self.origin.up.sent, seed_upload, peer_uploads,
                       time.process_time() - started)

    def lower_bound(self) -> float:
        u_origin = parse_rate(self.args.origin_rate)
        u_node = parse_rate(self.args.node_rate)
        n = self.args.peers
        return max(self.size / u_origin, n * self.size / (u_origin + n * u_node), self.size / u_node)

    def _tick(self) -> None:
        self._apply(self.core.tick())
        for peer in list(self.peers.values()):
            if peer.finished_at is None and not peer.failed:
                self._pump(peer)
        if any(p.finished_at is None and not p.failed for p in self.peers.values()) or not self.peers:
            self.net.at(self.clock.now + TICK, self._tick)

    def _register(self, host_id: str, *, is_seed: bool, download: DownloadSpec | None = None) -> None:
        host = self.hosts[host_id]
        if not host.alive:
            return
        peer_id = f"{host_id}-p"
        policy = DownloadPolicy(peer_id=peer_id, clock=self.clock, rng=random.Random(self.rng.random()),
                                concurrent_pieces=self.args.concurrent_pieces or self.daemon.concurrent_piece_count,
                                schedule_timeout=self.daemon.schedule_timeout)
        peer = SimPeer(peer_id, host, policy, is_seed, self.clock.now)
        self.peers[peer_id] = peer
        self._apply(self.core.register_peer(host_id, TASK_ID, peer_id, download or DownloadSpec(url=URL)))

    def _leave(self, host_id: str, announced: bool = False) -> None:
        """The host dies. The scheduler deletes it, or (`announced`: a kill, as SIGKILL) only sees
        its peer's stream close: the host stays announced until its time-to-live passes."""
        host = self.hosts[host_id]
        if not host.alive:
            return
        peer = self.peers.get(f"{host_id}-p")
        if peer is not None and peer.finished_at is None and not peer.failed:
            peer.failed = "left"
            self.left += not peer.is_seed  # (the count is of pulling peers)
        self.net.kill(host)
        if peer is not None:
            for child in list(peer.subscribers):
                self._carry_out(child, child.policy.parent_ended(peer.id, "connection reset by peer"))
        if not announced:
            self._apply(self.core.delete_host(host_id))
        elif peer is not None:
            self._apply(self.core.stream_closed(peer.id))

    # -- the scheduler's decisions ------------------------------------------------------------

    def _apply(self, decisions: list[Decision]) -> None:
        for decision in decisions:
            if isinstance(decision, SendNormal):
                self._give_parents(decision)
            elif isinstance(decision, SendNeedBackToSource):
                peer = self.peers.get(decision.peer_id)
                if peer is not None:
                    peer.policy.scheduler_says_back_to_source(decision.description)
                    self._pump(peer)
            elif isinstance(decision, TriggerSeed):
                host_id = self.seed_addresses.get(decision.address)
                if host_id is None or not self.hosts[host_id].alive:
                    self._apply(self.core.seed_trigger_failed(decision.address, decision.task_id))
                elif f"{host_id}-p" not in self.peers:
                    spec = decision.download
                    self.net.at(self.clock.now, lambda h=host_id, s=spec: self._register(h, is_seed=True, download=s))
            elif isinstance(decision, FailPeer):
                peer = self.peers.get(decision.peer_id)
                if peer is not None and peer.finished_at is None:
                    peer.failed = peer.failed or f"{decision.code}: {decision.message}"
            elif isinstance(decision, SendEmpty):
                raise AssertionError("the simulated content is never empty")

    def _give_parents(self, decision: SendNormal) -> None:
        child = self.peers.get(decision.peer_id)
        if child is None or child.failed:
            return
        if not child.policy.content_known:
            child.policy.content_info(self.piece_count)
            self._apply(self.core.download_started(child.id))  # the engine reports it on its first parents
        for candidate in decision.candidates:
            parent = self.peers.get(candidate.peer_id)
            if parent is None or not child.policy.add_parent(parent.id, is_seed=candidate.host.is_seed):
                continue
            child.parents[parent.id] = parent
            parent.subscribers[child] = None
            for number in parent.pieces:
                child.policy.parent_has(parent.id, number)
            if parent.finished_at is not None:
                child.policy.parent_ended(parent.id)
        self._pump(child)

    # -- one peer's commands ------------------------------------------------------------------

    def _pump(self, peer: SimPeer) -> None:
        if peer.failed or peer.finished_at is not None or not peer.host.alive:
            return
        if peer.origin_queue is not None:
            self._back_source_more(peer)
            return
        self._carry_out(peer, peer.policy.next_commands())

    def _carry_out(self, peer: SimPeer, commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, FetchPiece):
                self._fetch(peer, command.number, self.peers[command.parent_id])
            elif isinstance(command, ReportPieceFailed):
                self._apply(self.core.piece_failed(peer.id, command.number, command.parent_id, command.temporary))
            elif isinstance(command, DropParent):
                parent = peer.parents.pop(command.parent_id, None)
                if parent is not None:
                    parent.subscribers.pop(peer, None)
            elif isinstance(command, Reschedule):
                self._apply(self.core.reschedule(peer.id, command.blocked, command.description))
            elif isinstance(command, BackToSource):
                self._start_back_source(peer)
                return
            elif isinstance(command, Finished):
                self._finish(peer)
                return

    def _fetch(self, peer: SimPeer, number: int, parent: SimPeer) -> None:
        host = parent.host
        slots = host.upload_slots
        demand = number in peer.policy.demanded
        busy = bool(slots and len(host.up.flows) >= slots and not demand)
        holds = host.holds if not demand and not busy else None
        if holds is not None:  # the piece server's super-seeding: a piece on its way to another child is held
            busy = holds.sent_elsewhere(number, peer.id, until_sent=True)
        if busy:
            def answer_busy() -> None:
                peer.policy.piece_busy(number, parent.id)
                self._arm(peer)
                self._pump(peer)

            self.net.at(self.clock.now + REQUEST_RTT, answer_busy)
            return
        length = self._length(number)
        started = self.clock.now

        def release(delivered: bool) -> None:
            if holds is not None:
                holds.piece_left(number, peer.id, delivered=delivered)

        def done() -> None:
            release(delivered=True)
            peer.flows.pop(number, None)
            peer.policy.piece_succeeded(number, parent.id)
            self._apply(self.core.piece_finished(peer.id, number, number * self.piece_length, length, parent.id,
                                                 self.clock.now - started))
            self._got_piece(peer, number)
            self._pump(peer)

        def failed(reason: str) -> None:
            release(delivered=False)
            peer.flows.pop(number, None)
            if peer.host.alive:
                self._carry_out(peer, peer.policy.piece_failed(number, parent.id, reason, integrity=False))
                self._pump(peer)

        peer.flows[number] = self.net.start(parent.host, peer.host, length, done, failed)

    def _arm(self, peer: SimPeer) -> None:
        """Set the peer's timer to when its policy next wants to look again (a busy parent's back-off
        ends), unless an earlier one is pending (it re-arms when it fires): the engine's loop waits
        for the next event or ``next_wake()``, whichever comes first, with one timer."""
        wake = peer.policy.next_wake()
        if wake is None or (peer.wake_at is not None and peer.wake_at <= wake):
            return
        peer.wake_at = wake

        def fire() -> None:
            if peer.wake_at != wake:
                return  # an earlier timer took its place
            peer.wake_at = None
            self._pump(peer)
            self._arm(peer)

        self.net.at(wake, fire)

    def _got_piece(self, peer: SimPeer, number: int) -> None:
        peer.pieces.add(number)
        for child in list(peer.subscribers):
            policy = child.policy
            if number in policy.finished:
                continue  # the policy ignores the announcement of a piece it has
            # An announcement of a piece the child is fetching starts nothing (time passing is its
            # timer's and the tick's): no decision to ask for. Each asked for cost a dispatch.
            fetching = number in policy.in_flight
            policy.parent_has(peer.id, number)
            if not fetching:
                self._pump(child)

    def _finish(self, peer: SimPeer) -> None:
        peer.finished_at = self.clock.now
        if peer.origin_queue is not None:
            self._apply(self.core.back_to_source_finished(peer.id))
        else:
            self._apply(self.core.peer_finished(peer.id))
        for child in list(peer.subscribers):
            child.policy.parent_ended(peer.id)

    # -- back to source -----------------------------------------------------------------------

    def _start_back_source(self, peer: SimPeer) -> None:
        for flow in list(peer.flows.values()):  # the origin takes over every missing piece
            flow.on_fail = lambda reason: None
            self.net._remove(flow)
        peer.flows.clear()
        peer.policy.in_flight.clear()
        if not peer.policy.content_known:
            peer.policy.content_info(self.piece_count)
        self._apply(self.core.back_to_source_started(peer.id))
        peer.origin_queue = [n for n in range(self.piece_count) if n not in peer.pieces]
        self._back_source_more(peer)

    def _back_source_more(self, peer: SimPeer) -> None:
        queue = peer.origin_queue
        assert queue is not None
        while queue and peer.origin_workers < (self.args.origin_concurrency or self.daemon.back_to_source_concurrency):
            number = peer.policy.next_origin_piece(queue)
            peer.origin_workers += 1
            self._origin_piece(peer, number)
        if not queue and not peer.origin_workers and peer.finished_at is None:
            self._finish(peer)

    def _origin_piece(self, peer: SimPeer, number: int) -> None:
        length = self._length(number)
        started = self.clock.now

        def done() -> None:
            peer.origin_workers -= 1
            peer.policy.finished.add(number)
            self._apply(self.core.back_to_source_piece_finished(
                peer.id, number, number * self.piece_length, length, f"xxh3:{number:016x}",
                self.clock.now - started))
            self._got_piece(peer, number)
            self._back_source_more(peer)

        def failed(reason: str) -> None:
            peer.origin_workers -= 1
            if peer.host.alive and not peer.failed:
                peer.failed = f"back-to-source failed: {reason}"
                self._apply(self.core.back_to_source_failed(peer.id, reason))

        self.net.start(self.origin, peer.host, length, done, failed)

    def _length(self, number: int) -> int:
        return min(self.piece_length, self.size - number * self.piece_length)


def machine_cpu(cores: float, cpu_per_gib: float) -> Link | None:
    """The CPU all hosts share, as a link every transfer crosses: `cores` CPU-seconds per second,
    `cpu_per_gib` CPU-seconds (of every process and the kernel) per GiB moved. None: CPU is free."""
    if cores <= 0 or cpu_per_gib <= 0:
        return None
    return Link(rate=cores / cpu_per_gib * GIB)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The simulator's command line (a test builds its runs with it too)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=1000, help="pulling peers (default 1000)")
    parser.add_argument("--size-mib", type=int, default=256, help="blob size in MiB (default 256)")
    parser.add_argument("--node-rate", default="200mbit", help="each node's up- and downlink (default 200mbit)")
    parser.add_argument("--origin-rate", default="200mbit", help="the origin's uplink (default 200mbit)")
    parser.add_argument("--seed-rate", default="200mbit", help="each seed host's links (default 200mbit)")
    parser.add_argument("--seeds", type=int, default=1, help="seed hosts (default 1)")
    parser.add_argument("--leave", type=float, default=0.1, help="share of peers leaving mid-download (default 0.1)")
    parser.add_argument("--fail-seed-at", type=float, default=None,
                        help="simulated second the first seed leaves (the scheduler deletes its host)")
    parser.add_argument("--kill-seed-at", type=float, default=None,
                        help="simulated second the first seed is killed (the scheduler sees its stream close; "
                             "the host stays announced)")
    parser.add_argument("--candidate-limit", type=int, default=SchedulerConfig().candidate_parent_limit,
                        help="the scheduler's candidate_parent_limit (default: the scheduler's default)")
    parser.add_argument("--concurrent-pieces", type=int, default=0,
                        help="pieces in flight per peer (default: the dfdaemon's default)")
    parser.add_argument("--origin-concurrency", type=int, default=0,
                        help="parallel origin fetches of a back-sourcing peer (default: the dfdaemon's default)")
    parser.add_argument("--upload-slots", type=int, default=DEFAULT_SWARM_SLOTS,
                        help="pieces a host sends at once to children that may ask elsewhere; the "
                             f"others are told it is busy (default {DEFAULT_SWARM_SLOTS}, as dfdaemons; 0: no limit)")
    parser.add_argument("--cores", type=float, default=0.0,
                        help="model one machine's CPU shared by every host, as on the netns bench (with "
                             "--cpu-per-gib; default 0: CPU is free)")
    parser.add_argument("--cpu-per-gib", type=float, default=0.0,
                        help="CPU-seconds the machine spends per GiB moved, every process and the kernel "
                             "(measure it on a bench row that is not CPU-bound)")
    parser.add_argument("--random-seed", type=int, default=1)
    parser.add_argument("--deadline", type=float, default=3600.0, help="simulated seconds before giving up")
    args = parser.parse_args(argv)
    if args.peers < 1 or args.seeds < 1:
        parser.error("--peers and --seeds: at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    swarm = Swarm(args)
    outcome = swarm.run()
    bound = swarm.lower_bound()
    size = swarm.size
    done = outcome.completions
    unfinished = args.peers - len(done) - outcome.failed
    print(f"{args.peers} peers, {args.size_mib} MiB in {swarm.piece_count} pieces of "
          f"{swarm.piece_length // MIB} MiB; links: origin {args.origin_rate}, nodes {args.node_rate}, "
          f"{args.seeds} seed(s) {args.seed_rate}; {outcome.left} left mid-download")
    print("| peers | p50 s | p99 s | max s | max ÷ bound | origin ÷ blob | seed upload ÷ blob "
          "| peer upload min / max ÷ blob | failed | unfinished | sim CPU s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    uploads = outcome.peer_uploads
    print(f"| {args.peers} | {percentile(done, 0.5):.1f} | {percentile(done, 0.99):.1f} | "
          f"{max(done, default=float('nan')):.1f} | {max(done, default=float('nan')) / bound:.2f} | "
          f"{outcome.origin_bytes / size:.2f} | {outcome.seed_upload / size:.2f} | "
          f"{min(uploads) / size:.2f} / {max(uploads) / size:.2f} | {outcome.failed - outcome.left} | {unfinished} | "
          f"{outcome.events_seconds:.1f} |")
    if done:
        print(f"mean {statistics.mean(done):.1f} s; lower bound {bound:.1f} s")
    return 0 if not unfinished else 1


if __name__ == "__main__":
    sys.exit(main())
