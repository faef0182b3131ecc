"""Which classes a rank owns: one partition for centres, memories, prototypes and per-class biases.

arcface_torch's formula: rank r of W owns num_local = C//W + (r < C%W) classes starting at C//W*r + min(r, C%W),
so the first C%W ranks hold one class more. ``reshard`` moves any per-class tensor (dim 0 = class) from W to W'
ranks, which is how a checkpoint written by W ranks resumes on W'.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class PartitionError(ValueError):
    """Bad partition arguments or shards that do not match a partition."""


def shard_bounds(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(start, num_local) of rank's class range."""
    q, rem = divmod(num_classes, world_size)
    return q * rank + min(rank, rem), q + int(rank < rem)


@dataclass(frozen=True)
class ClassPartition:
    """The contiguous class range [start, end) that ``rank`` of ``world_size`` owns."""

    num_classes: int
    world_size: int
    rank: int

    def __post_init__(self) -> None:
        for name in ("num_classes", "world_size", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise PartitionError(f"ClassPartition: {name} must be an int, got {value!r}")
        if self.num_classes < 1:
            raise PartitionError(f"ClassPartition: num_classes must be >= 1, got {self.num_classes}")
        if self.world_size < 1:
            raise PartitionError(f"ClassPartition: world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise PartitionError(f"ClassPartition: rank must be in [0, {self.world_size}), got {self.rank}")

    @property
    def start(self) -> int:
        return shard_bounds(self.num_classes, self.world_size, self.rank)[0]

    @property
    def num_local(self) -> int:
        return shard_bounds(self.num_classes, self.world_size, self.rank)[1]

    @property
    def end(self) -> int:
        """One past the last owned class."""
        return self.start + self.num_local

    def sizes(self) -> list[int]:
        """num_local of every rank."""
        return [shard_bounds(self.num_classes, self.world_size, r)[1] for r in range(self.world_size)]

    def owns(self, labels: Tensor) -> Tensor:
        """Boolean mask: which global labels this rank owns."""
        return (labels >= self.start) & (labels < self.end)

    def to_local(self, labels: Tensor) -> Tensor:
        """Global labels -> local class index (int64), -1 where another rank owns the class."""
        labels = labels.long()
        return torch.where(self.owns(labels), labels - self.start, torch.full_like(labels, -1))

    def to_global(self, local: Tensor) -> Tensor:
        """Local class indices -> global labels."""
        return local.long() + self.start

    def owner(self, labels: Tensor) -> Tensor:
        """The rank that owns each global label (labels must lie in [0, num_classes))."""
        labels = labels.long()
        q, rem = divmod(self.num_classes, self.world_size)
        big = rem * (q + 1)  # classes held by the first `rem` ranks, which own q + 1 each
        low = torch.div(labels, q + 1, rounding_mode="floor")
        high = rem + torch.div(labels - big, max(q, 1), rounding_mode="floor")
        return torch.where(labels < big, low, high)

    @staticmethod
    def reshard(shards: list[Tensor], new_world_size: int) -> list[Tensor]:
        """Per-class shards of W ranks (in rank order, dim 0 = class) -> the W' = new_world_size shards.

        The old shards must follow the partition of their total class count over len(shards) ranks.
        """
        if len(shards) == 0:
            raise PartitionError("reshard: no shards given")
        if isinstance(new_world_size, bool) or not isinstance(new_world_size, int) or new_world_size < 1:
            raise PartitionError(f"reshard: new_world_size must be an int >= 1, got {new_world_size!r}")
        first = shards[0]
        for r, s in enumerate(shards):
            if not isinstance(s, Tensor) or s.ndim < 1:
                raise PartitionError(f"reshard: shard {r} must be a tensor with a class dimension, got {type(s)}")
            if s.shape[1:] != first.shape[1:] or s.dtype != first.dtype:
                raise PartitionError(
                    f"reshard: shard {r} has shape {list(s.shape)} / {s.dtype}, shard 0 has "
                    f"{list(first.shape)} / {first.dtype}: per-row shape and dtype must agree")
        num_classes = sum(s.shape[0] for s in shards)
        expected = [shard_bounds(num_classes, len(shards), r)[1] for r in range(len(shards))]
        got = [s.shape[0] for s in shards]
        if got != expected:
            raise PartitionError(
                f"reshard: shard sizes {got} do not follow the partition of {num_classes} classes over "
                f"{len(shards)} ranks, which is {expected}")
        if num_classes < 1:
            raise PartitionError("reshard: the shards hold no class")
        full = torch.cat([s.detach() for s in shards], dim=0)
        new_sizes = [shard_bounds(num_classes, new_world_size, r)[1] for r in range(new_world_size)]
        return [part.clone() for part in torch.split(full, new_sizes, dim=0)]


def reshard(shards: list[Tensor], new_world_size: int) -> list[Tensor]:
    """Module-level alias of ClassPartition.reshard."""
    return ClassPartition.reshard(shards, new_world_size)
