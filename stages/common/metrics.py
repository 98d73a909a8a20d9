"""Classification metrics shared by the stages and benchmarks (no scikit-learn needed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float((t == p).mean()) if len(t) else 0.0


def per_label_f1(y_true: Sequence[int], y_pred: Sequence[int], n_labels: int) -> np.ndarray:
    """F1 of each label id in [0, n_labels); a label absent from both truth and prediction scores 0."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    f1 = np.zeros(n_labels)
    for k in range(n_labels):
        tp = np.sum((t == k) & (p == k))
        fp = np.sum((t != k) & (p == k))
        fn = np.sum((t == k) & (p != k))
        f1[k] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return f1


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], n_labels: int) -> float:
    """Unweighted mean of per-label F1 over the labels that occur in the truth."""
    present = np.unique(np.asarray(y_true))
    return float(per_label_f1(y_true, y_pred, n_labels)[present].mean()) if len(present) else 0.0
