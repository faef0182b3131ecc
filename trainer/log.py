"""Console + file logging (rank 0 speaks; other ranks log warnings only, marked with their rank) and the
throughput/ETA meter.

Every line carries its level: `14:07:31 INFO    epoch 0 step 10/800 ...`, `14:07:31 WARNING resume: ...`. On a
terminal, warnings are yellow and errors red (not when NO_COLOR is set, and never in train.log). The logger counts
the warnings and errors of the run, so the end of a run can say how many there were.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

LOG_NAME = "facetrain"
DATEFMT = "%H:%M:%S"
_COLORS = {logging.WARNING: "\033[33m", logging.ERROR: "\033[1;31m", logging.CRITICAL: "\033[1;31m"}
_RESET = "\033[0m"


class LevelFormatter(logging.Formatter):
    """`HH:MM:SS LEVEL   [rank r] message`; the rank only on ranks other than 0; colour for terminals."""

    def __init__(self, rank: int, color: bool = False) -> None:
        where = f"[rank {rank}] " if rank else ""
        super().__init__(f"%(asctime)s %(levelname)-7s {where}%(message)s", datefmt=DATEFMT)
        self.color = color

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.color and record.levelno in _COLORS:
            return _COLORS[record.levelno] + text + _RESET
        return text


class LevelCounter(logging.Handler):
    """Counts the records of each level at or above WARNING (what the end of a run reports)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelname] = self.counts.get(record.levelname, 0) + 1

    @property
    def warnings(self) -> int:
        return self.counts.get("WARNING", 0)

    @property
    def errors(self) -> int:
        return self.counts.get("ERROR", 0) + self.counts.get("CRITICAL", 0)


def use_color(stream) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def setup_logging(output: Path, rank: int) -> logging.Logger:
    log = logging.getLogger(LOG_NAME)
    for h in log.handlers:
        h.close()
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(LevelFormatter(rank, color=use_color(sys.stdout)))
    log.addHandler(console)
    if rank == 0:
        Path(output).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(output) / "train.log")
        fh.setFormatter(LevelFormatter(rank, color=False))
        log.addHandler(fh)
    log.addHandler(LevelCounter())
    return log


def level_counts(log: logging.Logger) -> LevelCounter | None:
    """The counter setup_logging attached to ``log`` (None for a logger set up elsewhere)."""
    return next((h for h in log.handlers if isinstance(h, LevelCounter)), None)


class Meter:
    """Samples/s over all ranks since the last report, and the time left at that rate."""

    def __init__(self, global_batch: int, total_steps: int):
        self.global_batch = global_batch
        self.total_steps = total_steps
        self.t0 = time.perf_counter()
        self.steps = 0

    def tick(self) -> None:
        self.steps += 1

    def report(self, global_step: int) -> tuple[float, float]:
        """(samples per second over all ranks, hours left) since the previous report; resets the window."""
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        sps = self.steps * self.global_batch / dt
        hours = (self.total_steps - global_step) * (dt / max(self.steps, 1)) / 3600.0
        self.t0, self.steps = now, 0
        return sps, hours
