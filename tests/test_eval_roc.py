"""ROC and TAR@FAR (eval.roc): rule "le" against counting by hand, rule "insightface" against scikit-learn's
``roc_curve`` — the function the published IJB tables come from — on random, tied and degenerate score sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_curve as sklearn_roc_curve

from eval.roc import DEFAULT_FARS, roc_curve, tar_at_far, tar_from_top_negatives
from tests.tar_reference import brute_force_tar

# FARs of the IJB tables (written as eval_ijbc.py writes them, 10 ** -k), plus the ends and in-between values
FARS = [10**-6, 10**-5, 10**-4, 10**-3, 10**-2, 10**-1, 0.0, 0.004, 0.05, 0.3, 0.375, 0.5, 1.0]


def oracle_tar(scores, labels, far):
    """The published rule on scikit-learn's ROC: the TPR of the point of ``sklearn.metrics.roc_curve`` whose FPR is
    nearest to ``far``; among equally near points the one with the largest index on sklearn's curve (eval_ijbc.py
    flips the curve and keeps the first minimum — the same point, found here without flipping)."""
    fpr, tpr, _ = sklearn_roc_curve(labels.astype(int), scores)
    distance = np.abs(fpr - far)
    return tpr[np.flatnonzero(distance == distance.min()).max()]


def random_set(seed, n, positive_share=0.3, decimals=None, dtype=np.float64):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < positive_share
    labels[:2] = [True, False]  # both classes present
    scores = rng.normal(0, 1, n) + 1.5 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)  # ties, within and across the classes
    return scores.astype(dtype), labels


def test_roc_curve_hand_computed():
    scores = np.array([0.9, 0.8, 0.8, 0.3, 0.1, 0.3])
    labels = np.array([1, 0, 1, 0, 1, 1])
    curve = roc_curve(scores, labels)
    np.testing.assert_array_equal(curve.thresholds, [np.inf, 0.9, 0.8, 0.3, 0.1])
    np.testing.assert_array_equal(curve.tps, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(curve.fps, [0, 0, 1, 2, 2])
    assert (curve.num_pos, curve.num_neg) == (4, 2)
    # FAR 0 -> no false accept: only the 0.9 positive; FAR 0.5 -> one false accept: cut at 0.8
    np.testing.assert_allclose(tar_at_far(curve, [0.0, 0.49, 0.5, 1.0]), [0.25, 0.25, 0.5, 1.0])


def test_insightface_rule_takes_the_highest_tpr_at_a_shared_fpr():
    # one impostor above 3 positives above 3 negatives: sklearn's curve (0,0) (1/4,0) (1/4,1) (1,1)
    scores = np.array([0.99, 0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    labels = np.array([0, 1, 1, 1, 0, 0, 0], dtype=bool)
    curve = roc_curve(scores, labels)
    # FAR 0.2: FPR 1/4 is nearest, shared by TPR 0 and TPR 1 -> 1 (eval_ijbc.py's "select largest tpr at same fpr")
    # FAR 0.1 and 1e-6: FPR 0 is nearest, only (0, 0) -> 0. FAR 0.125: FPR 0 and 1/4 are equally near -> the later
    # point, (1/4, 1). FAR 0.625: FPR 1/4 and 1 are equally near -> (1, 1)
    np.testing.assert_array_equal(tar_at_far(curve, [0.2, 0.1, 1e-6, 0.125, 0.625], rule="insightface"),
                                  [1.0, 0.0, 0.0, 1.0, 1.0])
    # rule "le": FAR 0.25 allows the impostor, 0.1 does not
    np.testing.assert_array_equal(tar_at_far(curve, [0.1, 0.25]), [0.0, 1.0])


CASES = {
    "continuous": lambda: random_set(0, 800),
    "continuous float32": lambda: random_set(1, 800, dtype=np.float32),
    "ties (1 decimal)": lambda: random_set(2, 800, decimals=1),
    "heavy ties (0 decimals)": lambda: random_set(3, 500, decimals=0),
    "few positives": lambda: random_set(4, 3000, positive_share=0.004, decimals=2),
    "all scores equal": lambda: (np.full(9, 0.5), np.array([1, 0, 1, 0, 0, 1, 0, 0, 0], dtype=bool)),
    "one positive, one negative": lambda: (np.array([0.2, 0.7]), np.array([True, False])),
    "perfectly separated": lambda: (np.r_[np.linspace(0.6, 1, 7), np.linspace(0, 0.5, 9)],
                                    np.r_[np.ones(7, bool), np.zeros(9, bool)]),
    "inverted": lambda: (np.r_[np.linspace(0, 0.5, 7), np.linspace(0.6, 1, 9)],
                         np.r_[np.ones(7, bool), np.zeros(9, bool)]),
    "two distinct values": lambda: (np.array([1.0, 1.0, 0.0, 0.0, 1.0]), np.array([1, 0, 0, 1, 1], dtype=bool)),
    "planted impostor": lambda: (np.r_[1.0, np.linspace(0.9, 0.95, 6), np.linspace(0.1, 0.5, 30)],
                                 np.r_[False, np.ones(6, bool), np.zeros(30, bool)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_insightface_rule_equals_sklearn_oracle(case):
    scores, labels = CASES[case]()
    curve = roc_curve(scores, labels)
    expected = [oracle_tar(scores, labels, far) for far in FARS]
    np.testing.assert_array_equal(tar_at_far(curve, FARS, rule="insightface"), expected)


@pytest.mark.parametrize("case", sorted(CASES))
def test_le_rule_equals_counting(case):
    scores, labels = CASES[case]()
    curve = roc_curve(scores, labels)
    np.testing.assert_allclose(tar_at_far(curve, FARS), [brute_force_tar(scores, labels, f) for f in FARS])


@pytest.mark.parametrize("seed", range(20))
def test_insightface_rule_equals_sklearn_on_many_small_tied_sets(seed):
    # small sets make exactly-equidistant FPRs and shared FPRs common: the tie-breaking is what is tested
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 40))
    scores, labels = random_set(seed, n, positive_share=float(rng.uniform(0.1, 0.9)), decimals=int(seed % 3))
    fars = sorted(set(FARS) | {k / 8 for k in range(9)} | {k / 10 for k in range(11)})
    expected = [oracle_tar(scores, labels, far) for far in fars]
    np.testing.assert_array_equal(tar_at_far(roc_curve(scores, labels), fars, rule="insightface"), expected)


def test_top_negatives_path_equals_the_full_roc():
    # the same numbers from the positives and only the largest negatives (the chunked MegaFace path)
    scores, labels = random_set(5, 900, decimals=1)
    fars = [0.0, 1e-3, 0.004, 0.01, 0.05, 0.1, 0.3]
    neg = scores[~labels]
    top = np.sort(neg)[::-1][: math.floor(max(fars) * neg.size) + 1]
    tars, _ = tar_from_top_negatives(scores[labels], np.random.default_rng(0).permutation(top), neg.size, fars)
    np.testing.assert_allclose(tars, tar_at_far(roc_curve(scores, labels), fars))


def test_default_fars_are_the_published_columns():
    assert DEFAULT_FARS == tuple(10**-k for k in range(6, 0, -1))


def test_roc_rejects_bad_input():
    with pytest.raises(ValueError, match="finite"):
        roc_curve(np.array([0.1, np.nan]), np.array([1, 0]))
    with pytest.raises(ValueError, match="0/1"):
        roc_curve(np.array([0.1, 0.2]), np.array([1, 2]))
    with pytest.raises(ValueError, match="FAR must be"):
        tar_at_far(roc_curve(np.array([0.1, 0.2]), np.array([1, 0])), [1.5])
    with pytest.raises(ValueError, match="need positive and negative pairs"):
        tar_at_far(roc_curve(np.array([0.1, 0.2]), np.array([1, 1])), [0.1], rule="insightface")
    with pytest.raises(ValueError, match="unknown TAR@FAR rule"):
        tar_at_far(roc_curve(np.array([0.1, 0.2]), np.array([1, 0])), [0.1], rule="nearest")
    with pytest.raises(ValueError, match="only 1 were kept"):
        tar_from_top_negatives(np.array([0.5]), np.array([0.4]), 100, [0.05])
