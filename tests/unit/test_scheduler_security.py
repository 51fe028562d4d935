"""Who may do what on the scheduler (issue 12): table-driven tests of the pure core on a ManualClock.

The caller's identity is an input (:class:`scheduler.core.Caller`); the gRPC service reads it from
the connection. Each table row is one caller and what the core must decide for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from common.clock import ManualClock
from common.config import SchedulerConfig
from common.errors import PermissionDenied, QuotaExceeded
from common.identity import Identity, Role
from common.pieces import MAX_PIECE_COUNT, MAX_PIECE_LENGTH
from scheduler.core import (
    ABANDONED_TASK_TTL,
    FAILED_PEER_TTL,
    Caller,
    Code,
    Decision,
    FailPeer,
    SchedulerCore,
    SendNeedBackToSource,
    SendNormal,
    TriggerSeed,
    geometry_problem,
    ip_of_grpc_peer,
    stream_message_problem,
)
from scheduler.resource import DownloadSpec, HostInfo

TASK = "task-1"
PIECE = 4 * 1024 * 1024
SEED_ADDRESS = "10.0.0.9:4000"

SHARED_PEER = Identity(Role.PEER)
SHARED_SEED = Identity(Role.SEED)
ADMIN = Identity(Role.ADMIN)


def tls(identity: Identity, ip: str = "10.0.0.1") -> Caller:
    return Caller(identity, ip)


def plain(ip: str = "10.0.0.1") -> Caller:
    return Caller(None, ip)


def host_info(name: str, ip: str = "10.0.0.1", *, seed: bool = False, port: int = 4000) -> HostInfo:
    return HostInfo(id=f"h-{name}", ip=ip, hostname=name, type=1 if seed else 0, port=port, download_port=4005)


def new_core(clock: ManualClock | None = None, **config: Any) -> SchedulerCore:
    config.setdefault("retry_interval", 1.0)
    return SchedulerCore(SchedulerConfig(**config), clock or ManualClock())


def fails(decisions: list[Decision], code: Code) -> bool:
    return any(isinstance(d, FailPeer) and d.code is code for d in decisions)


# --------------------------------------------------------------------------------------------
# Hosts: who may announce what


@pytest.mark.parametrize(
    ("caller", "info", "allowed"),
    [
        # plaintext: a seed only at a configured --seed-peer address
        (plain(), host_info("n1"), True),
        (plain("10.0.0.9"), host_info("seed", "10.0.0.9", seed=True), True),
        (plain(), host_info("evil", seed=True), False),
        (plain("10.0.0.9"), host_info("seed", "10.0.0.9", seed=True, port=4001), False),
        # a configured DNS name matches the announced hostname only from the announced IP
        (plain("10.0.0.7"), host_info("seed-0", "10.0.0.7", seed=True), True),
        (plain("10.0.0.8"), host_info("seed-0", "10.0.0.7", seed=True), False),
        # mutual TLS: the seed role, whatever the configuration says
        (tls(SHARED_SEED), host_info("s1", seed=True), True),
        (tls(SHARED_PEER, "10.0.0.9"), host_info("seed", "10.0.0.9", seed=True), False),
        (tls(Identity(Role.PEER, "n1")), host_info("n1"), True),
        (tls(Identity(Role.PEER, "n1")), host_info("n1.cluster.local"), True),
        (tls(Identity(Role.PEER, "n1")), host_info("n2"), False),  # a per-host certificate names its host
        (tls(Identity(Role.SEED, "s1")), host_info("s1", seed=True), True),
        (tls(ADMIN), host_info("n1"), False),  # admins list and delete; they are not nodes
        (tls(Identity(Role.SCHEDULER)), host_info("n1"), False),
    ],
)
def test_announce_host(caller: Caller, info: HostInfo, allowed: bool) -> None:
    core = new_core(seed_peer=(SEED_ADDRESS, "seed-0.seeds.ns.svc:4000"))
    if allowed:
        core.announce_host(info, caller)
        assert core.hosts[info.id].info == info
    else:
        with pytest.raises(PermissionDenied):
            core.announce_host(info, caller)
        assert info.id not in core.hosts


@pytest.mark.parametrize(
    ("first", "second", "allowed"),
    [
        (tls(Identity(Role.PEER, "n1")), tls(Identity(Role.PEER, "n1"), "10.9.9.9"), True),  # its own cert
        (tls(SHARED_PEER), tls(SHARED_PEER), True),  # a shared certificate, from the same IP
        (tls(SHARED_PEER), tls(SHARED_PEER, "10.0.0.66"), False),
        (tls(Identity(Role.PEER, "n1")), tls(SHARED_PEER), False),
        (plain(), plain(), True),
        (plain(), plain("10.0.0.66"), False),
    ],
)
def test_a_host_record_belongs_to_who_announced_it(first: Caller, second: Caller, allowed: bool) -> None:
    core = new_core()
    core.announce_host(host_info("n1"), first)
    rogue = host_info("n1", ip="10.0.0.66")  # pointing the node at the attacker
    if allowed:
        core.announce_host(rogue, second)
        return
    with pytest.raises(PermissionDenied):
        core.announce_host(rogue, second)
    assert core.hosts["h-n1"].info.ip == "10.0.0.1"
    decisions = core.register_peer("h-n1", TASK, "p1", DownloadSpec(url="https://r/b"), second)
    assert fails(decisions, Code.PERMISSION_DENIED) and "p1" not in core.peers
    with pytest.raises(PermissionDenied):
        core.delete_host("h-n1", second)
    assert "h-n1" in core.hosts


def test_a_nodes_own_certificate_takes_its_host_id_back_from_a_squatter() -> None:
    core = new_core()
    squatter, node = tls(SHARED_PEER, "10.0.0.66"), tls(Identity(Role.PEER, "n1"))
    core.announce_host(host_info("n1", ip="10.0.0.66"), squatter)  # first after a scheduler restart
    core.register_peer("h-n1", TASK, "squat", DownloadSpec(url="https://r/b"), squatter)
    core.announce_host(host_info("n1"), node)
    assert core.hosts["h-n1"].info.ip == "10.0.0.1" and "squat" not in core.peers
    with pytest.raises(PermissionDenied):  # and it is the node's for good
        core.announce_host(host_info("n1", ip="10.0.0.66"), squatter)
    with pytest.raises(PermissionDenied):  # another per-host certificate does not name it
        core.announce_host(host_info("n1"), tls(Identity(Role.PEER, "n2")))


def test_a_peer_id_of_another_identity_cannot_be_taken_over() -> None:
    core = new_core()
    owner, other = tls(SHARED_PEER, "10.0.0.1"), tls(SHARED_PEER, "10.0.0.2")
    core.announce_host(host_info("n1"), owner)
    core.announce_host(host_info("n2", "10.0.0.2"), other)
    core.register_peer("h-n1", TASK, "victim", DownloadSpec(url="https://r/b"), owner)
    decisions = core.register_peer("h-n2", TASK, "victim", DownloadSpec(url="https://r/b"), other)
    assert fails(decisions, Code.PERMISSION_DENIED)
    assert core.peers["victim"].host.id == "h-n1"


# --------------------------------------------------------------------------------------------
# Admin operations


@pytest.mark.parametrize(
    ("caller", "admin"),
    [
        (tls(ADMIN), True),
        (tls(Identity(Role.ADMIN, "ops")), True),
        (tls(SHARED_PEER, "127.0.0.1"), False),  # with TLS, loopback proves nothing
        (tls(SHARED_SEED), False),
        (tls(Identity(Role.SCHEDULER)), False),
        (plain("127.0.0.1"), True),  # plaintext: loopback only
        (plain("::1"), True),
        (plain("10.0.0.1"), False),
        (plain(""), False),
    ],
)
def test_list_and_delete_need_the_admin_role(caller: Caller, admin: bool) -> None:
    core = new_core()
    core.announce_host(host_info("n1"), tls(SHARED_PEER))
    core.register_peer("h-n1", TASK, "p1", DownloadSpec(url="https://r/b"), tls(SHARED_PEER))
    actions: list[Callable[[], object]] = [
        lambda: core.list_hosts(caller),
        lambda: core.delete_peer("p1", caller),
        lambda: core.delete_task(TASK, caller),
        lambda: core.delete_host("h-n1", caller),
        lambda: core.require_admin(caller, "PreheatImage"),
    ]
    for action in actions:
        if admin:
            action()
        else:
            with pytest.raises(PermissionDenied, match="admin"):
                action()
    assert ("h-n1" in core.hosts) is not admin


def test_a_host_may_delete_itself() -> None:
    core = new_core()
    me = tls(Identity(Role.PEER, "n1"))
    core.announce_host(host_info("n1"), me)
    core.delete_host("h-n1", me)
    assert "h-n1" not in core.hosts


# --------------------------------------------------------------------------------------------
# Streams


@pytest.mark.parametrize(
    ("bound", "peer_id", "is_register", "refused"),
    [
        ("", "p1", True, False),
        ("", "victim", False, True),  # a stream must register before it says anything
        ("", "", True, True),
        ("p1", "p1", False, False),
        ("p1", "p1", True, False),  # a retry of its own registration
        ("p1", "victim", False, True),
        ("p1", "victim", True, True),  # one stream, one peer
    ],
)
def test_a_stream_speaks_for_its_own_peer_only(bound: str, peer_id: str, is_register: bool, refused: bool) -> None:
    assert bool(stream_message_problem(bound, peer_id, is_register)) is refused


@pytest.mark.parametrize(
    ("peer", "ip"),
    [("ipv4:127.0.0.1:5000", "127.0.0.1"), ("ipv6:[::1]:5000", "::1"), ("unix:/tmp/s", ""), ("", "")],
)
def test_ip_of_grpc_peer(peer: str, ip: str) -> None:
    assert ip_of_grpc_peer(peer) == ip


# --------------------------------------------------------------------------------------------
# Who defines the bytes


def test_a_peer_that_asked_for_the_origin_itself_defines_nothing() -> None:
    core = new_core(seed_peer=(SEED_ADDRESS,))
    attacker = tls(SHARED_PEER, "10.0.0.66")
    core.announce_host(host_info("evil", "10.0.0.66"), attacker)
    (decision,) = core.register_peer("h-evil", TASK, "evil", DownloadSpec(url="https://r/b", need_back_to_source=True),
                                     attacker)
    assert isinstance(decision, SendNeedBackToSource)  # it may fetch for itself...
    core.back_to_source_started("evil")
    for n in range(2):
        core.back_to_source_piece_finished("evil", n, n * PIECE, PIECE, "xxh3:" + "66" * 16)
    core.back_to_source_finished("evil")
    info = core.stat_task(TASK)
    assert info.pieces == () and info.content_length is None  # ...but defines nothing for others
    # an honest peer is not offered the attacker: the configured seed is triggered
    core.announce_host(host_info("n1"), tls(SHARED_PEER))
    decisions = core.register_peer("h-n1", TASK, "p1", DownloadSpec(url="https://r/b"), tls(SHARED_PEER))
    assert [type(d) for d in decisions] == [TriggerSeed]
    assert not core.peers["evil"].eligible_parent


def test_a_peer_sent_to_the_origin_and_a_seed_define_the_pieces() -> None:
    core = new_core()  # no seed: the first peer is sent to the origin by the scheduler
    core.announce_host(host_info("n1"), tls(SHARED_PEER))
    (decision,) = core.register_peer("h-n1", TASK, "p1", DownloadSpec(url="https://r/b"), tls(SHARED_PEER))
    assert isinstance(decision, SendNeedBackToSource)
    core.back_to_source_piece_finished("p1", 0, 0, PIECE, "xxh3:" + "01" * 16)
    assert [p.digest for p in core.stat_task(TASK).pieces] == ["xxh3:" + "01" * 16]
    core.announce_host(host_info("s1", "10.0.0.9", seed=True), tls(SHARED_SEED, "10.0.0.9"))
    core.register_peer("h-s1", "task-2", "s1", DownloadSpec(url="https://r/c", need_back_to_source=True),
                       tls(SHARED_SEED, "10.0.0.9"))
    core.back_to_source_piece_finished("s1", 0, 0, PIECE, "xxh3:" + "02" * 16)
    assert [p.digest for p in core.stat_task("task-2").pieces] == ["xxh3:" + "02" * 16]


def test_a_peer_that_went_to_the_origin_on_its_own_counts_only_where_it_agrees() -> None:
    core = new_core()
    peer = tls(SHARED_PEER)
    core.announce_host(host_info("n1"), peer)
    core.announce_host(host_info("n2", "10.0.0.2"), tls(SHARED_PEER, "10.0.0.2"))
    core.register_peer("h-n1", TASK, "src", DownloadSpec(url="https://r/b"), peer)  # sent to the origin
    core.back_to_source_piece_finished("src", 0, 0, PIECE, "xxh3:" + "01" * 16)
    core.register_peer("h-n2", TASK, "self", DownloadSpec(url="https://r/b"), tls(SHARED_PEER, "10.0.0.2"))
    core.back_to_source_started("self")  # it gave up on its parent and went to the origin itself
    core.back_to_source_piece_finished("self", 0, 0, PIECE, "xxh3:" + "01" * 16)  # agrees: counts
    core.back_to_source_piece_finished("self", 1, PIECE, PIECE, "xxh3:" + "66" * 16)  # nobody defined it
    assert list(core.peers["self"].finished) == [0]
    assert [p.number for p in core.stat_task(TASK).pieces] == [0]


def test_untrusted_seed_gets_no_trigger() -> None:
    core = new_core()
    with pytest.raises(PermissionDenied):
        core.announce_host(host_info("evil", "10.0.0.66", seed=True), tls(SHARED_PEER, "10.0.0.66"))
    core.announce_host(host_info("n1"), tls(SHARED_PEER))
    decisions = core.register_peer("h-n1", TASK, "p1", DownloadSpec(url="https://r/b", request_header={
        "Authorization": "Basic YWxpY2U6czNjcmV0"}), tls(SHARED_PEER))
    assert not any(isinstance(d, TriggerSeed) for d in decisions)
    assert core.available_seeds() == []


# --------------------------------------------------------------------------------------------
# Geometry


@pytest.mark.parametrize(
    ("piece_length", "number", "offset", "length", "ok"),
    [
        (0, 0, 0, PIECE, True),
        (0, 3, 3 * PIECE, PIECE, True),
        (0, 3, 3 * PIECE + 1, PIECE, False),  # not on a whole piece length
        (PIECE, 2, 2 * PIECE, 100, True),  # a short last piece
        (PIECE, 2, 2 * PIECE + 1, 100, False),
        (PIECE, 2, 2 * PIECE, PIECE + 1, False),
        (0, MAX_PIECE_COUNT, 0, 1, False),  # a bitmap of 2^40 pieces is never allocated
        (0, -1, 0, 1, False),
        (0, 0, 0, 0, False),
        (0, 0, 0, MAX_PIECE_LENGTH + 1, False),
        (0, 0, -5, 10, False),
    ],
)
def test_geometry(piece_length: int, number: int, offset: int, length: int, ok: bool) -> None:
    assert (geometry_problem(piece_length, number, offset, length) == "") is ok


def defined_task(core: SchedulerCore) -> None:
    core.announce_host(host_info("n1"), tls(SHARED_PEER))
    core.register_peer("h-n1", TASK, "src", DownloadSpec(url="https://r/b"), tls(SHARED_PEER))
    for n in range(2):
        core.back_to_source_piece_finished("src", n, n * PIECE, PIECE, f"xxh3:{n:032x}")


@pytest.mark.parametrize(
    ("piece_length", "refused"),
    [(0, False), (PIECE, False), (1, True), (2 * PIECE, True), (MAX_PIECE_LENGTH * 2, True)],
)
def test_registration_with_a_piece_length_the_task_does_not_have(piece_length: int, refused: bool) -> None:
    core = new_core()
    defined_task(core)
    core.announce_host(host_info("n2", "10.0.0.2"), tls(SHARED_PEER, "10.0.0.2"))
    decisions = core.register_peer("h-n2", TASK, "p2", DownloadSpec(url="https://r/b", piece_length=piece_length),
                                   tls(SHARED_PEER, "10.0.0.2"))
    assert fails(decisions, Code.INVALID_ARGUMENT) is refused


@pytest.mark.parametrize(
    ("number", "offset", "length"),
    [(0, 0, PIECE // 2), (1, 0, PIECE), (MAX_PIECE_COUNT * 1000, 0, PIECE), (2, 2 * PIECE, 2 * PIECE)],
)
def test_piece_reports_that_break_the_geometry_end_the_download(number: int, offset: int, length: int) -> None:
    core = new_core()
    defined_task(core)
    core.announce_host(host_info("n2", "10.0.0.2"), tls(SHARED_PEER, "10.0.0.2"))
    (decision,) = core.register_peer("h-n2", TASK, "p2", DownloadSpec(url="https://r/b"), tls(SHARED_PEER, "10.0.0.2"))
    assert isinstance(decision, SendNormal)
    assert fails(core.piece_finished("p2", number, offset, length, "src"), Code.INVALID_ARGUMENT)
    assert core.peers["p2"].state.value == "Failed"
    assert core.peers["p2"].finished.count == 0


# --------------------------------------------------------------------------------------------
# Demotion


@pytest.mark.parametrize(
    ("attacker", "demoted"),
    [
        (tls(SHARED_PEER, "10.0.0.66"), False),  # a shared certificate from one IP: one identity
        (tls(Identity(Role.PEER, "evil0")), False),  # a per-host certificate names one host only
        (plain("10.0.0.66"), True),  # plaintext proves nothing: each announced host counts (documented)
    ],
)
def test_one_identity_cannot_demote_a_parent_however_many_hosts_it_announces(attacker: Caller, demoted: bool) -> None:
    core = new_core()
    defined_task(core)
    for i in range(5):
        try:
            core.announce_host(host_info(f"evil{i}", "10.0.0.66"), attacker)
        except PermissionDenied:  # a per-host certificate announces its own host only
            continue
        core.register_peer(f"h-evil{i}", TASK, f"e{i}", DownloadSpec(url="https://r/b"), attacker)
        core.piece_failed(f"e{i}", 0, "src")
    assert core.peers["src"].demoted is demoted
    if not demoted:
        core.announce_host(host_info("n3", "10.0.0.3"), tls(SHARED_PEER, "10.0.0.3"))
        (decision,) = core.register_peer("h-n3", TASK, "p3", DownloadSpec(url="https://r/b"),
                                         tls(SHARED_PEER, "10.0.0.3"))
        assert isinstance(decision, SendNormal) and [c.peer_id for c in decision.candidates] == ["src"]


# --------------------------------------------------------------------------------------------
# Bounded state


def test_twenty_thousand_registrations_of_one_host_stay_bounded() -> None:
    clock = ManualClock()
    core = new_core(clock, max_peers_per_host=100)
    caller = tls(SHARED_PEER)
    core.announce_host(host_info("n1"), caller)
    refused = 0
    for i in range(20_000):
        decisions = core.register_peer("h-n1", f"task-{i}", f"p{i}", DownloadSpec(url=f"https://r/{i}"), caller)
        refused += fails(decisions, Code.RESOURCE_EXHAUSTED)
        core.stream_closed(f"p{i}")  # the client walks away: the peer failed
    assert core.peer_count <= 100 and len(core.hosts["h-n1"].peers) <= 100
    assert core.task_count <= 100  # the tasks of forgotten peers go with them
    assert refused == 0  # finished or failed peers make room; only active ones count against the host
    clock.advance(FAILED_PEER_TTL + 1)
    core.gc()
    assert core.peer_count == 0
    clock.advance(ABANDONED_TASK_TTL + 1)
    core.gc()
    assert core.task_count == 0


def test_active_peers_past_the_host_limit_are_refused() -> None:
    core = new_core(max_peers_per_host=3)
    caller = tls(SHARED_PEER)
    core.announce_host(host_info("n1"), caller)
    results = [core.register_peer("h-n1", f"task-{i}", f"p{i}", DownloadSpec(url="https://r/b"), caller)
               for i in range(4)]
    assert [fails(r, Code.RESOURCE_EXHAUSTED) for r in results] == [False, False, False, True]


def test_hosts_and_streams_per_client_are_capped() -> None:
    core = new_core(max_hosts_per_client=2, max_streams_per_client=2)
    caller = tls(SHARED_PEER)
    core.announce_host(host_info("n1"), caller)
    core.announce_host(host_info("n2"), caller)
    with pytest.raises(QuotaExceeded):
        core.announce_host(host_info("n3"), caller)
    core.announce_host(host_info("n4", "10.0.0.4"), tls(SHARED_PEER, "10.0.0.4"))  # another client is not affected
    core.open_stream(caller)
    core.open_stream(caller)
    with pytest.raises(QuotaExceeded):
        core.open_stream(caller)
    core.close_stream(caller)
    core.open_stream(caller)
