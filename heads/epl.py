"""EPL: empirical prototypes as a sample-to-sample term (official code; class-sharded here).

State: unit prototypes P (heads/memory.py, PrototypeMemory), updated every training step from epoch 0, BEFORE the
loss, with the softsign rule. The term (heads/embedded.py switches it on from epoch 3 and averages it with the
sample-to-class rows, i.e. 1/2 (CosFace + EPL)):

    logits_ij = s * cos(x_i, sg(P_j)),  positive: s * (cos_iy - k * sg(cos_iy))     (value s(1-k)cos, grad s*cos)
    EPL       = mean_i -log softmax_j(logits_i)_y                                  (distributed logsumexp)

The official criterion exp()s raw logits (fp32 overflow); for one-hot targets it is this cross-entropy.
The prototypes have no gradient; only x does.
"""
from __future__ import annotations

from torch import Tensor

from heads.margins import AdaptiveMargin
from heads.memory import PrototypeMemory
from heads.memory_scores import softmax_mean
from heads.partial_fc import ClassScores, ShardBatch
from heads.partition import ClassPartition
from heads.precision import matmul_precision_of
from heads.sample_to_sample import MemoryTerm


class EPL(MemoryTerm):
    """Prototype softmax with the adaptive margin k * sg(cos(x, P_y))."""

    def __init__(self, partition: ClassPartition, embedding_size: int, scale: float = 64.0, k: float = 0.7,
                 init: str = "feature", seed: int = 0) -> None:
        super().__init__()
        self.memory = PrototypeMemory(partition, embedding_size, init=init, seed=seed)
        self.scale, self.margin = float(scale), AdaptiveMargin(float(k))

    def before_loss(self, batch: ShardBatch) -> None:
        self.memory.update(batch.X, batch.local)

    def loss(self, batch: ShardBatch, scores: ClassScores) -> tuple[Tensor, dict]:
        rows, valid = self.memory.rows(scores.index)
        return softmax_mean(self.unit_batch(batch, rows, scores), rows, valid, scores.target, self.scale, self.margin,
                            precision=matmul_precision_of(self)), {}

    def extra_repr(self) -> str:
        return f"scale={self.scale}, k={self.margin.k}, init={self.memory.init}"
