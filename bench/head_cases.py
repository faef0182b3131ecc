"""The head cases the benchmarks and the host-sync checks run: every loss family once, and a memory made full.

``FAMILIES`` holds one head config per loss family (bench/gpu_check.py's exactness and sync parts, the host-sync
test tests/test_host_syncs.py); ``fill_memory`` puts a head with a class memory in its steady state after the first
epoch: every row written, the sample-to-sample term switched on.
"""
from __future__ import annotations

import torch

FAMILIES = {
    "softmax": {"loss": "softmax"},
    "cosface": {"loss": "cosface"},
    "arcface": {"loss": "arcface"},
    "combined+filter": {"loss": "combined", "margin": [1.1, 0.2, 0.1], "interclass_filtering_threshold": 0.3},
    "uce": {"loss": "uce"},
    "uce_diverse": {"loss": "uce_diverse"},
    "gb_cosface": {"loss": "gb_cosface"},
    "unitsface": {"loss": "unitsface"},
    "cosface_s2s_bce": {"loss": "cosface_s2s_bce"},
    "cosface_s2s_softmax": {"loss": "cosface_s2s_softmax"},
    "epl": {"loss": "epl"},
    "uce_epl": {"loss": "uce_epl"},
}

BLOCK_ROWS = 65536


def fill_memory(head: torch.nn.Module, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> None:
    """A full memory: every latest-feature row / prototype a random unit vector and the s2s term on; nothing for a
    head without a memory. Rows are drawn from ``generator`` in ``dtype`` (float64: the same rows whatever the
    memory's dtype) and in blocks of 65,536 (no second full-size temporary)."""
    from heads import EmbeddedLoss
    if not isinstance(head, EmbeddedLoss):
        return
    memory = head.s2s.memory
    rows = memory.features if hasattr(memory, "features") else memory.prototypes
    with torch.no_grad():
        for start in range(0, rows.shape[0], BLOCK_ROWS):
            block = rows[start:start + BLOCK_ROWS]
            values = torch.nn.functional.normalize(torch.randn(block.shape, generator=generator, dtype=dtype), dim=1)
            block.copy_(values.to(rows.dtype))
        memory.valid.fill_(True)
    head.set_epoch(head.start_epoch)
