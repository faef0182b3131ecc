"""Softmax over classes split across ranks, built only from heads/comm.py's primitives.

Rank r holds logits z_local [N, C_local] for its classes, for the N = W*B gathered samples, and target_local [N]:
the column of the target in z_local, -1 where another rank owns it. With m = global row max (no gradient):

    lse_i    = m_i + log(shard_sum(sum_j exp(z_ij - m_i)))      d lse_i / d z_ij = exp(z_ij - lse_i), exact
    z_i,y    = shard_sum(z_i,target or 0)                        only the owner contributes
    CE       = mean_i (lse_i - z_i,y)

Every result is the global value, identical on every rank; each rank's graph holds its own classes' gradient.
Softmax arithmetic runs in float32 (float64 when the logits are float64).
"""
from __future__ import annotations

import torch
from torch import Tensor

from heads.comm import global_max, shard_sum


class LogitsError(ValueError):
    """Logits and targets of a distributed softmax that do not fit together."""


def softmax_dtype(z: Tensor) -> Tensor:
    """z in float32, or float64 when it already is float64."""
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def _check(z_local: Tensor, target_local: Tensor) -> None:
    if z_local.ndim != 2:
        raise LogitsError(f"logits must be [N, C_local], got shape {list(z_local.shape)}")
    if target_local.shape != (z_local.shape[0],):
        raise LogitsError(f"target must be [N] = [{z_local.shape[0]}], got shape {list(target_local.shape)}")
    if target_local.numel() and bool(((target_local < -1) | (target_local >= z_local.shape[1])).any()):
        raise LogitsError(f"target values must lie in [-1, {z_local.shape[1]}) (a local column, or -1 when another "
                          f"rank owns the class), got min {int(target_local.min())} max {int(target_local.max())}")


def dist_logsumexp(z_local: Tensor, dim: int = 1) -> Tensor:
    """log sum_j exp(z_j) over the class dimension split across ranks (global value, exact local gradient)."""
    z = softmax_dtype(z_local)
    with torch.no_grad():
        if z.shape[dim] == 0:
            local_max = torch.full_like(z.sum(dim), float("-inf"))
        else:
            local_max = z.amax(dim)
        m = global_max(local_max)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows of only -inf: lse = -inf, no NaN
    total = shard_sum(torch.exp(z - m.unsqueeze(dim)).sum(dim))
    return m + torch.log(total)


def dist_target_logit(z_local: Tensor, target_local: Tensor) -> Tensor:
    """[N] global target logits: the owner's column, summed over ranks (gradient on the owner)."""
    z = softmax_dtype(z_local)
    owned = target_local >= 0
    if z.shape[1] == 0:
        local = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    else:
        picked = z.gather(1, target_local.clamp_min(0).unsqueeze(1)).squeeze(1)
        local = torch.where(owned, picked, torch.zeros_like(picked))
    return shard_sum(local)


def dist_log_softmax_target(z_local: Tensor, target_local: Tensor) -> Tensor:
    """[N] log p_i(target_i) under the softmax over all classes of all ranks."""
    _check(z_local, target_local)
    return dist_target_logit(z_local, target_local) - dist_logsumexp(z_local, dim=1)


def dist_cross_entropy(z_local: Tensor, target_local: Tensor) -> Tensor:
    """Mean over the N rows of -log softmax(z)_target, classes split across ranks; identical on every rank."""
    return -dist_log_softmax_target(z_local, target_local).mean()


def dist_logsumexp_nontarget(z_local: Tensor, target_local: Tensor) -> Tensor:
    """[N] log sum_{j != y} exp(z_j) across ranks (e.g. GB-CosFace's smooth max over the negatives)."""
    _check(z_local, target_local)
    z = softmax_dtype(z_local)
    if z.shape[1] == 0:
        return dist_logsumexp(z, dim=1)
    is_target = torch.zeros_like(z, dtype=torch.bool).scatter_(
        1, target_local.clamp_min(0).unsqueeze(1), (target_local >= 0).unsqueeze(1))
    return dist_logsumexp(z.masked_fill(is_target, float("-inf")), dim=1)


@torch.no_grad()
def dist_top1_correct(z_local: Tensor, target_local: Tensor) -> Tensor:
    """[N] bool: the target logit is the largest over all classes of all ranks (ties count as correct)."""
    _check(z_local, target_local)
    z = softmax_dtype(z_local.detach())
    local_max = z.amax(1) if z.shape[1] else torch.full_like(z.sum(1), float("-inf"))
    return dist_target_logit(z, target_local) >= global_max(local_max)
