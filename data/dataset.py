"""Torch training loader over an InsightFace rec: decode with PIL, fixed-size batches on every rank.

Per sample: RGB uint8 x -> (x / 255 - 0.5) / 0.5 in [-1, 1], shape [3, H, W]; label int64. A random horizontal flip
is decided by an RNG keyed on (seed, epoch, index), so a run is reproducible whatever the number of workers.

Per step s of an epoch (W ranks, batch B, one permutation of all N images seeded with seed + epoch)::

    rank r takes perm[s*W*B + r*B : s*W*B + (r+1)*B],   steps_per_epoch = N // (W*B)

so every rank runs the same number of full batches (the head's all-gather needs exactly B samples from each rank).
"""
from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from data.position import EpochPosition
from data.recordio import InsightFaceRec, RecordIOError


class RecordDataset(Dataset):
    """Images and labels of an :class:`InsightFaceRec`, normalised to [-1, 1], optionally flipped."""

    def __init__(self, rec: InsightFaceRec, flip: bool, seed: int) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.rec = rec
        self.flip = flip
        self.seed = int(seed)
        # Shared memory, so persistent DataLoader workers see set_epoch() made in the main process.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.height, self.width = rec.image_size

    def set_epoch(self, epoch: int) -> None:
        """Select the flip pattern of ``epoch``; call before iterating the loader for that epoch."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def __len__(self) -> int:
        return len(self.rec)

    def flips(self, index: int) -> bool:
        """Whether sample ``index`` is flipped in the current epoch: one fair coin per (seed, epoch, index)."""
        if not self.flip:
            return False
        state = np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0]
        return bool(state & 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        label, data = self.rec.read(index)
        key = int(self.rec.image_keys[index])
        where = f"{self.rec.reader.rec_path}: key {key}"
        try:
            with Image.open(io.BytesIO(data)) as im:
                rgb = np.array(im.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
        except (OSError, ValueError) as e:
            raise RecordIOError(f"{where}: image cannot be decoded ({e})") from None
        if rgb.shape[:2] != (self.height, self.width):
            raise RecordIOError(f"{where}: image is {rgb.shape[0]}x{rgb.shape[1]} (HxW), expected "
                                f"{self.height}x{self.width} from {self.rec.root}")
        x = torch.from_numpy(rgb).permute(2, 0, 1).float()
        x = (x / 255.0 - 0.5) / 0.5
        if self.flips(index):
            x = x.flip(-1)
        return x, torch.tensor(label, dtype=torch.int64)


class FixedBatchSampler(EpochPosition, Sampler[list[int]]):
    """Batch sampler giving every rank ``steps_per_epoch`` full batches of disjoint indices per epoch.

    ``set_epoch(e)`` picks the permutation (torch.Generator seeded with seed + e) and rewinds to step 0;
    ``set_start_step(k)`` then skips the first k steps (mid-epoch resume). With ``drop_last=False`` the last partial
    global batch is completed with indices from the start of the permutation (some samples seen twice).
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int,
                 drop_last: bool = True) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        if batch_size <= 0 or world_size <= 0:
            raise ValueError(f"batch_size and world_size must be > 0, got {batch_size} and {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.drop_last = drop_last
        global_batch = world_size * batch_size
        if drop_last:
            self.steps_per_epoch = num_samples // global_batch
        else:
            self.steps_per_epoch = -(-num_samples // global_batch)
        if self.steps_per_epoch == 0:
            raise ValueError(f"dataset of {num_samples} samples is smaller than one global batch "
                             f"({world_size} ranks x {batch_size} = {global_batch})")
        self.epoch = 0
        self.start_step = 0

    def permutation(self) -> torch.Tensor:
        """This epoch's order of all samples, the same on every rank (padded by wrapping when not drop_last)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.num_samples, generator=g)
        need = self.steps_per_epoch * self.world_size * self.batch_size
        if need > perm.numel():
            perm = perm.repeat(-(-need // perm.numel()))
        return perm[:need]

    def __iter__(self):
        perm = self.permutation()
        w, b, r = self.world_size, self.batch_size, self.rank
        for s in range(self.start_step, self.steps_per_epoch):
            yield perm[s * w * b + r * b: s * w * b + (r + 1) * b].tolist()


def build_train_loader(root: str | os.PathLike, batch_size: int, rank: int, world_size: int, seed: int,
                       num_workers: int = 0, flip: bool = True
                       ) -> tuple[DataLoader, FixedBatchSampler, RecordDataset]:
    """DataLoader over ``root/train.rec`` for one rank. Each epoch call ``sampler.set_epoch(e)`` and
    ``dataset.set_epoch(e)`` (then ``sampler.set_start_step(k)`` when resuming mid-epoch) before iterating."""
    dataset = RecordDataset(InsightFaceRec(root), flip=flip, seed=seed)
    sampler = FixedBatchSampler(len(dataset), batch_size, rank, world_size, seed)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)
    return loader, sampler, dataset
