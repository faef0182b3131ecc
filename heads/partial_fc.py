"""Partial FC: this rank's shard of class centres, class sampling, margin softmax over all ranks.

Per step (N = W*B gathered samples, C_local = this rank's classes):

    X, Y     = gather_embeddings(x_local), gather_labels(y_local)          heads/comm.py       gather()
    S        = sampled local classes (sorted): every class of this shard present in Y, plus random others up to
               int(r * C_local); r == 1: all classes, r == 0: positives only                    sample_classes()
    W_S      = weight[S] as a fresh leaf tensor (the gradient is [|S|, D], never a dense [C_local, D])
    u        = normalize(X)                                                                      score()
    cos      = u @ W_S^T / |W_j|                                             [N, |S|]     heads/blocks.py
    logits   = s * (cos with filtering and the target margin)               heads/margins.py
    loss     = mean_i (logsumexp_j logits_ij - logits_i,y) over the classes of all ranks         criterion()

The loss and its gradients w.r.t. u and W_S are computed together in the forward (heads/blocks.py): the [N, |S|]
block lives only inside the forward, in two buffers, and nothing of its size waits for the backward.

No host sync in a training step (heads/blocks.py, DESIGN.md): the labels are range-checked on the first call and on
statistics steps (heads/stats.py; an out-of-range label in between maps to no class: a wrong loss for that sample
until the next check, never a wrong memory row or an out-of-bounds index); the sampler draws a fixed number of
classes when every positive fits (int(r * C_local) > min(N, C_local), the usual case: e.g. 12.5k sampled classes per
rank for a batch of 1024); otherwise the number of positives can exceed the sample size and sets the output size,
which takes ONE sync (their count) per step.

The centres and their SGD momentum are BUFFERS (weight, weight_momentum; dim 0 = class), so the head's memory per
rank is 2 x shard, and they checkpoint and reshard with the state dict. heads/optim.py steps the sampled rows. The
initial centres (N(0, init_std^2), drawn per block of classes: the same on any number of ranks) and the sampler's
stream (seeded from (seed, rank)) come from heads/seeds.py.

Other sample-to-class losses (heads/uce.py, heads/gb_cosface.py) subclass PartialFC and replace ``criterion``; the
embedded losses (heads/embedded.py) reuse gather / score and hand the same sampled classes to a memory term.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from heads.blocks import (
    CosineBlock,
    margin_and_slope,
    needs_grad,
    put_targets,
    row_max,
    stabiliser,
    take_targets,
    target_columns,
    top1_correct,
    with_gradients,
)
from heads.comm import all_reduce_sum_, gather_embeddings, gather_labels
from heads.margins import CombinedMargin, TargetMargin, normalize, target_mask
from heads.partition import ClassPartition
from heads.precision import matmul_precision_of
from heads.rows import RowSparseRows
from heads.seeds import derive_seed, init_centres
from heads.stats import collects_stats


class HeadInputError(ValueError):
    """Embeddings or labels passed to a head that do not fit it."""


@dataclass
class ShardBatch:
    """The gathered global batch as this rank sees it."""

    X: Tensor      # [N, D] embeddings of all ranks (autograd: backward sums shard parts, x W; heads/comm.py)
    Y: Tensor      # [N] global labels
    local: Tensor  # [N] local class index of each label, -1 where another rank owns the class

    @property
    def size(self) -> int:
        return self.X.shape[0]


@dataclass
class ClassScores:
    """This rank's sampled classes, and what the sample-to-class loss scores: unit embeddings and centre rows."""

    index: Tensor | None  # sorted local indices of the sampled classes (None = all of the shard)
    target: Tensor        # [N] column of each sample's class within the sampled classes, -1 where not here
    u: Tensor | None      # [N, D] X / |X| in the centres' dtype (autograd to X); None when only sampling was asked
    w: Tensor | None      # [K, D] the sampled centres, a fresh leaf (heads/rows.py); None likewise

    @property
    def num_sampled(self) -> int:
        return 0 if self.w is None else self.w.shape[0]

    def block(self, precision: str = "fp32") -> CosineBlock:
        """The [N, K] cosines of u against w (heads/blocks.py)."""
        return CosineBlock(self.u, self.w, precision)


