"""The [N, K] block of a head, value and gradients computed together in the forward, with no host sync.

Every loss of this package is a scalar function of cosines between the N gathered embeddings and the K columns of
this rank (sampled centres, or memory rows), and its derivative w.r.t. every cosine is known as soon as its value is.
So each loss computes, in its forward and without autograd, the block of cosines, the loss, and G = dL/dcos [N, K];
the two products that turn G into gradients run right away, and the block is freed before the forward returns:

    cos  = (u @ w^T) * inv                    u [N, D] unit embeddings, w [K, D] rows, inv_j = 1 / max(|w_j|, eps)
    dL/du   = (G * inv) @ w
    dL/dw_j = inv_j (G^T u)_j - c_j inv_j^2 w_j,      c_j = sum_i G_ij cos_ij        (0 where |w_j| < eps)

``with_gradients(loss, [(input, gradient), ...])`` then ties the value to its gradients (backward = upstream
gradient x stored gradient), so to autograd each term is an ordinary differentiable scalar. Against autograd through
the formulas this makes one or two [N, K] buffers instead of six to nine (each elementwise step, its saved input and
its gradient), and nothing [N, K] is held from the forward to the backward. Gradient convention (DESIGN.md,
heads/comm.py): each rank's gradients are the parts of its own columns; the tests compare them to float64 references
on 1-4 ranks.

No host sync: targets are handled with fixed-size gathers and scatters (``owned`` = the sample's class is a column
here, ``tcol`` = its column, 0 where not owned, with the result masked by ``owned``), never with ``nonzero``, a
boolean index or an ``if`` on a tensor. The products run in the head's matmul precision (heads/precision.py).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from heads.comm import global_max, shard_sum
from heads.margins import NORM_EPS
from heads.precision import matmul


class _WithGradients(torch.autograd.Function):
    """``value`` (0-dim) whose gradients w.r.t. ``inputs`` were computed with it: backward = g * stored gradient.

    The stored gradients are kept as attributes (not saved tensors) and released by the backward, which scales them
    in place and hands them on: autograd can then keep them as the inputs' ``.grad`` without a copy. So one backward
    per forward (``retain_graph`` through a head loss is refused).
    """

    @staticmethod
    def forward(ctx, value: Tensor, *pairs: Tensor) -> Tensor:  # type: ignore[override]
        ctx.grads = list(pairs[1::2])
        return value.detach().clone()

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("a head loss was differentiated twice (retain_graph): its gradients were computed in "
                               "the forward and handed on by the first backward")
        ctx.grads = None
        out: list[Tensor | None] = [None]
        for grad in grads:
            out += [grad.mul_(g.to(grad.dtype)), None]
        return tuple(out)


def with_gradients(value: Tensor, pairs: list[tuple[Tensor, Tensor | None]]) -> Tensor:
    """``value`` as a differentiable scalar of the inputs of ``pairs`` [(input, d value / d input)].

    Inputs that do not require a gradient (or whose gradient is None) are left out; with none left, the plain value
    is returned.
    """
    flat = [t for inp, grad in pairs if inp.requires_grad and grad is not None for t in (inp, grad.to(inp.dtype))]
    if not flat or not torch.is_grad_enabled():
        return value
    return _WithGradients.apply(value, *flat)


def needs_grad(*inputs: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


# --- targets without a host sync ------------------------------------------------------------------------------------
def target_columns(target: Tensor) -> tuple[Tensor, Tensor]:
    """(owned [N] bool, tcol [N] long): whether the sample's class is a column here, and that column (0 if not)."""
    return target >= 0, target.clamp_min(0)


def take_targets(z: Tensor, tcol: Tensor) -> Tensor:
    """[N] z[i, tcol_i] (rows not owned give an arbitrary column's value: mask with ``owned``); zeros when K = 0."""
    if z.shape[1] == 0:
        return z.new_zeros(z.shape[0])
    return z.gather(1, tcol.unsqueeze(1)).squeeze(1)


def put_targets(z: Tensor, tcol: Tensor, owned: Tensor, values: Tensor | float) -> None:
    """z[i, tcol_i] = values_i for the owned rows, in place; the other rows keep their entries."""
    if z.shape[1] == 0:
        return
    index = tcol.unsqueeze(1)
    keep = z.gather(1, index).squeeze(1)
    if not isinstance(values, Tensor):
        values = torch.full_like(keep, values)
    z.scatter_(1, index, torch.where(owned, values.to(z.dtype), keep).unsqueeze(1))


