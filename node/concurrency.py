"""Small trio helpers shared by the node's services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


@asynccontextmanager
async def open_service_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery that re-raises a lone exception as itself.

    trio wraps whatever escapes a nursery in an ``ExceptionGroup``. Where a
    nursery only runs helpers for the body (a generation thread, a reader), the
    caller should see the one ``NodeError`` (or ``Cancelled``) that happened,
    not a group; real multi-failures still come out as a group.
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


class TokenBucket:
    """A rate limit: ``rate`` events a second on average, bursts of up to ``burst``.

    Time is passed in (``now``, any monotonic or wall clock in seconds), so the
    bucket is pure and works in tests with a fake clock.
    """

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp: float | None = None

    def take(self, now: float, n: float = 1.0) -> bool:
        """Spend ``n`` tokens if there are that many; returns whether they were spent."""
        if self.stamp is not None and now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now if self.stamp is None else max(self.stamp, now)
        if self.tokens < n:
            return False
        self.tokens -= n
        return True
