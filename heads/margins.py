"""Margins on cosine logits, as small pure functions.

Notation: cos_j = <x/|x|, W_j/|W_j|>, y the target class, theta = arccos(cos_y), s the scale.

    softmax   s * cos_y
    CosFace   s * (cos_y - m)
    ArcFace   s * cos(theta + m)
    combined  s * (cos(m1*theta + m2) - m3)       ArcFace = (1, m, 0), CosFace = (1, 0, m)

The combined margin is implemented for ANY (m1, m2, m3). (arcface_torch implements only m1 = 1 and, when m3 > 0,
applies m3 alone, silently dropping m2; we never ignore a configured margin.) When m1 == 1 and m2 == 0 the formula
is evaluated as cos_y - m3 without the arccos round trip: the same value, exact gradient.

``straight_through=True`` gives arcface_torch's ArcFace behaviour: the margin's value is computed without gradient
and the gradient passes as if the target logit were s * cos_y.

Inter-class filtering (Partial FC, CVPR'22): non-target cosines above a threshold are set to 0 (no gradient); they
still contribute e^0 to the softmax denominator.

The target functions below return the unscaled target cosine; ``margin_logits`` applies filtering, the target
margin and the scale s to a whole [N, K] block of cosines.
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


TargetMargin = Callable[[Tensor], Tensor]


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


def margin_logits(cos: Tensor, target: Tensor, margin: TargetMargin, scale: float,
                  filter_threshold: float = 0.0) -> Tensor:
    """s * [cosines with filtering and the target margin]: [N, K] cosines, target [N] in [-1, K) -> logits."""
    is_target = target_mask(cos, target)
    cos = interclass_filter(cos, is_target, filter_threshold)
    if cos.shape[1] == 0:
        return scale * cos
    cos_y = cos.gather(1, target.clamp_min(0).unsqueeze(1))  # [N, 1]; rows without a target are masked below
    return scale * torch.where(is_target, margin(cos_y), cos)
