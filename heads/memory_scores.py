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
                   terms (masks are built only when some argument lies outside).
    softmax_mean   mean over the samples whose positive row is written (on any rank) of -log softmax_j(z_i)_y,
                   z_ij = s cos_ij, z_iy = s margin(cos_iy), over the written columns of all ranks.

Margins here are additive (the target's value moves, its derivative stays 1): CosFace-style cos - m, and EPL's
cos - k sg(cos). Both functions need the rows to be unit vectors (the memories keep them so: heads/memory.py).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from heads.comm import all_reduce_sum_, global_max
from heads.margins import target_positions


class _WithGradients(torch.autograd.Function):
    """``value`` (0-dim) whose gradients w.r.t. ``inputs`` were computed with it: backward = g * stored gradient."""

    @staticmethod
    def forward(ctx, value: Tensor, *pairs: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(*pairs[1::2])
        return value.detach().clone()

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        out: list[Tensor | None] = [None]
        for grad in ctx.saved_tensors:
            out += [grad * g.to(grad.dtype), None]
        return tuple(out)


def with_gradients(value: Tensor, pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``value`` as a differentiable scalar of the inputs of ``pairs`` [(input, d value / d input)].

    Inputs that do not require a gradient are left out; with none left, the plain value is returned.
    """
    flat = [t for inp, grad in pairs if inp.requires_grad for t in (inp, grad.to(inp.dtype))]
    if not flat:
        return value
    return _WithGradients.apply(value, *flat)


def _needs_grad(*inputs: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def bce_sum(u: Tensor, rows: Tensor, valid: Tensor, target: Tensor, scale: float, margin: float, bias: Tensor,
            clamp: float | None = None) -> Tensor:
    """This shard's part of the sample-to-sample BCE sum (see the module docstring): 0-dim, gradients to u, bias.

    bias: 0-dim (one unified b) or [K] (b_j per column, e.g. a leaf of the sampled rows of per-class biases).
    """
    n, k = u.shape[0], rows.shape[0]
    need_grad = _needs_grad(u, bias)
    with torch.no_grad():
        ud = u.detach()
        b = bias.detach().to(ud.dtype)
        pos_rows, pos_cols = target_positions(target)
        written = valid[pos_cols]
        pr, pc = pos_rows[written], pos_cols[written]            # positives whose row is written
        b_y = b if b.ndim == 0 else b[pc]

        # negatives: z = s cos - b_j for every entry; positives and unwritten columns are set to -inf below
        z = torch.addmm(-b if b.ndim == 0 else -b.unsqueeze(0), ud * scale, rows.T) if k else ud.new_zeros(n, 0)
        low = high = None
        if clamp is not None and z.numel():
            z_min, z_max = torch.aminmax(z)
            if bool(z_min < -clamp):
                low = z < -clamp
            if bool(z_max > clamp):
                high = z > clamp
            if low is not None or high is not None:
                z.clamp_(-clamp, clamp)
        z[pos_rows, pos_cols] = float("-inf")                   # softplus(-inf) = sigmoid(-inf) = 0: no term
        if not bool(valid.all()):
            z.masked_fill_(~valid, float("-inf"))
        total = F.softplus(z).sum()

        # positives: zp = -(s (cos_y - m) - b_y), N values
        cos_y = (ud[pr] * rows[pc]).sum(1)
        zp = b_y - scale * (cos_y - margin)
        inside = None
        if clamp is not None:
            inside = zp.abs() <= clamp
            zp = zp.clamp(-clamp, clamp)
        total = total + F.softplus(zp).sum()
        if not need_grad:
            return total

        g = z.sigmoid_()                                        # dL/dz of the negatives (0 at -inf)
        for mask in (low, high):
            if mask is not None:
                g.masked_fill_(mask, 0.0)
        gp = torch.sigmoid(zp)                                  # dL/dzp of the positives
        if inside is not None:
            gp = gp * inside
        # z_ij = s cos_ij - b_j:  dL/dcos_ij = s g_ij, dL/db_j = -g_ij
        # zp_i = b_y - s(cos_iy - m):  dL/dcos_iy = -s gp_i, dL/db_y = gp_i
        grad_u = torch.mm(g, rows) if k else torch.zeros_like(ud)
        grad_u.index_add_(0, pr, rows[pc] * (-gp).unsqueeze(1))
        grad_u.mul_(scale)
        if b.ndim == 0:
            grad_b = gp.sum() - g.sum()
        else:
            grad_b = g.sum(0).neg_().index_add_(0, pc, gp)
    return with_gradients(total, [(u, grad_u), (bias, grad_b)])


def softmax_mean(u: Tensor, rows: Tensor, valid: Tensor, target: Tensor, scale: float,
                 margin: Callable[[Tensor], Tensor]) -> Tensor:
    """Softmax cross-entropy over the memory columns of all ranks (see the module docstring): 0-dim, global.

    ``margin(cos_y)`` gives the target cosine's value; its derivative is taken as 1 (additive margins only).
    Averaged over the samples whose positive row is written on its owner; 0 when there is none.
    """
    n, k = u.shape[0], rows.shape[0]
    need_grad = _needs_grad(u)
    with torch.no_grad():
        ud = u.detach()
        z = torch.mm(ud * scale, rows.T) if k else ud.new_zeros(n, 0)
        pr, pc = target_positions(target)
        z_y = scale * margin((ud[pr] * rows[pc]).sum(1))
        z[pr, pc] = z_y
        if not bool(valid.all()):
            z.masked_fill_(~valid, float("-inf"))
        m = global_max(z.amax(1) if k else torch.full((n,), float("-inf"), dtype=z.dtype, device=z.device))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows of only -inf: no NaN
        e = z.sub_(m.unsqueeze(1)).exp_()
        # one all-reduce: per row the sum of exp, the target logit (its owner's), whether the positive is written
        parts = torch.zeros(n, 3, dtype=z.dtype, device=z.device)
        parts[:, 0] = e.sum(1)
        parts[pr, 1] = z_y
        parts[pr, 2] = valid[pc].to(z.dtype)
        all_reduce_sum_(parts)
        total, target_logit, keep = parts[:, 0], parts[:, 1], parts[:, 2] > 0
        n_keep = keep.sum()
    if not bool(n_keep > 0):
        return with_gradients(ud.new_zeros(()), [(u, torch.zeros_like(ud))])
    with torch.no_grad():
        per_sample = m + torch.log(total) - target_logit
        loss = torch.where(keep, per_sample, torch.zeros_like(per_sample)).sum() / n_keep
        if not need_grad:
            return loss
        # dL/dz_ij = (softmax_ij - [j = y_i]) / n_keep on the kept rows, 0 elsewhere
        row_factor = torch.where(keep, 1.0 / (n_keep * total), torch.zeros_like(total))
        g = e.mul_(row_factor.unsqueeze(1))
        g[pr, pc] -= keep[pr].to(g.dtype) / n_keep
        grad_u = torch.mm(g, rows).mul_(scale) if k else torch.zeros_like(ud)
    return with_gradients(loss, [(u, grad_u)])
