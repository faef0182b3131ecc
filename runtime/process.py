"""The process runtime every room shares: which rank am I, on which device, under which launcher; barriers and
agreement between ranks; a clean exit. Written once here; trainer, eval and heads use it.

Launchers, all read into one :class:`DistEnv` by :func:`detect`:

- ./run.sh (trainer/launch.py), the deepspeed launcher, torchrun: RANK, WORLD_SIZE, LOCAL_RANK (+ LOCAL_SIZE or
  LOCAL_WORLD_SIZE), MASTER_ADDR/PORT;
- a task of an srun step (``srun ./run.sh ...``): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the tasks per node from
  SLURM_STEP_TASKS_PER_NODE (or SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE). The master is the first host of
  SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST, compressed like "gpu[01-04,07]"), the port MASTER_PORT or one derived
  from SLURM_JOB_ID, so that every task of the job agrees without talking. Only a STEP's task is a rank (srun sets
  SLURM_STEP_NUM_TASKS): the batch script itself, which also carries SLURM_PROCID and SLURM_NTASKS, is one process;
- nothing of that: one process, rank 0 of 1.

The device: ``cuda:(local_rank % visible GPUs)`` — the only device index there is. Under ``srun --gpus-per-task=1``
every task sees its own GPU as cuda:0 whatever its local rank; under torchrun with 8 visible GPUs it is the local
rank itself. Without CUDA: the CPU, and gloo.

Agreement: :func:`agree_any` / :func:`agree_max` make one decision on every rank (an all-reduce MAX on the device
the backend uses), so that no rank takes a branch its peers do not — a rank that raises alone leaves the others
waiting in the next collective until the timeout.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

__all__ = [
    "LaunchError", "DistEnv", "detect", "first_host", "free_port",
    "device_index", "choose_device", "pick_device",
    "is_distributed", "rank_world", "collective_device", "barrier", "agree_any", "agree_max",
    "init_process_group", "start", "shutdown", "exit_process", "abort_process",
]


class LaunchError(RuntimeError):
    """The launcher's environment is inconsistent; the message names the variable."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "facetrain" (./run.sh) | "deepspeed" | "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def environ(self) -> dict[str, str]:
        """The variables that describe this rank to a process (what ./run.sh's launcher and the deepspeed launcher
        export; :func:`detect` reads them back)."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "LOCAL_SIZE": str(self.local_world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


# ------------------------------------------------------------------------------------------------ launchers
def _int(env: Mapping[str, str], name: str, default: str | None = None) -> int:
    value = env.get(name, default)
    if value is None:
        raise LaunchError(f"environment variable {name} is missing")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r}: expected an integer") from None


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: "gpu[03-05,9],cpu1" -> "gpu03"; "a1,a2" -> "a1"."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise LaunchError(f"SLURM node list {nodelist!r}: cannot read a host name from it")
    prefix, ranges = m.group(1), m.group(2)
    return prefix if ranges is None else prefix + re.split(r"[,-]", ranges)[0]


def _tasks_per_node(env: Mapping[str, str], local_rank: int) -> int:
    """SLURM writes e.g. "4(x2),3" (4 tasks on 2 nodes, then 3): the first count is this job's usual per-node size.
    Without any of the variables: local_rank + 1, the least it can be."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        m = re.match(r"(\d+)", env.get(name, ""))
        if m:
            return int(m.group(1))
    return local_rank + 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect(env: Mapping[str, str] | None = None) -> DistEnv:
    """The launcher this process runs under, from its environment (``os.environ`` by default)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = env.get("FACETRAIN_LAUNCHER") or (
            "torchrun" if "TORCHELASTIC_RUN_ID" in env or "LOCAL_WORLD_SIZE" in env else "deepspeed")
        local_rank = _int(env, "LOCAL_RANK", "0")
        d = DistEnv(_int(env, "RANK"), _int(env, "WORLD_SIZE"), local_rank,
                    _int(env, "LOCAL_SIZE" if "LOCAL_SIZE" in env else "LOCAL_WORLD_SIZE", env["WORLD_SIZE"]),
                    env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", "29500"), launcher)
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_NUM_TASKS" in env:  # an srun step's task
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist and _int(env, "SLURM_NTASKS") > 1:
            raise LaunchError("SLURM_JOB_NODELIST is missing: cannot tell the master host")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 15000 + _int(env, "SLURM_JOB_ID", "0") % 20000
        local_rank = _int(env, "SLURM_LOCALID", "0")
        d = DistEnv(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), local_rank,
                    _tasks_per_node(env, local_rank), env.get("MASTER_ADDR") or first_host(nodelist or "127.0.0.1"),
                    port, "slurm")
    else:
        return DistEnv(0, 1, 0, 1, "127.0.0.1", _int(env, "MASTER_PORT", "0") or free_port(), "single")
    if not 0 <= d.rank < d.world_size:
        raise LaunchError(f"rank {d.rank} is outside world size {d.world_size} (launcher: {d.launcher})")
    if not 0 <= d.local_rank < max(d.local_world_size, 1):
        raise LaunchError(f"local rank {d.local_rank} is outside local world size {d.local_world_size} "
                          f"(launcher: {d.launcher})")
    return d


# ------------------------------------------------------------------------------------------------ the device
def device_index(local_rank: int, device_count: int) -> int:
    """The GPU a rank uses among the ``device_count`` it sees: ``local_rank % device_count`` (see the module
    docstring: srun's one GPU per task gives 0 on every rank, torchrun's all-visible GPUs the local rank)."""
    if device_count < 1:
        raise LaunchError(f"no GPU visible (device_count={device_count}): no CUDA device is visible to this rank; "
                          f"expected at least one (CUDA_VISIBLE_DEVICES?)")
    if local_rank < 0:
        raise LaunchError(f"device_index: local rank must be >= 0, got {local_rank}")
    return local_rank % device_count


def choose_device(requested: str | None, local_rank: int, device_count: int) -> torch.device:
    """``requested`` when it names a device fully (``cpu``, ``cuda:1``); a bare ``cuda`` or nothing means this rank's
    GPU, cuda:device_index(local_rank, device_count), when ``device_count`` > 0, else (nothing asked) the CPU."""
    if requested is not None:
        dev = torch.device(requested)
        if dev.type != "cuda" or dev.index is not None:
            return dev
    elif device_count < 1:
        return torch.device("cpu")
    return torch.device("cuda", device_index(local_rank, device_count))


def pick_device(d: DistEnv, requested: str | None = None) -> torch.device:
    """This rank's device (:func:`choose_device` on the GPUs it sees), made current when it is a GPU. Refuses more
    ranks on a node than visible GPUs when every rank sees several (two NCCL ranks cannot share one GPU)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested is None and count > 1 and d.local_world_size > count:
        raise LaunchError(f"{d.local_world_size} ranks on this node but {count} GPUs visible: two NCCL ranks "
                          f"cannot share a GPU; start one rank per GPU (NPROC={count}), or give each task its own "
                          f"GPU (srun --gpus-per-task=1)")
    dev = choose_device(requested, d.local_rank, count)
    if dev.type == "cuda":
        torch.cuda.set_device(dev.index)
    return dev


