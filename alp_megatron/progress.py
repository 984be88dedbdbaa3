"""Progress of long byte-bound work (loading or writing checkpoints), as plain lines for logs.

Lines, not a bar: converters and trainers run under ``torchrun`` and Slurm, whose logs are files where a
redrawn bar becomes one unreadable line. A line is written at most every ``every_s`` seconds and once at
the end, through whatever ``write`` the caller gives (``print`` in a CLI, a logger in the trainer).
"""

from __future__ import annotations

import time
from typing import Callable, Optional


def size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


class ByteProgress:
    """A ``progress(done_bytes, total_bytes)`` callback that writes a line at most every ``every_s`` seconds;
    :meth:`done` writes the closing line, with the rate.

    ``write``: None writes nothing (e.g. on ranks other than 0). ``clock``: seconds, for tests.
    """

    def __init__(self, what: str, write: Optional[Callable[[str], None]], every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.what, self.write, self.every_s, self.clock = what, write, every_s, clock
        self.done_bytes = self.total_bytes = 0
        self.started = self._last_line = clock()

    def __call__(self, done_bytes: int, total_bytes: int) -> None:
        self.done_bytes, self.total_bytes = done_bytes, total_bytes
        now = self.clock()
        unfinished = total_bytes <= 0 or done_bytes < total_bytes  # the closing line says 100 %
        if self.write is not None and now - self._last_line >= self.every_s and unfinished:
            self._last_line = now
            self.write(f"{self.what}: {self._amount()}, {now - self.started:.0f} s")

    def done(self) -> float:
        """Writes the closing line; returns the seconds taken."""
        seconds = self.clock() - self.started
        if self.write is not None:
            rate = f", {size(self.done_bytes / seconds)}/s" if seconds > 0 and self.done_bytes else ""
            self.write(f"{self.what}: {self._amount()} in {seconds:.1f} s{rate}")
        return seconds

    def _amount(self) -> str:
        if self.total_bytes <= 0:
            return size(self.done_bytes)
        return f"{size(self.done_bytes)} of {size(self.total_bytes)} ({100 * self.done_bytes / self.total_bytes:.0f} %)"
