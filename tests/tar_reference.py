"""TAR@FAR counted by hand: the reference the ROC tests (tests/test_eval_roc.py, rule "le") and the IJB tests
(tests/test_eval_ijb.py) compare eval.roc against; shares no code with eval/."""
from __future__ import annotations

import math

import numpy as np


def brute_force_tar(scores: np.ndarray, labels: np.ndarray, far: float) -> float:
    """max TPR over thresholds t in {+inf} ∪ scores with #(neg ≥ t) ≤ ⌊far·N⌋, by counting per threshold."""
    pos, neg = scores[labels], scores[~labels]
    budget = math.floor(far * neg.size + 1e-9)
    best = 0.0
    for t in np.unique(scores):
        if (neg >= t).sum() <= budget:
            best = max(best, (pos >= t).sum() / pos.size)
    return best
