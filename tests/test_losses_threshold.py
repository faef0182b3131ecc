"""eval/uniform_threshold.py: the best single threshold against brute force; the learned-threshold report."""
import time

import numpy as np
import pytest

from eval.uniform_threshold import (
    best_threshold,
    format_threshold_report,
    pair_cosines,
    threshold_accuracy,
    threshold_report,
)


def brute_force(pos: np.ndarray, neg: np.ndarray) -> float:
    """Best accuracy of "same iff score > t" over every distinct cut (t = each score, and below all)."""
    cuts = np.concatenate([[-np.inf], np.unique(np.concatenate([pos, neg]))])
    return max(((pos > t).sum() + (neg <= t).sum()) / (pos.size + neg.size) for t in cuts)


@pytest.mark.parametrize("seed", range(6))
def test_best_threshold_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    pos = np.round(rng.normal(0.5, 0.2, 57), 2)  # rounding makes ties, also across the two sets
    neg = np.round(rng.normal(0.1, 0.2, 83), 2)
    best = best_threshold(pos, neg)
    assert best.accuracy == pytest.approx(brute_force(pos, neg), abs=1e-12)
    assert threshold_accuracy(pos, neg, best.threshold) == pytest.approx(best.accuracy, abs=1e-12)
    assert (best.positives, best.negatives) == (57, 83)


def test_separable_sets_reach_one_and_the_threshold_lies_in_the_gap():
    best = best_threshold([0.6, 0.7, 0.9], [0.1, 0.2, 0.4])
    assert best.accuracy == 1.0 and 0.4 < best.threshold < 0.6
    assert best_threshold([0.5], []).accuracy == 1.0  # positives only: accept everything
    only_neg = best_threshold([], [0.3, 0.5])
    assert only_neg.accuracy == 1.0 and only_neg.threshold >= 0.5  # reject everything


def test_best_threshold_is_n_log_n():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(0.5, 0.2, 500_000), rng.normal(0.1, 0.2, 500_000)
    t0 = time.perf_counter()
    best = best_threshold(pos, neg)
    assert time.perf_counter() - t0 < 5.0  # a quadratic scan of 10^6 pairs would take hours
    assert 0.25 < best.threshold < 0.35  # the two normals cross at 0.3


def test_report_puts_learned_thresholds_beside_the_best_one():
    pos, neg = [0.6, 0.7, 0.9, 0.35], [0.1, 0.2, 0.4, 0.5]
    report = threshold_report(pos, neg, {"t_uss": 0.45, "p_v": 0.1})
    assert report["pairs"] == 8 and report["best_accuracy"] == 0.875  # cut between 0.5 and 0.6
    assert report["learned"]["t_uss"] == {"threshold": 0.45, "accuracy": 0.75}
    assert report["learned"]["p_v"]["accuracy"] == 5 / 8
    line = format_threshold_report(report, title="lfw")
    assert line.startswith("lfw: best single threshold t* = ") and "learned t_uss = 0.4500 (acc 75.00%)" in line


def test_pair_cosines_and_errors():
    emb = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    pos, neg = pair_cosines(emb, [True, False])
    assert pos.tolist() == [1.0] and neg == pytest.approx([np.sqrt(0.5)])
    with pytest.raises(ValueError, match=r"\[2N, D\] for N=3"):
        pair_cosines(emb, [True, False, True])
    with pytest.raises(ValueError, match="positive_scores: scores must be finite"):
        best_threshold([np.nan], [0.1])
    with pytest.raises(ValueError, match="no pairs"):
        best_threshold([], [])
