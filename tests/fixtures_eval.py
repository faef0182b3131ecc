"""Tiny synthetic evaluation sets in the real layouts, with answers known by construction.

Faces are smooth random colour fields ("identities"); an image of an identity is its field plus a little pixel
noise. Even a randomly initialised IResNet maps such images so that every same-identity cosine (≈ 0.99+) is far
above every cross-identity one (≈ 0.9 or less), and an image identical to another scores 1. The known answers below
rest on exactly that ordering:

- IJB (``make_ijb_dataset``): S subjects with an enrolment template (two medias: a 2-frame video and a still) and
  a verification template (2 frames, plus a junk image of another identity with faceness 0, which the faceness
  weighting must cancel). Loose crops are JPEGs in which the face sits at an integer offset, every other one
  upscaled 2x by pixel repetition, with the landmarks where the template's points land — so alignment recovers the
  face exactly. Pairs: (enrol k, verify k) positive, (enrol k, verify j≠k) negative, and optionally a planted
  impostor: two templates of different "subjects" made of the same image (score 1, above every positive), so the
  pairs sort as [impostor, S positives, S(S−1) negatives] (the tests derive their expected TAR tables from this
  by hand); without it TAR = 1 at every FAR. 1:N: galleries G1/G2
  hold the enrolment templates of the first/second half of the subjects, every verification template is a probe:
  rank-1 = 1 and TPIR = 1 in both galleries.
- MegaFace (``make_megaface_dataset``): FaceScrub identities as aligned PNGs, distractor JPEGs of other fields,
  a planted distractor = identity 0's noise-free field (closer to each of its images than they are to each other:
  every ordered pair of identity 0 loses rank 1), listed in megaface_noises.txt; a mislabelled FaceScrub image
  (identity 1's folder, identity 2's face), listed in facescrub_noises.txt. With both lists: rank-1 = 1 and
  TAR@1e-6 = 1.
- ``make_tiny_checkpoint``: a checkpoint folder (backbone.pth + config.yaml) of a seeded random iresnet_tiny;
  ``make_small_weights``: a bare backbone.pth of a smaller one (arcface_torch style: --network + --model-arg).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

import backbones
from eval.align import ARCFACE_TEMPLATE

SIZE = 112


def identity_field(seed: int, identity: int) -> np.ndarray:
    """The noise-free face of an identity: a 6x6 random colour grid upsampled bicubically to 112x112 uint8 RGB."""
    rng = np.random.default_rng([seed, identity])
    low = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(low).resize((SIZE, SIZE), Image.Resampling.BICUBIC))


def with_noise(face: np.ndarray, seed: int, key: int, sigma: float = 4.0) -> np.ndarray:
    rng = np.random.default_rng([seed, 7, key])
    return np.clip(face + rng.normal(0.0, sigma, face.shape), 0, 255).astype(np.uint8)


def save_image(img: np.ndarray, path: Path, quality: int = 98) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(img).save(path, quality=quality)
    else:
        Image.fromarray(img).save(path)


def loose_crop(face: np.ndarray, rng: np.random.Generator, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Place an aligned face in a larger canvas (integer offset, upscaled by pixel repetition); return
    (canvas, landmarks of the face's template points in canvas pixels)."""
    big = face.repeat(scale, 0).repeat(scale, 1)
    ox, oy = (int(v) for v in rng.integers(4, 40, size=2))
    canvas = np.zeros((big.shape[0] + oy + int(rng.integers(4, 30)), big.shape[1] + ox + int(rng.integers(4, 30)), 3),
                      dtype=np.uint8)
    canvas[:] = rng.integers(0, 255, size=3, dtype=np.uint8)  # a background colour
    canvas[oy : oy + big.shape[0], ox : ox + big.shape[1]] = big
    # aligned pixel x shows loose pixel scale·x + offset (pixel-centre coordinates)
    return canvas, ARCFACE_TEMPLATE * scale + np.array([ox, oy])


# --------------------------------------------------------------------------------------------------------- IJB


@dataclass
class IJBFixture:
    root: Path  # the folder holding <subset>/
    subset: str
    num_subjects: int
    planted_impostor: bool
    positives: int
    negatives: int
    galleries: tuple[str, str]
    image_count: int
    pair_lines: list[tuple[int, int, int]] = field(default_factory=list)


