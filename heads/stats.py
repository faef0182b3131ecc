"""Statistics a head computes only when asked: what the trainer logs, not what the loss needs.

Two numbers cost collectives or class-sized passes every step while the trainer reads them only on log steps:

* ``accuracy`` (top-1 of the global batch on the sampled cosines): one more pass over the [N, K] block and two
  all-reduces (the global row maximum, the target cosine);
* ``memory_filled`` (the fraction of memory rows ever written): a pass over a class-sized vector and an all-reduce;

plus, for heads with one bias per class, the mean bias over all ranks (an all-reduce). Each module reads its own
``collect_stats`` flag (True unless switched off, so a head used on its own logs everything, as before).

    heads.set_collect_stats(head, step % log_every == 0)     # the trainer, before the head's forward

With the statistics off, the logs carry only what the loss computed anyway (learned thresholds, p_v, sub-losses,
``num_sampled``), all without a host sync.
"""
from __future__ import annotations

from torch import nn


def set_collect_stats(head: nn.Module, enabled: bool) -> None:
    """Switch the logging statistics of ``head`` and of every submodule on or off (default: on)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_collect_stats: enabled must be True or False, got {enabled!r}")
    for module in head.modules():
        module.collect_stats = enabled


def collects_stats(module: nn.Module) -> bool:
    """Whether ``module`` should compute its logging statistics in this forward."""
    return getattr(module, "collect_stats", True)
