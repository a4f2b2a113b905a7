"""A small progress line on stderr with rate and ETA (quiet when stderr is not a terminal, except every ~10 s)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``Progress(total, "scan", unit="tok")``; call ``update(n)``, then ``close()``."""

    def __init__(self, total: int, label: str, unit: str = "it", enabled: bool = True):
        self.total, self.label, self.unit, self.enabled = max(int(total), 1), label, unit, enabled
        self.done = 0
        self.start = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last > (0.2 if self.tty else 10.0) or self.done >= self.total):
            self.last = now
            self._print(now, end="\r" if self.tty else "\n")

    def _print(self, now: float, end: str) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:5.0f}s" if eta != float("inf") else "   ?s"
        sys.stderr.write(f"{self.label}: {self.done}/{self.total} {self.unit} | {rate:,.1f} {self.unit}/s | ETA {eta_text}   {end}")
        sys.stderr.flush()

    def close(self) -> float:
        elapsed = time.monotonic() - self.start
        if self.enabled:
            if self.tty:
                self._print(time.monotonic(), end="\n")
            else:
                sys.stderr.write(f"{self.label}: done, {self.done} {self.unit} in {elapsed:.1f}s\n")
        return elapsed