def make_ijb_dataset(root: Path, subset: str = "IJBC", num_subjects: int = 6, planted_impostor: bool = True,
                     seed: int = 0) -> IJBFixture:
    subset = subset.upper()
    prefix = subset.lower()
    galleries = ("G1", "G2") if subset == "IJBC" else ("S1", "S2")
    base = Path(root) / subset
    crops, meta = base / "loose_crop", base / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    tid_lines, pts_lines = [], []
    counter = iter(range(1, 10**6))

    def add_image(img: np.ndarray, template: int, media: int, faceness: float) -> None:
        k = next(counter)
        name = f"{k}.jpg"
        canvas, landmarks = loose_crop(img, rng, scale=1 + (k % 2))
        save_image(canvas, crops / name)
        tid_lines.append(f"{name} {template} {media}")
        pts_lines.append(" ".join([name] + [f"{v:.4f}" for v in landmarks.reshape(-1)] + [f"{faceness:.3f}"]))

    media_id = iter(range(5000, 10**6))
    for s in range(num_subjects):
        face = identity_field(seed, s)
        enrol, verify = 100 + s, 200 + s
        video = next(media_id)
        add_image(with_noise(face, seed, 10 * s + 0), enrol, video, 0.99)
        add_image(with_noise(face, seed, 10 * s + 1), enrol, video, 0.95)
        add_image(with_noise(face, seed, 10 * s + 2), enrol, next(media_id), 0.90)
        video = next(media_id)
        add_image(with_noise(face, seed, 10 * s + 3), verify, video, 0.97)
        add_image(with_noise(face, seed, 10 * s + 4), verify, video, 0.93)
        junk = identity_field(seed, 1000 + s)  # another identity, faceness 0: must not count
        add_image(junk, verify, next(media_id), 0.0)

    pairs = [(100 + a, 200 + b, int(a == b)) for a in range(num_subjects) for b in range(num_subjects)]
    if planted_impostor:
        twin = identity_field(seed, 999)
        add_image(twin, 900, next(media_id), 0.98)
        add_image(twin, 901, next(media_id), 0.98)
        pairs.append((900, 901, 0))
    order = np.random.default_rng([seed, 2]).permutation(len(pairs))
    pairs = [pairs[i] for i in order]

    (meta / f"{prefix}_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    (meta / f"{prefix}_name_5pts_score.txt").write_text("\n".join(pts_lines) + "\n")
    (meta / f"{prefix}_template_pair_label.txt").write_text("\n".join(f"{a} {b} {same}" for a, b, same in pairs) + "\n")

    def write_1n(path: Path, subjects: range, template_base: int) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["TEMPLATE_ID", "SUBJECT_ID", "FILENAME", "SIGHTING_ID"])
            for s in subjects:
                for frame in range(2):
                    w.writerow([template_base + s, 7000 + s, f"img/{template_base + s}_{frame}.jpg", 1 + frame])

    half = num_subjects // 2
    write_1n(meta / f"{prefix}_1N_gallery_{galleries[0]}.csv", range(0, half), 100)
    write_1n(meta / f"{prefix}_1N_gallery_{galleries[1]}.csv", range(half, num_subjects), 100)
    write_1n(meta / f"{prefix}_1N_probe_mixed.csv", range(num_subjects), 200)

    negatives = num_subjects * (num_subjects - 1) + int(planted_impostor)
    return IJBFixture(Path(root), subset, num_subjects, planted_impostor, num_subjects, negatives, galleries,
                      len(tid_lines), pairs)


# ---------------------------------------------------------------------------------------------------- MegaFace


@dataclass
class MegaFaceFixture:
    root: Path
    num_identities: int
    images_per_identity: int
    num_distractors: int  # including the planted one
    planted_distractor: str  # megaface_lst entry
    mislabelled_probe: str  # facescrub_lst entry
    facescrub_noises: Path
    megaface_noises: Path


def make_megaface_dataset(root: Path, num_identities: int = 4, images_per_identity: int = 4,
                          num_distractors: int = 40, seed: int = 1) -> MegaFaceFixture:
    root = Path(root)
    fs_lines, mf_lines = [], []
    for i in range(num_identities):
        name = f"Person_{i}"
        for j in range(images_per_identity):
            entry = f"{name}/{name}_{j}.png"
            shown = 2 if (i, j) == (1, images_per_identity - 1) else i  # one mislabelled image
            save_image(with_noise(identity_field(seed, shown), seed, 100 * i + j, sigma=5.0),
                       root / "facescrub_images" / entry)
            fs_lines.append(entry)
    mislabelled = f"Person_1/Person_1_{images_per_identity - 1}.png"
    for d in range(num_distractors - 1):
        entry = f"{d % 7}/{1000 + d}@N0{d % 3}/{d}_{d % 5}.jpg"
        save_image(identity_field(seed, 500 + d), root / "megaface_images" / entry)
        mf_lines.append(entry)
    planted = "9/99999@N00/planted_0.jpg"
    save_image(identity_field(seed, 0), root / "megaface_images" / planted, quality=100)
    mf_lines.insert(len(mf_lines) // 2, planted)
    (root / "facescrub_lst").write_text("\n".join(fs_lines) + "\n")
    (root / "megaface_lst").write_text("\n".join(mf_lines) + "\n")
    fs_noises = root / "facescrub_noises.txt"
    fs_noises.write_text(f"# images whose label is wrong\n{Path(mislabelled).name}\nSomeone_Else_3.png\n")
    mf_noises = root / "megaface_noises.txt"
    mf_noises.write_text(f"# distractors showing a FaceScrub identity\n{planted}\n1/2/not_in_this_set.jpg\n")
    return MegaFaceFixture(root, num_identities, images_per_identity, num_distractors, planted, mislabelled,
                           fs_noises, mf_noises)


# ---------------------------------------------------------------------------------------------------- models


SMALL_NET = {"depths": [1, 1, 1, 1], "widths": [8, 16, 32, 64], "stem_width": 8}  # ~3x faster than the default


def make_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A checkpoint folder (backbone.pth + config.yaml naming the network) of a seeded random iresnet_tiny."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = backbones.get_model("iresnet_tiny")
    torch.save(model.state_dict(), folder / "backbone.pth")
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "iresnet_tiny", "num_features": 512}}))
    return folder


def make_small_weights(path: Path, seed: int = 0) -> tuple[Path, list[str]]:
    """An arcface_torch-style bare backbone.pth of a smaller random iresnet_tiny, and the CLI arguments naming it
    (--weights PATH --network iresnet_tiny --model-arg ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(backbones.get_model("iresnet_tiny", **SMALL_NET).state_dict(), path)
    args = ["--weights", str(path), "--network", "iresnet_tiny"]
    for key, value in SMALL_NET.items():
        args += ["--model-arg", f"{key}={value}"]
    return path, args


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return backbones.get_model("iresnet_tiny", **SMALL_NET).eval()

