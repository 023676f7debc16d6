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
