"""DALI training pipeline over an InsightFace rec: read, decode (GPU when there is one), flip, normalise, shard.

Per sample::

    jpeg, label  = fn.readers.mxnet(train.rec, images-only index, shard, num_shards)     CPU (the only backend)
    rgb uint8    = fn.decoders.image(jpeg, device = "mixed" on a GPU | "cpu")              [H, W, 3]
    (optional)     arcface_augment(rgb)                                                    arcface_torch's dali_aug
    x float32    = (rgb - 127.5) / 127.5, mirrored with probability 1/2, CHW             = (rgb/255 - 0.5)/0.5
    y int64      = int64(label[0])                                                          the reader gives float32
    where uint8  = the reader's source info "<rec> at index <byte offset>", zero-padded      -> batch_keys()

Pipelines without a GPU pass ``device_id=None``. The reader serves every key of its index, so it gets the
images-only index of :func:`data.rec_index.prepare_rec` (the InsightFace header and identity-range records are not
images). Note that DALI sorts the index by offset: the reader always walks the file in stored order.

Epochs and ranks. Each epoch builds a fresh pipeline (and shuts it down at the end): rank r reads the contiguous
shard ``(r + epoch) mod W`` of the file (DALI's ``start = N * shard // W``) and stops after exactly
``steps_per_epoch = N // (W * B)`` batches, which every shard holds. So every rank runs the same number of full
batches whatever the shard sizes: no partial batch reaches the all-gather (arcface_torch's DALI iterator can
differ by one batch between ranks, insightface #1890).

Shuffling. ``fn.readers.mxnet`` shuffles only inside a buffer of ``initial_fill`` records read ahead, so a batch
mixes records that lie close together in the file. On a rec stored identity by identity (as MS1MV3 / Glint360K
ship) a batch then holds a few identities only. Remedy, in two parts: shuffle the file once
(``python -m data.tools.shuffle``), and per epoch change the reader's seed (a new buffer order) and rotate which
contiguous shard each rank reads. A warning says when the labels show a file stored identity by identity
(:func:`data.rec_index.looks_grouped`). In an epoch a rank hands out ``steps_per_epoch * B`` records of its shard
through the buffer; when that plus the buffer exceeds the shard, the reader wraps to the shard's start, so a few
records can come twice and as many not at all (the torch loader draws an exact permutation per epoch).

Mid-epoch resume (``set_start_step(k)``) replays the epoch's first k batches without handing them out: the
shuffle buffer and the flips depend on everything read before, so replaying is the exact way; it costs k batches
of pipeline time (no training).

Damaged images. DALI's decoder cannot skip a sample: an image that does not decode stops the run with a
:class:`RecordIOError` naming the rec (and the record, when DALI's message gives its byte offset), pointing to
``python -m data.tools.inspect ROOT --decode`` and to the torch reader (``data.loader=torch``), which replaces up to
``data.max_bad_images`` damaged images by the next decodable one.
"""
from __future__ import annotations

import re
import warnings
from typing import Iterator

import numpy as np
import torch

from data.position import EpochPosition, epoch_word
from data.rec_index import PreparedRec, looks_grouped, same_label_neighbours
from data.recordio import RecordIOError
from data.train_data import TrainData, check_batch_args

READER_NAME = "Reader"
_AT_OFFSET = re.compile(rb" at index (\d+)$")  # fn.readers.mxnet's source info: "<rec path> at index <byte offset>"


