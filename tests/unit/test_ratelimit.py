"""The one token bucket (common/ratelimit.py): the piece server's reservations, the proxy's admission."""

from __future__ import annotations

import pytest

from common.ratelimit import TokenBucket


@pytest.mark.parametrize(
    ("rate", "burst", "steps", "delays"),
    [
        # (time, amount) reservations -> seconds to wait before sending
        (100.0, 50, [(0.0, 50), (0.0, 10)], [0.0, 0.1]),  # the burst, then the rate
        (100.0, 50, [(0.0, 30), (0.0, 30), (0.0, 30)], [0.0, 0.1, 0.4]),  # overdraft queues in order
        (100.0, 50, [(0.0, 50), (10.0, 50)], [0.0, 0.0]),  # idle time refills up to the burst only
        (100.0, 50, [(10.0, 50), (10.0, 60)], [0.0, 0.6]),
        (100.0, 50, [(0.0, 200)], [1.5]),  # bigger than the burst: allowed, paid for by waiting
        (100.0, 50, [(0.0, 100), (0.5, 10)], [0.5, 0.1]),  # debt is repaid before anything else
        (100.0, 50, [(1.0, 10), (0.5, 10)], [0.0, 0.0]),  # a clock going back refills nothing
    ],
)
def test_reserve(rate: float, burst: int, steps: list[tuple[float, int]], delays: list[float]) -> None:
    bucket = TokenBucket(rate, burst, now=0.0)
    assert [bucket.reserve(amount, now) for now, amount in steps] == pytest.approx(delays)


@pytest.mark.parametrize(
    ("rate", "burst", "steps", "waits"),
    [
        # (time, amount) takes -> 0.0 taken, else seconds until it would be (nothing taken)
        (2.0, 2.0, [(0.0, 1), (0.0, 1), (0.0, 1)], [0.0, 0.0, 0.5]),  # the burst, then refused
        (2.0, 2.0, [(0.0, 2), (0.0, 1), (0.0, 1)], [0.0, 0.5, 0.5]),  # a refusal takes nothing
        (2.0, 2.0, [(0.0, 2), (0.5, 1), (0.6, 1)], [0.0, 0.0, 0.4]),  # refilled at the rate
        (0.25, 1.0, [(0.0, 1), (1.0, 1), (4.0, 1)], [0.0, 3.0, 0.0]),
        (2.0, 2.0, [(0.0, 2), (60.0, 3)], [0.0, 0.5]),  # never more than the burst saved
        (2.0, 2.0, [(1.0, 2), (0.5, 1)], [0.0, 0.5]),  # a clock going back refills nothing
    ],
)
def test_take(rate: float, burst: float, steps: list[tuple[float, int]], waits: list[float]) -> None:
    bucket = TokenBucket(rate, burst, now=0.0)
    assert [bucket.take(amount, now) for now, amount in steps] == pytest.approx(waits)


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 10), (-1.0, 10), (1.0, 0), (1.0, 0.5)])
def test_bad_settings(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, now=0.0)
