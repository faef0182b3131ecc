"""Torch training loader over an InsightFace rec: decode with PIL, fixed-size batches on every rank.

Per sample: RGB uint8 x -> (x / 255 - 0.5) / 0.5 in [-1, 1], shape [3, H, W]; label int64. A random horizontal flip
is decided by an RNG keyed on (seed, epoch, index), so a run is reproducible whatever the number of workers.

Per step s of an epoch (W ranks, batch B, one permutation of all N images seeded with seed + epoch)::

    rank r takes perm[s*W*B + r*B : s*W*B + (r+1)*B],   steps_per_epoch = N // (W*B)

so every rank runs the same number of full batches (the head's all-gather needs exactly B samples from each rank).

Damaged images. An image that does not decode (a JPEG torn in the middle passes the up-front structural check of
:mod:`data.rec_index`) or has the wrong size is replaced by the next decodable image of the rec (index + 1, + 2, ...,
wrapping), its label with it: batches stay full and the same in every run. Each damaged image is logged once
(``facetrain`` logger: file, key, byte offset, reason) and counted, once per image, in shared memory across the
rank's workers; the damaged image that takes the count past ``max_bad_images`` (0: the first one) stops the run
with a :class:`RecordIOError` saying how to list them all and how to allow more.

Job signals. SLURM (scancel, preemption) and the DeepSpeed launcher send SIGTERM (or SIGUSR1) to every process of
the job, DataLoader workers included; torch's own SIGTERM handler in a worker dies unless the signal came from the
worker's parent, and the rank then fails with "DataLoader worker ... killed by signal" before it can checkpoint.
:func:`ignore_job_signals` (the workers' ``worker_init_fn``) keeps the workers alive through SIGTERM and SIGUSR1
from anyone but the rank and passes such a signal on to the rank, which decides. Workers still end with their rank:
by the rank's normal shutdown, by SIGTERM from the rank itself (multiprocessing terminates its daemon children at
interpreter exit), or when the rank is gone (torch's worker watchdog checks the parent every 5 s).
"""
from __future__ import annotations

import io
import logging
import multiprocessing as mp
import os
import signal
import threading

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from data.position import EpochPosition, epoch_word
from data.recordio import InsightFaceRec, RecordIOError

log = logging.getLogger("facetrain")

JOB_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_job_signals(worker_id: int | None = None) -> None:
    """``worker_init_fn`` of the training DataLoader: SIGTERM and SIGUSR1 sent to this worker by anyone but its
    parent (the rank) are ignored; SIGTERM from the parent still ends the worker at once, as torch's handler does.

    torch installs a C handler for SIGTERM in every worker before ``worker_init_fn`` runs: it exits quietly when the
    parent sent the signal and dies of it otherwise (SIGUSR1 keeps its default action: die). Plain ``SIG_IGN`` is
    not enough: the rank's interpreter exit (multiprocessing terminates daemon children, then joins them) would then
    wait forever for a worker that ignores the parent's SIGTERM. So both signals are blocked in this thread (every
    thread the worker starts later inherits the mask) and one daemon thread takes them with ``sigwaitinfo``, which
    tells who sent them: SIGTERM from the parent -> ``os._exit(0)``; a signal from anyone else is passed on to the
    rank (a stop request sent to the workers alone still stops the training cleanly: trainer/signals.py).
    """
    if not hasattr(signal, "sigwaitinfo"):  # not Linux: SIGUSR1 at least must not kill the worker
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
    threading.Thread(target=_take_job_signals, args=(parent,), name="facetrain-job-signals", daemon=True).start()


def _take_job_signals(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(set(JOB_SIGNALS))
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)  # the rank stops its worker (torch's handler does the same)
        if info.si_pid != parent:
            if os.getppid() != parent:  # the rank is gone (this worker was re-parented): its pid may be reused
                os._exit(0)
            try:  # a job signal meant for the training (sent to the workers alone): the rank decides
                os.kill(parent, info.si_signo)
            except ProcessLookupError:
                os._exit(0)


class BadImages:
    """The damaged images one rank's reader met (positions in the rec), shared by its DataLoader workers.

    Each image counts once, however often it is drawn; the list holds up to ``limit + 1`` positions, enough to
    know when the limit is passed and, in the rank, which images were replaced (:meth:`source_index`).
    """

    def __init__(self, limit: int, num_images: int) -> None:
        if limit < 0:
            raise ValueError(f"max_bad_images must be >= 0, got {limit}")
        self.limit = int(limit)
        self._positions = torch.full((min(self.limit, num_images) + 1,), -1, dtype=torch.int64).share_memory_()
        self._count = torch.zeros((), dtype=torch.int64).share_memory_()
        self._lock = mp.Lock()

    @property
    def count(self) -> int:
        """Damaged images met so far (by this rank's reader, all workers together)."""
        return int(self._count)

    def __contains__(self, index: int) -> bool:
        n = min(int(self._count), self._positions.numel())
        return n > 0 and bool((self._positions[:n] == int(index)).any())

    def add(self, index: int) -> tuple[int, bool]:
        """Count image ``index`` as damaged; (count, whether it was new)."""
        with self._lock:
            n = int(self._count)
            if bool((self._positions[:min(n, self._positions.numel())] == int(index)).any()):
                return n, False
            if n < self._positions.numel():
                self._positions[n] = int(index)
            self._count.fill_(n + 1)
            return n + 1, True

    def positions(self) -> list[int]:
        """The damaged images' positions, in the order met (at most ``limit + 1``)."""
        n = min(int(self._count), self._positions.numel())
        return self._positions[:n].tolist()


