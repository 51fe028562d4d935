"""Who may trigger a download on a dfdaemon (peer.access) and what other hosts see of a URL."""

from __future__ import annotations

import pytest

from common.identity import Identity, Role
from peer.access import TriggerPolicy, caller_ip, public_url, trigger_refusal

SCHEDULERS = frozenset({"10.0.0.5", "::1"})
SEED_PLAIN = TriggerPolicy(seed=True, mutual_tls=False, scheduler_ips=SCHEDULERS)
SEED_MTLS = TriggerPolicy(seed=True, mutual_tls=True, scheduler_ips=SCHEDULERS)
NODE_MTLS = TriggerPolicy(seed=False, mutual_tls=True, scheduler_ips=SCHEDULERS)


@pytest.mark.parametrize(
    ("policy", "identity", "ip", "allowed"),
    [
        (SEED_PLAIN, None, "10.0.0.5", True),
        (SEED_PLAIN, None, "::ffff:10.0.0.5", True),  # IPv4-mapped on a dual-stack socket
        (SEED_PLAIN, None, "::1", True),
        (SEED_PLAIN, None, "10.0.0.6", False),
        (SEED_PLAIN, None, None, False),
        (SEED_MTLS, Identity(Role.SCHEDULER), "10.9.9.9", True),  # the identity counts, not the address
        (SEED_MTLS, Identity(Role.SCHEDULER, "sched-0"), "10.9.9.9", True),
        (SEED_MTLS, Identity(Role.SEED), "10.0.0.5", False),
        (SEED_MTLS, Identity(Role.ADMIN), "10.0.0.5", False),
        (SEED_MTLS, Identity(Role.PEER), "10.0.0.5", False),
        (SEED_MTLS, None, "10.0.0.5", False),
        (NODE_MTLS, Identity(Role.SCHEDULER), "10.0.0.5", False),  # a normal node is never a fetcher
        (TriggerPolicy(seed=False, mutual_tls=False, scheduler_ips=SCHEDULERS), None, "10.0.0.5", False),
    ],
)
def test_trigger_rules(policy: TriggerPolicy, identity: Identity | None, ip: str | None, allowed: bool) -> None:
    refusal = trigger_refusal(policy, identity, ip)
    assert (refusal is None) == allowed, refusal


@pytest.mark.parametrize(
    ("peer", "ip"),
    [("ipv4:10.0.0.5:4312", "10.0.0.5"), ("ipv6:[::1]:4312", "::1"), ("unix:/run/x.sock", None), ("", None)],
)
def test_caller_ip(peer: str, ip: str | None) -> None:
    assert caller_ip(peer) == ip


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://bucket.s3.example/blob?X-Amz-Signature=abc&X-Amz-Credential=k", "https://bucket.s3.example/blob"),
        ("http://alice:s3cret@origin:8080/file#frag", "http://origin:8080/file"),
        ("http://[::1]:5000/v2/a/blobs/sha256:ab", "http://[::1]:5000/v2/a/blobs/sha256:ab"),
        ("http://origin:notaport/x", ""),
    ],
)
def test_public_url(url: str, shown: str) -> None:
    assert public_url(url) == shown
