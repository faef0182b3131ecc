"""Partial FC: this rank's shard of class centres, class sampling, margin softmax over all ranks.

Per step (N = W*B gathered samples, C_local = this rank's classes):

    X, Y     = gather_embeddings(x_local), gather_labels(y_local)          heads/comm.py       gather()
    S        = sampled local classes (sorted): every class of this shard present in Y, plus random others up to
               int(r * C_local); r == 1: all classes, r == 0: positives only                    sample()
    W_S      = weight[S] as a fresh leaf tensor (the gradient is [|S|, D], never a dense [C_local, D])
    cos      = normalize(X) @ normalize(W_S).T  (as (X/|X| @ W_S.T) / |W_j|)    [N, |S|]    score()
    logits   = s * (cos with filtering and the target margin)               heads/margins.py
    loss     = dist_cross_entropy(logits, target relabelled into S)         heads/dist_softmax.py  criterion()

The centres and their SGD momentum are BUFFERS (weight, weight_momentum; dim 0 = class), so the head's memory per
rank is 2 x shard, and they checkpoint and reshard with the state dict. heads/optim.py steps the sampled rows.

Other sample-to-class losses (heads/uce.py, heads/gb_cosface.py) subclass PartialFC and replace ``criterion``; the
embedded losses (heads/embedded.py) reuse gather / score and hand the same sampled classes to a memory term.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from heads.comm import gather_embeddings, gather_labels
from heads.dist_softmax import dist_cross_entropy, dist_top1_correct
from heads.margins import CombinedMargin, TargetMargin, cosine, margin_logits
from heads.partition import ClassPartition
from heads.rows import RowSparseRows

INIT_BLOCK = 4096
"""Centres are drawn in blocks of this many classes, each from its own seed: the initial centre of a class does not
depend on the number of ranks."""


class HeadInputError(ValueError):
    """Embeddings or labels passed to a head that do not fit it."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 steps): distinct tuples give unrelated streams."""
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & mask)) & mask
        h = (h + 0x9E3779B97F4A7C15) & mask
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & mask
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & mask
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def init_centres(start: int, num_local: int, embedding_size: int, std: float, seed: int) -> Tensor:
    """N(0, std^2) centres of classes [start, start + num_local), float32, independent of the partition."""
    out = torch.empty(num_local, embedding_size)
    end = start + num_local
    for block in range(start // INIT_BLOCK, (end + INIT_BLOCK - 1) // INIT_BLOCK):
        lo, hi = block * INIT_BLOCK, (block + 1) * INIT_BLOCK
        gen = torch.Generator().manual_seed(derive_seed(seed, 0xCE, block))
        rows = torch.randn(INIT_BLOCK, embedding_size, generator=gen) * std
        a, b = max(lo, start), min(hi, end)
        out[a - start:b - start] = rows[a - lo:b - lo]
    return out


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
    """This rank's sampled classes and the cosines of the batch to their centres."""

    index: Tensor | None  # sorted local indices of the sampled classes (None = all of the shard)
    target: Tensor        # [N] column of each sample's class within the sampled classes, -1 where not here
    cos: Tensor | None    # [N, K] normalize(X) . normalize(W_S); None when only the sampling was asked for


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Head arithmetic runs in the head's own precision (float32 / float64), never under autocast."""
    return torch.autocast(device_type=device.type, enabled=False)


class PartialFC(RowSparseRows, nn.Module):
    """Class-sharded margin-softmax head. ``forward(x_local, labels_local) -> (loss, logs)``.

    loss: the global-batch mean, identical on every rank. logs: ``accuracy`` (0-dim tensor, top-1 of the global
    batch on the sampled cosines, identical on every rank) and ``num_sampled`` (this rank's sampled classes).
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

    # --- state ---------------------------------------------------------------------------------------------------
    def per_class_buffers(self) -> list[str]:
        """Buffers whose dim 0 is this rank's classes (resharded when the number of ranks changes)."""
        return ["weight", "weight_momentum"]

    def learned_thresholds(self) -> dict[str, float]:
        """Cosine thresholds the loss learns (none for margin softmax; see UCE, USS, GB-CosFace)."""
        return {}

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
        """Sorted local indices of this step's classes (None = all): positives, filled with random others."""
        if self.sample_rate >= 1.0:
            return None
        positives = torch.unique(local_labels[local_labels >= 0], sorted=True)
        num_sample = int(self.sample_rate * self.partition.num_local)
        if positives.numel() >= num_sample:
            return positives
        gen = self._sampler()
        score = torch.rand(self.partition.num_local, generator=gen, device=gen.device).to(local_labels.device)
        score[positives] = 2.0  # above every random score: positives are always kept
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
        """Check the inputs, all-gather embeddings and labels, map labels to this shard."""
        self._check_inputs(x_local, labels_local)
        X = gather_embeddings(x_local)
        Y = gather_labels(labels_local.to(device=x_local.device, dtype=torch.long))
        if Y.numel() and bool(((Y < 0) | (Y >= self.num_classes)).any()):
            raise HeadInputError(f"{type(self).__name__}: labels must lie in [0, {self.num_classes}), got min "
                                 f"{int(Y.min())} max {int(Y.max())} in the gathered batch")
        return ShardBatch(X, Y, self.partition.to_local(Y))

    def score(self, batch: ShardBatch, with_cosines: bool = True) -> ClassScores:
        """Sample this step's classes; with ``with_cosines`` take their centres as a tracked leaf and score them."""
        index = self.sample_classes(batch.local)
        self.last_sampled = index
        if index is None:
            target = batch.local
        else:
            position = torch.searchsorted(index, batch.local.clamp_min(0))
            target = torch.where(batch.local >= 0, position, torch.full_like(batch.local, -1))
        if not with_cosines:
            return ClassScores(index, target, None)
        w = self.leaf_rows(index, track=self.training and torch.is_grad_enabled())
        return ClassScores(index, target, cosine(batch.X.to(w.dtype), w))

    def criterion(self, batch: ShardBatch, scores: ClassScores) -> tuple[Tensor, dict]:
        """Margin softmax cross-entropy over the sampled classes of all ranks."""
        logits = margin_logits(scores.cos, scores.target, self.margin, self.scale,
                               self.interclass_filtering_threshold)
        return dist_cross_entropy(logits, scores.target), self.score_logs(scores)

    def score_logs(self, scores: ClassScores) -> dict:
        """Top-1 accuracy of the global batch on the sampled cosines, and this rank's number of sampled classes."""
        accuracy = dist_top1_correct(scores.cos, scores.target).to(scores.cos.dtype).mean()
        return {"accuracy": accuracy, "num_sampled": scores.cos.shape[1]}

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
