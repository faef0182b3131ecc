"""Per-class tables stepped row-sparsely: centres, per-class biases. ``RowSparseRows`` is the one row-sparse type.

A table holds two buffers with dim 0 = this rank's classes: ``weight`` and its SGD ``weight_momentum``. Each
forward takes the rows it uses (all, or the sampled ones) as a fresh leaf tensor, so autograd builds a gradient for
those rows only; heads/optim.py steps every submodule that is a ``RowSparseRows`` (PartialFC's centres, ClassBias):
it pops the accumulated row gradients and steps those rows (momentum, weight decay). Rows that no forward used do
not move.

``ClassBias`` is the per-class bias (UCE "diverse", s2s BCE) with its global mean over the classes of all ranks.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from heads.comm import all_reduce_sum_
from heads.partition import ClassPartition


class RowSparseRows:
    """Mixin for an nn.Module with buffers ``weight`` and ``weight_momentum`` (dim 0 = class)."""

    weight: Tensor
    weight_momentum: Tensor

    def _init_rows(self) -> None:
        self._pending: list[tuple[Tensor | None, Tensor]] = []  # (rows or None = all, leaf) since the last step
        self._pending_versions: list[int] = []  # weight's version when each leaf's rows were taken

    def leaf_rows(self, index: Tensor | None, track: bool) -> Tensor:
        """weight[index] (all rows when None) as a new leaf; with ``track`` its gradient is kept for the optimizer."""
        rows = self.weight if index is None else self.weight.index_select(0, index)  # faster than weight[index]
        leaf = rows.detach().requires_grad_(track)
        if track:
            self._pending.append((index, leaf))
            self._pending_versions.append(self.weight._version)
        return leaf

    def pop_rows(self) -> tuple[Tensor | None, Tensor, Tensor | None] | None:
        """(rows, grad, values) accumulated over the forwards since the last call, and forget them.

        rows: sorted unique local indices, or None for every row; grad: [len(rows) or C_local, ...]; values: the
        current ``weight[rows]`` as the forward gathered them (a tensor the caller may update in place and write
        back), or None when they must be read again (several forwards, or ``weight`` written since). None when no
        forward produced a gradient.
        """
        pending = [(index, leaf, version) for (index, leaf), version in zip(self._pending, self._pending_versions)
                   if leaf.grad is not None]
        self.clear_row_grads()
        if not pending:
            return None
        if len(pending) == 1:
            index, leaf, version = pending[0]
            values = leaf.detach() if index is not None and version == self.weight._version else None
            return index, leaf.grad, values
        if any(index is None for index, _, _ in pending):
            grad = torch.zeros_like(self.weight)
            for index, leaf, _ in pending:
                if index is None:
                    grad.add_(leaf.grad)
                else:
                    grad.index_add_(0, index, leaf.grad)
            return None, grad, None
        # several forwards (accumulation): their union of rows; torch.unique syncs, once per step, only here
        rows, inverse = torch.unique(torch.cat([index for index, _, _ in pending]), sorted=True, return_inverse=True)
        grad = torch.zeros((rows.numel(), *self.weight.shape[1:]), dtype=self.weight.dtype,
                           device=self.weight.device)
        grad.index_add_(0, inverse, torch.cat([leaf.grad for _, leaf, _ in pending]))
        return rows, grad, None

    def pop_row_grads(self) -> tuple[Tensor | None, Tensor] | None:
        """(rows, grad) of :meth:`pop_rows`, without the gathered values."""
        popped = self.pop_rows()
        return None if popped is None else popped[:2]

    def pending_grads(self) -> list[Tensor]:
        """The row gradients of the forwards since the last step, without consuming them (the trainer's
        non-finite check, trainer/guard.py)."""
        return [entry[1].grad for entry in self._pending if entry[1].grad is not None]

    def clear_row_grads(self) -> None:
        """Drop the gradients of past forwards (zero_grad)."""
        self._pending.clear()
        self._pending_versions.clear()


class ClassBias(RowSparseRows, nn.Module):
    """One learnable bias per class of this rank's shard: buffers ``weight`` [C_local] and ``weight_momentum``.

    Used by the "diverse" uniform BCE (one b_j per class) and the sample-to-sample BCE, which both log and threshold
    with :meth:`global_mean`. Sharded like the centres, so it checkpoints and reshards with them.
    """

    def __init__(self, partition: ClassPartition, init: float = 0.0) -> None:
        super().__init__()
        self.partition = partition
        self.register_buffer("weight", torch.full((partition.num_local,), float(init)))
        self.register_buffer("weight_momentum", torch.zeros(partition.num_local))
        self._init_rows()

    def per_class_buffers(self) -> list[str]:
        return ["weight", "weight_momentum"]

    @torch.no_grad()
    def global_mean(self) -> Tensor:
        """Mean of the biases over all classes of all ranks (0-dim; an all-reduce, identical on every rank)."""
        return all_reduce_sum_(self.weight.sum().reshape(1))[0] / self.partition.num_classes

    def extra_repr(self) -> str:
        return f"classes [{self.partition.start}, {self.partition.end})"
