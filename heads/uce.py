"""UCE / uniform BCE (UniFace, "Rediscovering BCE Loss for Uniform Classification"), class-sharded.

Per sample, over the sampled classes of all ranks (z = s * cosine with the target margin, heads/margins.py):

    softplus(-(z_y - b)) + l * sum_{j != y} softplus(z_j - b)          summed over classes, averaged over samples

b is ONE learnable scalar (t = b/s, the unified threshold), initialised to log(10 * C * r) (r = sample rate), or,
"diverse", one bias per class (b_y for the positive, b_j for each negative), sharded with the centres. A plain sum
over classes: each rank adds its own columns, no cross-shard normaliser; only b's gradient is reduced over ranks
(heads/optim.py). The official code clamps each softplus argument to [-s, s] (``clamp``, on by default).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from heads.bce import bce_class_sum, global_bce_mean
from heads.comm import all_reduce_sum_
from heads.margins import interclass_filter, target_mask
from heads.partial_fc import ClassScores, PartialFC, ShardBatch
from heads.rows import ClassBias


def default_bias(num_classes: int, sample_rate: float) -> float:
    """UniFace's initial b: log(10 * C * r) (at least log 10: r = 0 samples the positives only)."""
    return math.log(10.0 * max(num_classes * sample_rate, 1.0))


class UniformBCE(PartialFC):
    """Partial-FC centres + uniform BCE. Extra arguments: neg_weight (l), bias_init (None = log(10 C r)),
    diverse (one bias per class), clamp (softplus arguments to [-s, s])."""

    def __init__(self, *args, neg_weight: float = 1.0, bias_init: float | None = None, diverse: bool = False,
                 clamp: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.neg_weight, self.diverse, self.clamp = float(neg_weight), bool(diverse), bool(clamp)
        init = default_bias(self.num_classes, self.sample_rate) if bias_init is None else float(bias_init)
        if self.diverse:
            self.class_bias = ClassBias(self.partition, init)
        else:
            self.bias = nn.Parameter(torch.tensor(init))

    def per_class_buffers(self) -> list[str]:
        extra = [f"class_bias.{n}" for n in self.class_bias.per_class_buffers()] if self.diverse else []
        return super().per_class_buffers() + extra

    @torch.no_grad()
    def mean_bias(self) -> Tensor:
        """b, or the mean class bias over all classes of all ranks (diverse)."""
        if not self.diverse:
            return self.bias.detach().clone()
        return all_reduce_sum_(self.class_bias.weight.sum().reshape(1))[0] / self.num_classes

    def learned_thresholds(self) -> dict[str, float]:
        return {"t_uce": float(self.mean_bias()) / self.scale}

    def criterion(self, batch: ShardBatch, scores: ClassScores) -> tuple[Tensor, dict]:
        cos = interclass_filter(scores.cos, target_mask(scores.cos, scores.target),
                                self.interclass_filtering_threshold) if self.interclass_filtering_threshold > 0 \
            else scores.cos
        if self.diverse:
            bias = self.class_bias.leaf_rows(scores.index, track=self.training and torch.is_grad_enabled())
        else:
            bias = self.bias
        local = bce_class_sum(cos, scores.target, self.margin, self.scale, bias, self.neg_weight,
                              self.scale if self.clamp else None)
        b = self.mean_bias()
        logs = self.score_logs(scores)
        logs.update({"b_uce": b, "t_uce": b / self.scale})
        return global_bce_mean(local, batch.size), logs

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, neg_weight={self.neg_weight}, diverse={self.diverse}, "
                f"clamp={self.clamp}")