class RecordDataset(Dataset):
    """Images and labels of an :class:`InsightFaceRec`, normalised to [-1, 1], optionally flipped; damaged images
    replaced by the next decodable one, up to ``max_bad_images`` of them (see the module docstring)."""

    def __init__(self, rec: InsightFaceRec, flip: bool, seed: int, max_bad_images: int = 100) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.rec = rec
        self.flip = flip
        self.seed = int(seed)
        self.bad = BadImages(max_bad_images, len(rec))
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
        return bool(epoch_word(self.seed, self.epoch, int(index)) & 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        label, rgb = self._load(index)
        x = torch.from_numpy(rgb).permute(2, 0, 1).float()
        x = (x / 255.0 - 0.5) / 0.5
        if self.flips(index):
            x = x.flip(-1)
        return x, torch.tensor(label, dtype=torch.int64)

    def _decode(self, data: bytes) -> np.ndarray | str:
        """RGB uint8 [H, W, 3], or why the image cannot be used."""
        try:
            with Image.open(io.BytesIO(data)) as im:
                rgb = np.array(im.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
        except Exception as e:  # noqa: BLE001 - any decoder failure (OSError, ValueError, SyntaxError, ...)
            return f"image cannot be decoded ({type(e).__name__}: {e})"
        if rgb.shape[:2] != (self.height, self.width):
            return (f"image is {rgb.shape[0]}x{rgb.shape[1]} (HxW), expected {self.height}x{self.width} from "
                    f"{self.rec.root / 'property'}")
        return rgb

    def _where(self, i: int) -> str:
        key = int(self.rec.image_keys[i])
        try:
            return f"key {key} at offset {self.rec.reader.offset(key)}"
        except (KeyError, RecordIOError):
            return f"key {key}"

    def _load(self, index: int) -> tuple[int, np.ndarray]:
        """(label, RGB) of image ``index``, or of the next decodable image when it is damaged."""
        n = len(self.rec)
        found = []  # (position, reason) of damaged images met here for the first time
        for step in range(n):
            i = (index + step) % n
            if i in self.bad:  # known damaged (by any worker): not decoded again, not counted again
                continue
            label, data = self.rec.read(i)
            rgb = self._decode(data)
            if not isinstance(rgb, str):
                break
            count, new = self.bad.add(i)
            if new:
                found.append((i, rgb))
            if count > self.bad.limit:
                raise self._too_many(i, rgb, count)
        else:
            raise RecordIOError(f"{self.rec.reader.rec_path}: no image of the {n} decodes; the last: "
                                f"{self._where((index - 1) % n)}; run `python -m data.tools.inspect {self.rec.root} "
                                f"--decode`")
        for j, reason in found:
            log.warning("%s: %s: %s; replaced by %s (label %d) [damaged images: %d, data.max_bad_images=%d]",
                        self.rec.reader.rec_path, self._where(j), reason, self._where(i), label, self.bad.count,
                        self.bad.limit)
        return label, rgb

    def _too_many(self, i: int, reason: str, count: int) -> RecordIOError:
        return RecordIOError(
            f"{self.rec.reader.rec_path}: {count} damaged images met, more than data.max_bad_images="
            f"{self.bad.limit}; the last: {self._where(i)}: {reason}. List them all with `python -m data.tools.inspect "
            f"{self.rec.root} --decode`; repair or leave them out (data.tools.pack --skip-bad), or allow more with "
            f"data.max_bad_images=N (each is then replaced by the next decodable image)")

    def source_index(self, index: int) -> int:
        """The image actually served for ``index``: itself, or the next one not known to be damaged. Exact for an
        index already served (its worker recorded every damaged image it skipped)."""
        n = len(self.rec)
        for step in range(n):
            i = (index + step) % n
            if i not in self.bad:
                return i
        return index


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

    def permutation(self, epoch: int | None = None) -> torch.Tensor:
        """The order of all samples in ``epoch`` (default: the current one), the same on every rank (padded by
        wrapping when not drop_last)."""
        g = torch.Generator().manual_seed(self.seed + (self.epoch if epoch is None else int(epoch)))
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

    def batch(self, epoch: int, step: int) -> list[int]:
        """The indices this rank gets at ``step`` of ``epoch`` (what ``__iter__`` yields there)."""
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step must be in 0..{self.steps_per_epoch - 1}, got {step}")
        w, b, r = self.world_size, self.batch_size, self.rank
        return self.permutation(epoch)[step * w * b + r * b: step * w * b + (r + 1) * b].tolist()


def build_train_loader(root: str | os.PathLike, batch_size: int, rank: int, world_size: int, seed: int,
                       num_workers: int = 0, flip: bool = True, max_bad_images: int = 100
                       ) -> tuple[DataLoader, FixedBatchSampler, RecordDataset]:
    """DataLoader over ``root/train.rec`` for one rank. Each epoch call ``sampler.set_epoch(e)`` and
    ``dataset.set_epoch(e)`` (then ``sampler.set_start_step(k)`` when resuming mid-epoch) before iterating.

    Workers ignore SIGTERM/SIGUSR1 from anyone but the rank (:func:`ignore_job_signals`); up to ``max_bad_images``
    damaged images are replaced by the next decodable one (:class:`RecordDataset`)."""
    dataset = RecordDataset(InsightFaceRec(root), flip=flip, seed=seed, max_bad_images=max_bad_images)
    sampler = FixedBatchSampler(len(dataset), batch_size, rank, world_size, seed)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                        worker_init_fn=ignore_job_signals if num_workers > 0 else None)
    return loader, sampler, dataset