# ------------------------------------------------------------------------------------------------ the group
def is_distributed() -> bool:
    """True when torch.distributed is initialised (even with a single rank)."""
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def collective_device() -> torch.device:
    """Where a tensor must live for the default group's collectives: the current GPU under nccl, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def agree_max(value: float) -> float:
    """The largest ``value`` over all ranks, on every rank (one all-reduce; the value itself without a group)."""
    if rank_world()[1] == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def agree_any(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank."""
    return agree_max(1.0 if flag else 0.0) > 0


def init_process_group(d: DistEnv, device: torch.device, timeout_s: int = 3600) -> None:
    """Join the group ``d`` describes with plain torch.distributed (nccl on CUDA, gloo on CPU); nothing is exported
    to the environment. One process, or a group that already exists (tests, the trainer's): nothing to do.
    torchrun / deepspeed / ./run.sh: ``env://`` (under torchrun the elastic agent's store is reused); srun: tcp to
    the master host."""
    if d.world_size == 1 or is_distributed():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if d.launcher == "slurm":
        dist.init_process_group(backend, init_method=f"tcp://{d.master_addr}:{d.master_port}", rank=d.rank,
                                world_size=d.world_size, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method="env://", timeout=timeout)


def start(requested_device: str | None = None) -> tuple[int, int, torch.device]:
    """Detect the launcher, pick this rank's device and join its group: (rank, world size, device)."""
    d = detect()
    dev = pick_device(d, requested_device)
    init_process_group(d, dev)
    rank, world = rank_world()
    return rank, world, dev


# ------------------------------------------------------------------------------------------------ the end
def shutdown(synchronize: bool = False) -> None:
    """Destroy the process group; with ``synchronize`` (a normal end) after a barrier, so that no rank tears its
    side down while a peer is still in a collective. (Not after an error: a barrier would wait for the timeout.)"""
    if is_distributed():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def _flush(handlers: bool) -> None:
    if handlers:
        for handler in logging.getLogger("facetrain").handlers:
            try:
                handler.flush()
            except (OSError, ValueError):
                pass
    else:
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def exit_process(code: int) -> None:
    """End a rank's process: destroy the process group (after a barrier on a normal end), flush, and leave without
    interpreter finalization.

    Gloo's worker threads can abort a process during interpreter teardown ("terminate called without an active
    exception", SIGABRT; seen here once in ~100 two-rank runs, after every file had been written), which a launcher
    reports as a failed job. Everything this project writes is closed before this point (checkpoints are renamed
    into place, logs flushed here), so skipping finalization loses nothing.
    """
    shutdown(synchronize=code == 0)
    _flush(handlers=False)
    os._exit(code)


def abort_process(code: int) -> None:
    """End this rank at once from any thread (the watchdog's hang verdict): flush the logs and leave, without
    touching the process group, which a peer may be holding in a collective."""
    _flush(handlers=True)
    os._exit(code)
