"""Batched flip-sum features of image files, on one process or spread over the ranks of a process group.

    images = FaceImages(paths, landmarks)               # landmarks [N, 5, 2] → aligned on the fly; None → 112x112
    feats = extract_features(model, images, batch_size=256, device=device, num_workers=8)

feature(img) = f(img) + f(horizontally flipped img) (``flip=False``: f(img)), not normalised — the IJB protocol
weights and pools raw features, MegaFace normalises them. Inputs are RGB, normalised (x/255 − 0.5)/0.5 like
training.

Several ranks (torchrun / the deepspeed launcher, see :func:`init_distributed_from_env`): rank r embeds the
contiguous slice ``rank_slice(N, r, W)`` of the images and rank 0 gathers all rows, in chunks, into its result (an
array, or ``out`` — e.g. a ``np.lib.format.open_memmap`` when a million rows should not live in RAM). Other ranks
return None.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml
from PIL import Image
from tqdm import tqdm

from eval.align import AlignmentError, align_face

__all__ = [
    "FeatureError",
    "FaceImages",
    "rank_slice",
    "dist_rank_world",
    "init_distributed_from_env",
    "extract_features",
    "add_model_arguments",
    "model_from_arguments",
    "checkpoint_label",
]

_GATHER_ROWS = 16384  # rows per gather round: 32 MB of float32 512-d features per rank


class FeatureError(ValueError):
    """An image that cannot be read or aligned, or inputs of the wrong shape."""


class FaceImages(torch.utils.data.Dataset):
    """Image files as uint8 [3, s, s] RGB tensors: aligned from 5 landmarks, or read as already aligned.

    ``landmarks``: None (images must already be s x s) or float [N, 5, 2] in each image's pixel coordinates.
    Items are ``(index, image)``.
    """

    def __init__(
        self, paths: Sequence[str | os.PathLike], landmarks: np.ndarray | None = None, image_size: int = 112
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.image_size = image_size
        if landmarks is not None:
            landmarks = np.asarray(landmarks, dtype=np.float64)
            if landmarks.shape != (len(self.paths), 5, 2):
                raise FeatureError(
                    f"landmarks must be [N, 5, 2] for N={len(self.paths)} images, got {landmarks.shape}"
                )
        self.landmarks = landmarks

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        """The image ``index`` as uint8 [s, s, 3] RGB (aligned when landmarks were given)."""
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise FeatureError(f"{path}: cannot read image ({e})") from None
        s = self.image_size
        if self.landmarks is not None:
            try:
                return align_face(rgb, self.landmarks[index], s)
            except AlignmentError as e:
                points = self.landmarks[index].tolist()
                raise FeatureError(f"{path}: cannot align with landmarks {points}: {e}") from None
        if rgb.shape[:2] != (s, s):
            raise FeatureError(
                f"{path}: image is {rgb.shape[1]}x{rgb.shape[0]}, expected an aligned {s}x{s} face "
                "(or give 5-point landmarks to align it)"
            )
        return rgb

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, torch.from_numpy(np.ascontiguousarray(self.load(index).transpose(2, 0, 1)))


def rank_slice(n: int, rank: int, world_size: int) -> slice:
    """Rank r's contiguous share of n items: n//W + (r < n%W) items from n//W·r + min(r, n%W)."""
    base, extra = divmod(n, world_size)
    start = base * rank + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env(device: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group a launcher describes (WORLD_SIZE > 1 with RANK, MASTER_ADDR, MASTER_PORT) and pick
    this rank's device: ``device`` if given, else cuda:LOCAL_RANK when CUDA is available, else cpu.

    One process without launcher variables: no group, rank 0 of 1. Backend: nccl on CUDA, gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None:
        dev = torch.device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        dist.init_process_group(
            "nccl" if dev.type == "cuda" else "gloo", init_method="env://", timeout=timedelta(minutes=60)
        )
    rank, world = dist_rank_world()
    return rank, world, dev


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def _model_device(model: torch.nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def _embed_local(
    model: torch.nn.Module,
    images: torch.utils.data.Dataset,
    batch_size: int,
    device: torch.device,
    flip: bool,
    num_workers: int,
    show: bool,
    desc: str,
    dest: np.ndarray | None = None,
) -> np.ndarray | None:
    """Features of every item of ``images`` in order, float32 [n, D], written into ``dest`` batch by batch (allocated
    at the first batch when None). None when there are no items."""
    loader = torch.utils.data.DataLoader(
        images, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    row = 0
    for _, batch in tqdm(loader, desc=desc, unit="batch", disable=not show, dynamic_ncols=True):
        x = batch.to(device=device, non_blocking=True).float()
        x = (x / 255.0 - 0.5) / 0.5
        emb = model(x).float()
        if flip:
            emb = emb + model(torch.flip(x, dims=[3])).float()
        if dest is None:
            dest = np.empty((len(images), emb.shape[1]), dtype=np.float32)
        elif dest.shape != (len(images), emb.shape[1]):
            raise FeatureError(f"out has shape {tuple(dest.shape)}, expected {(len(images), emb.shape[1])}")
        dest[row : row + emb.shape[0]] = emb.cpu().numpy()
        row += emb.shape[0]
    return dest


def _gather_to_rank0(local: np.ndarray | None, n: int, dim: int, out: np.ndarray | None) -> np.ndarray | None:
    """Collect every rank's rows (rank r holds rank_slice(n, r, W)) into ``out`` on rank 0, in fixed-size rounds."""
    rank, world = dist_rank_world()
    comm_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    comm_device = comm_device or torch.device("cpu")
    slices = [rank_slice(n, r, world) for r in range(world)]
    longest = max(s.stop - s.start for s in slices)
    for start in range(0, longest, _GATHER_ROWS):
        piece = torch.zeros(_GATHER_ROWS, dim, dtype=torch.float32)
        if local is not None and start < local.shape[0]:
            rows = local[start : start + _GATHER_ROWS]
            piece[: rows.shape[0]] = torch.from_numpy(rows)
        piece = piece.to(comm_device)
        bucket = [torch.empty_like(piece) for _ in range(world)] if rank == 0 else None
        dist.gather(piece, bucket, dst=0)
        if rank == 0:
            for r, got in enumerate(bucket):
                valid = min(_GATHER_ROWS, max(0, slices[r].stop - slices[r].start - start))
                if valid:
                    begin = slices[r].start + start
                    out[begin : begin + valid] = got[:valid].cpu().numpy()
    return out if rank == 0 else None


def extract_features(
    model: torch.nn.Module,
    images: torch.utils.data.Dataset,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    flip: bool = True,
    num_workers: int = 0,
    progress: bool | None = None,
    desc: str = "features",
    out: np.ndarray | None = None,
) -> np.ndarray | None:
    """Features float32 [N, D] of all N items of ``images`` (rank 0; other ranks of a process group get None).

    ``device`` defaults to the model's; the model runs in eval mode and its previous mode is restored. ``out``:
    optional preallocated [N, D] float32 array (or memmap) for the result on rank 0. ``progress=None`` shows a tqdm
    bar on a terminal (rank 0 only).
    """
    if batch_size < 1:
        raise FeatureError(f"batch_size must be >= 1, got {batch_size}")
    n = len(images)
    if n == 0:
        raise FeatureError("no images to embed")
    device = torch.device(device) if device is not None else _model_device(model)
    rank, world = dist_rank_world()
    share = rank_slice(n, rank, world)
    local_images = images if world == 1 else torch.utils.data.Subset(images, range(share.start, share.stop))
    show = rank == 0 and _show_progress(progress)
    was_training = model.training
    model.eval()
    try:
        local = _embed_local(model, local_images, batch_size, device, flip, num_workers, show,
                             desc if world == 1 else f"{desc} (rank 0 of {world})", out if world == 1 else None)
    finally:
        model.train(was_training)
    if world == 1:
        return local

    # a rank with no items learns D from the others
    dim_t = torch.tensor([0 if local is None else local.shape[1]], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        dim_t = dim_t.cuda()
    dist.all_reduce(dim_t, op=dist.ReduceOp.MAX)
    dim = int(dim_t.item())
    if rank == 0:
        if out is None:
            out = np.empty((n, dim), dtype=np.float32)
        elif tuple(out.shape) != (n, dim):
            raise FeatureError(f"out has shape {tuple(out.shape)}, expected {(n, dim)}")
    return _gather_to_rank0(local, n, dim, out)


# ------------------------------------------------------------------------------------------ command-line helpers


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every eval command shares: which checkpoint, how to run it, where results go."""
    parser.add_argument("--weights", required=True,
                        help="backbone.pth (arcface_torch layout, needs --network) or a checkpoint directory "
                             "holding backbone.pth + config.yaml")
    parser.add_argument("--network", help="backbone name for get_model (required for a bare backbone.pth)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra get_model keyword (YAML value), e.g. num_features=512; repeatable")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward (per rank)")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="image decoding / alignment processes per rank (0 = in the main process)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda:LOCAL_RANK if CUDA is available, else cpu)")
    parser.add_argument("--out", default=None, help="folder for the results (default: next to the checkpoint)")
    parser.add_argument("--label", default=None, help="name of this model in the tables (default: checkpoint name)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def model_from_arguments(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load the checkpoint named by ``args`` onto ``device`` (eval mode); SystemExit with the reason if it fails."""
    from eval.checkpoint_io import CheckpointError, load_model_for_eval

    overrides = {}
    for item in args.model_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --model-arg {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    try:
        model, model_cfg = load_model_for_eval(args.weights, args.network, **overrides)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    return model.to(device), model_cfg


def checkpoint_label(weights: str | os.PathLike) -> str:
    """A short name for a checkpoint: its folder name, or parent/stem of a weights file."""
    path = Path(weights)
    if path.is_dir():
        return path.name
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem
