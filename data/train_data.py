"""The loader interface: what the trainer iterates, whichever reader produces it (``TorchTrainData`` in
:mod:`data.loader`, ``DaliTrainData`` in :mod:`data.dali_pipeline`), and the batch arguments every reader checks.

Imports run one way: :mod:`data.loader` (the factory, ``build_loader``) imports :mod:`data.dataset` and
:mod:`data.dali_pipeline`; those and the loader import this module, and nothing here imports them back.
"""
from __future__ import annotations

import abc
from typing import Iterator

import torch

from data.rec_index import PreparedRec


class TrainData(abc.ABC):
    """An epoch-wise iterable of (images, labels) batches with a fixed number of full batches per rank."""

    prepared: PreparedRec
    batch_size: int
    steps_per_epoch: int

    @property
    def num_images(self) -> int:
        return self.prepared.num_images

    @property
    def num_classes(self) -> int:
        return self.prepared.num_classes

    @property
    def image_size(self) -> tuple[int, int]:
        return self.prepared.image_size

    @abc.abstractmethod
    def set_epoch(self, epoch: int) -> None:
        """Select the order (and augmentation randomness) of ``epoch``, starting at its step 0."""

    @abc.abstractmethod
    def set_start_step(self, step: int) -> None:
        """Start the current epoch at ``step`` (0..steps_per_epoch): a mid-epoch resume."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Steps left in the current epoch."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images float32 [B,3,H,W] in [-1,1], labels int64 [B]) on the device, ``len(self)`` times."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop workers / pipelines and release their memory. Idempotent."""

    def batch_keys(self) -> list[int] | str:
        """The record keys (train.idx) of the batch this rank yielded last, in batch order; [] before the first
        batch. A reader that cannot know them returns a string saying where it was instead."""
        return "record keys not available from this reader"

    def __enter__(self) -> TrainData:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_batch_args(num_images: int, batch_size: int, rank: int, world_size: int) -> int:
    """Validate the arguments every kind shares; return steps_per_epoch = N // (W * B)."""
    if batch_size <= 0 or world_size <= 0:
        raise ValueError(f"batch_size and world_size must be > 0, got {batch_size} and {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    steps = num_images // (world_size * batch_size)
    if steps == 0:
        raise ValueError(f"dataset of {num_images} images is smaller than one global batch "
                         f"({world_size} ranks x {batch_size} = {world_size * batch_size})")
    return steps
