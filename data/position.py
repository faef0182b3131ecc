"""Where a training reader stands: the epoch and the step it starts at (a mid-epoch resume), shared by the torch
sampler (data/dataset.py) and the DALI reader (data/dali_pipeline.py)."""
from __future__ import annotations


class EpochPosition:
    """Mixin for a reader with ``steps_per_epoch`` full batches per rank and epoch."""

    steps_per_epoch: int
    epoch: int = 0
    start_step: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch`` and rewind to its step 0."""
        self.epoch, self.start_step = int(epoch), 0

    def set_start_step(self, step: int) -> None:
        """Start the current epoch at ``step`` (0..steps_per_epoch)."""
        if not 0 <= step <= self.steps_per_epoch:
            raise ValueError(f"start step must be in 0..{self.steps_per_epoch}, got {step}")
        self.start_step = int(step)

    def __len__(self) -> int:
        """Steps left in the current epoch."""
        return self.steps_per_epoch - self.start_step
