"""The one embedding pipeline: a stream of face images → features, on one process or spread over the ranks of a
process group. Verification bins, IJB-B/C, MegaFace and the trainer's evaluator all embed through :func:`embed`.

    feats = embed(model, images, batch_size=128, device=device, flip=True, normalize=False)

``images`` is a uint8 tensor [N, 3, H, W] (decoded verification bins) or a dataset of uint8 [3, H, W] tensors —
:class:`FaceImages` reads image files (OpenCV's decoder, the one the field's IJB and MegaFace scripts use) and
aligns them from 5 landmarks when given (eval.align). For every image:

    x = (img / 255 − 0.5) / 0.5                   (RGB, float32, like training)
    feature = f(x) + f(horizontally flipped x)    (``flip=False``: f(x))
    feature /= ‖feature‖ (in float64)             (``normalize=True``: verification, MegaFace; IJB pools raw ones)

Several ranks (torchrun, the deepspeed launcher or srun — runtime.process): rank r embeds the contiguous slice
``rank_slice(N, r, W)`` and rank 0 gathers every row, in fixed-size rounds, into its result (an array, or ``out`` —
e.g. a ``np.lib.format.open_memmap`` when a million rows should not sit in RAM); the other ranks get None.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from eval.align import AlignmentError, align_face
from runtime.process import agree_max, collective_device, rank_world

__all__ = [
    "FeatureError",
    "FaceImages",
    "rank_slice",
    "embed",
    "extract_features",
    "l2_normalize",
]

_GATHER_ROWS = 16384  # rows per gather round: 32 MB of float32 512-d features per rank
cv2.setNumThreads(1)  # one image at a time per loader worker; OpenCV's own pool would only oversubscribe the cores


class FeatureError(ValueError):
    """An image that cannot be read or aligned, or inputs of the wrong shape."""


class FaceImages(torch.utils.data.Dataset):
    """Image files as uint8 [3, s, s] RGB tensors: aligned from 5 landmarks, or read as already aligned.

    ``landmarks``: None (images must already be s x s) or [N, 5, 2] in each image's pixel coordinates. Files are
    decoded by OpenCV (EXIF orientation applied), as ``cv2.imread`` does in the field's scripts.
    """

    def __init__(
        self, paths: Sequence[str | os.PathLike], landmarks: np.ndarray | None = None, image_size: int = 112
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.image_size = image_size
        if landmarks is not None:
            landmarks = np.asarray(landmarks)
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
            data = np.fromfile(path, dtype=np.uint8)
        except OSError as e:
            raise FeatureError(f"{path}: cannot read image ({e.strerror or e})") from None
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        if bgr is None:
            raise FeatureError(f"{path}: cannot read image (not a decodable image file, {data.size} bytes)")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        s = self.image_size
        if self.landmarks is not None:
            try:
                return align_face(rgb, self.landmarks[index], s)
            except AlignmentError as e:
                points = np.asarray(self.landmarks[index]).tolist()
                raise FeatureError(f"{path}: cannot align with landmarks {points}: {e}") from None
        if rgb.shape[:2] != (s, s):
            raise FeatureError(
                f"{path}: image is {rgb.shape[1]}x{rgb.shape[0]}, expected an aligned {s}x{s} face "
                "(or give 5-point landmarks to align it)"
            )
        return rgb

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.load(index).transpose(2, 0, 1)))


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` divided by their L2 norm (a zero row stays zero: the norm is clamped at 1e-12)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def rank_slice(n: int, rank: int, world_size: int) -> slice:
    """Rank r's contiguous share of n items: n//W + (r < n%W) items from n//W·r + min(r, n%W)."""
    base, extra = divmod(n, world_size)
    start = base * rank + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def _model_device(model: torch.nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _batches(images: torch.Tensor | torch.utils.data.Dataset, batch_size: int, num_workers: int, pin: bool):
    """uint8 [B, 3, H, W] batches in order: slices of a tensor, or a DataLoader over a dataset."""
    if isinstance(images, torch.Tensor):
        return (images[s : s + batch_size] for s in range(0, images.shape[0], batch_size))
    return torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       pin_memory=pin)


