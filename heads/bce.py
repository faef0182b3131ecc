"""Class-wise binary cross-entropy with biases: the sum that UCE, USS and the s2s BCE share.

For cosines [N, K] (this rank's K columns), z = s * cos with the margin on the target column, and biases b (one
unified scalar, or one per column):

    sum_i [ softplus(-(z_iy - b_y))  +  l * sum_{j != y} softplus(z_ij - b_j) ]     (this shard's columns)

Because it is a plain sum over classes, a class-sharded head needs no cross-shard normaliser: each rank adds its
columns' part and ``shard_sum`` (heads/comm.py) totals it; the gradient w.r.t. a replicated b is then this shard's
part on each rank (heads/optim.py sums it over ranks).

The official UniFace / UniTSFace code clamps every softplus argument to [-s, s] before exp/log, which zeroes the
gradient of terms outside that range; ``clamp`` reproduces it (None = exact softplus).

The sums themselves, value and gradients in the forward without a host sync, are ``uniform_bce`` (heads/uce.py,
columns = sampled centres) and ``bce_sum`` (heads/memory_scores.py, columns = memory rows); the data-driven bias of
USS / s2s-BCE is ``negatives_lse`` there.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from heads.comm import shard_sum


def softplus(z: Tensor, clamp: float | None = None) -> Tensor:
    """log(1 + e^z); z clamped to [-clamp, clamp] first when ``clamp`` is given.

    torch's fused softplus (2-4x faster than the exact forms over [N, K]) returns z itself above 20: an error below
    e^-20 ~ 2e-9 per term, far below float32 training noise.
    """
    if clamp is not None:
        z = z.clamp(-clamp, clamp)
    return F.softplus(z)


def global_bce_mean(local_sum: Tensor, num_samples: int) -> Tensor:
    """The loss: the class sums of all shards, averaged over the N samples of the global batch."""
    return shard_sum(local_sum) / num_samples
