"""The per-task progress bar: a live bar on a terminal, one plain line per task anywhere else.

A tqdm bar redraws itself with carriage returns; written into a log file or a CI console (stderr not a
terminal) those frames pile up into one unreadable line per redraw. There, each task gets one line when
it ends instead. Task numbers are R's row numbers (0-based), as in the printed text and the errors.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm


class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close``, printing one line at ``close``:
    ``task 2 of 5: 750 steps in 1.9 s, loss 0.4123``."""

    def __init__(self, total: int, desc: str, stream: TextIO | None = None) -> None:
        self.total, self.desc, self.stream = total, desc, stream or sys.stderr
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.closed = False

    def update(self, steps: int = 1) -> None:
        self.n += steps

    def set_postfix(self, **values: Any) -> None:
        self.postfix.update(values)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        seconds = time.perf_counter() - self.started
        print(f"{self.desc}: {self.n} steps in {seconds:.1f} s{extra}", file=self.stream, flush=True)


def task_progress(total: int, task_id: int, num_tasks: int, enabled: bool) -> tqdm | LineProgress:
    """The progress display for training task ``task_id`` (``total`` steps): a tqdm bar on a terminal,
    a :class:`LineProgress` where stderr is not one, nothing shown when ``enabled`` is False."""
    desc = f"task {task_id} of {num_tasks}"
    if enabled and not sys.stderr.isatty():
        return LineProgress(total, desc)
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="step", mininterval=0.5)
