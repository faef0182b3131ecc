"""Class-wise binary cross-entropy with biases: the sum that UCE, USS and the s2s BCE share.

For cosines [N, K] (this rank's K columns), z = s * cos with the margin on the target column, and biases b (one
unified scalar, or one per column):

    sum_i [ softplus(-(z_iy - b_y))  +  l * sum_{j != y} softplus(z_ij - b_j) ]     (this shard's columns)

Because it is a plain sum over classes, a class-sharded head needs no cross-shard normaliser: each rank adds its
columns' part and ``shard_sum`` (heads/comm.py) totals it; the gradient w.r.t. a replicated b is then this shard's
part on each rank (heads/optim.py sums it over ranks).

The official UniFace / UniTSFace code clamps every softplus argument to [-s, s] before exp/log, which zeroes the
gradient of terms outside that range; ``clamp`` reproduces it (None = exact softplus).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from heads.comm import shard_sum
from heads.dist_softmax import dist_logsumexp, softmax_dtype
from heads.margins import TargetMargin, target_positions


def softplus(z: Tensor, clamp: float | None = None) -> Tensor:
    """log(1 + e^z); z clamped to [-clamp, clamp] first when ``clamp`` is given.

    torch's fused softplus (2-4x faster than the exact forms over [N, K]) returns z itself above 20: an error below
    e^-20 ~ 2e-9 per term, far below float32 training noise.
    """
    if clamp is not None:
        z = z.clamp(-clamp, clamp)
    return F.softplus(z)


def bce_class_sum(cos: Tensor, target: Tensor, margin: TargetMargin, scale: float, bias: Tensor,
                  neg_weight: float = 1.0, clamp: float | None = None, columns: Tensor | None = None) -> Tensor:
    """This shard's sum of the positive and negative terms (0-dim tensor; see the module docstring).

    cos [N, K], target [N] (column of the positive, -1 when not here), z = s * cos with ``margin`` on the target.
    bias: 0-dim (unified b) or [K] (b_j of each column). columns: [K] bool, the columns that take part (None = all;
    e.g. memory rows never written). Three [N, K] passes: s cos - b, the softplus, the sum (the clamp adds one).
    """
    cos = softmax_dtype(cos)
    bias = bias.to(cos.dtype)
    u = torch.add(-bias, cos, alpha=scale)                          # s cos_ij - b_j
    rows, cols = target_positions(target)
    b_y = bias if bias.ndim == 0 else bias[cols]
    u.index_put_((rows, cols), b_y - scale * margin(cos[rows, cols]))  # positive: -(s m(cos_y) - b_y)
    terms = softplus(u, clamp)
    if columns is not None and not bool(columns.all()):
        terms = terms.masked_fill(~columns.unsqueeze(0), 0.0)
    total = terms.sum()
    if neg_weight != 1.0:  # l * (all terms) - (l - 1) * (positive terms)
        total = neg_weight * total - (neg_weight - 1.0) * terms[rows, cols].sum()
    return total


def global_bce_mean(local_sum: Tensor, num_samples: int) -> Tensor:
    """The loss: the class sums of all shards, averaged over the N samples of the global batch."""
    return shard_sum(local_sum) / num_samples


@torch.no_grad()
def negatives_logsumexp_mean(cos: Tensor, target: Tensor, scale: float, columns: Tensor | None = None) -> Tensor | None:
    """mean_i logsumexp_{j != y_i}(s cos_ij) over all ranks' columns: UniTSFace's data-driven bias.

    Rows without any negative column (e.g. an empty memory) are left out; None when no row has one. The value is
    global, identical on every rank.
    """
    z = scale * softmax_dtype(cos.detach())
    rows, cols = target_positions(target)
    z[rows, cols] = float("-inf")
    if columns is not None:
        z = z.masked_fill(~columns.unsqueeze(0), float("-inf"))
    lse = dist_logsumexp(z, dim=1)
    finite = torch.isfinite(lse)
    if not bool(finite.any()):
        return None
    return lse[finite].mean()
