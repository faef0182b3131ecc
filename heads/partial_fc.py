"""Partial FC: this rank's shard of class centres, class sampling, margin softmax over all ranks.

Per step (N = W*B gathered samples, C_local = this rank's classes):

    X, Y     = gather_embeddings(x_local), gather_labels(y_local)          heads/comm.py
    S        = sampled local classes (sorted): every class of this shard present in Y, plus random others up to
               int(r * C_local); r == 1: all classes, r == 0: positives only
    W_S      = weight[S] as a fresh leaf tensor (the gradient is [|S|, D], never a dense [C_local, D])
    cos      = normalize(X) @ normalize(W_S).T                              [N, |S|]
    logits   = s * (cos with filtering and the target margin)               heads/margins.py
    loss     = dist_cross_entropy(logits, target relabelled into S)         heads/dist_softmax.py

The centres and their SGD momentum are BUFFERS (weight, weight_momentum; dim 0 = class), so the head's memory per
rank is 2 x shard, and they checkpoint and reshard with the state dict. heads/optim.py steps the sampled rows.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from heads.comm import gather_embeddings, gather_labels
from heads.dist_softmax import dist_cross_entropy, dist_top1_correct
from heads.margins import CombinedMargin, TargetMargin, margin_logits, normalize
from heads.partition import ClassPartition

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


class PartialFC(nn.Module):
    """Class-sharded margin-softmax head. ``forward(x_local, labels_local) -> (loss, logs)``.

    loss: the global-batch mean, identical on every rank. logs: ``accuracy`` (0-dim tensor, top-1 of the global
    batch on the sampled cosines, identical on every rank) and ``num_sampled`` (this rank's sampled classes).
    """

    def __init__(self, partition: ClassPartition, embedding_size: int, margin: TargetMargin = CombinedMargin(),
                 scale: float = 64.0, sample_rate: float = 1.0, interclass_filtering_threshold: float = 0.0,
                 init_std: float = 0.01, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(partition, ClassPartition):
            raise HeadInputError(f"PartialFC: partition must be a ClassPartition, got {type(partition).__name__}")
        if not 0.0 <= sample_rate <= 1.0:
            raise HeadInputError(f"PartialFC: sample_rate must be in [0, 1], got {sample_rate}")
        if embedding_size < 1:
            raise HeadInputError(f"PartialFC: embedding_size must be >= 1, got {embedding_size}")
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
        self._pending: list[tuple[Tensor | None, Tensor]] = []  # (sampled rows or None = all, leaf) since last step
        self.last_sampled: Tensor | None = None  # sorted local indices of the last forward (None = all classes)

    # --- state ---------------------------------------------------------------------------------------------------
    def per_class_buffers(self) -> list[str]:
        """Buffers whose dim 0 is this rank's classes (resharded when the number of ranks changes)."""
        return ["weight", "weight_momentum"]

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

    # --- one step ------------------------------------------------------------------------------------------------
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
        if x_local.ndim != 2 or x_local.shape[1] != self.embedding_size:
            raise HeadInputError(f"PartialFC: embeddings must be [B, {self.embedding_size}], got "
                                 f"{list(x_local.shape)}")
        if labels_local.shape != (x_local.shape[0],):
            raise HeadInputError(f"PartialFC: labels must be [B] = [{x_local.shape[0]}], got "
                                 f"{list(labels_local.shape)}")
        if labels_local.is_floating_point() or labels_local.is_complex():
            raise HeadInputError(f"PartialFC: labels must be an integer tensor, got {labels_local.dtype}")

    def forward(self, x_local: Tensor, labels_local: Tensor) -> tuple[Tensor, dict]:
        self._check_inputs(x_local, labels_local)
        X = gather_embeddings(x_local)
        Y = gather_labels(labels_local.to(device=x_local.device, dtype=torch.long))
        if Y.numel() and bool(((Y < 0) | (Y >= self.num_classes)).any()):
            raise HeadInputError(f"PartialFC: labels must lie in [0, {self.num_classes}), got min {int(Y.min())} "
                                 f"max {int(Y.max())} in the gathered batch")
        local = self.partition.to_local(Y)
        index = self.sample_classes(local)
        self.last_sampled = index
        track = self.training and torch.is_grad_enabled()
        rows = self.weight if index is None else self.weight[index]
        w = rows.detach().requires_grad_(track)  # a fresh leaf: the gradient is for the sampled rows only
        if index is None:
            target = local
        else:
            position = torch.searchsorted(index, local.clamp_min(0))
            target = torch.where(local >= 0, position, torch.full_like(local, -1))
        with torch.autocast(device_type=X.device.type, enabled=False):
            cos = normalize(X.to(w.dtype)) @ normalize(w).T
            logits = margin_logits(cos, target, self.margin, self.scale, self.interclass_filtering_threshold)
            loss = dist_cross_entropy(logits, target)
        if track:
            self._pending.append((index, w))
        accuracy = dist_top1_correct(cos, target).to(cos.dtype).mean()
        return loss, {"accuracy": accuracy, "num_sampled": w.shape[0]}

    # --- what heads/optim.py steps -------------------------------------------------------------------------------
    def pop_row_grads(self) -> tuple[Tensor | None, Tensor] | None:
        """(rows, grad) accumulated over the forwards since the last call, and forget them.

        rows: sorted unique local indices, or None for every row; grad: [len(rows) or C_local, D].
        None when no forward produced a gradient.
        """
        pending = [(index, w.grad) for index, w in self._pending if w.grad is not None]
        self._pending.clear()
        if not pending:
            return None
        if len(pending) == 1:
            return pending[0]
        if any(index is None for index, _ in pending):
            grad = torch.zeros_like(self.weight)
            for index, g in pending:
                if index is None:
                    grad.add_(g)
                else:
                    grad.index_add_(0, index, g)
            return None, grad
        rows, inverse = torch.unique(torch.cat([index for index, _ in pending]), sorted=True, return_inverse=True)
        grad = torch.zeros(rows.numel(), self.embedding_size, dtype=self.weight.dtype, device=self.weight.device)
        grad.index_add_(0, inverse, torch.cat([g for _, g in pending]))
        return rows, grad

    def clear_row_grads(self) -> None:
        """Drop the gradients of past forwards (zero_grad)."""
        self._pending.clear()

    def extra_repr(self) -> str:
        p = self.partition
        return (f"classes={p.num_classes} (rank {p.rank}/{p.world_size}: [{p.start}, {p.end})), "
                f"embedding_size={self.embedding_size}, margin={self.margin}, scale={self.scale}, "
                f"sample_rate={self.sample_rate}, interclass_filtering_threshold="
                f"{self.interclass_filtering_threshold}")
