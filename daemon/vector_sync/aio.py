"""Small asyncio helpers shared by the long-running loops."""

from __future__ import annotations

import asyncio
import random


def backoff(attempt: int, first: float = 0.5, cap: float = 30.0) -> float:
    """Capped exponential back-off with jitter, so many daemons do not retry in step."""
    return min(cap, first * 2.0**attempt) * random.uniform(0.5, 1.0)


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds` unless `stop` is set first; True when stopping."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))
    except TimeoutError:
        return False
    return True


async def wait_first(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Return when any of `events` is set, or after `timeout`."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
