"""The head's own SGD, beside the backbone's DeepSpeed engine (the head is never all-reduced or ZeRO-partitioned).

Row-sparse centre tables (any submodule with weight, weight_momentum and pop_row_grads, e.g. PartialFC) are stepped
on the rows that were sampled since the last step, with torch.optim.SGD's rule (dampening 0, no Nesterov):

    d = g + wd * w;   buf = momentum * buf + d;   w = w - lr * buf          (sampled rows only)

so with every row sampled every step it is exactly torch.optim.SGD; rows not sampled, and their momentum, do not
change (no weight decay either). The momentum lives in the head's ``weight_momentum`` buffer, so it checkpoints and
reshards with the head.

Dense head parameters are replicated on every rank, but each rank's graph holds only its class shard's part of
their gradient (heads/comm.py): their gradients are all_reduce-SUMmed first, then a torch.optim.SGD steps them.
"""
from __future__ import annotations

import numbers
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from heads.comm import all_reduce_sum_


class HeadOptimizerError(ValueError):
    """Bad optimizer arguments or a state dict that does not fit this head."""


@runtime_checkable
class RowSparseTable(Protocol):
    """A table of per-class rows stepped sparsely (PartialFC's centres)."""

    weight: Tensor
    weight_momentum: Tensor

    def pop_row_grads(self) -> tuple[Tensor | None, Tensor] | None: ...

    def clear_row_grads(self) -> None: ...


class HeadOptimizer:
    """SGD with momentum and weight decay for a head: sparse centre rows + all-reduced dense parameters."""

    def __init__(self, head: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
                raise HeadOptimizerError(f"HeadOptimizer: {name} must be a number >= 0, got {value!r}")
        # torch-optimizer style: one param group holds the hyper-parameters (set_lr or group["lr"] = ... both work)
        self.param_groups = [{"lr": float(lr), "momentum": float(momentum), "weight_decay": float(weight_decay)}]
        self.tables = [m for m in head.modules() if isinstance(m, RowSparseTable)]
        self.dense = [p for p in head.parameters() if p.requires_grad]
        self._sgd = (torch.optim.SGD(self.dense, lr=float(lr), momentum=float(momentum),
                                     weight_decay=float(weight_decay)) if self.dense else None)

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @property
    def momentum(self) -> float:
        return self.param_groups[0]["momentum"]

    @property
    def weight_decay(self) -> float:
        return self.param_groups[0]["weight_decay"]

    def set_lr(self, lr: float) -> None:
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr >= 0:
            raise HeadOptimizerError(f"HeadOptimizer: lr must be a number >= 0, got {lr!r}")
        self.param_groups[0]["lr"] = float(lr)

    def zero_grad(self) -> None:
        for table in self.tables:
            table.clear_row_grads()
        for p in self.dense:
            p.grad = None

    @torch.no_grad()
    def step(self, grad_scale: float = 1.0) -> None:
        """One SGD step. ``grad_scale``: the loss scale the gradients carry (fp16), divided out first."""
        for table in self.tables:
            popped = table.pop_row_grads()
            if popped is not None:
                rows, grad = popped
                self._step_rows(table, rows, grad / grad_scale if grad_scale != 1.0 else grad)
        if self._sgd is not None:
            self._reduce_dense_grads(grad_scale)
            for group in self._sgd.param_groups:
                group.update(self.param_groups[0])
            self._sgd.step()

    def _step_rows(self, table: RowSparseTable, rows: Tensor | None, grad: Tensor) -> None:
        if rows is None:
            w, buf = table.weight, table.weight_momentum
        else:
            w, buf = table.weight.index_select(0, rows), table.weight_momentum.index_select(0, rows)
        d = grad.to(w.dtype).add(w, alpha=self.weight_decay)
        buf.mul_(self.momentum).add_(d)
        w.add_(buf, alpha=-self.lr)
        if rows is not None:
            table.weight.index_copy_(0, rows, w)
            table.weight_momentum.index_copy_(0, rows, buf)

    def _reduce_dense_grads(self, grad_scale: float) -> None:
        """Sum the shard parts of every dense gradient over ranks, in one all_reduce.

        A trailing flag per parameter says whether any rank had a gradient, so a parameter unused on some rank
        (None there) still gets the others' parts, and one unused everywhere stays None.
        """
        p0 = self.dense[0]
        parts = [p.grad.reshape(-1).to(p0.dtype) if p.grad is not None else torch.zeros(p.numel(), dtype=p0.dtype,
                 device=p0.device) for p in self.dense]
        flags = torch.tensor([float(p.grad is not None) for p in self.dense], dtype=p0.dtype, device=p0.device)
        flat = all_reduce_sum_(torch.cat(parts + [flags]))
        offset = 0
        for i, p in enumerate(self.dense):
            chunk = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            p.grad = chunk / grad_scale if flat[-len(self.dense) + i] > 0 else None

    def state_dict(self) -> dict:
        """What the head's buffers do not already hold: lr and the dense parameters' SGD state."""
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "dense": None if self._sgd is None else self._sgd.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore lr and the dense SGD state; momentum and weight decay stay as configured now."""
        for key in ("lr", "dense"):
            if key not in state:
                raise HeadOptimizerError(f"HeadOptimizer.load_state_dict: key {key!r} missing (have {sorted(state)})")
        if (state["dense"] is None) != (self._sgd is None):
            raise HeadOptimizerError(
                f"HeadOptimizer.load_state_dict: the saved state has {'no' if state['dense'] is None else 'some'} "
                f"dense head parameters, this head has {len(self.dense)}")
        if self._sgd is not None:
            try:
                self._sgd.load_state_dict(state["dense"])
            except (ValueError, KeyError) as e:
                raise HeadOptimizerError(f"HeadOptimizer.load_state_dict: dense state does not fit this head's "
                                         f"{len(self.dense)} parameters: {e}") from e
        self.set_lr(float(state["lr"]))
