"""Where a training reader stands: the epoch and the step it starts at (a mid-epoch resume), and the epoch's
randomness; shared by the torch sampler (data/dataset.py) and the DALI reader (data/dali_pipeline.py)."""
from __future__ import annotations

import numpy as np


def epoch_word(seed: int, epoch: int, key: int) -> int:
    """32 random bits of (run seed, epoch, key): the data room's one seed mixer (numpy's SeedSequence). The DALI
    reader's seed per rank (key = rank), the torch reader's flip coin per sample (key = index). The heads draw their
    streams from heads/seeds.py's splitmix64 instead: centres in existing checkpoints depend on it."""
    return int(np.random.SeedSequence([seed, epoch, key]).generate_state(1)[0])


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
