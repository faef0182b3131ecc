"""Checkpoints: engine + head shards + head optimizer + RNG + data position + config, written atomically.

Layout of OUTPUT/checkpoints/TAG/ (TAG = epoch_0003 at the end of epoch 3, 1-based; step_000123 mid-epoch):
    <DeepSpeed engine files>           engine.save_checkpoint: backbone weights and its optimizer (ZeRO shards)
    head/rank_000_of_002.pt            this rank's head state (class-sharded buffers), head optimizer, RNG states
    backbone.pth                       plain backbone state dict (eval, arcface_torch layout)
    config.yaml                        the resolved run configuration (eval reads `model:` from it)
    meta.json                          epoch, step_in_epoch, global_step, world_size, num_classes
OUTPUT/checkpoints/latest              the tag of the newest complete checkpoint

Atomicity: everything is written under .tmp-TAG and renamed to TAG by rank 0 after every rank has finished; `latest`
is replaced last. A crash mid-save leaves the previous checkpoint intact.

Resharding: a checkpoint written by W ranks loads on W' ranks. Per-class head buffers (centres, momentum, memories)
are concatenated in class order and split by the new partition; replicated head state comes from rank 0's file.
The backbone's optimizer state loads exactly under ZeRO stage 0; under ZeRO >= 1 with a different W it is reset
(logged), since DeepSpeed's ZeRO shards are tied to the rank count.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainer.config import dump_config

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or inconsistent; the message names the folder and file."""


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def head_file(folder: Path, rank: int, world_size: int) -> Path:
    return folder / "head" / f"rank_{rank:03d}_of_{world_size:03d}.pt"


def save(root: Path, tag: str, *, engine, head, head_opt, cfg: dict, meta: dict, rank: int, world_size: int,
         keep: int | None = None) -> Path:
    """Write checkpoint `tag` under `root` (collective: call on every rank)."""
    root = Path(root)
    tmp_tag = f".tmp-{tag}"
    tmp = root / tmp_tag
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    head_state = {"head": head.state_dict(), "head_optimizer": head_opt.state_dict(), "rng": _rng_state(),
                  "world_size": world_size, "rank": rank}
    hf = head_file(tmp, rank, world_size)
    hf.parent.mkdir(parents=True, exist_ok=True)
    torch.save(head_state, hf)
    if rank == 0:
        torch.save({k: v.detach().cpu() for k, v in engine.module.state_dict().items()}, tmp / "backbone.pth")
        (tmp / "config.yaml").write_text(dump_config(cfg))
        (tmp / "meta.json").write_text(json.dumps({**meta, "world_size": world_size, "tag": tag,
                                                   "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    _barrier()
    if rank == 0:
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / f".{LATEST}.tmp"
        latest_tmp.write_text(tag + "\n")
        os.replace(latest_tmp, root / LATEST)
        if keep:
            _prune(root, keep)
    _barrier()
    return root / tag


def _prune(root: Path, keep: int) -> None:
    epochs = sorted(p for p in root.glob("epoch_*") if p.is_dir())
    for old in epochs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resolve(resume: str, output: Path) -> Path | None:
    """`auto` -> newest complete checkpoint under output/checkpoints (None if there is none); else the given folder."""
    if resume == "auto":
        latest = Path(output) / "checkpoints" / LATEST
        if not latest.is_file():
            return None
        folder = latest.parent / latest.read_text().strip()
    else:
        folder = Path(resume)
    if not (folder / "meta.json").is_file():
        raise CheckpointError(f"train.resume={resume!r}: {folder} is not a complete checkpoint (no meta.json)")
    return folder


def read_meta(folder: Path) -> dict:
    return json.loads((Path(folder) / "meta.json").read_text())


def load(folder: Path, *, engine, head, head_opt, rank: int, world_size: int, zero_stage: int,
         log=print) -> dict:
    """Restore a checkpoint written by any number of ranks into this run; returns its meta."""
    folder = Path(folder)
    meta = read_meta(folder)
    old_w = int(meta["world_size"])
    same_world = old_w == world_size
    load_opt = same_world or zero_stage == 0
    path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=load_opt,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"{folder}: DeepSpeed found no engine checkpoint in it")
    if not load_opt:
        log(f"resume: checkpoint written by {old_w} ranks, now {world_size} with ZeRO stage {zero_stage}: backbone "
            f"weights restored, backbone optimizer momentum reset")
    files = [head_file(folder, r, old_w) for r in range(old_w)]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{folder}: head shard {f.name} is missing (the checkpoint was written by {old_w} "
                                  f"ranks)")
    if same_world:
        state = torch.load(files[rank], map_location="cpu", weights_only=False)
        head.load_state_dict(state["head"])
        _set_rng_state(state["rng"])
    else:
        states = [torch.load(f, map_location="cpu", weights_only=False)["head"] for f in files]
        head.load_state_dict(reshard_head_state(states, head))
        log(f"resume: head resharded from {old_w} to {world_size} ranks")
        state = torch.load(files[0], map_location="cpu", weights_only=False)
    head_opt.load_state_dict(state["head_optimizer"])
    return meta


def reshard_head_state(states: list[dict], head) -> dict:
    """Head state dicts of W old ranks -> the state dict of this head's rank under its own partition."""
    part = head.partition
    per_class = set(head.per_class_buffers())
    out = dict(states[0])
    for name in per_class:
        new_shards = part.reshard([s[name] for s in states], part.world_size)
        out[name] = new_shards[part.rank]
    return out
