"""The training data the trainer iterates, whichever reader produces it.

    data = build_loader("dali" | "torch", root, batch_size, rank, world_size, seed, device)
    for epoch in range(start_epoch, epochs):
        data.set_epoch(epoch)
        data.set_start_step(k)              # only when resuming mid-epoch
        for images, labels in data:         # float32 [B,3,H,W] in [-1,1] and int64 [B], both on `device`
            ...                             # data.batch_keys(): record keys of this batch (e.g. for a NaN report)
    data.close()

Both kinds give every rank ``steps_per_epoch = num_images // (world_size * batch_size)`` full batches per epoch, so
the head's all-gather always meets B samples from each rank. Before anything is read the rec is checked once (and
the result cached, see :mod:`data.rec_index`): a truncated file, a wrong magic word, an index offset past the end, a
non-image payload or a label outside ``property``'s num_classes fails here, naming the file and the record.

``torch`` decodes with PIL in DataLoader workers (:mod:`data.dataset`): an exact, permutation-per-epoch order and
exact mid-epoch resume; a damaged image is replaced by the next decodable one (up to ``max_bad_images`` per run and
rank) and the workers leave job signals (SIGTERM, SIGUSR1) to their rank. ``dali`` reads with DALI's
``fn.readers.mxnet`` and decodes on the GPU when ``device`` is a CUDA device, on the CPU otherwise
(:mod:`data.dali_pipeline`); it cannot skip a damaged image.
"""
from __future__ import annotations

import contextlib
import os
import signal
from typing import Iterator

import torch

from data.dataset import JOB_SIGNALS
from data.rec_index import PreparedRec, prepare_rec
from data.train_data import TrainData, check_batch_args

__all__ = ["KINDS", "TorchTrainData", "TrainData", "build_loader", "check_batch_args", "job_signals_blocked",
           "resolve_kind"]


@contextlib.contextmanager
def job_signals_blocked():
    """Block SIGTERM/SIGUSR1 in this thread while DataLoader workers are forked, so that they are born with them
    blocked: a signal that reaches a worker before its ``worker_init_fn`` has run (a preemption during the start of
    an epoch) then waits for it instead of killing the worker by torch's default. Signals that reach the rank
    meanwhile are delivered when the block ends, not lost."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class TorchTrainData(TrainData):
    """:func:`data.dataset.build_train_loader` behind the :class:`TrainData` interface."""

    def __init__(self, prepared: PreparedRec, batch_size: int, rank: int, world_size: int, seed: int,
                 device: torch.device, num_workers: int = 2, flip: bool = True, max_bad_images: int = 100) -> None:
        from data.dataset import build_train_loader

        self.prepared = prepared
        self.batch_size = batch_size
        self.steps_per_epoch = check_batch_args(prepared.num_images, batch_size, rank, world_size)
        self.device = torch.device(device)
        self.loader, self.sampler, self.dataset = build_train_loader(
            prepared.root, batch_size, rank, world_size, seed, num_workers=num_workers, flip=flip,
            max_bad_images=max_bad_images)
        assert self.sampler.steps_per_epoch == self.steps_per_epoch
        self._last: tuple[int, int] | None = None  # (epoch, step) of the batch yielded last

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def set_start_step(self, step: int) -> None:
        self.sampler.set_start_step(step)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, step = self.sampler.epoch, self.sampler.start_step
        with job_signals_blocked():  # workers are born with SIGTERM/SIGUSR1 blocked (data.dataset.ignore_job_signals)
            batches = iter(self.loader)
        for images, labels in batches:
            self._last = (epoch, step)
            step += 1
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def batch_keys(self) -> list[int]:
        """Exact: the sampler's indices of the last batch, each replaced as the reader replaced a damaged image."""
        if self._last is None:
            return []
        indices = self.sampler.batch(*self._last)
        keys = self.dataset.rec.image_keys
        return [int(keys[self.dataset.source_index(i)]) for i in indices]

    def close(self) -> None:
        # Persistent workers live in the DataLoader's cached iterator; torch exposes no public shutdown.
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None


KINDS = ("auto", "torch", "dali")


def resolve_kind(kind: str, device: torch.device) -> str:
    """``auto`` -> ``dali`` on a CUDA device when DALI imports, else ``torch``; other kinds unchanged."""
    if kind not in KINDS:
        raise ValueError(f"data loader kind must be one of {KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    if torch.device(device).type != "cuda":
        return "torch"
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return "torch"
    return "dali"


def build_loader(kind: str, root: str | os.PathLike, batch_size: int, rank: int, world_size: int, seed: int,
                 device: torch.device, num_workers: int = 2, flip: bool = True, *, augment: bool = False,
                 cache_dir: str | os.PathLike | None = None, progress: bool = False, max_bad_images: int = 100,
                 **dali_options) -> TrainData:
    """Check ``root`` (once, cached in ``cache_dir``) and open it with the ``kind`` reader for this rank.

    ``kind``: ``dali``, ``torch`` or ``auto`` (:func:`resolve_kind`: DALI on a GPU, the torch reader otherwise).
    ``max_bad_images`` (torch reader; ``data.max_bad_images``): damaged images replaced by the next decodable one
    before the run stops (0: stop at the first). DALI cannot skip an image: a damaged one stops the run with an
    error that says so. Rank 0 logs the warnings of the up-front check (e.g. classes without images).
    ``augment`` (dali only) adds arcface_torch's DALI augmentation (see :func:`data.dali_pipeline.arcface_augment`);
    ``dali_options`` go to :class:`data.dali_pipeline.DaliTrainData` (``shuffle``, ``shuffle_buffer``,
    ``prefetch``).
    """
    kind = resolve_kind(kind, device)
    if kind == "torch" and (augment or dali_options):
        extra = ["augment"] * augment + sorted(dali_options)
        raise ValueError(f"{', '.join(extra)}: only available with the dali loader (kind='dali')")
    prepared = prepare_rec(root, cache_dir=cache_dir, progress=progress, warn=rank == 0)
    if kind == "torch":
        return TorchTrainData(prepared, batch_size, rank, world_size, seed, device, num_workers, flip,
                              max_bad_images=max_bad_images)
    from data.dali_pipeline import DaliTrainData  # DALI is needed only here

    return DaliTrainData(prepared, batch_size, rank, world_size, seed, device, num_workers, flip, augment=augment,
                         **dali_options)
