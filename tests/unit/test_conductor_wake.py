"""The download loop's single wake-up timer (peer.download.engine.Conductor._wake_in) under uvloop,
whose timers fire up to a millisecond before the loop's clock reaches their time."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import uvloop

from peer.download.engine import Conductor


def test_every_wake_request_after_one_fired_gets_a_timer() -> None:
    """A timer that fired "early" must not be taken for one still pending: the download that
    waited on it for a parent's backoff to end, with no other event coming, hung for good."""

    async def scenario() -> int:
        events: asyncio.Queue[object] = asyncio.Queue()
        state: Any = SimpleNamespace(_wake_timer=None, _wake_at=0.0, _events=events)
        state._wake = lambda: Conductor._wake(state)
        woken = 0
        for step in range(40):
            Conductor._wake_in(state, 0.002 + 0.0013 * (step % 5))
            await asyncio.wait_for(events.get(), 1.0)  # times out when no timer was armed
            woken += 1
        return woken

    assert uvloop.run(scenario()) == 40
