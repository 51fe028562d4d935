"""The proxy listener's connection caps (peer.proxy.guard.ConnectionLimits): pure bookkeeping."""

from __future__ import annotations

from peer.proxy.guard import ConnectionLimits


def test_per_client_cap_leaves_room_for_other_clients() -> None:
    limits = ConnectionLimits(max_total=5, max_per_client=2)
    assert [limits.admit("10.0.0.9") for _ in range(3)] == [None, None, "max 2 connections per client"]
    assert limits.admit("10.0.0.1") is None
    assert limits.total == 3 and limits.refused == 1


def test_total_cap_and_release() -> None:
    limits = ConnectionLimits(max_total=2, max_per_client=2)
    assert limits.admit("a") is None and limits.admit("b") is None
    assert limits.admit("c") == "max 2 connections"
    limits.release("a")
    assert limits.admit("c") is None
    limits.release("b")
    limits.release("c")
    assert limits.total == 0 and limits.per_client == {}  # no entry left per client that went away
