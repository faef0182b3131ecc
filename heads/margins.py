"""Margins on cosine logits, as small pure functions.

Notation: cos_j = <x/|x|, W_j/|W_j|>, y the target class, theta = arccos(cos_y), s the scale.

    softmax   s * cos_y
    CosFace   s * (cos_y - m)
    ArcFace   s * cos(theta + m)
    combined  s * (cos(m1*theta + m2) - m3)       ArcFace = (1, m, 0), CosFace = (1, 0, m)
    adaptive  s * (cos_y - k * sg(cos_y))         EPL's prototype margin: value s(1-k)cos_y, gradient of s*cos_y

The combined margin is implemented for ANY (m1, m2, m3). (arcface_torch implements only m1 = 1 and, when m3 > 0,
applies m3 alone, silently dropping m2; we never ignore a configured margin.) When m1 == 1 and m2 == 0 the formula
is evaluated as cos_y - m3 without the arccos round trip: the same value, exact gradient.

``straight_through=True`` gives arcface_torch's ArcFace behaviour: the margin's value is computed without gradient
and the gradient passes as if the target logit were s * cos_y.

Inter-class filtering (Partial FC, CVPR'22): non-target cosines above a threshold are set to 0 (no gradient); they
still contribute e^0 to the softmax denominator.

The target functions below return the unscaled target cosine; ``margin_logits`` applies filtering, the target
margin and the scale s to a whole [N, K] block of cosines. ``cosine`` and ``margin_logits`` are the autograd forms
(the dense-gradient baseline of the benchmarks, the tests); the heads compute their blocks, value and gradients
together and without a host sync, in heads/blocks.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

NORM_EPS = 1e-5
"""x / max(|x|, NORM_EPS): the one normalisation used by every head (UniTSFace/EPL's eps)."""


def normalize(x: Tensor, dim: int = -1, eps: float = NORM_EPS) -> Tensor:
    """x / max(||x||, eps) along ``dim``."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


class _ClampedArccos(torch.autograd.Function):
    """theta = arccos(clamp(c, -1, 1)) with a finite gradient at |c| = 1.

    d theta / dc = -1 / sqrt(max(1 - c^2, eps_dtype)) inside [-1, 1] (the true derivative wherever it is finite
    in that dtype), 0 outside (as for the clamp).
    """

    @staticmethod
    def forward(ctx, c: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(c)
        return torch.arccos(c.clamp(-1.0, 1.0))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (c,) = ctx.saved_tensors
        tiny = torch.finfo(c.dtype).eps
        inside = c.abs() <= 1.0
        slope = -torch.rsqrt((1.0 - c * c).clamp_min(tiny))
        return grad * torch.where(inside, slope, torch.zeros_like(slope))


def clamped_arccos(c: Tensor) -> Tensor:
    """arccos of c clamped to [-1, 1]; finite gradient everywhere."""
    return _ClampedArccos.apply(c)


def combined_margin(cos_y: Tensor, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0,
                    straight_through: bool = False) -> Tensor:
    """cos(m1 * theta_y + m2) - m3 for any (m1, m2, m3); unscaled.

    The formula is used as is: no "easy margin" and no correction where m1 * theta + m2 > pi (there the target
    logit stops decreasing with theta).
    """
    def value(c: Tensor) -> Tensor:
        if m1 == 1.0 and m2 == 0.0:
            return c - m3
        return torch.cos(m1 * clamped_arccos(c) + m2) - m3

    if not straight_through:
        return value(cos_y)
    with torch.no_grad():
        shifted = value(cos_y) - cos_y
    return cos_y + shifted  # value of the margin, gradient of cos_y


def cosface(cos_y: Tensor, m: float) -> Tensor:
    """cos_y - m; unscaled."""
    return combined_margin(cos_y, 1.0, 0.0, m)


def arcface(cos_y: Tensor, m: float, straight_through: bool = False) -> Tensor:
    """cos(theta_y + m); unscaled. ``straight_through``: arcface_torch's gradient (as if no margin)."""
    return combined_margin(cos_y, 1.0, m, 0.0, straight_through)


@dataclass(frozen=True)
class CombinedMargin:
    """A target margin as a value: callable on target cosines. Defaults = no margin (normalised softmax)."""

    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    straight_through: bool = False

    def __call__(self, cos_y: Tensor) -> Tensor:
        return combined_margin(cos_y, self.m1, self.m2, self.m3, self.straight_through)


@dataclass(frozen=True)
class AdaptiveMargin:
    """EPL's adaptive margin k * sg(cos_y): the target cosine keeps its gradient, its value shrinks to (1-k) cos_y."""

    k: float = 0.7

    def __call__(self, cos_y: Tensor) -> Tensor:
        return cos_y - self.k * cos_y.detach()


TargetMargin = Callable[[Tensor], Tensor]


class _ColumnCosine(torch.autograd.Function):
    """cos_ij = <u_i, w_j> / max(|w_j|, eps) for unit rows u, with a hand-written backward.

    With g = dL/dcos, inv_j = 1 / max(|w_j|, eps):
        dL/du   = (g * inv) @ w
        dL/dw_j = sum_i g_ij inv_j u_i  -  (sum_i g_ij cos_ij) inv_j^2 w_j      (second term 0 where |w_j| < eps)
    Autograd through w / |w| would make several [K, D] passes (division, norm backward, accumulation); this makes
    one matmul and one fused [K, D] update.
    """

    @staticmethod
    def forward(ctx, u: Tensor, w: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        norm = w.norm(dim=1)
        inv = 1.0 / norm.clamp_min(eps)
        cos = (u @ w.T).mul_(inv)
        ctx.save_for_backward(u, w, inv, cos, norm >= eps)
        return cos

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        u, w, inv, cos, above_eps = ctx.saved_tensors
        g_inv = g * inv
        grad_u = g_inv @ w if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            c = (g * cos).sum(0) * inv * inv * above_eps
            grad_w = (g_inv.T @ u).addcmul_(w, c.unsqueeze(1), value=-1.0)
        return grad_u, grad_w, None


def cosine(x: Tensor, w: Tensor, eps: float = NORM_EPS) -> Tensor:
    """[N, K] cosines <x_i/|x_i|, w_j/|w_j|> (= normalize(x) @ normalize(w).T), gradient to x and w.

    Computed as (x/|x| @ w.T) / |w_j| without materialising normalize(w): for a class shard w is the big operand
    [K, D]; see _ColumnCosine for the backward.
    """
    return _ColumnCosine.apply(normalize(x, eps=eps), w, eps)


def target_positions(target: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, columns) of the target entries: the samples whose target column is here (target >= 0)."""
    rows = (target >= 0).nonzero().squeeze(1)
    return rows, target[rows]


def target_mask(cos: Tensor, target: Tensor) -> Tensor:
    """Boolean [N, K]: True at (i, target_i); rows with target -1 (target not in these columns) are all False."""
    n, k = cos.shape
    mask = torch.zeros(n, k, dtype=torch.bool, device=cos.device)
    if k == 0:
        return mask
    valid = target >= 0
    return mask.scatter_(1, target.clamp_min(0).unsqueeze(1), valid.unsqueeze(1))


def interclass_filter(cos: Tensor, is_target: Tensor, threshold: float) -> Tensor:
    """Non-target cosines > threshold -> 0 (no gradient); threshold <= 0 means off."""
    if threshold <= 0:
        return cos
    return cos.masked_fill((cos > threshold) & ~is_target, 0.0)


class _TargetMarginLogits(torch.autograd.Function):
    """logits = s * cos, the N target entries replaced by s * margin(cos_y): one [N, K] pass each way.

    The margin is any differentiable function of the target cosines; its gradient (N values) comes from autograd
    on that small function inside the backward. (Autograd on the plain formulation would add an [N, K] zero fill
    and accumulation for the gathered targets.)
    """

    @staticmethod
    def forward(ctx, cos: Tensor, rows: Tensor, cols: Tensor, scale: float,  # type: ignore[override]
                margin: TargetMargin) -> Tensor:
        with torch.enable_grad():
            cos_y = cos[rows, cols].detach().requires_grad_(True)
            margin_y = margin(cos_y)
        logits = cos * scale
        logits[rows, cols] = scale * margin_y.detach().to(logits.dtype)
        ctx.save_for_backward(rows, cols)
        ctx.scale, ctx.cos_y, ctx.margin_y = scale, cos_y, margin_y
        return logits

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        rows, cols = ctx.saved_tensors
        grad = g * ctx.scale
        if ctx.margin_y.requires_grad:
            (grad_y,) = torch.autograd.grad(ctx.margin_y, ctx.cos_y, grad[rows, cols], retain_graph=True)
            grad[rows, cols] = grad_y.to(grad.dtype)
        else:
            grad[rows, cols] = 0.0
        return grad, None, None, None, None


def margin_logits(cos: Tensor, target: Tensor, margin: TargetMargin, scale: float,
                  filter_threshold: float = 0.0) -> Tensor:
    """s * [cosines with filtering and the target margin]: [N, K] cosines, target [N] in [-1, K) -> logits."""
    if filter_threshold > 0:
        cos = interclass_filter(cos, target_mask(cos, target), filter_threshold)
    rows, cols = target_positions(target)
    return _TargetMarginLogits.apply(cos, rows, cols, float(scale), margin)
