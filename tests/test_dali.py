"""The DALI loader (CPU pipeline, device_id=None) on real rec files, against the torch reader; the up-front checks
both loaders share; fixed batches per rank under real gloo all-gathers."""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.dali_pipeline import DaliTrainData, sample_shard_bounds
from data.dataset import RecordDataset
from data.loader import TorchTrainData, build_loader, resolve_kind
from data.rec_index import prepare_rec
from data.recordio import MAGIC, InsightFaceRec, IRHeader, RecordIOError, RecordIOWriter, pack, write_insightface_rec

H, W = 32, 40
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


def face(label: int, variant: int, rng: np.random.Generator) -> np.ndarray:
    """A textured RGB picture, left/right asymmetric (flips are visible), colour varying (chroma subsampling)."""
    y, x = np.mgrid[0:H, 0:W]
    img = np.stack([(37 * label + 3 * x) % 256, (5 * y + 60 * variant) % 256, (x * y + 11 * label) % 256], -1)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def with_magic_inside(data: bytes) -> bytes:
    """The JPEG with a comment segment holding RecordIO's magic word at a 4-byte aligned payload position, so its
    record is stored split in parts (cflag 1 and 3); decoders skip comments."""
    comment = b"\0\0" + struct.pack("<I", MAGIC) + b"\0\0"  # JPEG bytes 8..11 = payload bytes 32..35
    return data[:2] + b"\xff\xfe" + struct.pack(">H", 2 + len(comment)) + comment + data[2:]


@pytest.fixture(scope="module")
def grouped(tmp_path_factory) -> Path:
    """InsightFace layout (header, 60 JPEGs of 12 identities grouped, identity-range records after them); key 18 is
    stored split around an embedded magic word."""
    root = tmp_path_factory.mktemp("grouped")
    rng = np.random.default_rng(0)
    samples = [(c, jpeg(face(c, v, rng))) for c in range(12) for v in range(5)]
    samples[17] = (samples[17][0], with_magic_inside(samples[17][1]))
    write_insightface_rec(root, samples, num_classes=12, image_size=(H, W))
    return root


@pytest.fixture(scope="module")
def unique(tmp_path_factory) -> Path:
    """64 images, each its own class (a label names its image), no header, in a shuffled order."""
    root = tmp_path_factory.mktemp("unique")
    rng = np.random.default_rng(1)
    order = rng.permutation(64)
    write_insightface_rec(root, [(int(c), jpeg(face(int(c), 0, rng))) for c in order], num_classes=64,
                          image_size=(H, W), with_header=False)
    return root


@pytest.fixture()
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def dali(root, cache, batch=5, rank=0, world=1, seed=0, **kw) -> DaliTrainData:
    data = build_loader("dali", root, batch, rank, world, seed, CPU, num_workers=1, cache_dir=cache, **kw)
    assert isinstance(data, DaliTrainData)
    return data


def epoch(data, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data.set_epoch(e)
    return [(x.clone(), y.clone()) for x, y in data]


# ---------------------------------------------------------------------------------------------------- index, cache
def test_images_only_index_in_cache_leaves_the_users_files_alone(grouped, cache):
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in grouped.iterdir()}
    prep = prepare_rec(grouped, cache_dir=cache)
    rec = InsightFaceRec(grouped)
    assert rec.header is not None and len(rec.reader) == 1 + 60 + 12  # header, images, identity ranges
    lines = prep.image_index.read_text().splitlines()
    assert [tuple(map(int, line.split("\t"))) for line in lines] == \
        [(k, rec.reader.offset(k)) for k in range(1, 61)]  # images only, file order
    assert prep.image_index.parent.parent == cache
    assert prep.num_images == 60 and prep.num_classes == 12 and prep.image_size == (H, W)
    assert prep.labels.dtype == np.int64 and prep.labels.tolist() == [c for c in range(12) for _ in range(5)]
    raw = (grouped / "train.rec").read_bytes()
    assert struct.unpack_from("<I", raw, rec.reader.offset(18) + 4)[0] >> 29 == 1  # key 18: first of split parts
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in grouped.iterdir()} == before
    # cached: the second call does not rescan (the index file is not rewritten) ...
    stamp = prep.image_index.stat().st_mtime_ns
    assert prepare_rec(grouped, cache_dir=cache).image_index.stat().st_mtime_ns == stamp
    # ... unless the cache is unreadable, or the rec changes
    (prep.image_index.parent / "scan.npz").write_bytes(b"not a zip")
    assert prepare_rec(grouped, cache_dir=cache).labels.tolist() == prep.labels.tolist()
    copy = cache.parent / "copy"
    shutil.copytree(grouped, copy)
    first = prepare_rec(copy, cache_dir=cache)
    (copy / "property").write_text("13,32,40")
    assert prepare_rec(copy, cache_dir=cache).num_classes == 13 and first.num_classes == 12


