"""The ``Head`` protocol: what the trainer (and a checkpoint) may rely on in any head that heads.build_head builds.

    loss, logs = head(x_local, labels_local)   nn.Module call -> forward: the global-batch loss, identical on every
                                               rank (heads/comm.py), and a dict of 0-dim tensors / numbers to log
    head.set_epoch(epoch)                      the epoch hook, at each epoch start (start epochs of memory terms,
                                               heads/embedded.py; a no-op for sample-to-class heads)
    head.learned_thresholds()                  {name: cosine threshold} the loss learns (USS/UCE b/s, GB-CosFace p_v);
                                               {} for losses without one
    head.per_class_buffers()                   state_dict keys whose dim 0 is this rank's classes: what a checkpoint
                                               reshards from W to W' ranks
    head.partition                             the ClassPartition those rows follow (heads/partition.py)
    head.state_dict() / load_state_dict()      nn.Module's: every centre, memory, bias and p_v is a parameter or a
                                               buffer, so the head checkpoints like any module

Every head is an nn.Module besides (train/eval, to, parameters, modules): heads/optim.py's HeadOptimizer steps its
row-sparse tables (heads/rows.py) and dense parameters. ``isinstance(obj, Head)`` checks that the members exist.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from heads.partition import ClassPartition


@runtime_checkable
class Head(Protocol):
    """A class-sharded head: ``forward(x_local, labels_local) -> (loss, logs)`` plus the hooks listed above."""

    partition: ClassPartition

    def __call__(self, x_local: Tensor, labels_local: Tensor) -> tuple[Tensor, dict]: ...

    def forward(self, x_local: Tensor, labels_local: Tensor) -> tuple[Tensor, dict]: ...

    def set_epoch(self, epoch: int) -> None: ...

    def learned_thresholds(self) -> dict[str, float]: ...

    def per_class_buffers(self) -> list[str]: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any: ...