def arcface_augment(images, height: int, width: int, gpu: bool):
    """arcface_torch's ``dali_aug`` on uint8 HWC images, each step applied to a random subset of the batch:

    p = 0.1  resolution drop: resize to s x s, s ~ U[0.5, 0.8) * height, then back to height x width
    p = 0.2  Gaussian blur, window 3 or 5
    p = 0.2  HSV jitter: hue + U[0, 20) degrees, saturation x U[1, 1.2)
    p = 0.1  grey (saturation 0)
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    def choose(probability: float, changed, unchanged):
        take = fn.random.coin_flip(probability=probability, dtype=types.INT32)  # per sample: 1 = changed
        if gpu:
            take = take.gpu()
        return fn.cast(take * changed + (1 - take) * unchanged, dtype=types.UINT8)

    side = fn.random.uniform(range=(0.5 * height, 0.8 * height))
    small = fn.resize(images, resize_x=side, resize_y=side)
    images = choose(0.1, fn.resize(small, size=(height, width)), images)
    blurred = fn.gaussian_blur(images, window_size=fn.random.uniform(values=[3, 5], dtype=types.INT32))
    images = choose(0.2, blurred, images)
    jittered = fn.hsv(images, hue=fn.random.uniform(range=(0.0, 20.0)), saturation=fn.random.uniform(range=(1.0, 1.2)))
    images = choose(0.2, jittered, images)
    return choose(0.1, fn.hsv(images, saturation=0.0), images)


def build_pipeline(prepared: PreparedRec, batch_size: int, shard_id: int, num_shards: int, seed: int,
                   device_id: int | None, num_threads: int = 2, flip: bool = True, augment: bool = False,
                   shuffle: bool = True, shuffle_buffer: int = 32768, prefetch: int = 2):
    """A built DALI pipeline with outputs (images float32 [B,3,H,W], labels int64 [B], where uint8 [B, L]); images
    and labels on the GPU when device_id is set. ``where`` is each sample's source info ("<rec> at index <byte
    offset>", zero-padded, on the CPU): :func:`keys_of` turns it into record keys."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali.pipeline import Pipeline

    height, width = prepared.image_size
    gpu = device_id is not None
    pipe = Pipeline(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id, seed=seed,
                    prefetch_queue_depth=prefetch)
    with pipe:
        jpegs, labels = fn.readers.mxnet(path=[str(prepared.rec_path)], index_path=[str(prepared.image_index)],
                                         shard_id=shard_id, num_shards=num_shards, random_shuffle=shuffle,
                                         initial_fill=max(1, shuffle_buffer), stick_to_shard=True,
                                         pad_last_batch=False, seed=seed, name=READER_NAME)
        where = fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0)  # uint8 [B, longest]
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        if augment:
            images = arcface_augment(images, height, width, gpu)
        mirror = fn.random.coin_flip(probability=0.5, dtype=types.INT32) if flip else 0
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=[127.5] * 3,
                                          std=[127.5] * 3, mirror=mirror)
        labels = fn.cast(labels[0], dtype=types.INT64)  # InsightFace: the class is the first label
        pipe.set_outputs(images, labels.gpu() if gpu else labels, where)
    pipe.build()
    return pipe