# ---------------------------------------------------------------------------------------------------- same bytes
def test_dali_and_torch_readers_give_the_same_labels_and_pixels(grouped, cache):
    """For a fixed order without augmentation: same labels, same decoded pixels within JPEG-decoder tolerance."""
    ds = RecordDataset(InsightFaceRec(grouped), flip=False, seed=0)
    for world, rank in [(1, 0), (2, 1)]:
        data = dali(grouped, cache, batch=6, rank=rank, world=world, flip=False, shuffle=False)
        got = epoch(data, 0)
        assert len(got) == data.steps_per_epoch == 60 // (world * 6)
        images, labels = torch.cat([x for x, _ in got]), torch.cat([y for _, y in got])
        assert images.dtype == torch.float32 and images.shape == (len(labels), 3, H, W)
        assert labels.dtype == torch.int64
        lo, _ = sample_shard_bounds(60, rank, world)  # epoch 0: rank r reads shard r, in file order (= key order here)
        want = torch.stack([ds[i][0] for i in range(lo, lo + len(labels))])
        want_labels = torch.tensor([ds.rec.read_label(i) for i in range(lo, lo + len(labels))])
        assert torch.equal(labels, want_labels)
        levels = (images - want).abs() * 127.5  # in 0..255 grey levels
        assert float(levels.max()) <= 2.0 and float(levels.mean()) <= 0.1, (float(levels.max()), float(levels.mean()))
        assert -1.0 <= float(images.min()) and float(images.max()) <= 1.0


def test_label_vectors_give_their_first_entry(tmp_path):
    """Records whose IRHeader carries a label vector (flag > 0): the class is its first entry, for both readers.
    (Keys from 1: a record 0 with a label vector would be InsightFace's header.)"""
    rng = np.random.default_rng(3)
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for key in range(1, 9):
            writer.write_idx(key, pack(IRHeader(0, [float(key % 4), 99.0, -1.0], key, 0), jpeg(face(key, 0, rng))))
    (tmp_path / "property").write_text(f"4,{H},{W}")
    for kind in ("dali", "torch"):
        data = build_loader(kind, tmp_path, 4, 0, 1, 0, CPU, num_workers=0, cache_dir=tmp_path / "cache",
                            **({"shuffle": False} if kind == "dali" else {}))
        labels = sorted(torch.cat([y for _, y in epoch(data, 0)]).tolist())
        assert labels == [0, 0, 1, 1, 2, 2, 3, 3], kind


def test_flip_mirrors_about_half_of_the_images(grouped, cache):
    ds = RecordDataset(InsightFaceRec(grouped), flip=False, seed=0)
    images = torch.cat([x for x, _ in epoch(dali(grouped, cache, batch=6, shuffle=False), 0)])
    flipped = 0
    for i, x in enumerate(images):
        plain = ds[i][0]
        same, mirrored = (x - plain).abs().max() < 0.02, (x - plain.flip(-1)).abs().max() < 0.02
        assert same or mirrored
        flipped += bool(mirrored)
    assert 15 <= flipped <= 45


