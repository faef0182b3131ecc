"""One view of "which rank am I" for every launcher: deepspeed, torchrun, SLURM's srun, or a plain process.

- deepspeed launcher / torchrun: RANK, WORLD_SIZE, LOCAL_RANK (+ LOCAL_SIZE or LOCAL_WORLD_SIZE), MASTER_ADDR/PORT.
- srun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE or SLURM_STEP_TASKS_PER_NODE; the master is
  the first host of SLURM_JOB_NODELIST (compressed form like "gpu[01-04,07]"), the port MASTER_PORT or one derived
  from SLURM_JOB_ID so that all tasks of a job agree without talking.
- nothing: one process, rank 0 of 1.
Backend: nccl when CUDA is available, gloo otherwise. On CPU, DeepSpeed's shared-memory all-reduce op would be
JIT-compiled (~60 s) on every fresh machine; it is switched off before DeepSpeed's communication starts, so CPU runs
use plain gloo collectives.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch


class LaunchError(RuntimeError):
    """The launcher environment is inconsistent; the message names the variable."""


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


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise LaunchError(f"environment variable {name} is missing") from None
    except ValueError:
        raise LaunchError(f"environment variable {name}={env[name]!r}: expected an integer") from None


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: "gpu[03-05,9],cpu1" -> "gpu03"; "a1,a2" -> "a1"."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m or not m.group(1):
        raise LaunchError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot read a host name from it")
    prefix, ranges = m.group(1), m.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _tasks_per_node(env: Mapping[str, str]) -> int:
    """SLURM writes e.g. "4(x2),3" (4 tasks on 2 nodes, then 3): the first count is this job's usual per-node size."""
    for name in ("SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if name in env:
            m = re.match(r"(\d+)", env[name])
            if m:
                return int(m.group(1))
    return 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect(env: Mapping[str, str] | None = None) -> DistEnv:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = env.get("FACETRAIN_LAUNCHER") or (
            "torchrun" if "TORCHELASTIC_RUN_ID" in env or "LOCAL_WORLD_SIZE" in env else "deepspeed")
        local_world = env.get("LOCAL_SIZE") or env.get("LOCAL_WORLD_SIZE") or env["WORLD_SIZE"]
        d = DistEnv(_int(env, "RANK"), _int(env, "WORLD_SIZE"), int(env.get("LOCAL_RANK", "0")), int(local_world),
                    env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")), launcher)
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else 15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise LaunchError("SLURM_JOB_NODELIST is missing: cannot tell the master host")
        d = DistEnv(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), int(env.get("SLURM_LOCALID", "0")),
                    _tasks_per_node(env), env.get("MASTER_ADDR") or first_host(nodelist), port, "slurm")
    else:
        d = DistEnv(0, 1, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT", "0")) or free_port(), "single")
    if not 0 <= d.rank < d.world_size:
        raise LaunchError(f"rank {d.rank} is outside world size {d.world_size} (launcher: {d.launcher})")
    if not 0 <= d.local_rank < max(d.local_world_size, 1):
        raise LaunchError(f"local rank {d.local_rank} is outside local world size {d.local_world_size}")
    return d


def device_index(local_rank: int, device_count: int) -> int:
    """The GPU a rank uses among the ``device_count`` it sees: ``local_rank % device_count``.

    One GPU per rank on a node (deepspeed launcher, torchrun: every rank sees all of the node's GPUs) gives
    ``local_rank``; ``srun --gpus-per-task=1`` (each task sees ONE GPU, CUDA_VISIBLE_DEVICES set per task) gives 0 on
    every rank, whatever its local rank.
    """
    if device_count < 1:
        raise LaunchError(f"device_index: no GPU visible (device_count={device_count}); expected at least one")
    if local_rank < 0:
        raise LaunchError(f"device_index: local rank must be >= 0, got {local_rank}")
    return local_rank % device_count


def pick_device(d: DistEnv) -> torch.device:
    """This rank's device: cuda:device_index(local_rank, visible GPUs), made current; cpu without CUDA.

    ``init`` exports the chosen index as LOCAL_RANK, which is what DeepSpeed uses to pick its device.
    """
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count > 1 and d.local_world_size > count:
            raise LaunchError(f"{d.local_world_size} ranks on this node but {count} GPUs visible: two NCCL ranks "
                              f"cannot share a GPU; start one rank per GPU (NPROC={count}), or give each task its own "
                              f"GPU (srun --gpus-per-task=1)")
        index = device_index(d.local_rank, count)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def prepare_deepspeed(device: torch.device) -> None:
    """Call before DeepSpeed's comm layer starts. On CPU: plain gloo collectives, no shm-op JIT build (~60 s).

    DeepSpeed reads `deepspeed.ops.__compatible_ops__` (probed lazily on first access, then cached) only to decide
    whether to build its shared-memory all-reduce. On CPU the table is filled with False before anything probes it:
    no op is compiled, and the probe's own compiler runs (and their linker noise) are skipped too.
    """
    if device.type != "cpu":
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops as ops
    table = vars(ops)
    if "__compatible_ops__" in table:
        table["__compatible_ops__"]["deepspeed_shm_comm"] = False
    else:
        from deepspeed.ops.op_builder.all_ops import ALL_OPS
        table["__compatible_ops__"] = {**dict.fromkeys(ALL_OPS, False), "deepspeed_not_implemented": False}


def init(d: DistEnv, device: torch.device, timeout_s: int = 1800) -> None:
    """Start torch.distributed through DeepSpeed's comm layer (so the engine finds it), on nccl or gloo.

    DeepSpeed takes its device from LOCAL_RANK (``cuda:LOCAL_RANK``), so LOCAL_RANK is exported as the index of the
    device ``pick_device`` chose, not the launcher's local rank: under ``srun`` with one visible GPU per task, local
    rank 3 uses cuda:0, and cuda:3 would be an invalid device ordinal. The launcher's local rank stays in
    FACETRAIN_LOCAL_RANK (and in ``d.local_rank``).
    """
    local_rank = device.index if device.type == "cuda" and device.index is not None else d.local_rank
    for k, v in (("RANK", d.rank), ("WORLD_SIZE", d.world_size), ("LOCAL_RANK", local_rank),
                 ("FACETRAIN_LOCAL_RANK", d.local_rank), ("MASTER_ADDR", d.master_addr),
                 ("MASTER_PORT", d.master_port)):
        os.environ[k] = str(v)
    backend = "nccl" if device.type == "cuda" else "gloo"
    prepare_deepspeed(device)
    import deepspeed
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s),
                               rank=d.rank, world_size=d.world_size, distributed_port=d.master_port)


def shutdown(synchronize: bool = False) -> None:
    """Destroy the process group; with ``synchronize`` (a normal end) after a barrier, so that no rank tears its
    side down while a peer is still in a collective. (Not after an error: a barrier would wait for the timeout.)"""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if synchronize:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_process(code: int) -> None:
    """End a rank's process: destroy the process group, flush, and leave without interpreter finalization.

    Gloo's worker threads can abort a process during interpreter teardown ("terminate called without an active
    exception", SIGABRT; seen here once in ~100 two-rank runs, after every file had been written), which a launcher
    reports as a failed job. Everything this project writes is closed before this point (checkpoints are renamed
    into place, logs flushed below), so skipping finalization loses nothing.
    """
    import logging
    import sys
    shutdown(synchronize=code == 0)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def abort_process(code: int) -> None:
    """End this rank at once from any thread (the watchdog's hang verdict): flush the logs and leave, without
    touching the process group, which a peer may be holding in a collective."""
    import logging
    import sys
    for handler in logging.getLogger("facetrain").handlers:
        try:
            handler.flush()
        except (OSError, ValueError):
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
