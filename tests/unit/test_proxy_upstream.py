"""The proxy's pure decisions about upstreams and error logging: scheme probing, the error-answer log."""

from __future__ import annotations

import asyncio

import pytest

from common.clock import ManualClock
from peer.proxy.server import ErrorAnswerLog
from peer.proxy.upstream import SCHEME_TTL, UNDECIDED_TTL, Probe, SchemeCache, choose_scheme

A, N, U = Probe.ANSWERED, Probe.NOT_TLS, Probe.UNREACHABLE


@pytest.mark.parametrize(("over_tls", "plain", "expected"), [
    (A, None, "https"),  # a TLS registry
    (U, None, "https"),  # unreachable, or a certificate not trusted: never downgraded
    (N, None, None),  # not TLS: ask plain HTTP
    (N, A, "http"),  # a plain-HTTP registry
    (N, U, "https"),  # neither: the real request reports why
    (N, N, "https"),
])
def test_choose_scheme(over_tls: Probe, plain: Probe | None, expected: str | None) -> None:
    assert choose_scheme(over_tls, plain) == expected


def _cache(answers: dict[str, Probe], clock: ManualClock) -> tuple[SchemeCache, list[str]]:
    asked: list[str] = []

    async def probe(url: str) -> Probe:
        asked.append(url)
        return answers[url]

    return SchemeCache(probe, clock), asked


def test_plain_http_registry_is_probed_once_and_remembered_for_the_ttl() -> None:
    clock = ManualClock()
    cache, asked = _cache({"https://reg:5000/v2/": N, "http://reg:5000/v2/": A}, clock)

    async def run() -> list[str]:
        return list(await asyncio.gather(*(cache.scheme("reg:5000") for _ in range(5))))

    assert asyncio.run(run()) == ["http"] * 5
    assert asked == ["https://reg:5000/v2/", "http://reg:5000/v2/"], "concurrent requests share one probe"
    clock.advance(SCHEME_TTL - 1)
    assert asyncio.run(cache.scheme("reg:5000")) == "http"
    assert len(asked) == 2
    clock.advance(2)
    asyncio.run(cache.scheme("reg:5000"))
    assert len(asked) == 4, "probed again after the TTL"


def test_tls_registry_is_not_probed_over_plain_http() -> None:
    cache, asked = _cache({"https://secure/v2/": A}, ManualClock())
    assert asyncio.run(cache.scheme("secure")) == "https"
    assert asked == ["https://secure/v2/"]


def test_unreachable_registry_is_probed_again_soon() -> None:
    clock = ManualClock()
    cache, asked = _cache({"https://down:5000/v2/": U}, clock)
    assert asyncio.run(cache.scheme("down:5000")) == "https"
    assert asyncio.run(cache.scheme("down:5000")) == "https"
    assert len(asked) == 1, "not probed on every request"
    clock.advance(UNDECIDED_TTL + 1)
    asyncio.run(cache.scheme("down:5000"))
    assert len(asked) == 2


def test_error_answer_log_lets_bursts_through_and_counts_what_it_held_back() -> None:
    log = ErrorAnswerLog(now=0.0, rate=1.0, burst=3)
    assert [log.admit(0.0) for _ in range(5)] == [0, 0, 0, None, None]
    assert log.admit(1.0) == 2, "the next line says how many were not logged"
    assert log.admit(1.0) is None
    assert log.admit(5.0) == 1
