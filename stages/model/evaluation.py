"""Classification metrics, computed one way for every stage and benchmark (no scikit-learn needed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from stages.model.encoder import TextClassifier, predict_logits


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


def scores(logits: Any, truth: Sequence[int], n_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 of `logits` (rows x labels) against label ids, rounded to 6 digits."""
    pred = np.asarray(logits).argmax(1).tolist()
    return {"accuracy": round(accuracy(truth, pred), 6), "macro_f1": round(macro_f1(truth, pred, n_labels), 6)}


def label_quality(logits: Any, truth: Sequence[int], names: list[str]) -> dict[str, Any]:
    """`scores`, the worst label's F1 (its name; ties broken by name) and the F1 of every label present in
    `truth`, by name."""
    pred = np.asarray(logits).argmax(1).tolist()
    f1 = per_label_f1(truth, pred, len(names))
    worst = min(sorted(set(truth)), key=lambda k: (f1[k], names[k]))
    return {
        **scores(logits, truth, len(names)),
        "worst_label_f1": {"label": names[worst], "f1": round(float(f1[worst]), 6)},
        "per_label_f1": {names[k]: round(float(f1[k]), 6) for k in sorted(set(truth))},
    }


def evaluate(
    model: TextClassifier, tokenizer: Any, frame: pl.DataFrame, labels: dict[str, int], max_length: int
) -> dict[str, float]:
    """`scores` of a PyTorch classifier on a frame's `text` and `label` columns."""
    logits, _ = predict_logits(model, tokenizer, frame["text"].to_list(), max_length)
    return scores(logits.numpy(), [labels[x] for x in frame["label"]], len(labels))
