"""The memory terms' [N, K] block, value and gradients computed together in the forward.

A memory term (heads/sample_to_sample.py, heads/epl.py) scores the gathered batch against K memory rows that take no
gradient, and its loss is a scalar. So dL/dz of every entry of the [N, K] block is known as soon as the value is,
and the block's only use in a backward would be one matmul, dL/du = s * (dL/dz @ R). Doing that matmul in the
forward and keeping only its [N, D] result:

* the block is made, used and freed inside the forward: one [N, K] buffer updated in place, ~4 elementwise passes
  instead of the ~12 an autograd graph over the formulas makes (and no [N, K] tensors held until the backward);
* the rows are not saved for a backward, so the memory can be written right after the forward with no copy.

``with_gradients`` ties the value to its precomputed gradients (backward = upstream gradient x stored gradient), so
to autograd the term is an ordinary differentiable scalar. Gradient convention (DESIGN.md, heads/comm.py): each
rank's gradients are the parts of its own columns — what autograd through the plain formulas gives — and the tests
check them against float64 references on 1-4 ranks.

Notation: u [N, D] unit embeddings (normalised by the caller, with autograd), R [K, D] unit memory rows of this
rank's sampled classes, valid [K] the rows ever written, target [N] the column of each sample's own class (-1: on
another rank), s the scale, cos = u R^T.

    bce_sum        this shard's  sum_i softplus(-(s (cos_iy - m) - b_y)) + sum_{i, j != y_i} softplus(s cos_ij - b_j)
                   over written columns; b one scalar or one per column. With ``clamp``: each softplus argument is
                   clamped to [-clamp, clamp] first (the official code), which zeroes the gradient of the clamped
                   terms. ``bias`` may be a function of the data-driven bias (below) that returns the bias to use:
                   USS / s2s-BCE initialise b from the data when it is <= 0, without a host sync.
    negatives_lse  mean_i logsumexp_{j != y_i}(s cos_ij) over the written columns of all ranks (rows without any
                   such column left out), and whether any row had one: UniTSFace's data-driven bias.
    softmax_mean   mean over the samples whose positive row is written (on any rank) of -log softmax_j(z_i)_y,
                   z_ij = s cos_ij, z_iy = s margin(cos_iy), over the written columns of all ranks.

Margins here are additive (the target's value moves, its derivative stays 1): CosFace-style cos - m, and EPL's
cos - k sg(cos). Both functions need the rows to be unit vectors (the memories keep them so: heads/memory.py).

No host sync (heads/blocks.py): targets by gather / scatter, unwritten columns masked every step, the clamp's
masks always built, "no written positive anywhere" handled by a clamped denominator. The two products run in the
head's matmul precision (heads/precision.py).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from heads.blocks import (
    bias_gradient,
    clamp_arguments,
    global_logsumexp_of,
    needs_grad,
    put_targets,
    row_max,
    stabiliser,
    sum_chunked,
    take_targets,
    target_bias,
    target_columns,
    with_gradients,
)
from heads.comm import all_reduce_sum_
from heads.precision import matmul

__all__ = ["bce_sum", "softmax_mean", "negatives_lse", "with_gradients"]

BiasFromData = Callable[[Tensor, Tensor], Tensor]
"""(data-driven bias: 0-dim, whether it exists: 0-dim bool) -> the bias to use in this step."""


def negatives_lse(z: Tensor) -> tuple[Tensor, Tensor]:
    """(mean over rows of the global logsumexp of ``z``'s finite entries, whether any row has one); no sync.

    ``z`` [N, K]: s cos with the positives and unwritten columns at -inf (this rank's columns). Global, identical on
    every rank.
    """
    n, k = z.shape
    if k == 0:
        local = z.new_full((n,), float("-inf"))
    else:  # by row blocks: logsumexp's temporary is a slice of the block
        rows = max(1, (1 << 22) // k)
        local = torch.cat([torch.logsumexp(z[i:i + rows], 1) for i in range(0, n, rows)])
    lse = global_logsumexp_of(local)
    finite = torch.isfinite(lse)
    count = finite.sum()
    return torch.where(finite, lse, 0.0).sum() / count.clamp_min(1), count > 0


def _mask_negatives(z: Tensor, tcol: Tensor, owned: Tensor, valid: Tensor) -> None:
    """Positives and unwritten columns to -inf (softplus and sigmoid of -inf are 0: no term, no gradient)."""
    put_targets(z, tcol, owned, float("-inf"))
    z.masked_fill_(~valid.unsqueeze(0), float("-inf"))


def bce_sum(u: Tensor, rows: Tensor, valid: Tensor, target: Tensor, scale: float, margin: float,
            bias: Tensor | BiasFromData, clamp: float | None = None, precision: str = "fp32") -> Tensor:
    """This shard's part of the sample-to-sample BCE sum (see the module docstring): 0-dim, gradients to u, bias.

    bias: 0-dim (one unified b) or [K] (b_j per column, e.g. a leaf of the sampled rows of per-class biases), or a
    function ``bias(data_bias, exists) -> that tensor`` called once the block's data-driven bias is known.
    """
    n, k = u.shape[0], rows.shape[0]
    with torch.no_grad():
        ud = u.detach()
        owned, tcol = target_columns(target)
        z = matmul(ud, rows.T, precision) if k else ud.new_zeros(n, 0)
        cos_y = take_targets(z, tcol)
        written = owned & (valid[tcol] if k else torch.zeros_like(owned))  # positives whose row is written
        z.mul_(scale)                                                      # s cos
        _mask_negatives(z, tcol, owned, valid)
        if callable(bias):
            bias = bias(*negatives_lse(z))
    need_grad = needs_grad(u, bias)
    with torch.no_grad():
        b = bias.detach().to(ud.dtype)
        b_y = target_bias(b, n, k, tcol)
        z.sub_(b if b.ndim == 0 else b.unsqueeze(0))                     # negatives: s cos_ij - b_j
        zp = b_y - scale * (cos_y - margin)                               # positives: -(s (cos_y - m) - b_y)
        outside = inside = None
        if clamp is not None:
            outside, inside, zp = clamp_arguments(z, zp, clamp)
            _mask_negatives(z, tcol, owned, valid)                         # the clamp lifted -inf to -clamp
        total = sum_chunked(F.softplus, z) + torch.where(written, F.softplus(zp), 0.0).sum()
        if not need_grad:
            return total

        g = z.sigmoid_()                                        # dL/dz of the negatives (0 at -inf)
        if outside is not None:
            g.masked_fill_(outside, 0.0)
        gp = torch.where(written, torch.sigmoid(zp), 0.0)       # dL/dzp of the positives
        if inside is not None:
            gp = gp * inside
        # z_ij = s cos_ij - b_j:  dL/dcos_ij = s g_ij, dL/db_j = -g_ij
        # zp_i = b_y - s(cos_iy - m):  dL/dcos_iy = -s gp_i, dL/db_y = gp_i
        grad_b = bias_gradient(g, gp, b, tcol, k)
        grad_u = matmul(g, rows, precision) if k else torch.zeros_like(ud)
        if k:
            grad_u.addcmul_(rows[tcol], gp.unsqueeze(1), value=-1.0)
        grad_u.mul_(scale)
    return with_gradients(total, [(u, grad_u), (bias, grad_b)])


def softmax_mean(u: Tensor, rows: Tensor, valid: Tensor, target: Tensor, scale: float,
                 margin: Callable[[Tensor], Tensor], precision: str = "fp32") -> Tensor:
    """Softmax cross-entropy over the memory columns of all ranks (see the module docstring): 0-dim, global.

    ``margin(cos_y)`` gives the target cosine's value; its derivative is taken as 1 (additive margins only).
    Averaged over the samples whose positive row is written on its owner; 0 when there is none.
    """
    n, k = u.shape[0], rows.shape[0]
    need_grad = needs_grad(u)
    with torch.no_grad():
        ud = u.detach()
        owned, tcol = target_columns(target)
        z = matmul(ud, rows.T, precision) if k else ud.new_zeros(n, 0)
        z_y = scale * margin(take_targets(z, tcol))
        z.mul_(scale)
        put_targets(z, tcol, owned, z_y)
        z.masked_fill_(~valid.unsqueeze(0), float("-inf"))
        m = stabiliser(row_max(z))
        e = z.sub_(m.unsqueeze(1)).exp_()
        # one all-reduce: per row the sum of exp, the target logit (its owner's), whether the positive is written
        written = owned & (valid[tcol] if k else torch.zeros_like(owned))
        parts = torch.stack([e.sum(1), torch.where(owned, z_y, 0.0), written.to(z.dtype)], 1)
        total, target_logit, keep = all_reduce_sum_(parts).unbind(1)
        keep = keep > 0
        n_keep = keep.sum().clamp_min(1).to(z.dtype)             # no kept sample: every term below is 0
        per_sample = m + torch.log(total) - target_logit
        loss = torch.where(keep, per_sample, 0.0).sum() / n_keep
        if not need_grad:
            return loss
        # dL/dz_ij = (softmax_ij - [j = y_i]) / n_keep on the kept rows, 0 elsewhere
        g = e.mul_(torch.where(keep, 1.0 / (n_keep * total), 0.0).unsqueeze(1))
        put_targets(g, tcol, owned, take_targets(g, tcol) - keep.to(g.dtype) / n_keep)
        grad_u = matmul(g, rows, precision).mul_(scale) if k else torch.zeros_like(ud)
    return with_gradients(loss, [(u, grad_u)])