# ---------------------------------------------------------------------------------------------------- batches, shards
@pytest.mark.parametrize("world, batch", [(2, 5), (3, 4)])
def test_every_rank_gets_the_same_number_of_full_batches_from_disjoint_shards(unique, cache, world, batch):
    """64 images over 3 ranks are shards of 21/21/22: still the same number of full batches on every rank."""
    prep = prepare_rec(unique, cache_dir=cache)
    file_order = prep.labels.tolist()  # a label names its image
    steps = 64 // (world * batch)
    for e in range(2):
        seen = []
        for rank in range(world):
            data = dali(unique, cache, batch=batch, rank=rank, world=world, shuffle_buffer=2)
            assert data.steps_per_epoch == len(data) == steps
            batches = epoch(data, e)
            assert len(batches) == steps and all(y.shape == (batch,) for _, y in batches)
            labels = torch.cat([y for _, y in batches]).tolist()
            lo, hi = sample_shard_bounds(64, (rank + e) % world, world)
            assert set(labels) <= set(file_order[lo:hi])  # this epoch's shard of this rank
            if steps * batch + 2 <= hi - lo:  # the buffer does not wrap: no record twice
                assert len(set(labels)) == len(labels)
            seen.append(set(labels))
        assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])  # ranks disjoint


def test_epochs_reshuffle_and_runs_reproduce(unique, cache):
    a = dali(unique, cache, batch=8, seed=3)
    e0, e1 = epoch(a, 0), epoch(a, 1)
    order = lambda batches: torch.cat([y for _, y in batches]).tolist()  # noqa: E731
    assert order(e0) != order(e1)
    again = epoch(dali(unique, cache, batch=8, seed=3), 0)
    assert all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(e0, again))
    assert order(epoch(dali(unique, cache, batch=8, seed=4), 0)) != order(e0)


def test_mid_epoch_resume_replays_exactly(unique, cache):
    data = dali(unique, cache, batch=8, seed=5)
    full = epoch(data, 2)
    assert len(full) == 8
    data.set_epoch(2)
    data.set_start_step(5)
    assert len(data) == 3
    rest = [(x.clone(), y.clone()) for x, y in data]
    assert len(rest) == 3
    assert all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(rest, full[5:]))
    data.set_start_step(8)
    assert len(data) == 0 and list(data) == []
    data.set_epoch(3)
    assert len(data) == 8
    with pytest.raises(ValueError, match=r"start step must be in 0\.\.8, got 9"):
        data.set_start_step(9)


def test_augmentation_flag(grouped, cache):
    plain = torch.cat([x for x, _ in epoch(dali(grouped, cache, batch=10, shuffle=False, flip=False), 0)])
    augmented = torch.cat([x for x, _ in epoch(dali(grouped, cache, batch=10, shuffle=False, flip=False,
                                                    augment=True), 0)])
    assert augmented.shape == plain.shape and augmented.dtype == torch.float32
    assert -1.0 <= float(augmented.min()) and float(augmented.max()) <= 1.0
    changed = int(((augmented - plain).abs().flatten(1).amax(1) > 0.02).sum())
    assert 10 <= changed <= 50  # each image is changed with probability 1 - 0.9 * 0.8 * 0.8 * 0.9 = 0.48
    with pytest.raises(ValueError, match="augment: only available with the dali loader"):
        build_loader("torch", grouped, 4, 0, 1, 0, CPU, augment=True, cache_dir=cache)


