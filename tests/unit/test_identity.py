"""Certificate identities: which CN proves which role, for which host."""

from __future__ import annotations

import pytest

from common.identity import MEMBER, Identity, Role, common_name, identity_from_common_name, ssl_identity


@pytest.mark.parametrize(
    ("cn", "expected"),
    [
        ("scheduler.damselfly", Identity(Role.SCHEDULER)),
        ("seed.damselfly", Identity(Role.SEED)),
        ("node-7.seed.damselfly", Identity(Role.SEED, "node-7")),
        ("Node-7.PEER.Damselfly", Identity(Role.PEER, "node-7")),
        ("admin.damselfly", Identity(Role.ADMIN)),
        # Anything else proves membership only: never a role by accident.
        ("root.damselfly", MEMBER),
        ("a.b.seed.damselfly", MEMBER),
        ("seed.damselfly.evil.example", MEMBER),
        (".seed.damselfly", MEMBER),
        ("node", MEMBER),
        ("", MEMBER),
    ],
)
def test_identity_from_common_name(cn: str, expected: Identity) -> None:
    assert identity_from_common_name(cn) == expected


def test_common_name_round_trips_and_refuses_dotted_hosts() -> None:
    for role in Role:
        assert identity_from_common_name(common_name(role)) == Identity(role)
        assert identity_from_common_name(common_name(role, "n1")) == Identity(role, "n1")
    with pytest.raises(ValueError, match="single DNS label"):
        common_name(Role.SEED, "n1.example")


def test_a_shared_certificate_speaks_for_any_host_a_bound_one_for_its_own() -> None:
    assert Identity(Role.PEER).may_speak_for("anything")
    assert Identity(Role.PEER, "n1").may_speak_for("n1")
    assert not Identity(Role.PEER, "n1").may_speak_for("n2")


def test_ssl_identity_reads_the_subject_common_name() -> None:
    cert = {"subject": ((("organizationName", "x"),), (("commonName", "n3.seed.damselfly"),))}
    assert ssl_identity(cert) == Identity(Role.SEED, "n3")
    assert ssl_identity({"subject": ((("organizationName", "x"),),)}) == MEMBER
    assert ssl_identity(None) is None
    assert ssl_identity({}) is None
