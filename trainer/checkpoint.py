"""Checkpoints: engine + head shards + head optimizer + RNG + data position + config, written atomically.

The folders and files are runtime/layout.py's (shared with eval, which reads backbone.pth and config.yaml).

Atomicity: everything is written under .tmp-TAG and renamed to TAG by rank 0 after every rank has finished; `latest`
is replaced last. A crash mid-save leaves the previous checkpoint intact; the next start removes the stale .tmp-*.
Nothing non-finite is ever written: every rank checks its tensors first and all agree before the first byte.
Rotation keeps the newest `keep` epoch checkpoints and the newest `keep_steps` step checkpoints, and never deletes
the one `latest` names.

Loading runs no code from the files: every read is torch.load(weights_only=True) (DeepSpeed's own reads included,
through its checkpoint engine), with only the few plain DeepSpeed data classes of a ZeRO optimizer file allowed.

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

from runtime.layout import (
    BACKBONE_FILE,
    CONFIG_FILE,
    LATEST,
    META_FILE,
    TMP_PREFIX,
    CheckpointError,
    head_file,
    latest_tag,
    newest_checkpoint,
)
from runtime.process import agree_any, barrier
from trainer.config import dump_config, read_json

__all__ = ["CheckpointError", "head_file", "safe_load", "install_safe_loading", "save", "prune", "remove_stale_tmp",
           "resolve", "read_meta", "engine_files", "load", "reshard_head_state"]


# --- loading without running code -----------------------------------------------------------------------------------
def _allowed_globals() -> list:
    """Plain data classes that may appear in a checkpoint: numpy RNG states of older head files, and the three
    DeepSpeed classes of a ZeRO optimizer file (a loss-scaler record, a fragment address, the stage enum)."""
    allowed: list = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed.append(_reconstruct)
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
        allowed += [LossScaler, ZeroStageEnum, fragment_address]
    except ImportError:
        pass
    return allowed


def safe_load(path: str | os.PathLike, map_location="cpu"):
    """torch.load that cannot run code from the file (weights_only), with a CheckpointError naming the file."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as e:  # noqa: BLE001 - pickle errors come in many types; the file is what matters
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        unsafe = ""
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            if found:
                unsafe = f"; it asks for {', '.join(found[:5])}, which a checkpoint of this trainer never holds"
        except Exception:  # noqa: BLE001 - not a zip checkpoint at all
            pass
        raise CheckpointError(f"{path}: cannot be read as a checkpoint without running code from it "
                              f"(torch.load weights_only=True: {reason}){unsafe}. A checkpoint folder is as "
                              f"untrusted as any downloaded file: this trainer never unpickles code") from None


def install_safe_loading(engine) -> None:
    """Make DeepSpeed's own checkpoint reads go through :func:`safe_load` (its engine uses weights_only=False)."""
    engine.checkpoint_engine.load = lambda path, map_location=None: safe_load(path, map_location or "cpu")


# --- RNG states as plain tensors and ints (weights_only-safe) ---------------------------------------------------------
def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    if isinstance(npst, dict):
        np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                             npst["cached_gaussian"]))
    else:  # written before RNG states were stored as tensors
        np.random.set_state(npst)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])



# --- writing ---------------------------------------------------------------------------------------------------------
def non_finite_tensors(named: dict) -> list[str]:
    """Names of the floating tensors in a (nested) dict that hold inf/NaN."""
    bad = []

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(prefix)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)

    walk("", named)
    return bad