def keys_of(where: torch.Tensor, prepared: PreparedRec) -> list[int] | None:
    """Record keys from the pipeline's ``where`` output (uint8 [B, L] source infos); None when one cannot be read."""
    order = np.argsort(prepared.offsets)  # sorted already (file order); kept general
    offsets = prepared.offsets[order]
    keys = []
    for row in where.cpu().numpy():
        m = _AT_OFFSET.search(bytes(row).rstrip(b"\0"))
        if m is None:
            return None
        i = int(np.searchsorted(offsets, int(m.group(1))))
        if i >= offsets.size or int(offsets[i]) != int(m.group(1)):
            return None
        keys.append(int(prepared.keys[order[i]]))
    return keys


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The DALI seed of (run seed, epoch, rank): reader buffer order and flips, 31 bits."""
    return epoch_word(seed, epoch, rank) & 0x7FFFFFFF


def sample_shard_bounds(num_images: int, shard: int, num_shards: int) -> tuple[int, int]:
    """[start, end) positions (file order) of the images in DALI's reader shard ``shard`` of ``num_shards``.

    DALI's formula, ``start = N * shard // num_shards``: the longer shards are spread over the ranks (N=10, 4 shards:
    sizes 2, 3, 2, 3). Not the class partition of :class:`heads.partition.ClassPartition` (arcface_torch's formula:
    the first C % W ranks own one class more, sizes 3, 3, 2, 2, as (start, num_local) of a class range): this splits
    the file's images among reader shards, that splits classes among ranks, and the two need not agree.
    """
    return num_images * shard // num_shards, num_images * (shard + 1) // num_shards


class DaliTrainData(EpochPosition, TrainData):
    """:class:`~data.train_data.TrainData` read by DALI; see the module docstring for epochs, shards and shuffling."""

    def __init__(self, prepared: PreparedRec, batch_size: int, rank: int, world_size: int, seed: int,
                 device: torch.device, num_workers: int = 2, flip: bool = True, augment: bool = False,
                 shuffle: bool = True, shuffle_buffer: int = 32768, prefetch: int = 2) -> None:
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            raise ImportError(f"the dali loader needs NVIDIA DALI (pip install nvidia-dali-cuda130): {e}; "
                              f"or use the torch loader (data.loader=torch)") from None
        self.prepared = prepared
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, int(seed)
        self.steps_per_epoch = check_batch_args(prepared.num_images, batch_size, rank, world_size)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.device_id: int | None = self.device.index if self.device.index is not None \
                else torch.cuda.current_device()
            self.device = torch.device("cuda", self.device_id)
        elif self.device.type == "cpu":
            self.device_id = None
        else:
            raise ValueError(f"the dali loader runs on a CUDA device or the CPU, got device {self.device}")
        self.num_threads, self.flip, self.augment, self.shuffle = max(1, num_workers), flip, augment, shuffle
        self.prefetch = prefetch
        smallest_shard = prepared.num_images // world_size
        self.shuffle_buffer = max(1, min(shuffle_buffer, smallest_shard))
        self.epoch, self.start_step = 0, 0
        self._pipe = None
        self._last: tuple[int, int, torch.Tensor] | None = None  # (epoch, step, where) of the batch yielded last
        if shuffle and looks_grouped(prepared.labels):
            warnings.warn(f"{prepared.rec_path}: {same_label_neighbours(prepared.labels):.0%} of neighbouring records "
                          f"share a label (stored identity by identity); DALI shuffles only within "
                          f"{self.shuffle_buffer} records, so batches hold few identities. Shuffle the file once: "
                          f"python -m data.tools.shuffle", stacklevel=3)

    def shard_of(self, epoch: int) -> int:
        """The shard this rank reads in ``epoch``: rotates so a rank sees another slice of the file each epoch."""
        return (self.rank + epoch) % self.world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.close()
        if self.start_step == self.steps_per_epoch:
            return
        epoch = self.epoch
        step = 0
        try:
            self._pipe = build_pipeline(self.prepared, self.batch_size, self.shard_of(epoch), self.world_size,
                                        epoch_seed(self.seed, epoch, self.rank), self.device_id, self.num_threads,
                                        self.flip, self.augment, self.shuffle, self.shuffle_buffer, self.prefetch)
            batches = DALIGenericIterator([self._pipe], ["images", "labels", "where"], size=-1)
            for step in range(self.steps_per_epoch):
                out = next(batches)[0]
                if step < self.start_step:
                    continue  # replay of a resumed epoch
                images, labels = out["images"], out["labels"]
                self._check_shape(images, epoch, step)
                self._last = (epoch, step, out["where"].clone())  # tiny; the iterator may reuse its buffers
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        except RuntimeError as e:
            raise self._explain(e, epoch, step) from None
        finally:
            self.close()

    def batch_keys(self) -> list[int] | str:
        """The record keys of the batch yielded last, from DALI's source info (the byte offset of each sample);
        where that cannot be read, a string naming the epoch, step and shard instead. [] before the first batch."""
        if self._last is None:
            return []
        epoch, step, where = self._last
        keys = keys_of(where, self.prepared)
        if keys is not None:
            return keys
        return f"epoch {epoch}, step {step} of shard {self.shard_of(epoch)}/{self.world_size}"

    def _check_shape(self, images: torch.Tensor, epoch: int, step: int) -> None:
        want = (self.batch_size, 3, *self.prepared.image_size)
        if tuple(images.shape) != want:
            raise RecordIOError(f"{self.prepared.rec_path}: epoch {epoch} step {step}: the DALI batch has shape "
                                f"{tuple(images.shape)}, expected {want} from property; run "
                                f"`python -m data.tools.inspect {self.prepared.root} --decode` to find the image")

    def _explain(self, error: RuntimeError, epoch: int, step: int) -> RecordIOError:
        """A DALI failure as an error naming the file, the record when DALI's message gives its byte offset
        ("... at index N"; not every decoder error does), the shard being read, DALI's reason and the way out:
        ``data.tools.inspect --decode`` lists damaged images, the torch reader skips them."""
        text = str(error)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        reason = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if line == "encountered:"),
                      lines[0] if lines else type(error).__name__)
        shard = self.shard_of(epoch)
        lo, hi = sample_shard_bounds(self.prepared.num_images, shard, self.world_size)
        keys = self.prepared.keys
        record = ""
        for m in re.finditer(r" at index (\d+)", text):
            hit = np.flatnonzero(self.prepared.offsets == int(m.group(1)))
            if hit.size:
                record = f"key {int(keys[hit[0]])} at offset {int(m.group(1))}: "
                break
        return RecordIOError(f"{self.prepared.rec_path}: DALI pipeline failed at epoch {epoch} step {step} reading "
                             f"shard {shard} (keys {int(keys[lo])}..{int(keys[hi - 1])} in file order): {record}"
                             f"{reason}. DALI cannot skip a damaged image: run `python -m data.tools.inspect "
                             f"{self.prepared.root} --decode` to list damaged records, and repair the set or train "
                             f"with data.loader=torch, which replaces up to data.max_bad_images damaged images by "
                             f"the next decodable one")

    def close(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe._shutdown()  # stops DALI's worker threads now rather than at garbage collection
