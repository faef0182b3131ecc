"""Collectives of the class-sharded head, and THE distributed gradient convention.

The convention (every head term follows it; later losses reuse these primitives unchanged):

    The loss L is a function of the GLOBAL batch: W ranks x B samples, averaged over the N = W*B samples.
    Every head term returns its GLOBAL value, identical on every rank. Its autograd graph on rank r carries only
    the part of the gradient that comes from the classes rank r owns.

Primitives (each is an identity when torch.distributed is not initialised, or when W == 1):

* ``gather_embeddings(x_local) -> X [W*B, D]``. Backward: the W partial gradients dL/dX (one per class shard) are
  SUMMED over ranks (all_reduce), rank r keeps its own B rows and MULTIPLIES THEM BY W. The x W cancels the / W
  with which data parallelism (DeepSpeed, DDP) averages backbone gradients, so W ranks x B samples train exactly
  like 1 rank x W*B. This is the only place where x W appears. Every rank must pass the same B.
* ``gather_labels(y_local) -> Y [W*B]`` (no gradient).

  Both check that every rank passes the same shape (else DistributedInputError on every rank) on their first call
  and whenever this rank's shape changes, not every step: the check all-gathers the shapes and reads them on the
  host, a sync. So a batch size that changes on SOME ranks only is caught only where it changed, and those ranks'
  check then meets the others' data all-gather: gloo reports a size mismatch, NCCL may hang until the timeout. The
  trainer keeps every rank's batch fixed (the loaders drop the last partial batch).
* ``shard_sum(t)``: forward all_reduce SUM, so every rank holds the global value; backward identity, so each rank's
  graph holds its own summand. A per-class sum (BCE style) is ``shard_sum(local_sum)``; a target logit is
  ``shard_sum(local_target_logit_or_zero)``.
* ``global_max(t)``: all_reduce MAX, no gradient (the stabiliser of a distributed logsumexp,
  see heads/dist_softmax.py).
* ``all_reduce_sum_(t)`` / ``rank_mean(t)``: plain reductions without gradient, e.g. for the gradient of a
  replicated head parameter: on each rank it holds only the shard part, so it is all_reduce-SUMmed before the
  optimizer step (heads/optim.py does this), or for a scalar state that must stay identical on every rank.

Why the sum is exact: dL/dX = sum over class shards of dL_shard/dX, and each rank's graph holds exactly its shard's
term. Rank r's backbone then receives W * dL/dx_r; after the data-parallel / W it is dL/dx_r, the 1-rank gradient.
A term that every rank computes identically from the gathered batch (not split by class) would be counted W times:
such a term must be computed on one shard only (or divided by W) - never rely on the x W to be undone elsewhere.

Every rank must run the same collectives in the same order: forward through every gather, and backward through
every gather (each gather's backward is an all_reduce).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from runtime.process import is_distributed, rank_world


class DistributedInputError(ValueError):
    """Ranks passed inconsistent inputs to a collective (e.g. different per-rank batch sizes)."""


_CHECKED: dict[str, tuple[object, tuple[int, ...]]] = {}  # what -> (process group, shape) last checked


def _check_same_shape(t: Tensor, what: str) -> None:
    """Every rank must pass a tensor of the same shape; raise on every rank (none hangs) otherwise.

    Runs when this rank's shape for ``what`` differs from the one last checked in this process group (the first
    call included); otherwise returns at once (no collective, no sync).
    """
    group = dist.distributed_c10d._get_default_group()
    last = _CHECKED.get(what)
    if last is not None and last[0] is group and last[1] == tuple(t.shape):
        return
    _CHECKED.pop(what, None)
    rank, world_size = rank_world()
    shape = torch.tensor(list(t.shape), dtype=torch.long, device=t.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    shapes_list = [tuple(s.tolist()) for s in shapes]
    if any(s != shapes_list[0] for s in shapes_list):
        per_rank = ", ".join(f"rank {r}: {list(s)}" for r, s in enumerate(shapes_list))
        raise DistributedInputError(
            f"{what}: every rank must pass the same shape (the same per-rank batch size B), got {per_rank}; "
            f"keep a fixed batch per rank (drop or pad the last batch)")
    _CHECKED[what] = (group, tuple(t.shape))


def _all_gather_cat(t: Tensor) -> Tensor:
    world_size = rank_world()[1]
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=0)


class _GatherEmbeddings(torch.autograd.Function):
    """X = cat over ranks of x_r; backward: (sum over ranks of dL_shard/dX)[own rows] * W."""

    @staticmethod
    def forward(ctx, x_local: Tensor) -> Tensor:  # type: ignore[override]
        rank, world_size = rank_world()
        ctx.world_size, ctx.rank, ctx.rows = world_size, rank, x_local.shape[0]
        return _all_gather_cat(x_local)

    @staticmethod
    def backward(ctx, grad_X: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad_X.contiguous().clone()          # all_reduce works in place; never modify autograd's buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # the full dL/dX on every rank
        own = grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]
        return own * ctx.world_size                  # THE x W: cancels data-parallel averaging of the backbone


def gather_embeddings(x_local: Tensor) -> Tensor:
    """All-gather [B, ...] -> [W*B, ...] with autograd (backward: sum over ranks, own slice, x W)."""
    if not is_distributed():
        return x_local
    _check_same_shape(x_local, "gather_embeddings")
    return _GatherEmbeddings.apply(x_local)


def gather_labels(y_local: Tensor) -> Tensor:
    """All-gather [B] -> [W*B] without gradient (rank order, the same order as gather_embeddings)."""
    if not is_distributed():
        return y_local
    _check_same_shape(y_local, "gather_labels")
    with torch.no_grad():
        return _all_gather_cat(y_local)


class _ShardSum(torch.autograd.Function):
    """Forward all_reduce SUM; backward identity (each rank's graph keeps its own summand)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # type: ignore[override]
        total = t.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


def shard_sum(t: Tensor) -> Tensor:
    """Sum of this rank's summand over all ranks; gradient flows only to this rank's summand."""
    if not is_distributed():
        return t
    return _ShardSum.apply(t)


@torch.no_grad()
def global_max(t: Tensor) -> Tensor:
    """Elementwise maximum over ranks (detached copy)."""
    out = t.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


@torch.no_grad()
def all_reduce_sum_(t: Tensor) -> Tensor:
    """In-place SUM over ranks, no gradient (e.g. the shard parts of a replicated parameter's gradient)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def rank_mean(t: Tensor) -> Tensor:
    """Mean over ranks (detached copy), for scalar states that must stay identical on every rank."""
    world_size = rank_world()[1]
    out = t.detach().clone()
    if world_size > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= world_size
    return out