def sum_chunked(fn: Callable[[Tensor], Tensor], z: Tensor, elements: int = 1 << 22) -> Tensor:
    """sum(fn(z)) over row blocks of about ``elements`` entries: fn's temporary is a slice, never [N, K]."""
    n, k = z.shape
    rows = max(1, elements // max(k, 1))
    if rows >= n:
        return fn(z).sum()
    total = z.new_zeros(())
    for start in range(0, n, rows):
        total = total + fn(z[start:start + rows]).sum()
    return total


def row_max(z: Tensor) -> Tensor:
    """[N] max over this rank's columns (-inf without columns)."""
    if z.shape[1] == 0:
        return z.new_full((z.shape[0],), float("-inf"))
    return z.amax(1)


def stabiliser(local_max: Tensor) -> Tensor:
    """Global row max for exp(z - m), 0 where it is not finite (rows of only -inf: no NaN)."""
    m = global_max(local_max)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def global_logsumexp_of(local_lse: Tensor) -> Tensor:
    """[N] log sum over ranks of exp(local_lse) (each rank's row logsumexp over its columns): global, stable."""
    m = stabiliser(local_lse)
    return m + torch.log(shard_sum(torch.exp(local_lse - m)))


# --- the cosine block -----------------------------------------------------------------------------------------------
class CosineBlock:
    """cos [N, K] of unit embeddings ``u`` against rows ``w``, and the products from dL/dcos to the gradients.

    ``u`` and ``w`` keep their autograd flags (the gradients go to them through ``with_gradients``); ``cos`` is a
    plain tensor the loss may overwrite once it has used it (``column_dots`` does).
    """

    def __init__(self, u: Tensor, w: Tensor, precision: str = "fp32", eps: float = NORM_EPS) -> None:
        self.u, self.w, self.precision = u, w, precision
        with torch.no_grad():
            ud, wd = u.detach(), w.detach()
            norm = wd.norm(dim=1)
            self.inv = 1.0 / norm.clamp_min(eps)
            self.above_eps = norm >= eps
            self.cos = matmul(ud, wd.T, precision).mul_(self.inv)

    @property
    def shape(self) -> tuple[int, int]:
        return self.cos.shape[0], self.cos.shape[1]

    def column_dots(self, G: Tensor) -> Tensor:
        """c_j = sum_i G_ij cos_ij [K]. Consumes ``cos`` (the block lets go of it: with no other reference left, its
        memory is free for the products that follow)."""
        cos, self.cos = self.cos, None
        return cos.mul_(G).sum(0)

    @torch.no_grad()
    def gradients(self, G: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """(dL/du, dL/dw) from G = dL/dcos (scaled in place) and c = column_dots(G); None where not required."""
        ud, wd = self.u.detach(), self.w.detach()
        G.mul_(self.inv)
        grad_u = matmul(G, wd, self.precision) if self.u.requires_grad else None
        grad_w = None
        if self.w.requires_grad:
            decay = c.mul_(self.inv).mul_(self.inv).mul_(self.above_eps)
            grad_w = matmul(G.T, ud, self.precision).addcmul_(wd, decay.unsqueeze(1), value=-1.0)
        return grad_u, grad_w


def top1_correct(cos: Tensor, owned: Tensor, tcol: Tensor) -> Tensor:
    """[N] bool: the target cosine is the largest over all classes of all ranks (ties count as correct)."""
    with torch.no_grad():
        target = shard_sum(torch.where(owned, take_targets(cos, tcol), 0.0))
        return target >= global_max(row_max(cos))


# --- BCE with a unified bias: the pieces its sample-to-class (heads/uce.py) and sample-to-sample
# (heads/memory_scores.py) forms share. Negatives z_ij = s cos_ij - b_j, positives zp_i = b_y - s (margin of cos_iy);
# b is one scalar, or one b_j per column of this rank.
def target_bias(b: Tensor, n: int, k: int, tcol: Tensor) -> Tensor:
    """b_y of every sample: the scalar b itself, or the bias of its own column (masked by ``owned`` later)."""
    return b if b.ndim == 0 else take_targets(b.unsqueeze(0).expand(n, k), tcol)


def clamp_arguments(z: Tensor, zp: Tensor, clamp: float) -> tuple[Tensor, Tensor, Tensor]:
    """Clamp the negatives' arguments ``z`` (in place) and the positives' ``zp`` to [-clamp, clamp], as the official
    codes do: (outside, where a negative was clamped; inside, where a positive was not; the clamped zp). Where an
    argument was clamped its gradient is 0."""
    outside = (z < -clamp).logical_or_(z > clamp)
    z.clamp_(-clamp, clamp)
    inside = zp.abs() <= clamp
    return outside, inside, zp.clamp(-clamp, clamp)


def bias_gradient(g: Tensor, gp: Tensor, b: Tensor, tcol: Tensor, k: int) -> Tensor:
    """dL/db from dL/dz of the negatives ``g`` [N, K] and dL/dzp of the positives ``gp`` [N]: dL/db_j = -sum_i g_ij
    (+ gp_i where column j is sample i's class); a scalar b sums both over everything."""
    if b.ndim == 0:
        return gp.sum() - g.sum()
    grad_b = g.sum(0).neg_()
    if k:
        grad_b.index_add_(0, tcol, gp)
    return grad_b


def margin_and_slope(margin: Callable[[Tensor], Tensor], cos_y: Tensor, slope: bool) -> tuple[Tensor, Tensor | None]:
    """(margin(cos_y), d margin / d cos_y) for N target cosines (the slope by autograd on these N values)."""
    with torch.enable_grad():
        c = cos_y.detach().requires_grad_(slope)
        value = margin(c)
        if not slope:
            return value.detach(), None
        if not value.requires_grad:
            return value.detach(), torch.zeros_like(c)
        (d,) = torch.autograd.grad(value, c, torch.ones_like(value))
    return value.detach(), d
