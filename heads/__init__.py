"""Heads: the class-sharded part of the network and its losses, picked by name from the config.

``build_head(cfg, num_classes, embedding_size, partition, seed)`` (heads/registry.py) builds the head that the
config's ``head:`` section names; heads/builders.py lists every loss with its keys and defaults:

    sample-to-class   softmax, cosface, arcface, combined (heads/partial_fc.py), uce (heads/uce.py),
                      gb_cosface (heads/gb_cosface.py)
    sample-to-sample  uss, s2s_bce, s2s_softmax (heads/sample_to_sample.py), epl (heads/epl.py), added with
                      ``s2s:`` to any sample-to-class loss (heads/embedded.py)
    presets           unitsface, arcface_uss, cosface_s2s_softmax, cosface_s2s_bce, epl, arcface_epl, uce_epl,
                      uce_diverse

Every head is a ``Head`` (heads/protocol.py; build_head returns one and checks it), an nn.Module with:
``forward(x_local, labels_local) -> (loss, logs)`` with the global-batch loss identical on every rank (heads/comm.py:
the gradient convention), ``set_epoch(epoch)`` (the epoch hook: memory terms start at their start epoch; a no-op for
sample-to-class heads), ``learned_thresholds()`` (cosine thresholds the loss learns: USS/UCE b/s, GB-CosFace p_v),
``per_class_buffers()`` (what a checkpoint reshards), ``partition`` (heads/partition.py: the class range of this
rank, the same for centres, memories and per-class biases), and ``state_dict`` / ``load_state_dict``.
heads/optim.py's HeadOptimizer steps them: row-sparse tables (heads/rows.py: RowSparseRows, the centres and the
ClassBias per-class biases) on the rows used, dense parameters after an all-reduce. Seeds: heads/seeds.py.

A training step of any head makes no host sync (heads/blocks.py) unless asked for statistics:
``set_collect_stats(head, enabled)`` (heads/stats.py) switches the top-1 accuracy and the memory fill on or off (on
by default; the trainer turns them on for log steps). ``set_matmul_precision(head, "fp32" | "tf32" | "bf16")``
(heads/precision.py; config key ``head.matmul_precision``) sets the precision of the [N, D] x [D, K] products.
"""
from __future__ import annotations

from heads import builders as _builders  # noqa: F401  (registers every loss)
from heads.builders import PRESET_TABLE
from heads.embedded import EmbeddedLoss
from heads.epl import EPL
from heads.gb_cosface import GBCosFace
from heads.margins import AdaptiveMargin, CombinedMargin
from heads.partial_fc import PartialFC
from heads.partition import ClassPartition
from heads.precision import MATMUL_PRECISIONS, set_matmul_precision
from heads.protocol import Head
from heads.registry import (
    HEADS,
    PRESETS,
    S2S_TERMS,
    HeadConfigError,
    build_head,
    flag,
    loss_names,
    number,
    read_options,
    register_head,
    register_preset,
    register_s2s,
)
from heads.sample_to_sample import S2SBCE, USS, S2SSoftmax
from heads.stats import collects_stats, set_collect_stats
from heads.uce import UniformBCE

__all__ = ["Head", "HEADS", "PRESETS", "S2S_TERMS", "PRESET_TABLE", "HeadConfigError", "build_head", "register_head",
           "register_s2s", "register_preset", "loss_names", "read_options", "number", "flag", "ClassPartition",
           "PartialFC", "UniformBCE", "GBCosFace", "EmbeddedLoss", "USS", "S2SBCE", "S2SSoftmax", "EPL",
           "CombinedMargin", "AdaptiveMargin", "set_collect_stats", "collects_stats", "set_matmul_precision",
           "MATMUL_PRECISIONS"]
