"""A small progress bar on stderr (no dependency): redrawn in place on a
terminal, a few plain lines otherwise so logs stay readable."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, *, enabled: bool = True, stream=None):
        self.total = max(int(total), 1)
        self.desc = desc
        self.n = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self._last_pct = -1

    def update(self, n: int = 1, note: str = "") -> None:
        self.n = min(self.n + n, self.total)
        if not self.enabled:
            return
        pct = 100 * self.n // self.total
        if self.tty:
            width = 30
            fill = width * self.n // self.total
            bar = "#" * fill + "-" * (width - fill)
            self.stream.write(f"\r{self.desc} [{bar}] {self.n}/{self.total} {note:<24.24}")
            self.stream.flush()
        elif pct // 25 != self._last_pct // 25 or self.n == self.total:
            self.stream.write(f"{self.desc}: {pct}% ({self.n}/{self.total}) {note}\n")
        self._last_pct = pct

    def close(self, note: str = "") -> None:
        if self.enabled:
            secs = time.perf_counter() - self.start
            end = f" done in {secs:.1f}s {note}".rstrip()
            self.stream.write(("\r" if self.tty else "") + f"{self.desc}:{end}" + (" " * 30 if self.tty else "") + "\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        elif self.enabled and self.tty:
            self.stream.write("\n")
