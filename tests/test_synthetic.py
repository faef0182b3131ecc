"""Synthetic identities: deterministic bytes (any number of workers), a training set that reads back through the
real RecordIO reader, verification bins built only from held-out identities, and nuisance that defeats raw pixels."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.recordio import InsightFaceRec
from data.synthetic import (
    CFP_PROFILE,
    TRAIN,
    identity_params,
    main,
    make_dataset,
    make_verification_pairs,
    render_identity_images,
)
from data.verification_bin import load_bin_images, read_bin
from eval.verification import evaluate_pairs

REPO = Path(__file__).resolve().parents[1]
FILES = ["train.rec", "train.idx", "property", "synth_lfw.bin", "synth_cfp.bin", "synthetic.json"]
NUM_IDS, PER_ID, VAL_IDS, PAIRS, SEED = 8, 4, 10, 160, 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    summary = make_dataset(root, NUM_IDS, PER_ID, VAL_IDS, PAIRS, seed=SEED, progress=False)
    return root, summary


def test_same_seed_gives_identical_bytes_with_any_number_of_workers(dataset, tmp_path):
    root, _ = dataset
    make_dataset(tmp_path, NUM_IDS, PER_ID, VAL_IDS, PAIRS, seed=SEED, progress=False, workers=2)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (root / name).read_bytes(), name


def test_identity_k_does_not_depend_on_the_dataset_size_and_seed_changes_everything(tmp_path):
    small = make_dataset(tmp_path / "a", 2, 2, 2, 2, seed=1, progress=False)
    large = make_dataset(tmp_path / "b", 3, 2, 2, 2, seed=1, progress=False)
    other = make_dataset(tmp_path / "c", 2, 2, 2, 2, seed=2, progress=False)
    a, b, c = (InsightFaceRec(s["dir"]) for s in (small, large, other))
    assert [a.read(i) for i in range(4)] == [b.read(i) for i in range(4)]  # labels 0, 1: same images
    assert all(a.read(i)[1] != c.read(i)[1] for i in range(4))


def test_train_rec_reads_back_with_the_right_labels(dataset):
    root, summary = dataset
    rec = InsightFaceRec(root)
    assert len(rec) == NUM_IDS * PER_ID == summary["train"]["images"]
    assert rec.num_classes == NUM_IDS
    labels = []
    for i in range(len(rec)):
        label, data = rec.read(i)
        labels.append(label)
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (112, 112)
    assert labels == sorted(labels)  # grouped by identity, as the InsightFace layout wants
    assert Counter(labels) == {k: PER_ID for k in range(NUM_IDS)}


def test_bins_hold_only_held_out_identities(dataset):
    root, summary = dataset
    train_ids = set(range(*summary["train"]["identities"]))
    held_out = set(range(*summary["val"]["identities"]))
    assert train_ids == set(range(NUM_IDS)) and held_out == set(range(NUM_IDS, NUM_IDS + VAL_IDS))
    saved = json.loads((root / "synthetic.json").read_text())
    for name in ("synth_lfw", "synth_cfp"):
        info = summary["val"]["bins"][name]
        pairs = info["pair_identities"]
        images, issame = read_bin(root / info["file"])
        assert len(pairs) == len(issame) == PAIRS and len(images) == 2 * PAIRS
        assert {i for pair in pairs for i in pair} <= held_out
        assert issame == [a == b for a, b in pairs]
        assert sum(issame) == PAIRS // 2 == info["positives"]
        assert saved["val"]["bins"][name]["pair_identities"] == pairs
        tensor, same = load_bin_images(root / info["file"])
        assert tuple(tensor.shape) == (2 * PAIRS, 3, 112, 112) and same.tolist() == issame


def test_raw_pixels_cannot_verify(dataset):
    """The nuisance dominates raw pixels: cosine on mean-removed pixels is close to chance (measured ~0.6)."""
    root, _ = dataset
    for name in ("synth_lfw", "synth_cfp"):
        images, issame = load_bin_images(root / f"{name}.bin")
        x = images.double().flatten(1).numpy()
        x -= x.mean(axis=1, keepdims=True)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        assert evaluate_pairs(x, issame)["uniform_accuracy"] < 0.72, name


def test_render_is_deterministic_per_rng_and_identity_specific():
    p = identity_params(0, 3)
    assert identity_params(0, 3)["eye_dx"] == p["eye_dx"] and identity_params(0, 4)["eye_dx"] != p["eye_dx"]
    a = render_identity_images(p, 3, np.random.default_rng(1))
    b = render_identity_images(p, 3, np.random.default_rng(1))
    c = render_identity_images(p, 3, np.random.default_rng(2), CFP_PROFILE)
    assert a.dtype == np.uint8 and a.shape == (3, 112, 112, 3) and a.flags.c_contiguous
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1])  # every image is a fresh nuisance draw
    assert a.std() > 30  # not blank: face + clutter
    with pytest.raises(ValueError, match="n must be >= 1"):
        render_identity_images(p, 0, np.random.default_rng(1), TRAIN)


def test_verification_pairs_alternate_and_are_balanced():
    ids = list(range(10, 16))
    pairs = make_verification_pairs(ids, 60, np.random.default_rng(0))
    assert [same for _, _, same in pairs] == [True, False] * 30
    assert all((a == b) == same and a in ids and b in ids for a, b, same in pairs)
    assert Counter(a for a, _, same in pairs if same) == {i: 5 for i in ids}  # same pairs cycle the identities
    with pytest.raises(ValueError, match="at least 2 held-out identities"):
        make_verification_pairs([1], 4, np.random.default_rng(0))


@pytest.mark.parametrize("kwargs, message", [
    ({"num_ids": 0}, "num_ids must be an integer >= 1"),
    ({"val_ids": 1}, "val_ids must be an integer >= 2"),
    ({"imgs_per_id": 2.5}, "imgs_per_id must be an integer"),
    ({"quality": 101}, "quality must be in 1..100"),
    ({"seed": -1}, "seed must be a non-negative integer"),
])
def test_make_dataset_validates_arguments(tmp_path, kwargs, message):
    args = {"num_ids": 2, "imgs_per_id": 1, "val_ids": 2, "val_pairs": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_dataset(tmp_path, progress=False, **args)
    assert not (tmp_path / "train.rec").exists()


def test_cli(tmp_path, capsys):
    p = subprocess.run([sys.executable, "-m", "data.synthetic", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and "--num-ids" in p.stdout and "--val-pairs" in p.stdout
    main(["--out", str(tmp_path), "--num-ids", "3", "--imgs-per-id", "2", "--val-ids", "2", "--val-pairs", "4",
          "--seed", "9", "--no-progress"])
    out = capsys.readouterr().out
    assert f"train: 6 images of 3 identities (labels 0..2) -> {tmp_path / 'train.rec'}" in out
    assert f"synth_cfp: 4 pairs (2 same) of held-out identities 3..4 -> {tmp_path / 'synth_cfp.bin'}" in out
    assert all((tmp_path / name).is_file() for name in FILES)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--num-ids", "0", "--no-progress"])
    assert "num_ids must be an integer >= 1" in capsys.readouterr().err
