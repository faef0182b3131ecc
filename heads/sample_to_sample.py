"""UniTSFace's sample-to-sample terms over the latest-feature memory (heads/memory.py), class-sharded.

Each sample x_i of the gathered batch is scored against the memory rows of this rank's sampled classes S:
cos_ij = <x_i/|x_i|, M_j/|M_j|>; its own class's row M_y is the one positive, every other row a negative; rows never
written take no part. With s the scale, m the margin, b the learnable bias (t = b/s, the unified threshold):

    USS          sum_i [ softplus(-(s(cos_iy - m) - b)) + sum_{j != y} softplus(s cos_ij - b) ] / N
    s2s BCE      the same with one bias per class: b_y for the positive, b_j for each negative
    s2s softmax  mean_i -log softmax_j(s (cos_ij - m [j = y]))_y        (samples whose M_y is written)

The BCE sums are per-class sums: each rank adds its columns and ``shard_sum`` totals them; the softmax normaliser
is a distributed logsumexp. Every term returns the global loss on every rank. The [N, K] block of each term is
computed by heads/memory_scores.py, value and gradient together in the forward (the memory takes no gradient).

Data-driven bias (official code): when b <= 0, b <- mean_i logsumexp_{j != y}(s cos_ij) before the loss (USS), a
global value, identical on all ranks. s2s BCE: when the mean of all class biases is <= 0, that value is ADDED to
every class bias. Without a host sync: in every training step the value is computed from the block the loss scores
anyway (heads/memory_scores.py: one logsumexp pass over it and two [N]-sized all-reduces) and the bias is written
with torch.where (the same value when b > 0); the journal records it before each write.

The three share one base, ``LatestFeatureTerm``: the latest-feature memory shard (heads/memory.py), written AFTER the
loss (``after_loss``), from epoch 0 on, even while the term is not yet part of the loss (heads/embedded.py), so it
is full when the term starts; each of the three adds only its loss. The per-class biases of s2s BCE are a ClassBias
(heads/rows.py), whose ``global_mean`` is the mean over all classes of all ranks.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from heads.bce import global_bce_mean
from heads.journal import Journaled
from heads.margins import CombinedMargin, normalize
from heads.memory import LatestFeatureMemory
from heads.memory_scores import bce_sum, softmax_mean
from heads.partial_fc import ClassScores, ShardBatch
from heads.partition import ClassPartition
from heads.precision import matmul_precision_of
from heads.rows import ClassBias
from heads.stats import collects_stats


class MemoryTerm(Journaled, nn.Module):
    """A sample-to-sample loss over a class memory shard, driven by heads/embedded.py each step:

    ``before_loss(batch)`` (training) -> ``loss(batch, scores)`` (when the term is active) -> ``after_loss(batch)``
    (training). ``scores`` carries the sampled classes of the sample-to-class head: the memory term uses the same.
    """

    memory: nn.Module

    def before_loss(self, batch: ShardBatch) -> None:
        """State update before the loss (EPL's prototypes)."""

    def after_loss(self, batch: ShardBatch) -> None:
        """State update after the loss (the latest-feature memory)."""

    def loss(self, batch: ShardBatch, scores: ClassScores) -> tuple[Tensor, dict]:
        raise NotImplementedError

    def per_class_buffers(self) -> list[str]:
        names = [f"memory.{n}" for n in self.memory.per_class_buffers()]
        for name, module in self.named_children():
            if isinstance(module, ClassBias):
                names += [f"{name}.{n}" for n in module.per_class_buffers()]
        return names

    def learned_thresholds(self) -> dict[str, float]:
        return {}

    def unit_batch(self, batch: ShardBatch, rows: Tensor, scores: ClassScores | None = None) -> Tensor:
        """X / |X| of the gathered batch in the memory's precision (with autograd: the gradient reaches X); the
        sample-to-class head's when it made one in that precision."""
        if scores is not None and scores.u is not None and scores.u.dtype == rows.dtype:
            return scores.u
        return normalize(batch.X.to(rows.dtype))


class LatestFeatureTerm(MemoryTerm):
    """A memory term over the latest-feature memory (USS, s2s BCE, s2s softmax): scale s, margin m, and the memory
    write after the loss. Subclasses add their loss (and their bias)."""

    def __init__(self, partition: ClassPartition, embedding_size: int, scale: float = 64.0,
                 margin: float = 0.1) -> None:
        super().__init__()
        self.partition = partition
        self.memory = LatestFeatureMemory(partition, embedding_size)
        self.scale, self.margin = float(scale), float(margin)

    def after_loss(self, batch: ShardBatch) -> None:
        self.memory.write(batch.X, batch.local)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}"


