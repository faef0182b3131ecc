"""GB-CosFace (aliyun code), class-sharded: a global boundary p_v between positive and negative similarities.

Per sample of the gathered batch, over the sampled classes of all ranks:

    c_p = cos_y
    c_n = (1/s) logsumexp_{j != y}(s cos_j)          smooth max over ALL negatives: a distributed logsumexp
    v   = sg((c_p + c_n) / 2)
    v^  = v + alpha (clamp(p_v, lo, hi) - v)
    L   = 1/2 mean softplus(2s (v^ - (c_p - m)))  +  1/2 mean softplus(2s (c_n - (v^ - m)))

p_v is a buffer (not a parameter): the first training batch sets it to mean(v); after each training step
p_v <- (1 - rate) clamp(p_v) + rate mean(v) (the clamped value is written back, as the official code does), then
the mean over ranks. v is a function of the global batch, so p_v is the same on every rank by construction.
With alpha = 0 the loss equals CosFace(s, 2m) in value and gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

from heads.comm import rank_mean
from heads.dist_softmax import dist_logsumexp_nontarget, dist_target_logit
from heads.journal import Journaled
from heads.margins import interclass_filter, target_mask
from heads.partial_fc import ClassScores, PartialFC, ShardBatch


def softplus_exact(z: Tensor) -> Tensor:
    """log(1 + e^z) without torch.softplus's linear cut above 20 (N values only: the exact form costs nothing)."""
    return torch.logaddexp(z, torch.zeros((), dtype=z.dtype, device=z.device))


class GBCosFace(Journaled, PartialFC):
    """Partial-FC centres + GB-CosFace. Extra arguments: alpha, pv_momentum (EMA rate), pv_clamp (lo, hi)."""

    def __init__(self, *args, alpha: float = 0.15, pv_momentum: float = 0.01,
                 pv_clamp: tuple[float, float] = (0.5, 0.7), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.alpha, self.pv_momentum = float(alpha), float(pv_momentum)
        self.pv_low, self.pv_high = (float(v) for v in pv_clamp)
        self.register_buffer("p_v", torch.zeros(()))
        self.register_buffer("p_v_started", torch.zeros((), dtype=torch.bool))

    def learned_thresholds(self) -> dict[str, float]:
        return {"p_v": float(self.p_v.clamp(self.pv_low, self.pv_high))} if bool(self.p_v_started) else {}

    def criterion(self, batch: ShardBatch, scores: ClassScores) -> tuple[Tensor, dict]:
        s, m, target = self.scale, self.margin_value, scores.target
        cos = interclass_filter(scores.cos, target_mask(scores.cos, target), self.interclass_filtering_threshold)
        c_p = dist_target_logit(cos, target)
        c_n = dist_logsumexp_nontarget(s * cos, target) / s
        v = ((c_p + c_n) / 2).detach()
        v_mean = v.mean()
        update = self.training
        if update and not bool(self.p_v_started):
            with torch.no_grad():
                self.journal(self.p_v)
                self.journal(self.p_v_started)
                self.p_v.copy_(rank_mean(v_mean))
                self.p_v_started.fill_(True)
        p_v = self.p_v.clamp(self.pv_low, self.pv_high) if bool(self.p_v_started) else \
            v_mean.clamp(self.pv_low, self.pv_high)
        v_hat = v + self.alpha * (p_v.to(v.dtype) - v)
        loss = 0.5 * softplus_exact(2 * s * (v_hat - (c_p - m))).mean() + \
            0.5 * softplus_exact(2 * s * (c_n - (v_hat - m))).mean()
        if update:
            with torch.no_grad():
                self.journal(self.p_v)
                self.p_v.copy_(rank_mean((1.0 - self.pv_momentum) * p_v + self.pv_momentum * v_mean))
        logs = self.score_logs(scores)
        logs["p_v"] = p_v.detach().clone()
        return loss, logs

    @property
    def margin_value(self) -> float:
        """GB-CosFace's m (a CosFace-style margin: the configured margin's m3)."""
        return float(self.margin.m3)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, alpha={self.alpha}, pv_momentum={self.pv_momentum}, "
                f"pv_clamp=({self.pv_low}, {self.pv_high})")
