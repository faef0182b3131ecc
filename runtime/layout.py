"""What a run leaves on disk, declared once: the trainer writes this layout, eval and the tables read it.

The run folder (key `output`), and which module writes what:
    OUTPUT/config.yaml                   the resolved configuration, at start (trainer/monitor.py)
    OUTPUT/train.log                     rank 0's log (trainer/log.py)
    OUTPUT/metrics.csv, tensorboard/, curves.png     scalars and evaluations (trainer/monitor.py)
    OUTPUT/run.lock, .heartbeat/         one run per folder, the ranks' liveness (trainer/runlock.py, watchdog.py)
    OUTPUT/checkpoints/                  below (trainer/checkpoint.py)

The checkpoints:
    OUTPUT/checkpoints/TAG/              TAG = epoch_0003 (end of epoch 3, 1-based) or step_0000123 (between ends)
        <DeepSpeed engine files>         engine.save_checkpoint: backbone weights and its optimizer (ZeRO shards)
        head/rank_000_of_002.pt          one rank's head state (class-sharded buffers), head optimizer, RNG states
        backbone.pth                     plain backbone state dict (arcface_torch's layout: eval loads it strictly)
        config.yaml                      the run's resolved configuration (eval builds the network from `model:`)
        meta.json                        epoch, position in samples, global step, world size, number of classes
    OUTPUT/checkpoints/latest            the tag of the newest complete checkpoint (replaced last, atomically)
    OUTPUT/checkpoints/.tmp-TAG/         a save in progress (renamed to TAG when every rank has written its part)
"""
from __future__ import annotations

import os
from pathlib import Path

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BACKBONE_FILE = "backbone.pth"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
HEAD_DIR = "head"
TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint is missing, inconsistent or does not fit; the message names the folder or file."""


def checkpoints_dir(output: str | os.PathLike) -> Path:
    return Path(output) / CHECKPOINTS


def epoch_tag(epochs_done: int) -> str:
    return f"epoch_{epochs_done:04d}"


def step_tag(global_step: int) -> str:
    return f"step_{global_step:07d}"


def head_file(folder: str | os.PathLike, rank: int, world_size: int) -> Path:
    return Path(folder) / HEAD_DIR / f"rank_{rank:03d}_of_{world_size:03d}.pt"


def latest_tag(root: str | os.PathLike) -> str | None:
    """The tag ``root/latest`` names (``root`` = OUTPUT/checkpoints); None when there is none yet."""
    latest = Path(root) / LATEST
    return latest.read_text().strip() if latest.is_file() else None


def newest_checkpoint(output: str | os.PathLike) -> Path | None:
    """OUTPUT/checkpoints/<latest> of a run folder; None when ``output`` holds no complete checkpoint."""
    tag = latest_tag(checkpoints_dir(output))
    return None if tag is None else checkpoints_dir(output) / tag


def checkpoint_folder(path: str | os.PathLike) -> Path:
    """The checkpoint a path names: a run folder (no backbone.pth, a checkpoints/latest) stands for its newest
    checkpoint; any other path (a checkpoint folder, a weights file, a folder of results) for itself."""
    p = Path(path)
    if p.is_dir() and not (p / BACKBONE_FILE).is_file():
        newest = newest_checkpoint(p)
        if newest is not None:
            return newest
    return p
