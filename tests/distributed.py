"""A multi-rank test harness: real torch.distributed (gloo) ranks in forked processes.

    results = run_ranks(fn, world_size, *args)      # fn(rank, world_size, *args) in every rank, in parallel

Each rank: torch.set_num_threads(1), gloo process group on 127.0.0.1 at a free port, fn runs, the group is
destroyed. Returns the ranks' return values (picklable) in rank order. A rank that raises makes run_ranks raise
RankError with that rank's traceback (the other ranks are killed: they may be blocked in a collective).

Processes are forked (cheap: torch is already imported), so ``fn`` may be any callable, a closure included.
Results travel as plain pickles (tensors by value, not through shared-memory file descriptors). Forked children
cannot use CUDA if the calling process initialised it: these are CPU (gloo) tests.
"""
from __future__ import annotations

import multiprocessing as mp
import pickle
import socket
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

import torch
import torch.distributed as dist

_PORT_IN_USE = "address already in use"


class RankError(RuntimeError):
    """A rank raised, or did not answer in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(conn: Connection, fn: Callable[..., Any], rank: int, world_size: int, port: int, timeout: float,
           args: tuple) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
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


def _run_once(fn: Callable[..., Any], world_size: int, args: tuple, timeout: float) -> list[Any]:
    ctx = mp.get_context("fork")
    port = free_port()
    conns, procs = [], []
    for rank in range(world_size):
        parent_end, child_end = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(child_end, fn, rank, world_size, port, timeout, args), daemon=True)
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
                    code = procs[rank].join(5) or procs[rank].exitcode
                    raise RankError(f"rank {rank} of {world_size} died without an answer (exit code {code})")
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


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; their return values in rank order."""
    if dist.is_available() and dist.is_initialized():
        raise RankError("run_ranks: torch.distributed is initialised in the calling process; forked ranks would "
                        "inherit its process group (destroy it first)")
    for attempt in range(3):
        try:
            return _run_once(fn, world_size, args, timeout)
        except RankError as e:
            if _PORT_IN_USE not in str(e).lower() or attempt == 2:
                raise
    raise AssertionError("unreachable")
