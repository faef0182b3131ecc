"""One agreement per step: was it finite, does anyone want to stop or checkpoint — and a non-finite step undone.

After the backward every rank fills three numbers on the device and one all-reduce (MAX) makes them agree:

    [0] non-finite   the loss, this rank's backbone gradients (ZeRO 0: averaged, so the same on every rank) or its
                     head gradients (its own class shard) hold inf/NaN
    [1] stop         a SIGTERM / SIGUSR1 reached this rank (trainer/signals.py)
    [2] checkpoint   a periodic checkpoint is due (rank 0's clock: train.checkpoint_every_minutes)

Reading the agreed vector is the step's one host sync. A non-finite step is then skipped identically on every rank:
no backbone or head optimizer step (weights, momentum untouched), the head's state writes of that forward undone
(memories, data-set biases, p_v: heads/journal.py) and the backbone's BatchNorm running statistics restored from a
copy taken before the forward. ``max_consecutive`` skipped steps in a row end the run with the step and the batch's
record keys, before any checkpoint could hold a non-finite tensor.

ZeRO >= 1 keeps the reduced backbone gradients in DeepSpeed's partitions, not in ``p.grad``: there DeepSpeed's own
overflow check (switched on here; one all-reduce of its own) skips the backbone step and the guard undoes the head.

fp16 (``loss_scale``): the loss is multiplied by a dynamic scale S before the backward (the head's gradients carry it
too); the check above divides every gradient by S in the same fused pass, an overflow is a non-finite step like any
other (skipped on every rank: backbone AND head and its state), and S follows torch's GradScaler rule on the device
from the agreed flag: halved after an overflow, doubled after ``growth_interval`` good steps in a row. S is part of
the checkpoint. Overflow skips do not count toward ``max_consecutive`` until S has fallen below 1 (a real NaN then).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from heads.journal import HeadTransaction
from runtime.process import rank_world


class NonFiniteError(FloatingPointError):
    """Too many non-finite steps in a row; the message names the step and the batch."""


@dataclass(frozen=True)
class StepFlags:
    nonfinite: bool
    stop: bool
    checkpoint: bool


class StepGuard:
    def __init__(self, engine, head, head_opt, max_consecutive: int = 10, loss_scale: float | None = None,
                 growth_interval: int = 2000) -> None:
        if max_consecutive < 1:
            raise ValueError(f"train.max_nonfinite_steps must be >= 1, got {max_consecutive}")
        if loss_scale is not None and not loss_scale > 0:
            raise ValueError(f"model.loss_scale must be > 0, got {loss_scale}")
        self.engine, self.head, self.head_opt = engine, head, head_opt
        self.max_consecutive = int(max_consecutive)
        self.world_size = rank_world()[1]
        self.txn = HeadTransaction(head)
        self.zero_stage = int(engine.zero_optimization_stage())
        if self.zero_stage >= 1:
            engine.optimizer.check_grad_overflow = True  # DeepSpeed skips a non-finite backbone step itself
        # ZeRO 0: the gradient-norm clip is done here, on the device (torch's clip_grad_norm_: coefficient
        # min(1, max_norm / (norm + 1e-6)), the same rule as DeepSpeed's), instead of by DeepSpeed, whose version
        # copies two Python numbers to the device per step (two host syncs on a GPU).
        self.clip = 0.0
        if self.zero_stage == 0 and engine.gradient_clipping() > 0:
            self.clip = float(engine.gradient_clipping())
            engine._config.gradient_clipping = 0.0
        self._buffers = [b for b in engine.module.buffers()]
        self._saved = [b.detach().clone() for b in self._buffers]
        self._params = list(engine.module.parameters())  # walked every step: listed once
        device = self._params[0].device
        self._flags = torch.zeros(3, device=device)
        self._found = torch.zeros(1, device=device)
        self._one = torch.ones(1, device=device)
        self.growth_interval = int(growth_interval)
        self.scale: torch.Tensor | None = None
        if loss_scale is not None:
            if self.zero_stage >= 1:
                raise ValueError("model.precision=fp16 needs ZeRO stage 0 here: with ZeRO >= 1 the scaled backbone "
                                 "gradients sit in DeepSpeed's partitions, out of reach of the unscaling; use "
                                 "deepspeed.zero_stage=0 or model.precision=bf16")
            self.scale = torch.full((1,), float(loss_scale), device=device)
            self._growth = torch.zeros(1, dtype=torch.int32, device=device)
        self.skipped_total = 0
        self.consecutive = 0

    # --- fp16 loss scale ------------------------------------------------------------------------------------------
    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """What to hand to the backward: the loss times the dynamic scale (fp16), or the loss itself."""
        return loss if self.scale is None else loss * self.scale.to(loss.dtype)

    def state_dict(self) -> dict:
        return {} if self.scale is None else {"loss_scale": self.scale.detach().cpu().clone(),
                                              "growth_tracker": self._growth.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if self.scale is not None and "loss_scale" in state:
            self.scale.copy_(state["loss_scale"])
            self._growth.copy_(state["growth_tracker"])

    # --- per step ------------------------------------------------------------------------------------------------
    def before_forward(self) -> None:
        """Keep a copy of the backbone's buffers (BatchNorm statistics move in the forward)."""
        if self._buffers:
            torch._foreach_copy_(self._saved, self._buffers)

    def _grads(self) -> list[torch.Tensor]:
        grads = []
        if self.zero_stage == 0:
            grads += [p.grad for p in self._params if p.grad is not None]
        for table in self.head_opt.tables:
            grads += table.pending_grads()
        grads += [p.grad for p in self.head_opt.dense if p.grad is not None]
        return grads

    @torch.no_grad()
    def agree(self, loss: torch.Tensor, stop: bool, checkpoint: bool) -> StepFlags:
        """The three flags, agreed over all ranks (one small all-reduce, one host sync)."""
        flags = self._flags
        flags.zero_()
        self._found.zero_()
        grads = [g for g in self._grads() if g.is_floating_point()]
        by_type: dict[tuple, list[torch.Tensor]] = {}
        for g in grads:
            by_type.setdefault((g.device, g.dtype), []).append(g)
        inv = self._one if self.scale is None else self.scale.double().reciprocal().float()
        for group in by_type.values():  # one dtype per fused call; a scale of 1 leaves the values as they are
            torch._amp_foreach_non_finite_check_and_unscale_(group, self._found, inv)
        flags[0] = torch.maximum(self._found[0], (~torch.isfinite(loss.detach().float())).float())
        if stop:
            flags[1].fill_(1.0)
        if checkpoint:
            flags[2].fill_(1.0)
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if self.scale is not None:  # GradScaler's rule, on the device, from the agreed flag
            self.overflow_scale = self.scale.clone()
            torch._amp_update_scale_(self.scale, self._growth, flags[0:1], 2.0, 0.5, self.growth_interval)
        nonfinite, stop_all, ckpt_all = flags.tolist()  # the step's host sync
        return StepFlags(nonfinite > 0, stop_all > 0, ckpt_all > 0)

    def apply(self, flags: StepFlags) -> bool:
        """Step the backbone and the head, or skip the step; True when the step was applied."""
        if flags.nonfinite:
            self._skip_backbone()
            self._undo()
            return False
        if self.clip:
            grads = [p for p in self._params if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.clip, foreach=True)
        self.engine.step()
        if not self.engine.was_step_applied():  # ZeRO >= 1: DeepSpeed found non-finite partitions
            self._undo()
            return False
        self.head_opt.step()
        self.head_opt.zero_grad()
        self.txn.commit()
        self.consecutive = 0
        return True

    def _skip_backbone(self) -> None:
        if self.zero_stage == 0:
            self.engine.zero_grad()
            return
        # ZeRO >= 1: DeepSpeed's overflow path drops the partitioned gradients without touching weights or momentum.
        opt = self.engine.optimizer
        opt.has_overflow = lambda *args, **kwargs: True
        try:
            self.engine.step()
        finally:
            del opt.has_overflow

    def _undo(self) -> None:
        self.head_opt.zero_grad()
        self.txn.rollback()
        if self._buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._saved)
        self.skipped_total += 1
        if self.scale is None or float(self.overflow_scale) < 1.0:  # fp16: an overflow lowers S; not an error yet
            self.consecutive += 1

    def check_consecutive(self, where: str, batch_keys) -> None:
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} non-finite steps in a row (train.max_nonfinite_steps={self.max_consecutive}), "
                f"the last at {where}; record keys of this rank's last batch: {batch_keys}. Nothing of these steps "
                f"was applied or saved: the newest checkpoint is finite. Lower optim.lr / raise "
                f"schedule.warmup_epochs, or check those records (python -m data.tools.inspect ROOT --decode)")
