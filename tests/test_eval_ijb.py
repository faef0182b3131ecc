"""IJB-B/C evaluation: template pooling, pair scoring, 1:N metrics, meta-file parsing and errors, multi-rank
feature extraction, and the end-to-end command on a synthetic IJB-C against a table computed by hand.
(Alignment: tests/test_eval_align.py; ROC and TAR@FAR: tests/test_eval_roc.py.)"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from eval import ijb
from eval.features import FaceImages, FeatureError, extract_features, rank_slice
from tests.distributed import run_ranks
from tests.fixtures_eval import (
    identity_field,
    make_ijb_dataset,
    make_small_weights,
    make_tiny_checkpoint,
    save_image,
    small_model,
)
from tests.tar_reference import brute_force_tar

# ------------------------------------------------------------------------------------- template pooling, scores


def test_template_features_hand_computed():
    f = np.array([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 4.0], [3.0, 4.0, 0], [0, 1.0, 0]])
    templates = np.array([7, 7, 7, 3, 3])
    medias = np.array([1, 1, 2, 5, 6])
    faceness = np.array([1.0, 0.5, 0.25, 1.0, 0.0])
    ids, t = ijb.template_features(f, templates, medias, faceness)
    assert ids.tolist() == [3, 7]
    # template 7: media 1 = mean(1·[1,0,0], 0.5·[0,2,0]) = [0.5, 0.5, 0]; media 2 = 0.25·[0,0,4] = [0,0,1]
    t7 = np.array([0.5, 0.5, 1.0]) / np.linalg.norm([0.5, 0.5, 1.0])
    # template 3: media 5 = [3,4,0], media 6 has faceness 0 -> nothing
    np.testing.assert_allclose(t.numpy(), [[0.6, 0.8, 0.0], t7], atol=1e-6)
    # normalising images first: media 1 = mean([1,0,0], 0.5·[0,1,0]) = [0.5, 0.25, 0]; media 2 = [0, 0, 0.25]
    _, tn = ijb.template_features(f, templates, medias, faceness, normalize_images=True)
    v = np.array([0.5, 0.25, 0.25])
    np.testing.assert_allclose(tn.numpy()[1], v / np.linalg.norm(v), atol=1e-6)


def test_template_features_equal_insightface_style_loops():
    rng = np.random.default_rng(3)
    n = 200
    feats = rng.normal(size=(n, 16)).astype(np.float32)
    templates = rng.integers(0, 25, n)
    medias = rng.integers(0, 6, n) + 100 * templates
    faceness = rng.random(n).astype(np.float32)
    ids, t = ijb.template_features(feats, templates, medias, faceness)
    weighted = feats * faceness[:, None]
    for row, tid in enumerate(ids):
        members = templates == tid
        total = sum(weighted[members & (medias == m)].mean(0) for m in np.unique(medias[members]))
        np.testing.assert_allclose(t[row].numpy(), total / np.linalg.norm(total), atol=2e-6)


@pytest.mark.parametrize("tile, n_pairs", [(16, 5000), (12, 300), (1024, 2000)])
def test_score_pairs_dense_and_sparse_blocks(tile, n_pairs):
    rng = np.random.default_rng(tile)
    feats = torch.nn.functional.normalize(torch.randn(50, 32), dim=1)
    rows, cols = rng.integers(0, 50, n_pairs), rng.integers(0, 50, n_pairs)
    expected = (feats[rows] * feats[cols]).sum(1).numpy()
    np.testing.assert_allclose(ijb.score_pairs(feats, rows, cols, tile=tile), expected, atol=1e-6)
    # a block with few pairs goes the sparse way, a full block the dense way: both in one call
    rows2 = np.r_[np.repeat(np.arange(8), 8), [40, 45]]
    cols2 = np.r_[np.tile(np.arange(8), 8), [3, 49]]
    np.testing.assert_allclose(ijb.score_pairs(feats, rows2, cols2, tile=8),
                               (feats[rows2] * feats[cols2]).sum(1).numpy(), atol=1e-6)


def test_identification_hand_computed():
    # gallery = unit vectors, so a probe's scores are its own coordinates
    gallery = torch.eye(3)
    probes = torch.tensor([
        [0.9, 0.2, 0.1],    # subject 1: mate 0.9, rank 1
        [0.5, 0.4, 0.6],    # subject 2: mate 0.4, two others above -> rank 3
        [0.3, 0.2, 0.6],    # subject 3: mate 0.6, rank 1
        [0.1, 0.65, 0.2],   # subject 9: not in the gallery, best 0.65
        [0.55, 0.0, 0.1],   # subject 8: not in the gallery, best 0.55
    ])
    r = ijb.identification_1n(probes, np.array([1, 2, 3, 9, 8]), gallery, np.array([1, 2, 3]),
                              ranks=(1, 2, 3), fpirs=(0.01, 0.5, 1.0))
    assert (r["mated_probes"], r["nonmated_probes"]) == (3, 2)
    assert r["rank"] == pytest.approx({"1": 2 / 3, "2": 2 / 3, "3": 1.0})
    # FPIR 0.01: no false alarm -> t = 0.65 -> only the 0.9 mate; 0.5: one -> t = 0.55 -> 0.9 and 0.6; 1.0: t = -inf
    assert r["tpir_at_fpir"] == pytest.approx({"1e-02": 1 / 3, "5e-01": 2 / 3, "1e+00": 2 / 3})


# --------------------------------------------------------------------------------------------------- meta files


def write_meta(tmp_path, tid_lines, pts_lines, pair_lines, prefix="ijbb"):
    meta = tmp_path / prefix.upper() / "meta"
    meta.mkdir(parents=True)
    (meta / f"{prefix}_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    (meta / f"{prefix}_name_5pts_score.txt").write_text("\n".join(pts_lines) + "\n")
    (meta / f"{prefix}_template_pair_label.txt").write_text("\n".join(pair_lines) + "\n")
    return meta


PTS = " ".join(["1.0"] * 10)


def test_meta_is_read_and_the_landmark_file_may_be_in_another_order(tmp_path):
    write_meta(tmp_path, ["1.jpg 1 10", "2.jpg 1 11", "3.jpg 2 12", ""],
               [f"3.jpg {PTS} 0.5", f"1.jpg {' '.join(['2.0'] * 10)} 0.9", f"2.jpg {PTS}  0.7"],
               ["1 2 0", "2 2 1"])
    meta = ijb.read_ijb_meta(tmp_path, "ijbb")
    assert meta.image_names == ["1.jpg", "2.jpg", "3.jpg"]
    assert meta.templates.tolist() == [1, 1, 2] and meta.medias.tolist() == [10, 11, 12]
    np.testing.assert_allclose(meta.faceness, [0.9, 0.7, 0.5])
    assert meta.landmarks[0, 0, 0] == 2.0 and meta.landmarks.shape == (3, 5, 2)
    assert meta.pair_label.tolist() == [False, True]
    assert meta.image_paths[0] == tmp_path / "IJBB" / "loose_crop" / "1.jpg"


@pytest.mark.parametrize("tid, pts, pairs, message", [
    (["1.jpg 1"], [f"1.jpg {PTS} 0.9"], ["1 1 1"], r"ijbb_face_tid_mid.txt:1: expected 3 fields"),
    (["1.jpg 1 10"], [f"1.jpg {PTS} 0.9"], ["1 1 1", "1 x 0"], r"'x' .* is not a valid int64"),
    (["1.jpg 1 10"], [f"1.jpg {PTS} 0.9"], ["1 5 1"], r"pair 1: second template 5 has no image"),
    (["1.jpg 1 10"], [f"1.jpg {PTS} 0.9"], ["1 1 2"], r"pair 1 has label 2"),
    (["1.jpg 1 10", "2.jpg 1 10"], [f"1.jpg {PTS} 0.9"], ["1 1 1"], r"no landmarks for e.g. \['2.jpg'\]"),
    (["1.jpg 1 10"], [f"1.jpg {' '.join(['1.0'] * 9)} 0.9"], ["1 1 1"], r"5pts_score.txt:1: expected 12 fields"),
])
def test_meta_errors_name_the_file_and_line(tmp_path, tid, pts, pairs, message):
    write_meta(tmp_path, tid, pts, pairs)
    with pytest.raises(ijb.IJBError, match=message):
        ijb.read_ijb_meta(tmp_path, "IJBB")


def test_pair_file_tolerates_blank_lines_trailing_spaces_and_crlf_and_names_a_short_line(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_bytes(b"1 2 0 \r\n\r\n3 4 1\n")
    t1, t2, label = ijb._read_pairs(path)
    assert t1.tolist() == [1, 3] and t2.tolist() == [2, 4] and label.tolist() == [False, True]
    path.write_text("1 2 0\n3 4\n")
    with pytest.raises(ijb.IJBError, match=r"pairs.txt:2: expected 3 fields"):
        ijb._read_pairs(path)
    path.write_text("")
    with pytest.raises(ijb.IJBError, match="no pairs"):
        ijb._read_pairs(path)


def test_meta_folder_errors(tmp_path):
    with pytest.raises(ijb.IJBError, match="no IJBC/meta folder"):
        ijb.read_ijb_meta(tmp_path, "IJBC")
    with pytest.raises(ijb.IJBError, match="unknown subset"):
        ijb.find_subset_dir(tmp_path, "IJBA")


def test_1n_lists_use_a_real_csv_parser(tmp_path):
    path = tmp_path / "g.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["TEMPLATE_ID", "SUBJECT_ID", "FILENAME"])
        w.writerow([5, 50, "img/a, with comma.jpg"])  # quoted by the writer: a naive split would shift columns
        w.writerow([5, 50, "img/b.jpg"])
        w.writerow([3, 30, 'frames/"q".png'])
    templates, subjects = ijb._read_1n_csv(path)
    assert templates.tolist() == [3, 5] and subjects.tolist() == [30, 50]
    path.write_text("TEMPLATE_ID,SUBJECT_ID\n5,50\n5,51\n")
    with pytest.raises(ijb.IJBError, match="template 5 is listed with more than one SUBJECT_ID"):
        ijb._read_1n_csv(path)
    path.write_text("TID,SID\n5,50\n")
    with pytest.raises(ijb.IJBError, match="must name the columns TEMPLATE_ID and SUBJECT_ID"):
        ijb._read_1n_csv(path)
    path.write_text("TEMPLATE_ID,SUBJECT_ID\n5,fifty\n")
    with pytest.raises(ijb.IJBError, match=r"g.csv:2: expected integer"):
        ijb._read_1n_csv(path)


# -------------------------------------------------------------------------------------------- feature extraction


def _images(tmp_path, n=7):
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        save_image(identity_field(5, i), p)
        paths.append(p)
    return paths


def test_feature_errors_name_the_image(tmp_path):
    paths = _images(tmp_path, 1)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(FeatureError, match="bad.jpg: cannot read image"):
        FaceImages([bad])[0]
    small = tmp_path / "small.png"
    save_image(np.zeros((50, 60, 3), np.uint8), small)
    with pytest.raises(FeatureError, match=r"small.png: image is 60x50, expected an aligned 112x112"):
        FaceImages([small])[0]
    with pytest.raises(FeatureError, match="landmarks must be"):
        FaceImages(paths, np.zeros((2, 5, 2)))


def _extract_on_ranks(rank, world, paths, seed):
    torch.manual_seed(0)
    model = small_model(seed)
    out = extract_features(model, FaceImages(paths), batch_size=2, progress=False)
    return None if out is None else np.array(out)


@pytest.mark.multirank
def test_multirank_extraction_equals_one_process(tmp_path):
    paths = _images(tmp_path, 7)  # 7 over 2 ranks: 4 + 3; batch 2 leaves a short last batch on each
    single = extract_features(small_model(0), FaceImages(paths), batch_size=3, progress=False)
    gathered = run_ranks(_extract_on_ranks, 2, paths, 0)
    assert gathered[1] is None
    np.testing.assert_allclose(gathered[0], single, rtol=1e-5, atol=1e-3)
    assert [rank_slice(7, r, 2) for r in range(2)] == [slice(0, 4), slice(4, 7)]
    assert [rank_slice(2, r, 3) for r in range(3)] == [slice(0, 1), slice(1, 2), slice(2, 2)]


# ---------------------------------------------------------------------------------------------------- end to end


def brute_force_tars(feats, meta, fars):
    """Independent pipeline from the saved image features: plain loops for pooling, numpy dot per pair, counting."""
    x = feats * meta.faceness[:, None]
    tfeat = {}
    for t in np.unique(meta.templates):
        members = meta.templates == t
        total = sum(x[members & (meta.medias == m)].mean(0) for m in np.unique(meta.medias[members]))
        tfeat[t] = total / max(np.linalg.norm(total), 1e-12)
    scores = np.array([tfeat[a] @ tfeat[b] for a, b in zip(meta.pair_t1, meta.pair_t2)])
    return [brute_force_tar(scores, meta.pair_label, f) for f in fars], scores


def test_end_to_end_ijbc_on_a_synthetic_set(tmp_path, capsys):
    fx = make_ijb_dataset(tmp_path / "data", "IJBC", num_subjects=6, planted_impostor=True)
    ckpt = make_tiny_checkpoint(tmp_path / "run" / "epoch_0001")
    result = ijb.main(["--weights", str(ckpt), "--data", str(tmp_path / "data"), "--subset", "ijbc",
                       "--num-workers", "0", "--batch-size", "16", "--no-progress"])
    printed = capsys.readouterr().out
    assert "IJB-C 1:1 verification" in printed and "results written to" in printed

    # The table by hand. P = 6 positives, N = 6·5 + 1 = 31 negatives; by construction the planted impostor scores
    # above every positive and every positive above the 30 other negatives, so the sorted pairs read
    # [impostor, 6 positives, 30 negatives]. Rule "le": ⌊31·FAR⌋ false accepts allowed: 0 up to FAR 1e-2 (0.31),
    # so the threshold must clear the impostor and rejects every positive; 3 at FAR 1e-1, enough for all positives.
    # Rule "insightface": scikit-learn's ROC keeps (0, 0), (1/31, 0), (1/31, 1), (1, 1); up to FAR 1e-2 the
    # nearest FPR is 0 (|0.01 − 0| < |0.01 − 0.032|) -> TPR 0; at 1e-1 it is 1/31 (0.068 < 0.1), where the
    # highest TPR, 1, is taken (the rule before this fix took the first point there: 0).
    hand_le = {"1e-06": 0.0, "1e-05": 0.0, "1e-04": 0.0, "1e-03": 0.0, "1e-02": 0.0, "1e-01": 1.0}
    hand_insightface = {"1e-06": 0.0, "1e-05": 0.0, "1e-04": 0.0, "1e-03": 0.0, "1e-02": 0.0, "1e-01": 1.0}
    saved = json.loads((ckpt / "eval_ijbc.json").read_text())
    assert saved["verification"]["tar_at_far"] == hand_le
    assert saved["verification"]["tar_at_far_insightface"] == hand_insightface
    assert (saved["verification"]["positive_pairs"], saved["verification"]["negative_pairs"]) == (6, 31)
    assert fx.negatives == 31 and fx.positives == 6
    assert saved == json.loads(json.dumps(result))
    for g in ("G1", "G2"):
        assert saved["identification"][g]["rank"] == {"1": 1.0, "5": 1.0, "10": 1.0}
        assert saved["identification"][g]["tpir_at_fpir"] == {"1e-02": 1.0, "1e-01": 1.0}
        assert saved["identification"][g]["mated_probes"] == 3

    # the same numbers from an independent computation on the saved features
    meta = ijb.read_ijb_meta(tmp_path / "data", "IJBC")
    feats = np.load(ckpt / "ijbc_features.npy")
    assert feats.shape == (fx.image_count, 512)
    fars = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    expected, scores = brute_force_tars(feats, meta, fars)
    assert list(saved["verification"]["tar_at_far"].values()) == pytest.approx(expected)

    # files next to the checkpoint: CSV tables and a real PNG
    with open(ckpt / "eval_ijbc.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][0] == "method" and rows[1][0] == "epoch_0001" and rows[1][-1] == "100.00"
    assert (ckpt / "eval_ijbc_1n.csv").read_text().startswith("gallery,mated probes,rank-1")
    png = (ckpt / "roc_ijbc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # without the planted impostor (same features, rescored): identical templates of a subject beat every impostor
    clean = meta.pair_t1 < 900
    meta.pair_t1, meta.pair_t2, meta.pair_label = meta.pair_t1[clean], meta.pair_t2[clean], meta.pair_label[clean]
    res, _ = ijb.evaluate_ijb(meta, feats, one_to_n=False)
    assert set(res["verification"]["tar_at_far"].values()) == {1.0}

    # faceness weighting cancels the junk image of each verification template; without it, positives drop
    def min_positive(faceness):
        ids, t = ijb.template_features(feats, meta.templates, meta.medias, meta.faceness if faceness else None)
        s, _, _ = ijb.verification_1to1(ids, t, meta.pair_t1, meta.pair_t2, meta.pair_label)
        return s[meta.pair_label].min()
    assert min_positive(False) < min_positive(True) - 0.01

    # a second run reuses the features and the paper table reads the result
    ijb.main(["--weights", str(ckpt), "--data", str(tmp_path / "data"), "--no-progress", "--far-rule", "insightface"])
    assert "reusing image features" in capsys.readouterr().out
    from eval import tables
    header, rows = tables.main([f"ours={ckpt}", "--layout", "ijbc", "--out", str(tmp_path)])
    assert rows[-1][:2] == ["ours", "ours"] and rows[-1][2:] == ["0.00", "0.00", "0.00"]


def _cli_on_ranks(rank, world, argv):
    return ijb.main(argv)


@pytest.mark.multirank
def test_end_to_end_on_two_ranks_equals_one(tmp_path):
    make_ijb_dataset(tmp_path / "data", "IJBB", num_subjects=4, planted_impostor=False)
    _, model_args = make_small_weights(tmp_path / "ck" / "backbone.pth")  # arcface_torch style: --network + args
    argv = model_args + ["--data", str(tmp_path / "data" / "IJBB"), "--subset", "IJBB",
                         "--num-workers", "0", "--batch-size", "4", "--no-progress"]
    two = run_ranks(_cli_on_ranks, 2, argv + ["--out", str(tmp_path / "two")])
    assert two[1] is None and two[0]["verification"]["tar_at_far"]["1e-06"] == 1.0
    one = ijb.main(argv + ["--out", str(tmp_path / "one")])
    np.testing.assert_allclose(np.load(tmp_path / "two" / "ijbb_features.npy"),
                               np.load(tmp_path / "one" / "ijbb_features.npy"), rtol=1e-5, atol=1e-2)
    assert two[0]["identification"]["S1"]["rank"] == one["identification"]["S1"]["rank"]


def test_1n_template_without_images_is_named(tmp_path):
    meta_dir = write_meta(tmp_path, ["1.jpg 1 10", "2.jpg 2 11"], [f"1.jpg {PTS} 0.9", f"2.jpg {PTS} 0.8"],
                          ["1 2 0", "1 1 1"])
    for name, rows in (("S1", "1,7"), ("S2", "2,8"), ("probe_mixed", "99,7")):
        kind = "gallery_" if name != "probe_mixed" else ""
        (meta_dir / f"ijbb_1N_{kind}{name}.csv").write_text(f"TEMPLATE_ID,SUBJECT_ID\n{rows}\n")
    meta = ijb.read_ijb_meta(tmp_path, "IJBB")
    feats = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    with pytest.raises(ijb.IJBError, match="1:N probe template #1: template 99 has no image"):
        ijb.evaluate_ijb(meta, feats)
    with pytest.raises(ijb.IJBError, match="3 feature rows for the 2 images"):
        ijb.evaluate_ijb(meta, np.zeros((3, 8), np.float32))
