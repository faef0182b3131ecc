"""Torch loader over real rec files: batch sampler arithmetic, decoded tensors, flips, workers, damaged images."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.dataset import FixedBatchSampler, RecordDataset, build_train_loader
from data.recordio import InsightFaceRec, RecordIOError, write_insightface_rec

H, W = 24, 20


def picture(label: int, variant: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
    """An RGB uint8 picture, left/right asymmetric so that flips are visible."""
    h, w = size
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 40 * label % 256
    img[..., 1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]  # ramp left -> right
    img[..., 2] = 10 * variant
    return img


def encode(img: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def rec_root(tmp_path_factory) -> Path:
    """12 PNG images (lossless, so decoded pixels are known exactly) of 4 identities, InsightFace layout."""
    root = tmp_path_factory.mktemp("rec")
    samples = [(label, encode(picture(label, v))) for label in range(4) for v in range(3)]
    write_insightface_rec(root, iter(samples), num_classes=4, image_size=(H, W))
    return root


# ---------------------------------------------------------------------------------------------------- sampler
def epoch_batches(num_samples: int, batch: int, world: int, seed: int, epoch: int,
                  drop_last: bool = True) -> list[list[list[int]]]:
    """batches[rank][step] for one epoch."""
    out = []
    for rank in range(world):
        s = FixedBatchSampler(num_samples, batch, rank, world, seed, drop_last)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


def test_sampler_partitions_the_global_batch():
    n, b, w = 103, 4, 3
    batches = epoch_batches(n, b, w, seed=5, epoch=0)
    steps = n // (w * b)
    assert steps == 8
    for rank_batches in batches:
        assert len(rank_batches) == steps and all(len(x) == b for x in rank_batches)
    flat = [i for rank_batches in batches for x in rank_batches for i in x]
    assert len(flat) == len(set(flat)) == w * b * steps  # disjoint across ranks and steps
    assert all(0 <= i < n for i in flat)
    # step s of rank r is the slice perm[s*W*B + r*B : s*W*B + (r+1)*B] of one shared permutation
    perm = FixedBatchSampler(n, b, 0, w, seed=5).permutation().tolist()
    for s in range(steps):
        assert sum((batches[r][s] for r in range(w)), []) == perm[s * w * b:(s + 1) * w * b]


def test_sampler_epochs_seeds_and_determinism():
    a0 = epoch_batches(50, 5, 2, seed=1, epoch=0)
    assert a0 == epoch_batches(50, 5, 2, seed=1, epoch=0)
    assert a0 != epoch_batches(50, 5, 2, seed=1, epoch=1)
    assert a0 != epoch_batches(50, 5, 2, seed=2, epoch=0)
    # seeded with seed + epoch, as documented
    g = torch.Generator().manual_seed(1 + 3)
    s = FixedBatchSampler(50, 5, 0, 2, seed=1)
    s.set_epoch(3)
    assert s.permutation().tolist() == torch.randperm(50, generator=g)[:50].tolist()


def test_sampler_resume_mid_epoch():
    s = FixedBatchSampler(64, 4, 1, 2, seed=0)
    s.set_epoch(2)
    full = list(s)
    assert len(s) == 8 == len(full)
    s.set_start_step(5)
    assert len(s) == 3 and list(s) == full[5:]
    s.set_start_step(8)
    assert len(s) == 0 and list(s) == []
    s.set_epoch(3)  # a new epoch starts at step 0
    assert len(s) == 8
    with pytest.raises(ValueError, match=r"start step must be in 0\.\.8, got 9"):
        s.set_start_step(9)


def test_sampler_without_drop_last_pads_with_full_batches():
    batches = epoch_batches(10, 3, 2, seed=0, epoch=0, drop_last=False)
    assert [len(rb) for rb in batches] == [2, 2] and all(len(x) == 3 for rb in batches for x in rb)
    flat = [i for rb in batches for x in rb for i in x]
    assert len(flat) == 12 and set(flat) <= set(range(10))
    s = FixedBatchSampler(10, 3, 0, 2, seed=0, drop_last=False)
    assert len(s) == 2 and set(s.permutation().tolist()) == set(range(10))
    assert len(FixedBatchSampler(2, 4, 1, 2, seed=0, drop_last=False)) == 1  # tiny set, wrapped several times


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"dataset of 7 samples is smaller than one global batch \(2 ranks x 4 = 8\)"):
        FixedBatchSampler(7, 4, 0, 2, seed=0)
    with pytest.raises(ValueError, match=r"rank must be in 0\.\.1, got 2"):
        FixedBatchSampler(70, 4, 2, 2, seed=0)
    with pytest.raises(ValueError, match=r"batch_size and world_size must be > 0"):
        FixedBatchSampler(70, 0, 0, 1, seed=0)


# ---------------------------------------------------------------------------------------------------- dataset
def test_dataset_tensors(rec_root):
    ds = RecordDataset(InsightFaceRec(rec_root), flip=False, seed=0)
    assert len(ds) == 12
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, H, W) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.shape == () and int(y) == i // 3
        want = (torch.from_numpy(picture(i // 3, i % 3)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
        assert torch.equal(x, want)
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert float(ds[0][0][1, 0, 0]) == -1.0 and float(ds[0][0][1, 0, -1]) == 1.0  # the green ramp spans [-1, 1]


def test_flip_is_deterministic_per_seed_epoch_index(rec_root):
    rec = InsightFaceRec(rec_root)
    plain = RecordDataset(rec, flip=False, seed=0)
    ds = RecordDataset(rec, flip=True, seed=7)
    patterns = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        pattern = []
        for i in range(len(ds)):
            x, flipped = ds[i][0], ds.flips(i)
            assert torch.equal(x, plain[i][0].flip(-1) if flipped else plain[i][0])
            pattern.append(flipped)
        patterns.append(pattern)
    assert 0 < sum(map(sum, patterns)) < 4 * len(ds)  # both outcomes happen
    assert len({tuple(p) for p in patterns}) > 1  # epochs differ
    again = RecordDataset(rec, flip=True, seed=7)
    again.set_epoch(2)
    assert [again.flips(i) for i in range(len(ds))] == patterns[2]
    # over many indices: a fair coin, and another seed gives another pattern
    ds.set_epoch(0)
    other = RecordDataset(rec, flip=True, seed=8)
    mine, theirs = [ds.flips(i) for i in range(400)], [other.flips(i) for i in range(400)]
    assert 160 < sum(mine) < 240 and mine != theirs


def run_epochs(loader, sampler, dataset, epochs):
    out = []
    for e in epochs:
        sampler.set_epoch(e)
        dataset.set_epoch(e)
        out.append([(x.clone(), y.clone()) for x, y in loader])
    return out


def test_loader_with_worker_matches_in_process_loader(rec_root):
    """A persistent worker must see set_epoch() (flips) and give exactly the in-process batches."""
    ref = build_train_loader(rec_root, batch_size=2, rank=1, world_size=2, seed=3, num_workers=0)
    loader, sampler, dataset = build_train_loader(rec_root, batch_size=2, rank=1, world_size=2, seed=3,
                                                  num_workers=1)
    assert loader.persistent_workers and not ref[0].persistent_workers
    assert loader.pin_memory == torch.cuda.is_available()
    got, want = run_epochs(loader, sampler, dataset, [0, 1]), run_epochs(*ref, [0, 1])
    assert [len(e) for e in got] == [3, 3]
    for ge, we in zip(got, want):
        for (gx, gy), (wx, wy) in zip(ge, we):
            assert gx.shape == (2, 3, H, W) and gy.dtype == torch.int64
            assert torch.equal(gx, wx) and torch.equal(gy, wy)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(got[0], got[1]))


def test_loader_resumes_mid_epoch(rec_root):
    loader, sampler, dataset = build_train_loader(rec_root, batch_size=2, rank=0, world_size=1, seed=0)
    full = run_epochs(loader, sampler, dataset, [4])[0]
    sampler.set_epoch(4)
    dataset.set_epoch(4)
    sampler.set_start_step(4)
    rest = [(x, y) for x, y in loader]
    assert len(rest) == 2
    for (a, b), (c, d) in zip(rest, full[4:]):
        assert torch.equal(a, c) and torch.equal(b, d)


# ---------------------------------------------------------------------------------------------------- bad images
def test_decoded_size_mismatch_names_the_record(tmp_path):
    samples = [(0, encode(picture(0, 0))), (1, encode(picture(1, 0, size=(H, W + 2))))]
    write_insightface_rec(tmp_path, samples, num_classes=2, image_size=(H, W))
    ds = RecordDataset(InsightFaceRec(tmp_path), flip=True, seed=0, max_bad_images=0)
    ds[0]
    with pytest.raises(RecordIOError, match=rf"train\.rec: 1 damaged images met, more than data.max_bad_images=0; "
                                            rf"the last: key 2 at offset \d+: image is {H}x{W + 2} \(HxW\), "
                                            rf"expected {H}x{W} from .*property"):
        ds[1]


def test_undecodable_image_names_the_record(tmp_path):
    good = encode(picture(0, 0), "JPEG")
    broken = good[:3] + b"\x00" * 40  # a JPEG signature and nothing sensible after it
    write_insightface_rec(tmp_path, [(0, good), (0, broken)], num_classes=1, image_size=(H, W))
    ds = RecordDataset(InsightFaceRec(tmp_path), flip=False, seed=0, max_bad_images=0)
    assert ds[0][0].shape == (3, H, W)
    with pytest.raises(RecordIOError, match=r"train\.rec: .*the last: key 2 at offset \d+: image cannot be decoded"):
        ds[1]


def test_label_beyond_property_reaches_the_loader_as_clear_error(tmp_path):
    write_insightface_rec(tmp_path, [(0, encode(picture(0, 0))), (2, encode(picture(2, 0)))], num_classes=3,
                          image_size=(H, W))
    (tmp_path / "property").write_text(f"2,{H},{W}")
    loader, sampler, _ = build_train_loader(tmp_path, batch_size=2, rank=0, world_size=1, seed=0)
    with pytest.raises(RecordIOError, match=r"key 2 at offset \d+: label 2 is out of range, property says "
                                            r"num_classes=2"):
        list(loader)
