"""The embedded loss: a sample-to-class head + a sample-to-sample memory term, with weights and a start epoch.

UniTSFace = CosFace(s=64, m=0.4) + USS(s=64, m=0.1), summed (the code sums; the paper text says "average"), USS
from epoch 1 while the memory fills during epoch 0. EPL = CosFace + prototype term from epoch 3, averaged (the mean
over the 2N rows [CosFace rows; prototype rows] = 1/2 (CosFace + EPL)). One step:

    batch   = s2c.gather(x_local, labels_local)                 X, Y of all ranks (heads/comm.py)
    s2s.before_loss(batch)                                      training: EPL's prototype update
    scores  = s2c.score(batch)                                  sampled classes S, cosines to their centres
    before the start epoch:  loss = L_s2c
    from the start epoch:    loss = w_c L_s2c + w_s L_s2s        (combine "sum")
                             loss = (w_c L_s2c + w_s L_s2s) / (w_c + w_s)   (combine "mean")
    s2s.after_loss(batch)                                       training: the latest-feature memory write

Both terms see the same sampled classes S (the memory rows of S: positives are always sampled, so every sample
meets its own class). With w_c = 0 the centres are not scored once the s2s term runs (UniTSFace's "USS alone"
ablation: the s2c loss in epoch 0 only). Every quantity is global, identical on every rank. ``memory_filled`` (the
fraction of rows written: a class-sized pass and an all-reduce) is logged on statistics steps only (heads/stats.py).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from heads.comm import all_reduce_sum_
from heads.partial_fc import PartialFC, no_autocast
from heads.partition import ClassPartition
from heads.sample_to_sample import MemoryTerm
from heads.stats import collects_stats

COMBINE = ("sum", "mean")


class EmbeddedLoss(nn.Module):
    """A heads/protocol.py Head: ``forward(x_local, labels_local) -> (loss, logs)``; ``set_epoch(epoch)`` at each
    epoch start switches the memory term on from its start epoch."""

    def __init__(self, s2c: PartialFC, s2s: MemoryTerm, s2c_weight: float = 1.0, s2s_weight: float = 1.0,
                 start_epoch: int = 1, combine: str = "sum") -> None:
        super().__init__()
        if combine not in COMBINE:
            raise ValueError(f"EmbeddedLoss: combine must be one of {COMBINE}, got {combine!r}")
        if combine == "mean" and s2c_weight + s2s_weight <= 0:
            raise ValueError("EmbeddedLoss: combine 'mean' needs s2c_weight + s2s_weight > 0")
        self.s2c, self.s2s = s2c, s2s
        self.s2c_weight, self.s2s_weight = float(s2c_weight), float(s2s_weight)
        self.start_epoch, self.combine = int(start_epoch), combine
        self.epoch = 0

    @property
    def partition(self) -> ClassPartition:
        return self.s2c.partition

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def s2s_active(self) -> bool:
        return self.epoch >= self.start_epoch

    def per_class_buffers(self) -> list[str]:
        return [f"s2c.{n}" for n in self.s2c.per_class_buffers()] + [f"s2s.{n}" for n in self.s2s.per_class_buffers()]

    def learned_thresholds(self) -> dict[str, float]:
        return {**self.s2c.learned_thresholds(), **self.s2s.learned_thresholds()}

    @torch.no_grad()
    def memory_filled(self, like: Tensor) -> Tensor:
        """Fraction of all classes whose memory row / prototype is written (global)."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        count = self.s2s.memory.filled().to(device=like.device, dtype=dtype).reshape(1)
        return all_reduce_sum_(count)[0] / self.partition.num_classes

    def forward(self, x_local: Tensor, labels_local: Tensor) -> tuple[Tensor, dict]:
        with no_autocast(x_local.device):
            batch = self.s2c.gather(x_local, labels_local)
            if self.training:
                self.s2s.before_loss(batch)
            active = self.s2s_active
            with_s2c = not active or self.s2c_weight != 0.0
            scores = self.s2c.score(batch, with_cosines=with_s2c)
            logs: dict = {}
            if with_s2c:
                loss_c, logs = self.s2c.criterion(batch, scores)
            if active:
                loss_s, logs_s = self.s2s.loss(batch, scores)
                loss = self.s2s_weight * loss_s
                if with_s2c:
                    loss = loss + self.s2c_weight * loss_c
                    logs["loss_s2c"] = loss_c.detach()
                if self.combine == "mean":
                    loss = loss / (self.s2c_weight + self.s2s_weight)
                logs.update(logs_s)
                logs["loss_s2s"] = loss_s.detach()
            else:
                loss = loss_c
            if self.training:
                self.s2s.after_loss(batch)
            if collects_stats(self):
                logs["memory_filled"] = self.memory_filled(batch.X)
            return loss, logs

    def extra_repr(self) -> str:
        return (f"s2c_weight={self.s2c_weight}, s2s_weight={self.s2s_weight}, start_epoch={self.start_epoch}, "
                f"combine={self.combine!r}")
