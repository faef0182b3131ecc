"""Where a run stands, and where a resumed one starts: the position bookkeeping the loop and the checkpoints share.

Positions are kept in SAMPLES within an epoch, so that a checkpoint written by W ranks resumes on W' ranks: with
another rank count the global batch, and so the step, differ. A resumed run starts at the first whole global batch
at or before the saved sample (a warning says when the two differ).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from runtime.layout import epoch_tag, step_tag


@dataclass
class Position:
    steps_per_epoch: int
    global_batch: int
    epoch: int = 0              # the epoch being trained, 0-based
    global_step: int = 0        # optimizer steps taken since the run began (skipped non-finite steps included)
    first_step_in_epoch: int = 0  # where this process's first epoch starts (> 0 after a mid-epoch resume)

    def __post_init__(self) -> None:
        self.start_epoch = self.epoch

    @classmethod
    def resumed(cls, meta: dict, steps_per_epoch: int, global_batch: int, log) -> Position:
        """The position a checkpoint's meta.json describes, in this run's global batch."""
        epoch, samples = meta["epoch"], meta.get("samples_in_epoch", 0)
        start = samples // global_batch
        if samples % global_batch:
            log.warning(f"resume: {samples} samples of epoch {epoch} were seen with a global batch of "
                        f"{meta['global_batch']}; continuing from sample {start * global_batch}")
        return cls(steps_per_epoch, global_batch, epoch, epoch * steps_per_epoch + start, start)

    @property
    def at_start(self) -> bool:
        return self.global_step == 0

    def begin_epoch(self, epoch: int) -> int:
        """Enter ``epoch``; the step within it to start from (the resume point in the first epoch, else 0)."""
        self.epoch = epoch
        return self.first_step_in_epoch if epoch == self.start_epoch else 0

    @property
    def step_in_epoch(self) -> int:
        return self.global_step - self.epoch * self.steps_per_epoch

    @property
    def epoch_complete(self) -> bool:
        return self.step_in_epoch == self.steps_per_epoch

    def tag(self) -> str:
        """epoch_NNNN (1-based) at an epoch's end, else step_NNNNNNN."""
        return epoch_tag(self.epoch + 1) if self.epoch_complete else step_tag(self.global_step)

    def meta(self) -> dict:
        """The position keys of a checkpoint's meta.json (what :meth:`resumed` reads back)."""
        complete = self.epoch_complete
        return {"epoch": self.epoch + 1 if complete else self.epoch,
                "step_in_epoch": 0 if complete else self.step_in_epoch,
                "samples_in_epoch": 0 if complete else self.step_in_epoch * self.global_batch,
                "global_batch": self.global_batch, "global_step": self.global_step}


class CheckpointClock:
    """Periodic step checkpoints: every `steps` optimizer steps and/or `minutes` of wall time (rank 0's clock,
    agreed through the step guard). 0 switches either off."""

    def __init__(self, steps: int, minutes: float, rank: int) -> None:
        if steps < 0 or minutes < 0:
            raise ValueError(f"train.checkpoint_every_steps / _minutes must be >= 0, got {steps} / {minutes}")
        self.steps, self.seconds, self.rank = int(steps), float(minutes) * 60.0, rank
        self.reset()

    def reset(self) -> None:
        self.t0 = time.monotonic()

    def time_due(self) -> bool:
        return self.rank == 0 and self.seconds > 0 and time.monotonic() - self.t0 >= self.seconds

    def step_due(self, global_step: int) -> bool:
        return self.steps > 0 and global_step % self.steps == 0
