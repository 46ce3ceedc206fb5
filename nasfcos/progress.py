"""Progress of long loops: a tqdm bar on a terminal; elsewhere (Prefect workers, CI, log
files) a plain log line at most every ``every_s`` seconds, so a job of hours always says
how far it is and when it should end, without filling a log file with bar redraws."""

from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import ExitStack

log = logging.getLogger("nasfcos.progress")


def on_terminal() -> bool:
    """Whether stderr is an interactive terminal (where a bar redraws in place)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """``with Progress(total, "train", unit="it") as p: ... p.update(1, loss=0.3)``.

    ``log_lines=False`` keeps a non-terminal run silent (for loops that write their own
    periodic lines, as training does); the bar still shows on a terminal, with the
    loop's log records printed above it instead of through it."""

    def __init__(self, total: int, desc: str, *, unit: str = "it", initial: int = 0, every_s: float = 30.0,
                 log_lines: bool = True, logger: logging.Logger = log, terminal: bool | None = None) -> None:  # fmt: skip
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done = self._start = initial
        self.log_lines, self.logger = log_lines, logger
        self.terminal = on_terminal() if terminal is None else terminal
        self._t0 = self._last = time.perf_counter()
        self._stack = ExitStack()
        self.bar = None
        if self.terminal:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)
            self._stack.enter_context(logging_redirect_tqdm())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def rate(self) -> float:
        """Units per second since this object started (resumed work excluded)."""
        return (self.done - self._start) / max(time.perf_counter() - self._t0, 1e-9)

    def eta(self) -> float:
        r = self.rate()
        return (self.total - self.done) / r if r > 0 else float("inf")

    def update(self, n: int = 1, **postfix: float | str) -> None:
        self.done += n
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()}, refresh=False)
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.log_lines and (now - self._last >= self.every_s or self.done >= self.total):
            self._last = now
            extra = "".join(f"  {k} {v:.4g}" if isinstance(v, float) else f"  {k} {v}" for k, v in postfix.items())
            self.logger.info("%s %d/%d %s (%.2f %s/s, eta %s)%s", self.desc, self.done, self.total, self.unit, self.rate(), self.unit, fmt_eta(self.eta()), extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._stack.close()
