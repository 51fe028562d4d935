"""The proxy's upstream allow-list (common.upstreams): which destinations, addresses and redirects pass."""

from __future__ import annotations

import pytest

from common.errors import UpstreamNotAllowed
from common.upstreams import UpstreamEntry, UpstreamPolicy, is_public_address, public_addresses

POLICY = UpstreamPolicy(["http://127.0.0.1:5000", "registry.example.com", "*.corp.example", "mirror.test:8443",
                         "docker.io"])
ANY_PUBLIC = UpstreamPolicy(["*", "registry.local"])


@pytest.mark.parametrize(("scheme", "host", "port", "allowed"), [
    ("http", "127.0.0.1", 5000, True),  # the registry mirror, as configured
    (None, "127.0.0.1", 5000, True),  # CONNECT / ns= name no scheme
    ("https", "127.0.0.1", 5000, False),  # another scheme than the one listed
    ("http", "127.0.0.1", 8002, False),  # the scheduler's port on the same host
    ("https", "registry.example.com", 443, True),
    ("http", "registry.example.com", 8080, True),  # a bare host: any port
    ("https", "REGISTRY.example.com", 443, True),
    ("https", "a.b.corp.example", 443, True),
    ("https", "corp.example", 443, False),  # *.domain is below the domain, not the domain
    ("https", "evilcorp.example", 443, False),
    ("https", "mirror.test", 8443, True),
    ("https", "mirror.test", 443, False),
    ("https", "registry-1.docker.io", 443, True),  # docker.io stands for its API host
    ("https", "169.254.169.254", 80, False),
    ("http", "10.0.0.1", 80, False),
])
def test_destinations(scheme: str | None, host: str, port: int, allowed: bool) -> None:
    if allowed:
        POLICY.check_destination(scheme, host, port)
    else:
        with pytest.raises(UpstreamNotAllowed, match="proxy_allowed_upstreams"):
            POLICY.check_destination(scheme, host, port)


@pytest.mark.parametrize(("host", "allowed"), [
    ("203.0.113.7", False),  # documentation range: not global
    ("8.8.8.8", True),
    ("127.0.0.1", False), ("::1", False), ("169.254.169.254", False), ("10.1.2.3", False),
    ("192.168.1.1", False), ("fd00::1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("::ffff:127.0.0.1", False),
    ("registry.local", True),  # named: its private addresses are the operator's choice
    ("anything.example", True),  # a name: resolution decides (public_addresses)
])
def test_star_reaches_public_addresses_only(host: str, allowed: bool) -> None:
    if allowed:
        ANY_PUBLIC.check_destination("https", host, 443)
    else:
        with pytest.raises(UpstreamNotAllowed):
            ANY_PUBLIC.check_destination("https", host, 443)


def test_a_name_that_resolves_to_loopback_is_refused_unless_named() -> None:
    with pytest.raises(UpstreamNotAllowed, match="resolves only to loopback"):
        public_addresses(ANY_PUBLIC, "rebind.example", 443, ["127.0.0.1", "10.0.0.8"])
    assert public_addresses(ANY_PUBLIC, "mixed.example", 443, ["127.0.0.1", "8.8.8.8"]) == ["8.8.8.8"]
    assert public_addresses(ANY_PUBLIC, "registry.local", 443, ["10.0.0.8"]) == ["10.0.0.8"]


@pytest.mark.parametrize(("target", "public_redirects", "allowed"), [
    ("http://127.0.0.1:5000/v2/other", True, True),  # same origin
    ("https://production.cdn.example/blob?sig=1", True, True),  # a CDN: public, chosen by the registry
    ("https://production.cdn.example/blob?sig=1", False, False),  # only allowed upstreams
    ("https://registry.example.com/blob", False, True),
    ("http://127.0.0.1:8002/", True, False),  # the scheduler: loopback, not listed
    ("http://169.254.169.254/latest/meta-data/", True, False),
    ("http://[::1]:4005/", True, False),
    ("ftp://example.com/x", True, False),
])
def test_redirects(target: str, public_redirects: bool, allowed: bool) -> None:
    policy = UpstreamPolicy([e for e in ("http://127.0.0.1:5000", "registry.example.com")],
                            public_redirects=public_redirects)
    if allowed:
        policy.check_redirect("http://127.0.0.1:5000/v2/x/blobs/sha256:0", target)
    else:
        with pytest.raises(UpstreamNotAllowed):
            policy.check_redirect("http://127.0.0.1:5000/v2/x/blobs/sha256:0", target)


@pytest.mark.parametrize("text", ["", "*.", "a*.example", "http://", "ftp://host", "host:0", "host:99999",
                                  "http://host/v2/path", "[::1"])
def test_bad_entries_say_what_is_wrong(text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        UpstreamEntry.parse(text)


def test_public_address_classes() -> None:
    assert is_public_address("1.1.1.1")
    assert not is_public_address("127.0.0.2")
    assert not is_public_address("fe80::1%eth0")