@torch.no_grad()
def _embed_local(model, images, n: int, batch_size: int, device: torch.device, flip: bool, normalize: bool,
                 num_workers: int, show: bool, desc: str, dest: np.ndarray | None) -> np.ndarray | None:
    """Features of the n items of ``images`` in order, float32 [n, D], written into ``dest`` batch by batch
    (allocated at the first batch when None). None when there are no items."""
    row = 0
    total = -(-n // batch_size)
    for batch in tqdm(_batches(images, batch_size, num_workers, device.type == "cuda"), total=total, desc=desc,
                      unit="batch", disable=not show, dynamic_ncols=True, leave=False):
        x = batch.to(device=device, non_blocking=True).float()
        x = (x / 255.0 - 0.5) / 0.5
        emb = model(x).float()
        if flip:
            emb = emb + model(torch.flip(x, dims=[3])).float()
        if normalize:
            emb = l2_normalize(emb.double()).float()
        if dest is None:
            dest = np.empty((n, emb.shape[1]), dtype=np.float32)
        elif tuple(dest.shape) != (n, emb.shape[1]):
            raise FeatureError(f"out has shape {tuple(dest.shape)}, expected {(n, emb.shape[1])}")
        dest[row : row + emb.shape[0]] = emb.cpu().numpy()
        row += emb.shape[0]
    return dest


def _gather_to_rank0(local: np.ndarray | None, n: int, dim: int, out: np.ndarray | None) -> np.ndarray | None:
    """Collect every rank's rows (rank r holds rank_slice(n, r, W)) into ``out`` on rank 0, in fixed-size rounds."""
    rank, world = rank_world()
    comm_device = collective_device()
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


def embed(
    model: torch.nn.Module,
    images: torch.Tensor | torch.utils.data.Dataset,
    *,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    flip: bool = True,
    normalize: bool = False,
    num_workers: int = 0,
    progress: bool | None = None,
    desc: str = "embed",
    out: np.ndarray | None = None,
    sharded: bool = True,
) -> np.ndarray | None:
    """Features float32 [N, D] of the N images (see the module docstring), on rank 0; None on the other ranks.

    ``sharded=False``: this process embeds every image itself, whatever the process group. ``device`` defaults to
    the model's; the model runs in eval mode under no_grad and gets its previous mode back. ``out``: an optional
    preallocated [N, D] float32 array (or memmap) for the result on rank 0. ``num_workers``: loader processes for a
    dataset (a tensor is sliced in place). ``progress=None`` shows a bar on a terminal (rank 0 only).
    """
    if isinstance(images, torch.Tensor) and (images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3):
        raise FeatureError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if batch_size < 1:
        raise FeatureError(f"batch_size must be >= 1, got {batch_size}")
    n = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
    if n == 0:
        raise FeatureError("no images to embed")
    device = torch.device(device) if device is not None else _model_device(model)
    rank, world = rank_world() if sharded else (0, 1)
    share = rank_slice(n, rank, world)
    if world == 1:
        local_images = images
    elif isinstance(images, torch.Tensor):
        local_images = images[share]
    else:
        local_images = torch.utils.data.Subset(images, range(share.start, share.stop))
    show = rank == 0 and _show_progress(progress)
    was_training = model.training
    model.eval()
    try:
        local = _embed_local(model, local_images, share.stop - share.start, batch_size, device, flip, normalize,
                             num_workers, show, desc if world == 1 else f"{desc} (rank 0 of {world})",
                             out if world == 1 else None)
    finally:
        model.train(was_training)
    if world == 1:
        return local

    # a rank with no items learns D from the others
    dim = int(agree_max(0 if local is None else local.shape[1]))
    if rank == 0:
        if out is None:
            out = np.empty((n, dim), dtype=np.float32)
        elif tuple(out.shape) != (n, dim):
            raise FeatureError(f"out has shape {tuple(out.shape)}, expected {(n, dim)}")
    return _gather_to_rank0(local, n, dim, out)


def extract_features(model: torch.nn.Module, images: torch.Tensor | torch.utils.data.Dataset,
                     **options: Any) -> np.ndarray | None:
    """:func:`embed` without normalisation (IJB pools raw flip-summed features), sharded over the ranks; ``options``
    are embed's (batch_size, device, flip, num_workers, progress, desc, out)."""
    return embed(model, images, **{**options, "normalize": False, "desc": options.get("desc", "features")})
