"""Benchmark ranks in fresh processes: CPU ranks on gloo (forked), GPU ranks spawned.

    results = run_ranks(fn, world_size, *args, start_method="spawn", backend="gloo")

``fn(rank, world_size, *args)`` runs in every rank; the return values come back in rank order. A CUDA benchmark must
use ``spawn``: a forked child of a process that touched CUDA fails with "Cannot re-initialize CUDA in forked
subprocess", so the parent of a GPU benchmark never calls ``torch.cuda`` itself; its ranks do, and report what they
found (device name, peak memory). ``spawn`` starts a new interpreter: ``fn`` and ``args`` must be picklable
(module-level functions). ``fork`` is cheaper and is what CPU runs use (a closure may then be ``fn``).

Each rank: ``torch.set_num_threads(threads)``, a process group on 127.0.0.1 at a free port, ``fn``, the group
destroyed. Results travel as plain pickles (tensors by value). A rank that raises makes ``run_ranks`` raise
:class:`RankError` with that rank's traceback; the other ranks are killed (they may be blocked in a collective). A
run whose port was taken meanwhile ("address already in use") is started again, up to three times. The multi-rank
tests use this too (tests/distributed.py).
"""
from __future__ import annotations

import multiprocessing as mp
import pickle
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from runtime.process import free_port, is_distributed


class RankError(RuntimeError):
    """A rank raised, or did not answer in time; the message holds its traceback."""


def fix_malloc() -> None:
    """glibc: every allocation above 64 KiB is its own mapping, returned to the system when freed (no dynamic
    threshold keeping freed blocks in the heap), so that the resident set follows the live tensors (CPU memory
    measurements by resident set)."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 65536)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 131072)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def _child(conn: Connection, fn: Callable[..., Any], rank: int, world_size: int, port: int, timeout: float,
           backend: str, threads: int | None, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    if threads:
        torch.set_num_threads(threads)
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        message = pickle.dumps(("ok", result))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        message = pickle.dumps(("error", traceback.format_exc()))
    try:
        conn.send_bytes(message)
    finally:
        conn.close()


_PORT_IN_USE = "address already in use"


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, start_method: str = "fork",
              backend: str = "gloo", threads: int | None = 1, timeout: float = 3600) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes; their return values in rank order."""
    if start_method not in ("fork", "spawn", "forkserver"):
        raise ValueError(f"run_ranks: start_method must be fork, spawn or forkserver, got {start_method!r}")
    if start_method == "fork":
        if is_distributed():
            raise RankError("run_ranks: torch.distributed is initialised in the calling process; forked ranks would "
                            "inherit its process group (destroy it first)")
    for attempt in range(3):
        try:
            return _run_once(fn, world_size, args, start_method, backend, threads, timeout)
        except RankError as e:
            if _PORT_IN_USE not in str(e).lower() or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _run_once(fn: Callable[..., Any], world_size: int, args: tuple, start_method: str, backend: str,
              threads: int | None, timeout: float) -> list[Any]:
    ctx = mp.get_context(start_method)
    port = free_port()
    conns, procs = [], []
    for rank in range(world_size):
        parent_end, child_end = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(child_end, fn, rank, world_size, port, timeout, backend, threads, args),
                        daemon=True)
        p.start()
        child_end.close()
        conns.append(parent_end)
        procs.append(p)
    results: dict[int, Any] = {}
    finished = False
    deadline = time.monotonic() + timeout
    try:
        waiting = {c: r for r, c in enumerate(conns)}
        while waiting:
            ready = wait(list(waiting), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RankError(f"ranks {sorted(waiting.values())} of {world_size} did not finish within "
                                f"{timeout:.0f} s")
            for c in ready:
                rank = waiting.pop(c)
                try:
                    status, payload = pickle.loads(c.recv_bytes())
                except EOFError:
                    procs[rank].join(5)
                    raise RankError(f"rank {rank} of {world_size} died without an answer (exit code "
                                    f"{procs[rank].exitcode})") from None
                if status == "error":
                    raise RankError(f"rank {rank} of {world_size} raised:\n{payload}")
                results[rank] = payload
        finished = True
    finally:
        for p in procs:
            p.join(timeout=10 if finished else 0)  # after a failure the others may be stuck in a collective
            if p.is_alive():
                p.kill()
                p.join()
        for c in conns:
            c.close()
    return [results[r] for r in range(world_size)]
