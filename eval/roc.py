"""Verification metrics on pair scores: the ROC curve, TAR at FAR, and the ROC plot.

A pair is accepted when its score s ≥ t. Sorting the scores once (descending) gives every realisable operating
point: cutting after the last copy of each distinct score value v accepts exactly the pairs with s ≥ v, so with
tps/fps the positive/negative counts among them, TPR = tps/P and FPR = fps/N (the curve starts at (0, 0), t = +∞).
Cost: sorting the scores (each class apart, then a linear merge), O(n log n); nothing per threshold.

TAR@FAR (rule "le", the default): the best TPR among the operating points whose FPR does not exceed the target,
i.e. at most ⌊FAR·N⌋ negatives accepted. Equivalently, with v the (⌊FAR·N⌋+1)-th largest negative score,
TAR = #(positives > v)/P — no threshold at or below v keeps the false accepts within budget, and accepting every
score above v does (:func:`tar_from_top_negatives` computes it that way from a chunked top-k, for MegaFace).

Rule "insightface": the number insightface's and arcface_torch's IJB scripts (``eval_ijbc.py``) print, the one
published IJB tables come from. They take scikit-learn's ``roc_curve`` (which drops the collinear points of the
curve and prepends (0, 0)), reverse it (``np.flipud``: "select largest tpr at same fpr") and report the TPR of the
first point of the reversed curve whose FPR is nearest to the target, i.e. among equally near points the one
latest in the ROC's order: the highest TPR at a shared FPR, and the larger FPR when two FPRs are equally near.
That point may lie above the target FAR. Kept so that numbers can be compared with published ones digit for
digit; "le" is the one a deployed threshold achieves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "DEFAULT_FARS",
    "RocCurve",
    "roc_curve",
    "tar_at_far",
    "tar_from_top_negatives",
    "allowed_false_accepts",
    "far_label",
    "per_far",
    "plot_roc",
]

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
_FAR_SLACK = 1e-9  # ⌊FAR·N⌋ is computed as ⌊FAR·N + slack⌋ so that e.g. 0.3·10 = 2.9999999999999996 counts 3


@dataclass(frozen=True)
class RocCurve:
    """Operating points of "accept iff score ≥ threshold", strongest threshold first (point 0: nothing accepted).

    tps[i] / fps[i]: positives / negatives with score ≥ thresholds[i]; thresholds[0] = +inf.
    """

    thresholds: np.ndarray
    tps: np.ndarray
    fps: np.ndarray
    num_pos: int
    num_neg: int

    @property
    def tpr(self) -> np.ndarray:
        return self.tps / max(self.num_pos, 1)

    @property
    def fpr(self) -> np.ndarray:
        return self.fps / max(self.num_neg, 1)


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> RocCurve:
    """The full ROC of ``scores`` [n] against boolean/0-1 ``labels`` [n] (1 = same identity), O(n log n)."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(f"scores and labels must be 1-D of equal length, got {scores.shape} and {labels.shape}")
    if scores.size == 0:
        raise ValueError("no scores")
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"score {bad} is {scores[bad]}: scores must be finite")
    if labels.dtype != bool:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"labels must be 0/1 or bool, got values {np.unique(labels)[:5].tolist()}")
        labels = labels.astype(bool)
    # Sort each class, then merge the two sorted runs (a stable sort of their concatenation is timsort's linear
    # merge): cheaper than one argsort of everything, and the merge order tells each position's class.
    neg, pos = np.sort(scores[~labels]), np.sort(scores[labels])
    both = np.concatenate([neg, pos])
    merged = np.argsort(both, kind="stable")[::-1]  # descending
    s = both[merged]
    pos_cum = np.cumsum(merged >= neg.size, dtype=np.int64)
    last_of_run = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # the cut after each distinct value
    tps = np.r_[0, pos_cum[last_of_run]]
    fps = np.r_[0, last_of_run + 1 - pos_cum[last_of_run]]
    thresholds = np.r_[np.inf, s[last_of_run].astype(np.float64)]
    return RocCurve(thresholds, tps, fps, int(tps[-1]), int(fps[-1]))


def allowed_false_accepts(far: float, num_neg: int) -> int:
    """⌊FAR·N⌋: how many of N negatives (or non-mated probes, for FPIR) a threshold may accept at rate ``far``."""
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"FAR must be in [0, 1], got {far}")
    return int(math.floor(far * num_neg + _FAR_SLACK))


