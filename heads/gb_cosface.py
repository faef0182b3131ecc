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

No host sync: the first-batch initialisation is a torch.where on the ``p_v_started`` flag (p_v and the flag are
written every training step, the same values when already started), and rank_mean(v_mean) is one scalar
all-reduce shared by the initialisation and the EMA. Value and gradients are computed in the forward
(heads/blocks.py): c_p and c_n are [N] functions of the cosines, dL/dcos = dL/dc_n softmax_{j != y}(s cos_ij) and,
at the target, dL/dc_p.
"""
from __future__ import annotations

import torch
from torch import Tensor

from heads.blocks import (
    needs_grad,
    put_targets,
    row_max,
    stabiliser,
    take_targets,
    target_columns,
    top1_correct,
    with_gradients,
)
from heads.comm import all_reduce_sum_, rank_mean
from heads.journal import Journaled
from heads.margins import target_mask
from heads.partial_fc import ClassScores, PartialFC, ShardBatch
from heads.precision import matmul_precision_of
from heads.stats import collects_stats


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
        block = scores.block(matmul_precision_of(self))
        n, k = block.shape
        cos = block.cos
        owned, tcol = target_columns(target)
        need = needs_grad(block.u, block.w)
        with torch.no_grad():
            accuracy = top1_correct(cos, owned, tcol).to(cos.dtype).mean() if collects_stats(self) else None
            filtered = None
            if self.interclass_filtering_threshold > 0 and k:
                filtered = (cos > self.interclass_filtering_threshold) & ~target_mask(cos, target)
            z = cos * s                                                  # the negatives: s cos, targets -inf
            if filtered is not None:
                z.masked_fill_(filtered, 0.0)
            put_targets(z, tcol, owned, float("-inf"))
            mx = stabiliser(row_max(z))
            e = z.sub_(mx.unsqueeze(1)).exp_()
            total, c_p = all_reduce_sum_(torch.stack([e.sum(1), torch.where(owned, take_targets(cos, tcol), 0.0)],
                                                     1)).unbind(1)
            c_n = (mx + torch.log(total)) / s                            # (1/s) logsumexp_{j != y}(s cos_j), global
            v = (c_p + c_n) / 2
            v_mean = v.mean()
        if self.training:
            v_bar = rank_mean(v_mean)
            with torch.no_grad():  # the first training batch sets p_v to mean(v)
                self.journal(self.p_v)
                self.journal(self.p_v_started)
                self.p_v.copy_(torch.where(self.p_v_started, self.p_v, v_bar.to(self.p_v.dtype)))
                self.p_v_started.fill_(True)
            p_v = self.p_v.clamp(self.pv_low, self.pv_high)
        else:
            p_v = torch.where(self.p_v_started, self.p_v, v_mean.to(self.p_v.dtype)).clamp(self.pv_low, self.pv_high)
        with torch.no_grad():
            v_hat = v + self.alpha * (p_v.to(v.dtype) - v)
            a = 2 * s * (v_hat - (c_p - m))
            b = 2 * s * (c_n - (v_hat - m))
            loss = 0.5 * softplus_exact(a).mean() + 0.5 * softplus_exact(b).mean()
            if need:
                d_cp = -s * torch.sigmoid(a) / n                         # dL/dc_p
                d_cn = s * torch.sigmoid(b) / n                          # dL/dc_n
                G = e.mul_((d_cn / total).unsqueeze(1))                  # dc_n/dcos_ij = softmax_{j != y}
                if filtered is not None:
                    G.masked_fill_(filtered, 0.0)
                put_targets(G, tcol, owned, d_cp)                        # dc_p/dcos_iy = 1
                del cos, e, z, filtered  # the block's cosines are freed by column_dots
                grad_u, grad_w = block.gradients(G, block.column_dots(G))
        if need:
            loss = with_gradients(loss, [(block.u, grad_u), (block.w, grad_w)])
        if self.training:
            with torch.no_grad():
                self.journal(self.p_v)
                self.p_v.copy_((1.0 - self.pv_momentum) * p_v + self.pv_momentum * v_bar.to(p_v.dtype))
        logs = self.score_logs(scores, accuracy)
        logs["p_v"] = p_v.detach().clone()
        return loss, logs

    @property
    def margin_value(self) -> float:
        """GB-CosFace's m (a CosFace-style margin: the configured margin's m3)."""
        return float(self.margin.m3)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, alpha={self.alpha}, pv_momentum={self.pv_momentum}, "
                f"pv_clamp=({self.pv_low}, {self.pv_high})")
