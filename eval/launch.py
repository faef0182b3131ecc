"""Which rank am I, on which device — eval's own launcher handling (eval never imports the trainer).

Launchers understood:
- torchrun / the deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (``env://``; under
  torchrun the elastic agent's store is reused);
- an srun step (``srun ./run.sh eval ...``, one task per GPU): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master
  is the first host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST), the port MASTER_PORT or one derived from
  SLURM_JOB_ID so that every task of the job agrees without talking;
- nothing of that: one process, rank 0 of 1.

The CUDA device is ``cuda:(local_rank % torch.cuda.device_count())`` — everywhere, the only device index there is.
Under srun with one visible GPU per task (``--gpus-per-task=1``) every task sees its GPU as cuda:0 although its
local rank is 0..n−1, so the raw local rank would be an invalid ordinal on all but local rank 0; under torchrun
with 8 visible GPUs it is local_rank itself. Nothing is exported to the environment (no LOCAL_RANK that could
disagree with the device in use): the process group is started from the values detected here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

__all__ = [
    "LaunchError",
    "Launch",
    "detect_launch",
    "first_host",
    "cuda_device_index",
    "choose_device",
    "dist_rank_world",
    "init_distributed_from_env",
    "exit_process",
]


class LaunchError(RuntimeError):
    """The launcher's environment is inconsistent; the message names the variable."""


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "deepspeed" | "slurm" | "single"


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


def detect_launch(env: Mapping[str, str] | None = None) -> Launch:
    """The launcher this process runs under, from its environment (``os.environ`` by default)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
        launch = Launch(_int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK", "0"),
                        env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", "29500"), launcher)
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_NUM_TASKS" in env:  # an srun step
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist and _int(env, "SLURM_NTASKS") > 1:
            raise LaunchError("SLURM_JOB_NODELIST is missing: cannot tell the master host")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 15000 + _int(env, "SLURM_JOB_ID", "0") % 20000
        launch = Launch(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID", "0"),
                        env.get("MASTER_ADDR") or first_host(nodelist or "127.0.0.1"), port, "slurm")
    else:
        return Launch(0, 1, 0, "127.0.0.1", 0, "single")
    if not 0 <= launch.rank < launch.world_size:
        raise LaunchError(f"rank {launch.rank} is outside world size {launch.world_size} ({launch.launcher})")
    if launch.local_rank < 0:
        raise LaunchError(f"local rank {launch.local_rank} is negative ({launch.launcher})")
    return launch


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """This rank's CUDA device among the visible ones: local_rank % device_count."""
    if device_count < 1:
        raise LaunchError("no CUDA device is visible")
    return local_rank % device_count


def choose_device(requested: str | None, local_rank: int, device_count: int) -> torch.device:
    """``requested`` if it names a device index (``cpu``, ``cuda:1``); a bare ``cuda`` or nothing means this rank's
    GPU, cuda:(local_rank % device_count), when ``device_count`` > 0, else the CPU."""
    if requested is not None:
        dev = torch.device(requested)
        if dev.type != "cuda" or dev.index is not None:
            return dev
        if device_count < 1:
            raise LaunchError(f"--device {requested}: no CUDA device is visible")
    elif device_count < 1:
        return torch.device("cpu")
    return torch.device("cuda", cuda_device_index(local_rank, device_count))


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env(device: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group the launcher describes and pick this rank's device (see the module docstring).

    Returns (rank, world size, device). One process without launcher variables: no group, rank 0 of 1. A group
    that already exists (tests, the trainer) is used as it is. Backend: nccl on CUDA, gloo on CPU.
    """
    launch = detect_launch()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    dev = choose_device(device, launch.local_rank, count)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if launch.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = timedelta(minutes=60)
        if launch.launcher == "slurm":
            dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                    rank=launch.rank, world_size=launch.world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
    rank, world = dist_rank_world()
    return rank, world, dev


def exit_process(code: int) -> None:
    """End an eval process: destroy the process group (after a barrier on a normal end), flush, and leave without
    interpreter finalization — gloo's threads can abort a process during teardown (SIGABRT after every file was
    written), which a launcher would report as a failed job."""
    import sys

    if dist.is_available() and dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
