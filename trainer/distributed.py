"""DeepSpeed's side of starting a rank: its communication layer on the process group runtime.process describes.

Which rank, which device, which launcher: runtime.process (shared with eval and heads). What is particular to the
trainer is only this: DeepSpeed starts torch.distributed itself (so that its engine finds the group), takes its device
from LOCAL_RANK, and on CPU would JIT-compile a shared-memory all-reduce (~60 s on every fresh machine) unless told
not to.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch

from runtime.process import DistEnv


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
    os.environ.update({**d.environ(), "LOCAL_RANK": str(local_rank), "FACETRAIN_LOCAL_RANK": str(d.local_rank)})
    backend = "nccl" if device.type == "cuda" else "gloo"
    prepare_deepspeed(device)
    import deepspeed
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s),
                               rank=d.rank, world_size=d.world_size, distributed_port=d.master_port)
