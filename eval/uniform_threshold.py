"""Uniform-threshold metrics: one similarity threshold for every pair, the papers' central claim made visible.

UniTSFace (USS), UniFace (UCE) and GB-CosFace each learn a single cosine threshold meant to separate all positive
pairs from all negative ones: t = b/s for USS / UCE, p_v for GB-CosFace. Given scores (cosines) of positive and
negative pairs, this module finds the best single threshold t* (exact, O(n log n): one sort) and its accuracy, and
the accuracy the learned threshold reaches on the same pairs, so a training log or an eval table can print them side
by side. The sorting core is eval/verification.py's ``uniform_threshold_accuracy`` (on distances, "same iff
d < t"); here scores are similarities ("same iff score > t").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from eval.verification import uniform_threshold_accuracy

__all__ = ["ThresholdResult", "best_threshold", "threshold_accuracy", "pair_cosines", "threshold_report",
           "format_threshold_report", "uniform_threshold_accuracy"]


@dataclass(frozen=True)
class ThresholdResult:
    threshold: float   # t*: call a pair "same" iff its score > t*
    accuracy: float    # fraction of pairs t* classifies correctly
    positives: int
    negatives: int


def _scores(values, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: scores must be finite numbers")
    return a


def best_threshold(positive_scores: Sequence[float] | np.ndarray,
                   negative_scores: Sequence[float] | np.ndarray) -> ThresholdResult:
    """The single threshold t* (same iff score > t*) with the best accuracy over all pairs, and that accuracy."""
    pos, neg = _scores(positive_scores, "positive_scores"), _scores(negative_scores, "negative_scores")
    if pos.size + neg.size == 0:
        raise ValueError("best_threshold: no pairs")
    scores = np.concatenate([pos, neg])
    same = np.concatenate([np.ones(pos.size, dtype=bool), np.zeros(neg.size, dtype=bool)])
    accuracy, t_dist = uniform_threshold_accuracy(-scores, same)  # score > t  <=>  -score < -t
    return ThresholdResult(threshold=-t_dist, accuracy=accuracy, positives=int(pos.size), negatives=int(neg.size))


def threshold_accuracy(positive_scores, negative_scores, threshold: float) -> float:
    """Accuracy of the rule "same iff score > threshold" over all pairs."""
    pos, neg = _scores(positive_scores, "positive_scores"), _scores(negative_scores, "negative_scores")
    total = pos.size + neg.size
    if total == 0:
        raise ValueError("threshold_accuracy: no pairs")
    return float((np.count_nonzero(pos > threshold) + np.count_nonzero(neg <= threshold)) / total)


def pair_cosines(embeddings: np.ndarray, issame: Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) cosines of pairs (rows 2k, 2k+1) of embeddings [2N, D] (any norm)."""
    emb = np.asarray(embeddings, dtype=np.float64)
    same = np.asarray(issame, dtype=bool)
    if emb.ndim != 2 or emb.shape[0] != 2 * same.size:
        raise ValueError(f"embeddings must be [2N, D] for N={same.size} pairs, got shape {emb.shape}")
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    cos = np.sum(emb[0::2] * emb[1::2], axis=1)
    return cos[same], cos[~same]


def threshold_report(positive_scores, negative_scores, learned: Mapping[str, float] | None = None) -> dict:
    """Best single threshold and its accuracy, plus each learned threshold (name -> t) with its accuracy."""
    best = best_threshold(positive_scores, negative_scores)
    rows = {name: {"threshold": float(t), "accuracy": threshold_accuracy(positive_scores, negative_scores, t)}
            for name, t in (learned or {}).items()}
    return {"best_threshold": best.threshold, "best_accuracy": best.accuracy, "pairs": best.positives +
            best.negatives, "learned": rows}


def format_threshold_report(report: dict, title: str = "") -> str:
    """One line: `t* = 0.312 (acc 97.50%)  |  t_uss = 0.290 (acc 97.10%)`."""
    parts = [f"best single threshold t* = {report['best_threshold']:.4f} (acc {100 * report['best_accuracy']:.2f}%"
             f" on {report['pairs']} pairs)"]
    for name, row in report["learned"].items():
        parts.append(f"learned {name} = {row['threshold']:.4f} (acc {100 * row['accuracy']:.2f}%)")
    return (f"{title}: " if title else "") + "  |  ".join(parts)
