"""Console + file logging (rank 0 speaks; other ranks log warnings only) and the throughput/ETA meter."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path


def setup_logging(output: Path, rank: int) -> logging.Logger:
    log = logging.getLogger("facetrain")
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    if rank == 0:
        Path(output).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(output) / "train.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    return log


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