def save(root: Path, tag: str, *, engine, head, head_opt, cfg: dict, meta: dict, rank: int, world_size: int,
         keep: int | None = None, keep_steps: int | None = None, trainer_state: dict | None = None) -> Path:
    """Write checkpoint `tag` under `root` (collective: call on every rank). Refuses (CheckpointError, on every rank,
    before anything is written) when any rank holds a non-finite tensor: `latest` keeps naming a good checkpoint."""
    root = Path(root)
    head_state = {"head": head.state_dict(), "head_optimizer": head_opt.state_dict(), "rng": _rng_state(),
                  "world_size": world_size, "rank": rank, "trainer_state": trainer_state or {}}
    bad = non_finite_tensors({"backbone": engine.module.state_dict(), **head_state})
    if agree_any(bool(bad)):
        mine = f"on this rank: {', '.join(bad[:6])}" if bad else "on another rank"
        raise CheckpointError(f"refusing to write checkpoint {root / tag}: non-finite tensors {mine}; the newest "
                              f"good checkpoint stays in {root / LATEST}")
    tmp_tag = f"{TMP_PREFIX}{tag}"
    tmp = root / tmp_tag
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    hf = head_file(tmp, rank, world_size)
    hf.parent.mkdir(parents=True, exist_ok=True)
    torch.save(head_state, hf)
    if rank == 0:
        torch.save({k: v.detach().cpu() for k, v in engine.module.state_dict().items()}, tmp / BACKBONE_FILE)
        (tmp / CONFIG_FILE).write_text(dump_config(cfg))
        (tmp / META_FILE).write_text(json.dumps({**meta, "world_size": world_size, "tag": tag,
                                                   "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    barrier()
    if rank == 0:
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / f".{LATEST}.tmp"
        latest_tmp.write_text(tag + "\n")
        os.replace(latest_tmp, root / LATEST)
        prune(root, keep, keep_steps)
    barrier()
    return root / tag


def prune(root: Path, keep: int | None, keep_steps: int | None) -> list[Path]:
    """Delete all but the newest `keep` epoch_* and `keep_steps` step_* checkpoints (None/0: keep all); never the
    one `latest` names. Returns the deleted folders."""
    current = latest_tag(root)
    deleted = []
    for pattern, n in (("epoch_*", keep), ("step_*", keep_steps)):
        if not n:
            continue
        folders = sorted(p for p in Path(root).glob(pattern) if p.is_dir())
        for old in folders[:-n]:
            if old.name != current:
                shutil.rmtree(old, ignore_errors=True)
                deleted.append(old)
    return deleted


def remove_stale_tmp(root: Path) -> list[Path]:
    """Remove `.tmp-*` folders an interrupted save left behind (call on one rank, before training)."""
    stale = [p for p in Path(root).glob(f"{TMP_PREFIX}*") if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


# --- reading ---------------------------------------------------------------------------------------------------------
def resolve(resume: str, output: Path) -> Path | None:
    """`auto` -> newest complete checkpoint under output/checkpoints (None if there is none); else the given folder."""
    if resume == "auto":
        folder = newest_checkpoint(output)
        if folder is None:
            return None
    else:
        folder = Path(resume)
    if not (folder / META_FILE).is_file():
        raise CheckpointError(f"train.resume={resume!r}: {folder} is not a complete checkpoint (no meta.json)")
    return folder


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META_FILE
    meta = read_json(path, CheckpointError, f"{path}: file not found (not a complete checkpoint)")
    for key in ("world_size", "num_classes", "epoch"):
        if key not in meta:
            raise CheckpointError(f"{path}: key {key!r} missing (have {sorted(meta)})")
    return meta


def engine_files(folder: Path, world_size: int, zero_stage: int, with_optimizer: bool) -> list[Path]:
    """The DeepSpeed files a load of `folder` reads: the model states, and with ZeRO >= 1 each rank's optimizer
    partition (named by the rank count that wrote them)."""
    files = [Path(folder) / "mp_rank_00_model_states.pt"]
    if zero_stage >= 1 and with_optimizer:
        files += [Path(folder) / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size)]
    return files


def load(folder: Path, *, engine, head, head_opt, rank: int, world_size: int, zero_stage: int,
         num_classes: int | None = None, log=print) -> dict:
    """Restore a checkpoint written by any number of ranks into this run; returns its meta, with the trainer's own
    state (the fp16 loss scale) under "trainer_state"."""
    folder = Path(folder)
    meta = read_meta(folder)
    if num_classes is not None and int(meta["num_classes"]) != num_classes:
        raise CheckpointError(f"{folder}: written for {meta['num_classes']} classes, the data has {num_classes} "
                              f"(another data set, or its property file changed): resume with the data it was "
                              f"trained on, or start a new output folder")
    old_w = int(meta["world_size"])
    same_world = old_w == world_size
    load_opt = same_world or zero_stage == 0
    for f in engine_files(folder, old_w, zero_stage, load_opt):
        if not f.is_file():
            raise CheckpointError(f"{folder}: DeepSpeed file {f.name} is missing (written by {old_w} ranks with "
                                  f"ZeRO stage {meta.get('zero_stage', 'unknown')}; loading with stage {zero_stage})")
    files = [head_file(folder, r, old_w) for r in range(old_w)]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{folder}: head shard {f.name} is missing (the checkpoint was written by {old_w} "
                                  f"ranks)")
    install_safe_loading(engine)
    path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=load_opt,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"{folder}: DeepSpeed found no engine checkpoint in it")
    if not load_opt:
        log(f"resume: checkpoint written by {old_w} ranks, now {world_size} with ZeRO stage {zero_stage}: backbone "
            f"weights restored, backbone optimizer momentum reset")
    if same_world:
        state = safe_load(files[rank])
        _load_head(head, state["head"], files[rank])
        _set_rng_state(state["rng"])
    else:
        states = [safe_load(f)["head"] for f in files]
        _load_head(head, reshard_head_state(states, head), folder / "head")
        log(f"resume: head resharded from {old_w} to {world_size} ranks")
        state = safe_load(files[0])
    head_opt.load_state_dict(state["head_optimizer"])
    return {**meta, "trainer_state": state.get("trainer_state", {})}


def _load_head(head, state: dict, source: Path) -> None:
    try:
        head.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{source}: the head state does not fit this run's head ({type(head).__name__}, "
                              f"head.loss as configured now): {e}") from None


def reshard_head_state(states: list[dict], head) -> dict:
    """Head state dicts of W old ranks -> the state dict of this head's rank under its own partition."""
    part = head.partition
    per_class = set(head.per_class_buffers())
    out = dict(states[0])
    for name in per_class:
        new_shards = part.reshard([s[name] for s in states], part.world_size)
        out[name] = new_shards[part.rank]
    return out
