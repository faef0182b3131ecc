"""MegaFace challenge 1: the chunked metrics against hand-computed cases and an independent brute force that scores
the feature files insightface would hand the devkit (noise lists applied its way, L2 distances, plain loops), list
parsing errors, and the end-to-end command on a synthetic test pack with distractors and both noise lists."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from eval import megaface as mf
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


def devkit_brute_force(probes, ids, distractors, ranks, fars, probe_noisy=None, distractor_noisy=None,
                       policy="centre"):
    """An independent computation: the feature files insightface would hand the devkit, scored with plain loops.

    Unit features with a 513th dimension of 0; a listed FaceScrub image becomes its identity's centre
    (Σ clean unit features, normalised; insightface's remove_noises without its random jitter) or is dropped; a
    listed distractor gets a 513th dimension of 100. Then L2 distances, as the devkit ranks: identification over
    ordered same-identity pairs, rank = 1 + #(distractors nearer to p than its mate q); verification: the best
    TPR over distance thresholds t (accept d ≤ t) with at most ⌊FAR·N⌋ of the N = P·M probe × distractor pairs
    accepted, positives = unordered same-identity probe pairs.
    """
    ids = np.asarray(ids)
    n_p, n_d = len(probes), len(distractors)
    probe_noisy = np.zeros(n_p, bool) if probe_noisy is None else np.asarray(probe_noisy)
    distractor_noisy = np.zeros(n_d, bool) if distractor_noisy is None else np.asarray(distractor_noisy)
    p = np.asarray(probes, np.float64)
    p = np.hstack([p / np.linalg.norm(p, axis=1, keepdims=True), np.zeros((n_p, 1))])
    d = np.asarray(distractors, np.float64)
    d = np.hstack([d / np.linalg.norm(d, axis=1, keepdims=True), 100.0 * distractor_noisy[:, None]])
    if policy == "drop":
        p, ids = p[~probe_noisy], ids[~probe_noisy]
    else:
        clean_p = p.copy()
        for i in np.flatnonzero(probe_noisy):
            members = (ids == ids[i]) & ~probe_noisy
            if members.any():
                centre = clean_p[members, :512].sum(0)
                p[i, :512] = centre / np.linalg.norm(centre)
    ranks_of_pairs, pos = [], []
    for i in range(len(p)):
        to_distractors = [np.linalg.norm(p[i] - d[k]) for k in range(n_d)]
        for j in range(len(p)):
            if i != j and ids[i] == ids[j]:
                mate = np.linalg.norm(p[i] - p[j])
                ranks_of_pairs.append(1 + sum(x < mate for x in to_distractors))
                if i < j:
                    pos.append(mate)
    neg = np.array([np.linalg.norm(p[i] - d[k]) for i in range(len(p)) for k in range(n_d)])
    pos = np.array(pos)
    tars = []
    for far in fars:
        budget = math.floor(far * neg.size + 1e-9)
        best = 0.0
        for t in np.r_[-np.inf, np.unique(np.r_[pos, neg])]:
            if (neg <= t).sum() <= budget:
                best = max(best, float((pos <= t).mean()))
        tars.append(best)
    ranks_of_pairs = np.array(ranks_of_pairs)
    return {str(k): float((ranks_of_pairs <= k).mean()) for k in ranks}, tars


@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
def test_chunked_metrics_with_noise_lists_equal_the_devkit_brute_force(chunk_rows):
    rng = np.random.default_rng(chunk_rows)
    centres = rng.normal(size=(6, 24))
    ids = np.repeat(np.arange(6), 5)
    probes = (centres[ids] + 0.6 * rng.normal(size=(30, 24))).astype(np.float32)
    probes[[3, 17]] = (centres[[4, 1]] + 0.6 * rng.normal(size=(2, 24))).astype(np.float32)  # mislabelled
    distractors = (rng.normal(size=(300, 24)) + 0.3 * centres[rng.integers(0, 6, 300)]).astype(np.float32)
    distractors[[11, 250]] = centres[[0, 2]] + 0.05 * rng.normal(size=(2, 24))  # show FaceScrub identities
    probe_noisy = np.isin(np.arange(30), [3, 17])
    distractor_noisy = rng.random(300) < 0.1
    distractor_noisy[[11, 250]] = True
    fars = (1e-4, 1e-3, 1e-2, 0.05)
    for policy in ("centre", "drop"):
        p = torch.nn.functional.normalize(torch.from_numpy(probes), dim=1)
        p, kept_ids = mf.clean_probe_features(p, ids, probe_noisy, policy)
        r = mf.megaface_metrics(p, kept_ids, distractors, distractor_noisy, ranks=(1, 3, 10), fars=fars,
                                chunk_rows=chunk_rows)
        ranks, tars = devkit_brute_force(probes, ids, distractors, (1, 3, 10), fars, probe_noisy, distractor_noisy,
                                         policy)
        assert r["identification"]["rank"] == pytest.approx(ranks), policy
        assert list(r["verification"]["tar_at_far"].values()) == pytest.approx(tars), policy
        assert r["distractors"] == 300 and r["distractors_out_of_reach"] == distractor_noisy.sum()
        assert r["verification"]["negative_pairs"] == len(kept_ids) * 300  # listed distractors still count in N
        assert 0 < ranks["1"] < 1 and 0 < tars[1] < 1  # a case that discriminates
    # without the lists: the planted distractors and mislabelled probes cost rank-1
    p = torch.nn.functional.normalize(torch.from_numpy(probes), dim=1)
    raw = mf.megaface_metrics(p, ids, distractors, ranks=(1,), fars=fars, chunk_rows=chunk_rows)
    ranks, tars = devkit_brute_force(probes, ids, distractors, (1,), fars)
    assert raw["identification"]["rank"] == pytest.approx(ranks)
    assert list(raw["verification"]["tar_at_far"].values()) == pytest.approx(tars)


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

    # the same numbers from the saved features, by the devkit-style brute force
    probes = np.load(out / "megaface_facescrub_features.npy")
    distractors = np.load(out / "megaface_distractor_features_30.npy")
    data = mf.read_megaface_set(fx.root)
    ranks, tars = devkit_brute_force(probes, data.probe_identities, distractors, (1, 5, 10), (1e-6,))
    assert raw["identification"]["rank"] == pytest.approx(ranks)
    assert [raw["verification"]["tar_at_far"]["1e-06"]] == pytest.approx(tars)

    # the noise lists repair both planted problems: every pair found at rank 1, every positive accepted
    probe_noisy = mf.facescrub_noise_mask(data.probe_names, mf.read_noise_list(fx.facescrub_noises))
    distractor_noisy = mf.megaface_noise_mask(data.distractor_names, mf.read_noise_list(fx.megaface_noises))
    fars = (1e-6, 0.01, 0.05)
    for policy, probes_left in (("centre", 16), ("drop", 15)):
        refined = mf.main(base + ["--facescrub-noises", str(fx.facescrub_noises), "--megaface-noises",
                                  str(fx.megaface_noises), "--noise-policy", policy, "--chunk-rows", "8",
                                  "--fars", *map(str, fars)])
        assert "reusing FaceScrub features" in capsys.readouterr().out
        assert refined["identification"]["rank"]["1"] == 1.0
        assert refined["verification"]["tar_at_far"]["1e-06"] == 1.0
        assert refined["distractors"] == 30 and refined["distractors_out_of_reach"] == 1
        assert refined["probes"] == probes_left and refined["verification"]["negative_pairs"] == probes_left * 30
        assert refined["noise"] == {"policy": policy, "facescrub_listed_in_set": 1, "distractors_listed_in_set": 1}
        ranks, tars = devkit_brute_force(probes, data.probe_identities, distractors, (1, 5, 10), fars, probe_noisy,
                                         distractor_noisy, policy)
        assert refined["identification"]["rank"] == pytest.approx(ranks)
        assert list(refined["verification"]["tar_at_far"].values()) == pytest.approx(tars)
    saved = json.loads((out / "eval_megaface.json").read_text())
    assert saved["kind"] == "megaface" and saved["identification"]["rank"]["1"] == 1.0
    assert (out / "eval_megaface.csv").read_text().startswith("method,distractors,rank-1")
