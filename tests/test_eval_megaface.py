"""MegaFace challenge 1: the chunked metrics against hand-computed cases and a brute-force reference, the noise
lists, list parsing errors, and the end-to-end command on a synthetic test pack."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from eval import megaface as mf
from eval.roc import roc_curve, tar_at_far
from tests.fixtures_eval import make_megaface_dataset, make_small_weights


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_metrics_hand_computed():
    # identity A at 0° and 10°, identity B at 90° and 100°, one distractor at 5°
    probes = torch.tensor([unit(0), unit(10), unit(90), unit(100)])
    distractors = np.array([unit(5)], dtype=np.float32)
    r = mf.megaface_metrics(probes, np.array([0, 0, 1, 1]), distractors, ranks=(1, 2), fars=(0.25, 0.5))
    # A's pairs: s(a1, a2) = cos 10° < s(a, d) = cos 5° -> rank 2 (both directions); B's pairs: rank 1
    assert r["identification"] == {"ordered_pairs": 4, "rank": {"1": 0.5, "2": 1.0}}
    # negatives (4): cos 5°, cos 5°, cos 85°, cos 95°; positives (2): cos 10°, cos 10°
    # FAR 0.25 -> 1 false accept allowed -> v = cos 5° -> no positive above; FAR 0.5 -> v = cos 85° -> both
    assert r["verification"]["tar_at_far"] == pytest.approx({"0.25": 0.0, "5e-01": 1.0})
    assert r["verification"]["negative_pairs"] == 4 and r["verification"]["positive_pairs"] == 2


def brute_force(probes, ids, distractors, ranks, fars):
    p = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    d = distractors / np.linalg.norm(distractors, axis=1, keepdims=True)
    pp, pd = p @ p.T, p @ d.T
    ranks_of_pairs, pos = [], []
    for i in range(len(p)):
        for j in range(len(p)):
            if i != j and ids[i] == ids[j]:
                ranks_of_pairs.append(1 + int((pd[i] > pp[i, j]).sum()))
                if i < j:
                    pos.append(pp[i, j])
    ranks_of_pairs = np.array(ranks_of_pairs)
    scores = np.r_[pos, pd.reshape(-1)]
    labels = np.r_[np.ones(len(pos), bool), np.zeros(pd.size, bool)]
    return ({str(k): float((ranks_of_pairs <= k).mean()) for k in ranks},
            tar_at_far(roc_curve(scores, labels), fars).tolist())


@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
def test_chunked_metrics_equal_brute_force(chunk_rows):
    rng = np.random.default_rng(chunk_rows)
    centres = rng.normal(size=(6, 24))
    ids = np.repeat(np.arange(6), 5)
    probes = (centres[ids] + 0.6 * rng.normal(size=(30, 24))).astype(np.float32)
    distractors = (rng.normal(size=(300, 24)) + 0.3 * centres[rng.integers(0, 6, 300)]).astype(np.float32)
    keep = rng.random(300) > 0.1
    fars = (1e-4, 1e-3, 1e-2)
    p = torch.nn.functional.normalize(torch.from_numpy(probes), dim=1)
    r = mf.megaface_metrics(p, ids, distractors, keep, ranks=(1, 3, 10), fars=fars, chunk_rows=chunk_rows)
    ranks, tars = brute_force(probes, ids, distractors[keep], (1, 3, 10), fars)
    assert r["identification"]["rank"] == pytest.approx(ranks)
    assert list(r["verification"]["tar_at_far"].values()) == pytest.approx(tars)
    assert r["distractors"] == keep.sum() and 0 < ranks["1"] < 1 and 0 < tars[1] < 1  # a case that discriminates


def test_noise_lists_and_probe_cleaning(tmp_path):
    fs = tmp_path / "fs.txt"
    fs.write_text("# comment\nA_2.png\n\nB_9.png\n")
    mfl = tmp_path / "mf.txt"
    mfl.write_text("# c\n1/2/x.jpg\nsomething\t3/4/y.jpg\n")
    assert mf.read_noise_list(fs) == {"A_2.png", "B_9.png"}
    assert mf.read_noise_list(mfl) == {"1/2/x.jpg", "3/4/y.jpg"}
    assert mf.facescrub_noise_mask(["A/A_1.png", "A/A_2.png"], {"A_2.png"}).tolist() == [False, True]
    assert mf.megaface_noise_mask(["root/1/2/x.jpg", "1/2/z.jpg", "3/4/y.jpg"],
                                  mf.read_noise_list(mfl)).tolist() == [True, False, True]
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    ids = np.array([0, 0, 0, 1])
    noisy = np.array([False, False, True, True])
    centred, ids_c = mf.clean_probe_features(feats, ids, noisy, "centre")
    s = 1 / math.sqrt(2)  # identity 0's clean centre is normalise([0.5, 0.5]); identity 1 has no clean image
    np.testing.assert_allclose(centred.numpy(), [[1, 0], [0, 1], [s, s], [0, -1]], atol=1e-6)
    dropped, ids_d = mf.clean_probe_features(feats, ids, noisy, "drop")
    assert dropped.shape == (2, 2) and ids_d.tolist() == [0, 0] and ids_c.tolist() == ids.tolist()
    with pytest.raises(mf.MegaFaceError, match="unknown FaceScrub noise policy"):
        mf.clean_probe_features(feats, ids, noisy, "ignore")


def test_list_errors(tmp_path):
    with pytest.raises(mf.MegaFaceError, match="facescrub_lst: no such list file"):
        mf.read_megaface_set(tmp_path)
    (tmp_path / "facescrub_lst").write_text("A/a.png\nlonely.png\n")
    (tmp_path / "megaface_lst").write_text("1/2/x.jpg\n")
    with pytest.raises(mf.MegaFaceError, match=r"facescrub_lst:2: 'lonely.png' must be 'Identity/image'"):
        mf.read_megaface_set(tmp_path)
    (tmp_path / "facescrub_lst").write_text("A/a.png\n")
    with pytest.raises(mf.MegaFaceError, match="1 distractors listed, 5 asked for"):
        mf.read_megaface_set(tmp_path, max_distractors=5)
    (tmp_path / "megaface_lst").write_text("\n")
    with pytest.raises(mf.MegaFaceError, match="megaface_lst: empty list"):
        mf.read_megaface_set(tmp_path)


def test_end_to_end_on_a_synthetic_test_pack(tmp_path, capsys):
    fx = make_megaface_dataset(tmp_path / "pack", num_identities=4, images_per_identity=4, num_distractors=30)
    weights, model_args = make_small_weights(tmp_path / "model" / "backbone.pth")
    out = tmp_path / "out"
    base = model_args + ["--data", str(fx.root), "--num-workers", "0", "--batch-size", "16", "--no-progress",
                         "--out", str(out)]

    raw = mf.main(base)
    assert "MegaFace challenge 1" in capsys.readouterr().out
    # the planted distractor (identity 0's noise-free face) outranks every mate of identity 0: 12 of 48 pairs lost
    assert raw["identification"]["ordered_pairs"] == 48
    assert raw["identification"]["rank"]["1"] <= 1 - 12 / 48
    assert raw["verification"]["tar_at_far"]["1e-06"] < 1.0
    assert raw["distractors"] == 30

    # the same numbers from the saved features, brute force
    probes = np.load(out / "megaface_facescrub_features.npy")
    distractors = np.load(out / "megaface_distractor_features_30.npy")
    data = mf.read_megaface_set(fx.root)
    ranks, tars = brute_force(probes, data.probe_identities, distractors, (1, 5, 10), (1e-6,))
    assert raw["identification"]["rank"] == pytest.approx(ranks)
    assert [raw["verification"]["tar_at_far"]["1e-06"]] == pytest.approx(tars)

    # the noise lists repair both planted problems: every pair found at rank 1, every positive accepted
    for policy, probes_left in (("centre", 16), ("drop", 15)):
        refined = mf.main(base + ["--facescrub-noises", str(fx.facescrub_noises), "--megaface-noises",
                                  str(fx.megaface_noises), "--noise-policy", policy, "--chunk-rows", "8"])
        assert "reusing FaceScrub features" in capsys.readouterr().out
        assert refined["identification"]["rank"]["1"] == 1.0
        assert refined["verification"]["tar_at_far"]["1e-06"] == 1.0
        assert refined["distractors"] == 29 and refined["probes"] == probes_left
        assert refined["noise"] == {"policy": policy, "facescrub_listed_in_set": 1, "distractors_removed": 1}
    saved = json.loads((out / "eval_megaface.json").read_text())
    assert saved["kind"] == "megaface" and saved["identification"]["rank"]["1"] == 1.0
    assert (out / "eval_megaface.csv").read_text().startswith("method,distractors,rank-1")
