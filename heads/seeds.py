"""The heads' one seed mixer, and the per-class random rows drawn with it.

``derive_seed(*parts)`` mixes integers into a 63-bit seed (splitmix64 steps), so that distinct tuples give unrelated
torch.Generator streams. Every random stream of the heads is seeded through it:

    centres          derive_seed(seed, 0xCE, block)      init_centres, one stream per block of INIT_BLOCK classes
    noise prototypes derive_seed(seed, 0xE91)            the "seed" argument of init_centres (heads/memory.py, EPL)
    class sampler    derive_seed(seed, rank)             PartialFC's sampler (heads/partial_fc.py)

Initial rows are drawn per block of classes, each block from its own stream, so the initial row of a class does not
depend on the number of ranks. These numbers are what checkpoints and reference tests were made with: changing the
mixer changes every run's initialisation.
"""
from __future__ import annotations

import torch
from torch import Tensor

INIT_BLOCK = 4096
"""Rows are drawn in blocks of this many classes, each from its own seed: the initial row of a class does not
depend on the number of ranks."""


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
    """N(0, std^2) rows of classes [start, start + num_local), float32, independent of the partition."""
    out = torch.empty(num_local, embedding_size)
    end = start + num_local
    for block in range(start // INIT_BLOCK, (end + INIT_BLOCK - 1) // INIT_BLOCK):
        lo, hi = block * INIT_BLOCK, (block + 1) * INIT_BLOCK
        gen = torch.Generator().manual_seed(derive_seed(seed, 0xCE, block))
        rows = torch.randn(INIT_BLOCK, embedding_size, generator=gen) * std
        a, b = max(lo, start), min(hi, end)
        out[a - start:b - start] = rows[a - lo:b - lo]
    return out
