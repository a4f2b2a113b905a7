"""Progress on stderr: a tqdm bar in a terminal, a line every ~10 s (and a closing line) in a log.

Every bar of a run, n2g's and the libraries' (transformers and huggingface_hub draw theirs with
tqdm too), has the same look; :func:`silence_library_bars` turns the libraries' off for ``-q``.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm


def silence_library_bars() -> None:
    """No progress bars from huggingface_hub and transformers (before or after they are imported)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub / transformers load
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers.utils.logging" in sys.modules:
        sys.modules["transformers.utils.logging"].disable_progress_bar()


class Progress:
    """``Progress(total, "scan", unit="tok")``; call ``update(n)``, then ``close()`` (returns seconds)."""

    def __init__(self, total: int, label: str, unit: str = "it", enabled: bool = True):
        self.total, self.label, self.unit, self.enabled = max(int(total), 1), label, unit, enabled
        self.done = 0
        self.start = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.bar = None
        if enabled and self.tty:
            self.bar = tqdm(total=self.total, desc=label, unit=unit, unit_scale=unit == "tok", file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.2, leave=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and (now - self.last > 10.0 or self.done >= self.total):
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta_text = f"{eta:5.0f}s" if eta != float("inf") else "   ?s"
            sys.stderr.write(f"{self.label}: {self.done}/{self.total} {self.unit} | {rate:,.1f} {self.unit}/s | ETA {eta_text}\n")
            sys.stderr.flush()

    def close(self) -> float:
        elapsed = time.monotonic() - self.start
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            unit = self.unit[:-1] if self.done == 1 and self.unit.endswith("s") else self.unit  # "1 neuron"
            sys.stderr.write(f"{self.label}: done, {self.done} {unit} in {elapsed:.1f}s\n")
        return elapsed
