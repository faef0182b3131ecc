"""Per-class tables stepped row-sparsely: centres, per-class biases.

A table holds two buffers with dim 0 = this rank's classes: ``weight`` and its SGD ``weight_momentum``. Each
forward takes the rows it uses (all, or the sampled ones) as a fresh leaf tensor, so autograd builds a gradient for
those rows only; heads/optim.py pops the accumulated row gradients and steps those rows (momentum, weight decay).
Rows that no forward used do not move.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from heads.partition import ClassPartition


class RowSparseRows:
    """Mixin for an nn.Module with buffers ``weight`` and ``weight_momentum`` (dim 0 = class)."""

    weight: Tensor
    weight_momentum: Tensor

    def _init_rows(self) -> None:
        self._pending: list[tuple[Tensor | None, Tensor]] = []  # (rows or None = all, leaf) since the last step

    def leaf_rows(self, index: Tensor | None, track: bool) -> Tensor:
        """weight[index] (all rows when None) as a new leaf; with ``track`` its gradient is kept for the optimizer."""
        rows = self.weight if index is None else self.weight.index_select(0, index)  # faster than weight[index]
        leaf = rows.detach().requires_grad_(track)
        if track:
            self._pending.append((index, leaf))
        return leaf

    def pop_row_grads(self) -> tuple[Tensor | None, Tensor] | None:
        """(rows, grad) accumulated over the forwards since the last call, and forget them.

        rows: sorted unique local indices, or None for every row; grad: [len(rows) or C_local, ...].
        None when no forward produced a gradient.
        """
        pending = [(index, leaf.grad) for index, leaf in self._pending if leaf.grad is not None]
        self._pending.clear()
        if not pending:
            return None
        if len(pending) == 1:
            return pending[0]
        if any(index is None for index, _ in pending):
            grad = torch.zeros_like(self.weight)
            for index, g in pending:
                if index is None:
                    grad.add_(g)
                else:
                    grad.index_add_(0, index, g)
            return None, grad
        rows, inverse = torch.unique(torch.cat([index for index, _ in pending]), sorted=True, return_inverse=True)
        grad = torch.zeros((rows.numel(), *self.weight.shape[1:]), dtype=self.weight.dtype,
                           device=self.weight.device)
        grad.index_add_(0, inverse, torch.cat([g for _, g in pending]))
        return rows, grad

    def clear_row_grads(self) -> None:
        """Drop the gradients of past forwards (zero_grad)."""
        self._pending.clear()


class ClassBias(RowSparseRows, nn.Module):
    """One learnable bias per class of this rank's shard: buffers ``weight`` [C_local] and ``weight_momentum``.

    Used by the "diverse" uniform BCE (one b_j per class) and the sample-to-sample BCE. Sharded like the centres,
    so it checkpoints and reshards with them.
    """

    def __init__(self, partition: ClassPartition, init: float = 0.0) -> None:
        super().__init__()
        self.partition = partition
        self.register_buffer("weight", torch.full((partition.num_local,), float(init)))
        self.register_buffer("weight_momentum", torch.zeros(partition.num_local))
        self._init_rows()

    def per_class_buffers(self) -> list[str]:
        return ["weight", "weight_momentum"]

    def extra_repr(self) -> str:
        return f"classes [{self.partition.start}, {self.partition.end})"
