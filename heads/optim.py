"""The head's own SGD, beside the backbone's DeepSpeed engine (the head is never all-reduced or ZeRO-partitioned).

Row-sparse tables (every submodule that is a heads/rows.py RowSparseRows: PartialFC's centres, ClassBias's per-class
biases) are stepped on the rows that were used since the last step, with torch.optim.SGD's rule (dampening 0, no
Nesterov):

    d = g + wd * w;   buf = momentum * buf + d;   w = w - lr * buf          (sampled rows only)

so with every row sampled every step it is exactly torch.optim.SGD; rows not sampled, and their momentum, do not
change (no weight decay either). The momentum lives in the head's ``weight_momentum`` buffer, so it checkpoints and
reshards with the head. The step allocates nothing of the sampled rows' size: w is the copy of the rows the forward
gathered (its leaf, heads/rows.py), d is formed in the gradient's buffer, the momentum rows are scaled and added in
place in the table (index_reduce_, index_add_) and read back into that same buffer, and w is written back with one
index_copy_.

Dense head parameters are replicated on every rank, but each rank's graph holds only its class shard's part of
their gradient (heads/comm.py): their gradients are all_reduce-SUMmed first, then a torch.optim.SGD steps them. A
parameter that no rank used this step (None everywhere) must not move (torch.optim.SGD skips it): which ones those
are is known only on the device (the all-reduced flags), so every dense parameter is stepped and the unused ones
are put back with torch.where: no host sync.
"""
from __future__ import annotations

import numbers
import warnings

import torch
from torch import Tensor, nn

from heads.comm import all_reduce_sum_
from heads.rows import RowSparseRows


class HeadOptimizerError(ValueError):
    """Bad optimizer arguments or a state dict that does not fit this head."""


class HeadOptimizer:
    """SGD with momentum and weight decay for a head: sparse rows (RowSparseRows) + all-reduced dense parameters."""

    def __init__(self, head: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
                raise HeadOptimizerError(f"HeadOptimizer: {name} must be a number >= 0, got {value!r}")
        # torch-optimizer style: one param group holds the hyper-parameters (set_lr or group["lr"] = ... both work)
        self.param_groups = [{"lr": float(lr), "momentum": float(momentum), "weight_decay": float(weight_decay)}]
        self.tables = [m for m in head.modules() if isinstance(m, RowSparseRows)]
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
            popped = table.pop_rows()
            if popped is not None:
                rows, grad, values = popped
                self._step_rows(table, rows, grad, values, grad_scale)
        if self._sgd is not None:
            self._step_dense(grad_scale)

    def _step_rows(self, table: RowSparseRows, rows: Tensor | None, grad: Tensor, values: Tensor | None,
                   grad_scale: float) -> None:
        lr, momentum, wd = self.lr, self.momentum, self.weight_decay
        d = grad if grad.dtype == table.weight.dtype else grad.to(table.weight.dtype)  # ours: updated in place
        if grad_scale != 1.0:
            d.div_(grad_scale)
        if rows is None:
            w, buf = table.weight, table.weight_momentum
            d.add_(w, alpha=wd)
            buf.mul_(momentum).add_(d)
            w.add_(buf, alpha=-lr)
            return
        w = values if values is not None else table.weight.index_select(0, rows)
        d.add_(w, alpha=wd)
        m = table.weight_momentum
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*index_reduce.*beta")
            m.index_reduce_(0, rows, torch.full((1,) * m.ndim, momentum, dtype=m.dtype, device=m.device)
                            .expand(rows.numel(), *m.shape[1:]), "prod")        # buf = momentum * buf
        m.index_add_(0, rows, d)                                               # buf += d
        torch.index_select(m, 0, rows, out=d)                                  # d <- buf
        w.add_(d, alpha=-lr)
        table.weight.index_copy_(0, rows, w)

    def _step_dense(self, grad_scale: float) -> None:
        """Sum the shard parts of every dense gradient over ranks (one all_reduce), then torch.optim.SGD.

        A trailing flag per parameter says whether any rank had a gradient, so a parameter unused on some rank (None
        there) still gets the others' parts, and one unused everywhere keeps its value and momentum.
        """
        p0 = self.dense[0]
        parts = [p.grad.reshape(-1).to(p0.dtype) if p.grad is not None else torch.zeros(p.numel(), dtype=p0.dtype,
                 device=p0.device) for p in self.dense]
        flags = [torch.ones(1, dtype=p0.dtype, device=p0.device) if p.grad is not None else
                 torch.zeros(1, dtype=p0.dtype, device=p0.device) for p in self.dense]
        flat = all_reduce_sum_(torch.cat(parts + flags))
        used = flat[-len(self.dense):] > 0
        offset = 0
        for p in self.dense:
            chunk = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            p.grad = chunk / grad_scale if grad_scale != 1.0 else chunk
        before = []
        for p in self.dense:
            buf = self._sgd.state.get(p, {}).get("momentum_buffer")
            before.append((p.detach().clone(), None if buf is None else buf.clone()))
        for group in self._sgd.param_groups:
            group.update(self.param_groups[0])
        self._sgd.step()
        for i, (p, (old, old_buf)) in enumerate(zip(self.dense, before)):
            p.copy_(torch.where(used[i], p, old))
            buf = self._sgd.state.get(p, {}).get("momentum_buffer")
            if buf is not None:  # a buffer SGD just created for an unused parameter is 0 (as if none: SGD's first
                buf.copy_(torch.where(used[i], buf, old_buf if old_buf is not None else torch.zeros_like(buf)))
                # step with momentum sets buf = d, exactly momentum * 0 + d)

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
