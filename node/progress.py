"""Progress reporting for long work (hashing, copying, downloading models).

Library code takes a ``Progress`` and calls ``start(total)``, ``advance(n)``
and ``finish()``; it never prints. ``TerminalProgress`` draws a one-line bar on
a terminal (stderr) and stays silent when stderr is not a terminal, so logs and
pipes get no control characters. ``NO_PROGRESS`` does nothing.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Does nothing; the interface every progress reporter has."""

    def start(self, total: int | None, label: str = "") -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


NO_PROGRESS = Progress()


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


class TerminalProgress(Progress):
    """A bar like ``fetching Qm…  [#######.......]  42%  41.2 MB/98.4 MB  55.0 MB/s``."""

    def __init__(self, stream: TextIO | None = None, width: int = 30, interval_s: float = 0.1) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.width = width
        self.interval_s = interval_s
        self.total: int | None = None
        self.done = 0
        self.label = ""
        self._started = self._drawn = 0.0

    def start(self, total: int | None, label: str = "") -> None:
        self.total, self.label, self.done = total, label, 0
        self._started = time.monotonic()
        self._draw(force=True)

    def advance(self, n: int) -> None:
        self.done += n
        self._draw()

    def finish(self) -> None:
        self._draw(force=True)
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._drawn < self.interval_s):
            return
        self._drawn = now
        rate = self.done / max(now - self._started, 1e-6)
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            bar = "#" * int(fraction * self.width)
            line = f"{self.label}  [{bar:<{self.width}}] {fraction:4.0%}  {_size(self.done)}/{_size(self.total)}"
        else:
            line = f"{self.label}  {_size(self.done)}"
        self.stream.write(f"\r{line}  {_size(rate)}/s\x1b[K")
        self.stream.flush()