def _sklearn_kept_points(curve: RocCurve) -> np.ndarray:
    """Indices of the points scikit-learn's roc_curve(drop_intermediate=True) returns.

    It computes the curve without the (0, 0) point, keeps its two ends and every point where the curve bends
    (a non-zero second difference of fps or tps), then prepends (0, 0).
    """
    fps, tps = curve.fps[1:], curve.tps[1:]
    if fps.size <= 2:
        return np.arange(curve.fps.size)
    bends = np.logical_or(np.diff(fps, 2) != 0, np.diff(tps, 2) != 0)
    return np.r_[0, 1 + np.flatnonzero(np.r_[True, bends, True])]


def tar_at_far(curve: RocCurve, fars: Sequence[float] = DEFAULT_FARS, rule: str = "le") -> np.ndarray:
    """TAR at each FAR: rule "le" (best TPR with FPR ≤ FAR) or "insightface" (TPR at the nearest FPR, the highest
    TPR among equally near points; see the module docstring)."""
    if curve.num_pos == 0 or curve.num_neg == 0:
        raise ValueError(f"need positive and negative pairs, got {curve.num_pos} and {curve.num_neg}")
    out = np.empty(len(fars))
    if rule == "le":
        for i, far in enumerate(fars):
            last_ok = np.searchsorted(curve.fps, allowed_false_accepts(far, curve.num_neg), side="right") - 1
            out[i] = curve.tps[last_ok] / curve.num_pos
    elif rule == "insightface":
        kept = _sklearn_kept_points(curve)
        # reversed like eval_ijbc.py's np.flipud, so that argmin's first hit is the LAST equally near point
        fpr, tpr = curve.fpr[kept][::-1], curve.tpr[kept][::-1]
        for i, far in enumerate(fars):
            out[i] = tpr[int(np.argmin(np.abs(fpr - far)))]
    else:
        raise ValueError(f"unknown TAR@FAR rule {rule!r}; expected 'le' or 'insightface'")
    return out


def tar_from_top_negatives(
    pos_scores: np.ndarray, top_negatives: np.ndarray, num_neg: int, fars: Sequence[float] = DEFAULT_FARS
) -> tuple[np.ndarray, np.ndarray]:
    """TAR@FAR (rule "le") from the positives and only the largest negatives; returns (tars, thresholds v).

    ``top_negatives`` must hold the ⌊FAR·N⌋+1 largest of the ``num_neg`` negative scores for the largest FAR asked
    (any order; more is fine). TAR = #(positives > v) / P with v the (⌊FAR·N⌋+1)-th largest negative.
    """
    pos = np.asarray(pos_scores, dtype=np.float64)
    top = np.sort(np.asarray(top_negatives, dtype=np.float64))[::-1]
    if pos.size == 0 or num_neg == 0:
        raise ValueError(f"need positive and negative pairs, got {pos.size} and {num_neg}")
    pos_sorted = np.sort(pos)
    tars, thresholds = np.empty(len(fars)), np.empty(len(fars))
    for i, far in enumerate(fars):
        k = allowed_false_accepts(far, num_neg)
        if k >= num_neg:
            tars[i], thresholds[i] = 1.0, -np.inf
            continue
        if k >= top.size:
            raise ValueError(f"FAR {far} needs the {k + 1} largest negatives, only {top.size} were kept")
        v = top[k]
        tars[i] = (pos.size - np.searchsorted(pos_sorted, v, side="right")) / pos.size
        thresholds[i] = v
    return tars, thresholds


def far_label(far: float) -> str:
    """'1e-04' style label of a FAR (JSON keys and table headers); '0.25' when one digit would round it."""
    label = f"{far:.0e}"
    return label if float(label) == far else f"{far:g}"


def per_far(fars: Sequence[float], values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """``{far_label(far): value}``, one entry per FAR, values as plain floats (the eval results' JSON)."""
    return dict(zip(map(far_label, fars), np.asarray(values).tolist()))


def plot_roc(
    curves: dict[str, RocCurve], path: str | Path, title: str = "ROC", fars: Sequence[float] = DEFAULT_FARS
) -> Path:
    """Save TAR vs FAR (log x) for one or more curves as a PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    lo = min(fars) / 10
    for name, curve in curves.items():
        fpr, tpr = curve.fpr, curve.tpr
        # Thin the curve to ~2000 log-spaced FPR points: the full IJB-C curve has millions of steps.
        grid = np.logspace(np.log10(lo), 0, 2000)
        idx = np.unique(np.clip(np.searchsorted(fpr, grid, side="right") - 1, 0, fpr.size - 1))
        ax.step(np.maximum(fpr[idx], lo), tpr[idx], where="post", label=name, lw=1.2)
    ax.set_xscale("log")
    ax.set_xlim(lo, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xticks(list(fars) + [1.0])
    ax.set_xlabel("False Accept Rate")
    ax.set_ylabel("True Accept Rate")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.4)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
