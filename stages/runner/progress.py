"""Progress of long loops that reads well both on a terminal and in a log.

On a terminal a live bar (rich) shows the step, what the loop says about it and the time left, and is
cleared at the end. Anywhere else (a redirected log, CI, the Prefect UI that `flows.pipeline` streams stage
output into) a bar would print nothing useful, so a plain line goes out at the first step, then at most
every `every` seconds, then at the last step:

    train: student  step 120/600 (20%)  epoch 2 loss 0.4123 310 rows/s  elapsed 0:40 ETA 2:40

`DISTILLERY_PROGRESS_SECONDS` sets that interval (default 15 s); `DISTILLERY_PROGRESS=plain` forces lines on a
terminal too. Milestones (an epoch's validation accuracy) go through `note`, which always prints a line.
Everything goes to stderr, which Python flushes line by line even when it is a pipe.
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import Any, TextIO


def interval() -> float:
    """Seconds between two plain progress lines (`DISTILLERY_PROGRESS_SECONDS`, default 15)."""
    try:
        return max(0.0, float(os.environ.get("DISTILLERY_PROGRESS_SECONDS", "15")))
    except ValueError:
        return 15.0


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """`with Progress("train: student", total=600) as bar: bar.advance(info="loss 0.41")`.

    `enabled=False` (e.g. on a non-zero distributed rank) prints nothing at all."""

    def __init__(self, name: str, total: int, unit: str = "step", enabled: bool = True,
                 every: float | None = None, stream: TextIO | None = None):  # fmt: skip
        self.name, self.total, self.unit, self.enabled = name, max(1, total), unit, enabled
        self.every = interval() if every is None else every
        self.stream = stream or sys.stderr
        self.done, self.start, self.last_line = 0, time.monotonic(), float("-inf")
        live = self.stream.isatty() and os.environ.get("DISTILLERY_PROGRESS", "") != "plain"
        self._bar: Any = None
        if enabled and live:
            from rich.console import Console
            from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                       TimeRemainingColumn())  # fmt: skip
            self._bar = Bar(*columns, transient=True, console=Console(file=self.stream))
            self._task = self._bar.add_task(name, total=self.total, info="")

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()

    def line(self, info: str = "") -> str:
        """The plain progress line for the current step."""
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        share = f"{self.unit} {self.done}/{self.total} ({self.done / self.total:.0%})"
        return "  ".join(x for x in (self.name, share, info, f"elapsed {clock(elapsed)} ETA {clock(eta)}") if x)

    def advance(self, steps: int = 1, info: str = "") -> None:
        self.done = min(self.total, self.done + steps)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, advance=steps, info=info)
            return
        now = time.monotonic()
        if self.done in (1, self.total) or now - self.last_line >= self.every:
            self.last_line = now
            print(self.line(info), file=self.stream, flush=True)

    def note(self, message: str) -> None:
        """A milestone, always printed (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=self.stream, flush=True)