def margin_softmax_cross_entropy(block: CosineBlock, target: Tensor, margin: TargetMargin, scale: float,
                                 filter_threshold: float = 0.0, with_accuracy: bool = False
                                 ) -> tuple[Tensor, Tensor | None]:
    """(mean_i -log softmax(logits_i)_y over the classes of all ranks, top-1 accuracy or None), no host sync.

    logits = s * cos, non-target cosines above ``filter_threshold`` (when > 0) set to 0 without gradient, the
    target's s * margin(cos_y). Value and gradients in the forward: two [N, K] buffers (cos; z -> exp -> dL/dcos),
    one all-reduce for the row maxima and one for the sums of exp and the target logits.
    """
    n, k = block.shape
    cos = block.cos
    owned, tcol = target_columns(target)
    need = needs_grad(block.u, block.w)
    with torch.no_grad():
        accuracy = top1_correct(cos, owned, tcol).to(cos.dtype).mean() if with_accuracy else None
        margin_y, slope = margin_and_slope(margin, take_targets(cos, tcol), need)
        z_y = scale * margin_y
        z = cos * scale
        filtered = None
        if filter_threshold > 0 and k:
            filtered = (cos > filter_threshold) & ~target_mask(cos, target)
            z.masked_fill_(filtered, 0.0)
        put_targets(z, tcol, owned, z_y)
        m = stabiliser(row_max(z))
        e = z.sub_(m.unsqueeze(1)).exp_()
        total, target_logit = all_reduce_sum_(torch.stack([e.sum(1), torch.where(owned, z_y, 0.0)], 1)).unbind(1)
        loss = (m + torch.log(total) - target_logit).mean()
        if not need:
            return loss, accuracy
        # dL/dz = (softmax - onehot) / N;  dL/dcos = s dL/dz, at the target s * margin'(cos_y) dL/dz, 0 if filtered
        G = e.mul_((scale / (n * total)).unsqueeze(1))
        if filtered is not None:
            G.masked_fill_(filtered, 0.0)
        put_targets(G, tcol, owned, (take_targets(G, tcol) - scale / n) * slope)
        del cos, e, z  # the block's cosines are freed by column_dots
        grad_u, grad_w = block.gradients(G, block.column_dots(G))
    return with_gradients(loss, [(block.u, grad_u), (block.w, grad_w)]), accuracy


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Head arithmetic runs in the head's own precision (float32 / float64), never under autocast."""
    return torch.autocast(device_type=device.type, enabled=False)


