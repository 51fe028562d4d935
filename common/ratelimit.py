"""The one rate limiter: a token bucket. Pure: no I/O and no clock (the caller passes the time
and does any waiting).

It is used two ways:

- :meth:`TokenBucket.reserve` takes what it is asked for, overdrawing the bucket if need be, and
  answers how long to wait before going ahead: callers asking at the same time are served in
  the order they asked (the piece server's upload budget, in bytes).
- :meth:`TokenBucket.take` takes only what is there and otherwise takes nothing and answers how
  long until it would be: a request can be refused at once (the proxy's P2P admission, in
  requests).
"""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; full at the start."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self.rate = float(rate)
        self.burst = burst
        self._tokens = float(burst)
        self._updated = now

    def _refill(self, now: float) -> None:
        if now > self._updated:  # a clock going back refills nothing
            self._tokens = min(float(self.burst), self._tokens + (now - self._updated) * self.rate)
            self._updated = now

    def reserve(self, amount: float, now: float) -> float:
        """Take `amount` tokens, overdrawing if need be; seconds to wait before using them."""
        self._refill(now)
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def take(self, amount: float, now: float) -> float:
        """Take `amount` tokens if they are there (0.0); else take none: seconds until they would be."""
        self._refill(now)
        if self._tokens < amount:
            return (amount - self._tokens) / self.rate
        self._tokens -= amount
        return 0.0
