"""UCE / uniform BCE (UniFace, "Rediscovering BCE Loss for Uniform Classification"), class-sharded.

Per sample, over the sampled classes of all ranks (z = s * cosine with the target margin, heads/margins.py):

    softplus(-(z_y - b)) + l * sum_{j != y} softplus(z_j - b)          summed over classes, averaged over samples

b is ONE learnable scalar (t = b/s, the unified threshold), initialised to log(10 * C * r) (r = sample rate), or,
"diverse", one bias per class (b_y for the positive, b_j for each negative), sharded with the centres. A plain sum
over classes: each rank adds its own columns, no cross-shard normaliser; only b's gradient is reduced over ranks
(heads/optim.py). The official code clamps each softplus argument to [-s, s] (``clamp``, on by default).

Value and gradients are computed together in the forward (heads/blocks.py), without a host sync; the logs carry b
and t = b / s (the mean class bias over all ranks for "diverse": an all-reduce, on statistics steps only).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.blocks import (
    CosineBlock,
    bias_gradient,
    clamp_arguments,
    margin_and_slope,
    needs_grad,
    put_targets,
    sum_chunked,
    take_targets,
    target_bias,
    target_columns,
    top1_correct,
    with_gradients,
)
from heads.comm import all_reduce_sum_
from heads.margins import TargetMargin, target_mask
from heads.partial_fc import ClassScores, PartialFC, ShardBatch
from heads.precision import matmul_precision_of
from heads.rows import ClassBias
from heads.stats import collects_stats


def default_bias(num_classes: int, sample_rate: float) -> float:
    """UniFace's initial b: log(10 * C * r) (at least log 10: r = 0 samples the positives only)."""
    return math.log(10.0 * max(num_classes * sample_rate, 1.0))


def uniform_bce(block: CosineBlock, target: Tensor, margin: TargetMargin, scale: float, bias: Tensor,
                num_samples: int, neg_weight: float = 1.0, clamp: float | None = None, filter_threshold: float = 0.0,
                with_accuracy: bool = False) -> tuple[Tensor, Tensor | None]:
    """(the global loss: the class sums of all ranks / num_samples, top-1 accuracy or None), no host sync.

    This rank's sum: sum_i [ softplus(-(s m(cos_iy) - b_y)) + l * sum_{j != y} softplus(s cos_ij - b_j) ], every
    argument clamped to [-clamp, clamp] first when ``clamp`` is given (no gradient through a clamped term); bias 0-dim
    (one b) or [K] (b_j of each column); non-target cosines above ``filter_threshold`` (when > 0) set to 0 without
    gradient. Two [N, K] buffers (cos; z -> dL/dcos), plus boolean masks for the clamp and the filter.
    """
    n, k = block.shape
    cos = block.cos
    owned, tcol = target_columns(target)
    need = needs_grad(block.u, block.w, bias)
    with torch.no_grad():
        accuracy = top1_correct(cos, owned, tcol).to(cos.dtype).mean() if with_accuracy else None
        b = bias.detach().to(cos.dtype)
        margin_y, slope = margin_and_slope(margin, take_targets(cos, tcol), need)
        b_y = target_bias(b, n, k, tcol)
        zp = b_y - scale * margin_y                                   # the positive's argument (N values)
        z = cos * scale
        filtered = None
        if filter_threshold > 0 and k:
            filtered = (cos > filter_threshold) & ~target_mask(cos, target)
            z.masked_fill_(filtered, 0.0)
        z.sub_(b)                                                    # s cos_ij - b_j
        outside = None
        if clamp is not None:
            outside, inside_p, zp = clamp_arguments(z, zp, clamp)
        put_targets(z, tcol, owned, float("-inf"))                   # the positive's term is taken apart
        local = neg_weight * sum_chunked(F.softplus, z) + torch.where(owned, F.softplus(zp), 0.0).sum()
        loss = all_reduce_sum_(local.reshape(1))[0] / num_samples
        if not need:
            return loss, accuracy
        # z_ij = s cos_ij - b_j: dL/dz = l sigmoid(z) / N (0 where clamped);  zp_i = b_y - s m(cos_y): sigmoid(zp) / N
        G = z.sigmoid_()
        if outside is not None:
            G.masked_fill_(outside, 0.0)
        G.mul_(neg_weight / num_samples)
        gp = torch.where(owned, torch.sigmoid(zp), 0.0) / num_samples
        if clamp is not None:
            gp = gp * inside_p
        grad_b = bias_gradient(G, gp, b, tcol, k) if bias.requires_grad else None
        G.mul_(scale)                                                # dL/dcos_ij = s dL/dz_ij
        if filtered is not None:
            G.masked_fill_(filtered, 0.0)
        put_targets(G, tcol, owned, -scale * slope * gp)             # dL/dcos_iy = -s m'(cos_y) dL/dzp_i
        del cos, z, outside, filtered  # the block's cosines are freed by column_dots
        grad_u, grad_w = block.gradients(G, block.column_dots(G))
    return with_gradients(loss, [(block.u, grad_u), (block.w, grad_w), (bias, grad_b)]), accuracy


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
        return self.class_bias.global_mean()

    def learned_thresholds(self) -> dict[str, float]:
        return {"t_uce": float(self.mean_bias()) / self.scale}

    def criterion(self, batch: ShardBatch, scores: ClassScores) -> tuple[Tensor, dict]:
        stats = collects_stats(self)
        if self.diverse:
            bias = self.class_bias.leaf_rows(scores.index, track=self.training and torch.is_grad_enabled())
        else:
            bias = self.bias
        loss, accuracy = uniform_bce(scores.block(matmul_precision_of(self)), scores.target, self.margin, self.scale,
                                     bias, batch.size, self.neg_weight, self.scale if self.clamp else None,
                                     self.interclass_filtering_threshold, with_accuracy=stats)
        logs = self.score_logs(scores, accuracy)
        if stats or not self.diverse:
            b = self.mean_bias()
            logs.update({"b_uce": b, "t_uce": b / self.scale})
        return loss, logs

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, neg_weight={self.neg_weight}, diverse={self.diverse}, "
                f"clamp={self.clamp}")
