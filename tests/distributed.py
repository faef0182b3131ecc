"""A multi-rank test harness: real torch.distributed (gloo) ranks in forked processes.

    results = run_ranks(fn, world_size, *args)      # fn(rank, world_size, *args) in every rank, in parallel

Each rank: torch.set_num_threads(1), gloo process group on 127.0.0.1 at a free port, fn runs, the group is
destroyed. Returns the ranks' return values (picklable) in rank order. A rank that raises makes run_ranks raise
RankError with that rank's traceback (the other ranks are killed: they may be blocked in a collective).

Processes are forked (cheap: torch is already imported), so ``fn`` may be any callable, a closure included.
Results travel as plain pickles (tensors by value, not through shared-memory file descriptors). Forked children
cannot use CUDA if the calling process initialised it: these are CPU (gloo) tests. The machinery is the benchmarks'
(:func:`bench.ranks.run_ranks`, forked gloo ranks of one thread); here only the tests' time limit differs.
"""
from __future__ import annotations

from typing import Any, Callable

from bench.ranks import RankError, free_port
from bench.ranks import run_ranks as _run_ranks

__all__ = ["RankError", "free_port", "run_ranks"]


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; their return values in rank order."""
    return _run_ranks(fn, world_size, *args, start_method="fork", backend="gloo", threads=1, timeout=timeout)