class PartialFC(RowSparseRows, nn.Module):
    """Class-sharded margin-softmax head (a heads/protocol.py Head). ``forward(x_local, labels_local) -> (loss, logs)``.

    loss: the global-batch mean, identical on every rank. logs: ``num_sampled`` (this rank's sampled classes) and,
    when statistics are collected (heads/stats.py; the default), ``accuracy`` (0-dim tensor, top-1 of the global
    batch on the sampled cosines, identical on every rank).
    """

    def __init__(self, partition: ClassPartition, embedding_size: int, margin: TargetMargin = CombinedMargin(),
                 scale: float = 64.0, sample_rate: float = 1.0, interclass_filtering_threshold: float = 0.0,
                 init_std: float = 0.01, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(partition, ClassPartition):
            raise HeadInputError(f"{type(self).__name__}: partition must be a ClassPartition, got "
                                 f"{type(partition).__name__}")
        if not 0.0 <= sample_rate <= 1.0:
            raise HeadInputError(f"{type(self).__name__}: sample_rate must be in [0, 1], got {sample_rate}")
        if embedding_size < 1:
            raise HeadInputError(f"{type(self).__name__}: embedding_size must be >= 1, got {embedding_size}")
        self.partition = partition
        self.embedding_size = embedding_size
        self.num_classes = partition.num_classes
        self.margin = margin
        self.scale = float(scale)
        self.sample_rate = float(sample_rate)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.seed = int(seed)
        weight = init_centres(partition.start, partition.num_local, embedding_size, init_std, self.seed)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_momentum", torch.zeros_like(weight))
        self._generator: torch.Generator | None = None
        self._init_rows()
        self.last_sampled: Tensor | None = None  # sorted local indices of the last forward (None = all classes)
        self._labels_checked = False

    # --- state ---------------------------------------------------------------------------------------------------
    def per_class_buffers(self) -> list[str]:
        """Buffers whose dim 0 is this rank's classes (resharded when the number of ranks changes)."""
        return ["weight", "weight_momentum"]

    def learned_thresholds(self) -> dict[str, float]:
        """Cosine thresholds the loss learns (none for margin softmax; see UCE, USS, GB-CosFace)."""
        return {}

    def set_epoch(self, epoch: int) -> None:
        """The epoch hook of the Head protocol (heads/protocol.py): sample-to-class losses have no start epoch."""

    def _sampler(self) -> torch.Generator:
        device = self.weight.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(derive_seed(self.seed, self.partition.rank))
        return self._generator

    def get_extra_state(self) -> dict:
        gen = self._generator
        return {"rank": self.partition.rank, "world_size": self.partition.world_size,
                "sampler_device": None if gen is None else gen.device.type,
                "sampler_state": None if gen is None else gen.get_state()}

    def set_extra_state(self, state: dict) -> None:
        same_rank = (state.get("rank"), state.get("world_size")) == (self.partition.rank, self.partition.world_size)
        if not same_rank or state.get("sampler_state") is None:
            self._generator = None  # another partition (resharded) or never sampled: fresh stream from (seed, rank)
            return
        gen = self._sampler()
        if state["sampler_device"] != gen.device.type:
            warnings.warn(f"PartialFC: the class sampler state was saved on {state['sampler_device']}, the head is "
                          f"on {gen.device.type}: the sampler restarts from its seed")
            return
        gen.set_state(state["sampler_state"])

    # --- one step, in parts --------------------------------------------------------------------------------------
    def sample_classes(self, local_labels: Tensor) -> Tensor | None:
        """Sorted local indices of this step's classes (None = all): positives, filled with random others.

        Without a host sync when int(r * C_local) > min(N, C_local) (every positive fits: the output size is fixed);
        otherwise the count of positives decides between "positives only" and "filled" (one sync). The same classes
        and the same random stream either way.
        """
        if self.sample_rate >= 1.0:
            return None
        num_local = self.partition.num_local
        num_sample = int(self.sample_rate * num_local)
        owned = local_labels >= 0
        mark = torch.zeros(num_local + 1, dtype=torch.bool, device=local_labels.device)
        mark.index_fill_(0, torch.where(owned, local_labels, num_local), True)  # others' classes: the spare slot
        positive = mark[:num_local]
        if num_sample <= min(local_labels.numel(), num_local):
            count = int(positive.sum())  # the one sync: the positives may outnumber the sample size
            if count >= num_sample:
                return torch.nonzero_static(positive, size=count).squeeze(1)
        gen = self._sampler()
        score = torch.rand(num_local, generator=gen, device=gen.device).to(local_labels.device)
        score.masked_fill_(positive, 2.0)  # above every random score: positives are always kept
        return torch.topk(score, num_sample).indices.sort().values

    def _check_inputs(self, x_local: Tensor, labels_local: Tensor) -> None:
        name = type(self).__name__
        if x_local.ndim != 2 or x_local.shape[1] != self.embedding_size:
            raise HeadInputError(f"{name}: embeddings must be [B, {self.embedding_size}], got "
                                 f"{list(x_local.shape)}")
        if labels_local.shape != (x_local.shape[0],):
            raise HeadInputError(f"{name}: labels must be [B] = [{x_local.shape[0]}], got "
                                 f"{list(labels_local.shape)}")
        if labels_local.is_floating_point() or labels_local.is_complex():
            raise HeadInputError(f"{name}: labels must be an integer tensor, got {labels_local.dtype}")

    def gather(self, x_local: Tensor, labels_local: Tensor) -> ShardBatch:
        """Check the inputs, all-gather embeddings and labels, map labels to this shard.

        The label range is checked (one host sync) on the first call and whenever statistics are collected.
        """
        self._check_inputs(x_local, labels_local)
        X = gather_embeddings(x_local)
        Y = gather_labels(labels_local.to(device=x_local.device, dtype=torch.long))
        if Y.numel() and (not self._labels_checked or collects_stats(self)):
            if bool(((Y < 0) | (Y >= self.num_classes)).any()):
                raise HeadInputError(f"{type(self).__name__}: labels must lie in [0, {self.num_classes}), got min "
                                     f"{int(Y.min())} max {int(Y.max())} in the gathered batch")
            self._labels_checked = True
        return ShardBatch(X, Y, self.partition.to_local(Y))

    def score(self, batch: ShardBatch, with_cosines: bool = True) -> ClassScores:
        """Sample this step's classes; with ``with_cosines`` take their centres as a tracked leaf and the unit batch."""
        index = self.sample_classes(batch.local)
        self.last_sampled = index
        if index is None:
            target = batch.local
        else:
            position = torch.searchsorted(index, batch.local.clamp_min(0))
            target = torch.where(batch.local >= 0, position, torch.full_like(batch.local, -1))
        if not with_cosines:
            return ClassScores(index, target, None, None)
        w = self.leaf_rows(index, track=self.training and torch.is_grad_enabled())
        return ClassScores(index, target, normalize(batch.X.to(w.dtype)), w)

    def criterion(self, batch: ShardBatch, scores: ClassScores) -> tuple[Tensor, dict]:
        """Margin softmax cross-entropy over the sampled classes of all ranks."""
        loss, accuracy = margin_softmax_cross_entropy(
            scores.block(matmul_precision_of(self)), scores.target, self.margin, self.scale,
            self.interclass_filtering_threshold, with_accuracy=collects_stats(self))
        return loss, self.score_logs(scores, accuracy)

    def score_logs(self, scores: ClassScores, accuracy: Tensor | None = None) -> dict:
        """This rank's number of sampled classes, and (statistics steps) the top-1 accuracy of the global batch on
        the sampled cosines."""
        logs: dict = {"num_sampled": scores.num_sampled}
        if accuracy is not None:
            logs["accuracy"] = accuracy
        return logs

    def forward(self, x_local: Tensor, labels_local: Tensor) -> tuple[Tensor, dict]:
        with no_autocast(x_local.device):
            batch = self.gather(x_local, labels_local)
            return self.criterion(batch, self.score(batch))

    def extra_repr(self) -> str:
        p = self.partition
        return (f"classes={p.num_classes} (rank {p.rank}/{p.world_size}: [{p.start}, {p.end})), "
                f"embedding_size={self.embedding_size}, margin={self.margin}, scale={self.scale}, "
                f"sample_rate={self.sample_rate}, interclass_filtering_threshold="
                f"{self.interclass_filtering_threshold}")