def test_torch_kind_has_the_same_interface(grouped, cache):
    data = build_loader("torch", grouped, 4, 1, 2, 0, CPU, num_workers=0, cache_dir=cache)
    assert isinstance(data, TorchTrainData)
    assert (data.steps_per_epoch, data.num_images, data.num_classes, data.image_size) == (7, 60, 12, (H, W))
    data.set_epoch(1)
    data.set_start_step(2)
    batches = list(data)
    assert len(batches) == len(data) == 5
    assert all(x.shape == (4, 3, H, W) and x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
    data.close()
    workers = build_loader("torch", grouped, 4, 0, 1, 0, CPU, num_workers=1, cache_dir=cache)
    assert len(epoch(workers, 0)) == 15 and len(mp.active_children()) == 1  # a persistent worker
    workers.close()
    assert mp.active_children() == []
    with pytest.raises(ValueError, match="kind must be one of"):
        build_loader("mxnet", grouped, 4, 0, 1, 0, CPU, cache_dir=cache)
    assert isinstance(build_loader("auto", grouped, 4, 0, 1, 0, CPU, cache_dir=cache), TorchTrainData)  # no GPU
    assert resolve_kind("auto", torch.device("cuda", 0)) == "dali" and resolve_kind("torch", CPU) == "torch"


def test_close_releases_dali_threads(unique, cache):
    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    def settles_to(limit: int) -> bool:  # a thread that was told to stop leaves a moment later
        deadline = time.monotonic() + 10
        while threads() > limit and time.monotonic() < deadline:
            time.sleep(0.05)
        return threads() <= limit

    torch.ones(256, 256) @ torch.ones(256, 256)  # torch's own worker threads exist before the count starts
    data = dali(unique, cache, batch=8, seed=0)
    base = threads()
    it = iter(data)
    next(it)
    assert threads() > base  # the pipeline's workers run
    data.close()  # mid-epoch: the abandoned pipeline stops now
    assert settles_to(base)
    epoch(data, 1)  # a full epoch shuts its pipeline down itself
    assert settles_to(base)
    data.close()  # idempotent


def test_device_mapping_without_touching_cuda(unique, cache):
    prep = prepare_rec(unique, cache_dir=cache)
    gpu = DaliTrainData(prep, 8, 0, 1, 0, torch.device("cuda", 1))
    assert gpu.device_id == 1 and gpu.device == torch.device("cuda", 1)
    assert DaliTrainData(prep, 8, 0, 1, 0, CPU).device_id is None  # CPU-only pipelines: device_id=None
    with pytest.raises(ValueError, match="CUDA device or the CPU"):
        DaliTrainData(prep, 8, 0, 1, 0, torch.device("meta"))
    with pytest.raises(ValueError, match=r"smaller than one global batch \(2 ranks x 40 = 80\)"):
        DaliTrainData(prep, 40, 0, 2, 0, CPU)


def test_grouped_file_warns(grouped, cache):
    with pytest.warns(UserWarning, match="stored identity by identity.*data.tools.shuffle"):
        dali(grouped, cache)


# ---------------------------------------------------------------------------------------------------- bad input
def damage(src: Path, dst: Path, how: str) -> int:
    """Copy ``src`` to ``dst`` with one kind of damage; return the key it hits."""
    shutil.copytree(src, dst)
    rec = InsightFaceRec(dst)
    key = int(rec.image_keys[7])
    offset = rec.reader.offset(key)
    data = bytearray((dst / "train.rec").read_bytes())
    if how == "truncated":  # a no-header set: cut into its last image
        key = int(rec.image_keys[-1])
        data = data[:rec.reader.offset(key) + 100]
    elif how == "magic":
        data[offset:offset + 4] = b"\0\0\0\0"
    elif how == "not_image":
        data[offset + 32:offset + 36] = b"\0\0\0\0"
    elif how == "offset_past_end":
        lines = (dst / "train.idx").read_text().splitlines()
        lines[7] = f"{key}\t{len(data) + 64}"
        (dst / "train.idx").write_text("\n".join(lines) + "\n")
    elif how == "label_range":
        (dst / "property").write_text(f"5,{H},{W}")
        in_file_order = sorted(range(len(rec)), key=lambda i: rec.reader.offset(int(rec.image_keys[i])))
        key = int(rec.image_keys[next(i for i in in_file_order if rec.read_label(i) >= 5)])  # the first one met
    (dst / "train.rec").write_bytes(bytes(data))
    return key


@pytest.mark.parametrize("kind", ["dali", "torch"])
@pytest.mark.parametrize("how, message", [
    ("truncated", r"key {key} at offset \d+: truncated record"),
    ("magic", r"key {key} at offset \d+: wrong magic 0x00000000"),
    ("not_image", r"key {key} at offset \d+: not an image record"),
    ("offset_past_end", r"train\.idx: key {key} has offset \d+, past the end of .*train\.rec"),
    ("label_range", r"key {key} at offset \d+: label \d+ is out of range, property says num_classes=5"),
])
def test_bad_input_fails_before_training_naming_file_and_record(unique, tmp_path, kind, how, message):
    key = damage(unique, tmp_path / "bad", how)
    with pytest.raises(RecordIOError, match=str(tmp_path / "bad").replace(".", r"\.") + ".*" +
                       message.format(key=key)):
        build_loader(kind, tmp_path / "bad", 4, 0, 1, 0, CPU, num_workers=0, cache_dir=tmp_path / "cache")


def test_undecodable_image_in_dali_names_the_file_and_the_tool(unique, tmp_path):
    shutil.copytree(unique, tmp_path / "bad")
    rec = InsightFaceRec(tmp_path / "bad")
    offset = rec.reader.offset(int(rec.image_keys[3]))
    data = bytearray((tmp_path / "bad" / "train.rec").read_bytes())
    data[offset + 32 + 200: offset + 32 + 600] = bytes(400)  # JPEG signature intact, entropy data destroyed
    (tmp_path / "bad" / "train.rec").write_bytes(bytes(data))
    loader = build_loader("dali", tmp_path / "bad", 8, 0, 1, 0, CPU, cache_dir=tmp_path / "cache", shuffle=False)
    with pytest.raises(RecordIOError, match=r"bad/train\.rec: DALI pipeline failed at epoch 0 step 0 reading shard "
                                            r"0 .*data\.tools\.inspect .*--decode"):
        list(loader)


# ---------------------------------------------------------------------------------------------------- gloo ranks
RANK_SCRIPT = textwrap.dedent("""
    import datetime, json, os, sys
    import torch, torch.distributed as dist
    from data.loader import build_loader
    root, cache, out = sys.argv[1:4]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))  # a missing batch fails, not hangs
    rank, world = dist.get_rank(), dist.get_world_size()
    data = build_loader("dali", root, 7, rank, world, 0, torch.device("cpu"), num_workers=1, cache_dir=cache,
                        shuffle_buffer=4)
    steps, gathered = [], []
    for e in range(2):
        data.set_epoch(e)
        n = 0
        for images, labels in data:
            parts = [torch.empty_like(labels) for _ in range(world)]
            dist.all_gather(parts, labels)           # needs a full batch from every rank
            x = [torch.empty_like(images) for _ in range(world)]
            dist.all_gather(x, images)
            gathered.append(torch.stack(parts).tolist())
            n += 1
        steps.append(n)
    data.close()
    dist.barrier()
    json.dump({"steps": steps, "gathered": gathered}, open(out, "w"))
    dist.destroy_process_group()
""")


@pytest.mark.multirank
def test_dali_ranks_meet_in_every_all_gather(tmp_path):
    """2 gloo ranks on 61 images (shards of 30 and 31), batch 7: 4 steps each, every all-gather complete."""
    rng = np.random.default_rng(2)
    write_insightface_rec(tmp_path / "set", [(c, jpeg(face(c, 0, rng))) for c in range(61)], 61, (H, W),
                          with_header=False)
    prepare_rec(tmp_path / "set", cache_dir=tmp_path / "cache")  # one scan, shared through the cache
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    port = __import__("tests.distributed", fromlist=["free_port"]).free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "rank.py"), str(tmp_path / "set"),
                                       str(tmp_path / "cache"), str(tmp_path / f"out{rank}.json")],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            out, _ = p.communicate(timeout=90)
            assert p.returncode == 0, out.decode(errors="replace")[-3000:]
    finally:
        for p in procs:  # a failed rank leaves the other waiting in a collective
            if p.poll() is None:
                p.kill()
                p.wait()
    results = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]
    assert results[0]["steps"] == results[1]["steps"] == [61 // 14, 61 // 14]
    assert results[0]["gathered"] == results[1]["gathered"]  # both ranks hold the same global batches
    for step in results[0]["gathered"]:
        assert not set(step[0]) & set(step[1])  # the ranks' samples are disjoint
