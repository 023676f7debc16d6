"""Ctrl-C for commands that run until stopped (``serve``, ``gateway``).

By default trio raises ``KeyboardInterrupt`` wherever the main task happens to be when
SIGINT arrives, which can be in the middle of a library's cleanup. Here SIGINT is
received as an event instead: the command's tasks are cancelled and clean up as on any
cancellation (jobs cancelled, engines stopped, connections closed), and then
``KeyboardInterrupt`` is raised, which the CLI prints as its one line with exit 130. A
second Ctrl-C while that cleanup runs ends the process at once.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Awaitable, Callable

import trio


def run_until_interrupted(main: Callable[[], Awaitable[object]]) -> None:
    """``trio.run(main)``; on Ctrl-C, cancel it, wait for its cleanup, then raise ``KeyboardInterrupt``."""

    async def supervised() -> bool:
        interrupted = False
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def on_interrupt() -> None:
                    nonlocal interrupted
                    async for _ in signals:
                        if interrupted:  # the second Ctrl-C: do not wait for the cleanup
                            print("\nllmarket: interrupted", file=sys.stderr, flush=True)
                            os._exit(130)
                        interrupted = True
                        main_scope.cancel()

                async def run_main() -> None:
                    with main_scope:
                        await main()
                    nursery.cancel_scope.cancel()  # main ended: stop listening for Ctrl-C

                main_scope = trio.CancelScope()
                nursery.start_soon(on_interrupt)
                nursery.start_soon(run_main)
        return interrupted

    if trio.run(supervised):
        raise KeyboardInterrupt