class BCETerm(LatestFeatureTerm):
    """The BCE memory terms (USS: one scalar bias; s2s BCE: one bias per class): the global mean of the per-class
    softplus sums (heads/memory_scores.bce_sum), arguments clamped to [-s, s] unless ``clamp`` is off."""

    def __init__(self, partition: ClassPartition, embedding_size: int, scale: float = 64.0, margin: float = 0.1,
                 clamp: bool = True) -> None:
        super().__init__(partition, embedding_size, scale, margin)
        self.clamp = bool(clamp)

    def bce_mean(self, batch: ShardBatch, scores: ClassScores, bias) -> Tensor:
        """The term's global value with ``bias`` (a tensor, or a callable that sets it from the data first)."""
        rows, valid = self.memory.rows(scores.index)
        local = bce_sum(self.unit_batch(batch, rows, scores), rows, valid, scores.target, self.scale, self.margin,
                        bias, clamp=self.scale if self.clamp else None, precision=matmul_precision_of(self))
        return global_bce_mean(local, batch.size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, clamp={self.clamp}"


class USS(BCETerm):
    """Unified-threshold sample-to-sample loss: one learnable scalar bias b, t = b / s."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bias = nn.Parameter(torch.zeros(()))  # b <= 0: (re-)initialised from the data before the loss

    def loss(self, batch: ShardBatch, scores: ClassScores) -> tuple[Tensor, dict]:
        value = self.bce_mean(batch, scores, self._bias_from_data if self.training else self.bias)
        b = self.bias.detach()
        return value, {"b_uss": b.clone(), "t_uss": b / self.scale}

    def _bias_from_data(self, data_bias: Tensor, exists: Tensor) -> Tensor:
        """b <= 0 (and some row has a written negative): b <- the data-driven bias; else b unchanged."""
        with torch.no_grad():
            b = self.bias
            self.journal(self.bias)
            self.bias.copy_(torch.where((b <= 0) & exists, data_bias.to(b.dtype), b))
        return self.bias

    def learned_thresholds(self) -> dict[str, float]:
        return {"t_uss": float(self.bias.detach()) / self.scale}


class S2SBCE(BCETerm):
    """Sample-to-sample BCE: one learnable bias per class, sharded with the classes (heads/rows.py)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.class_bias = ClassBias(self.partition, 0.0)

    def loss(self, batch: ShardBatch, scores: ClassScores) -> tuple[Tensor, dict]:
        track = self.training and torch.is_grad_enabled()
        after_init: list[Tensor] = []
        if self.training:
            def bias(data_bias: Tensor, exists: Tensor) -> Tensor:
                with torch.no_grad():  # mean of all class biases <= 0: add the data-driven bias to every one
                    mean_b = self.class_bias.global_mean()
                    add = torch.where((mean_b <= 0) & exists, data_bias.to(mean_b.dtype), 0.0)
                    self.journal(self.class_bias.weight)
                    self.class_bias.weight.add_(add)
                    after_init.append(mean_b + add)
                return self.class_bias.leaf_rows(scores.index, track=track)
        else:
            bias = self.class_bias.leaf_rows(scores.index, track=track)
        value = self.bce_mean(batch, scores, bias)
        logs = {}
        mean_b = after_init[0] if after_init else (self.class_bias.global_mean() if collects_stats(self) else None)
        if mean_b is not None:
            logs = {"b_s2s_mean": mean_b, "t_s2s_mean": mean_b / self.scale}
        return value, logs

    def learned_thresholds(self) -> dict[str, float]:
        return {"t_s2s_mean": float(self.class_bias.global_mean()) / self.scale}


class S2SSoftmax(LatestFeatureTerm):
    """Sample-to-sample softmax: cross-entropy over the memory rows, positive reduced by m."""

    def loss(self, batch: ShardBatch, scores: ClassScores) -> tuple[Tensor, dict]:
        rows, valid = self.memory.rows(scores.index)
        margin = CombinedMargin(1.0, 0.0, self.margin)
        return softmax_mean(self.unit_batch(batch, rows, scores), rows, valid, scores.target, self.scale, margin,
                            precision=matmul_precision_of(self)), {}
