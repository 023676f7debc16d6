"""Blocking chain calls from trio: in a thread, a few at a time.

web3.py over HTTP blocks. Every async caller of a ``DepositClient`` goes
through its ``io``, so the node never waits on the chain on the event loop, and
a slow chain ties up at most ``limit`` threads however many jobs wait on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")

DEFAULT_LIMIT = 4


class ChainIO:
    """Run blocking chain calls in threads, at most ``limit`` at once."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limiter = trio.CapacityLimiter(limit)

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
