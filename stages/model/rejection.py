"""Out-of-scope rejection: a score per text that is high for the intents the model knows and low for the rest,
a threshold fitted on validation, and the figures that say how well the two are told apart.

Methods (`reject.method`), each giving an in-scope score (accept when score >= threshold):
- `max_softmax`: the top softmax probability (Hendrycks & Gimpel, 2017);
- `energy`: logsumexp of the logits, the negative free energy (Liu et al., 2020);
- `mahalanobis`: minus the smallest Mahalanobis distance of the pooled embedding to a class mean, under one
  covariance shared by all classes (Lee et al., 2018). It needs the pooled embeddings and `MahalanobisStats`
  fitted on training rows.

The threshold keeps `in_scope_recall` of the validation rows of known intents accepted. Out-of-scope rows
(a label the data marks so, or intents held out of training) are never a class: they only evaluate the rule.
Only numpy: the server imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from stages.runner.errors import ParamError

METHODS = ("max_softmax", "energy", "mahalanobis")
LOGIT_METHODS = ("max_softmax", "energy")


def softmax_parts(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(softmax probabilities, each row's top logit, each row's sum of exp(logit - top)), in float64: what the
    logit methods' scores are made of, so a server that needs the probabilities anyway gets them for free."""
    x = np.asarray(logits, dtype=np.float64)
    top = np.max(x, axis=1)
    top = np.where(np.isfinite(top), top, 0.0)
    shifted = np.exp(x - top[:, None])
    total = shifted.sum(axis=1)
    return shifted / total[:, None], top, total


def logit_scores(method: str, top: np.ndarray, total: np.ndarray) -> np.ndarray:
    """max_softmax = exp(top - logsumexp) = 1 / total; energy = logsumexp = top + log(total)."""
    return 1.0 / total if method == "max_softmax" else top + np.log(total)


@dataclass(frozen=True)
class MahalanobisStats:
    """Class means (classes x dim) and the precision (inverse of the shared covariance, dim x dim)."""

    means: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, pooled: np.ndarray, labels: np.ndarray, n_classes: int, shrinkage: float = 1e-3) -> MahalanobisStats:
        x = np.asarray(pooled, dtype=np.float64)
        y = np.asarray(labels)
        if x.ndim != 2 or len(x) != len(y):
            raise ValueError(f"pooled must be rows x dim with one label per row, got {x.shape} and {len(y)} labels")
        present = np.unique(y)
        means = np.zeros((n_classes, x.shape[1]))
        for c in present:
            means[c] = x[y == c].mean(axis=0)
        centered = x - means[y]
        cov = centered.T @ centered / max(1, len(x) - len(present))
        # few rows per class: shrink towards a scaled identity so it stays invertible
        cov += shrinkage * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
        absent = np.setdiff1d(np.arange(n_classes), present)
        means[absent] = np.inf  # a class with no rows is never the nearest
        return cls(means.astype(np.float32), np.linalg.inv(cov).astype(np.float32))

    def tensors(self) -> dict[str, np.ndarray]:
        return {"means": self.means, "precision": self.precision}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray]) -> MahalanobisStats:
        means, precision = tensors.get("means"), tensors.get("precision")
        if means is None or precision is None or means.ndim != 2 or precision.shape != (means.shape[1],) * 2:
            raise ValueError("Mahalanobis statistics need means (classes x dim) and precision (dim x dim)")
        return cls(means.astype(np.float32), precision.astype(np.float32))

    @cached_property
    def _expanded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(P, P mu_c for each class, mu_c' P mu_c), over the classes that have a mean, in float64."""
        means = self.means.astype(np.float64)
        means = means[np.all(np.isfinite(means), axis=1)]
        precision = self.precision.astype(np.float64)
        pm = means @ precision  # P is symmetric
        return precision, pm, np.sum(pm * means, axis=1)

    def score(self, pooled: np.ndarray) -> np.ndarray:
        """-min over classes of (x - mu)' P (x - mu) = x'Px - 2 x'P mu + mu'P mu: two small matrix products per
        batch (a server scores one text in microseconds)."""
        x = np.asarray(pooled, dtype=np.float64)
        precision, pm, mpm = self._expanded
        dist = np.sum((x @ precision) * x, axis=1)[:, None] - 2.0 * (x @ pm.T) + mpm[None, :]
        return -np.min(dist, axis=1)


def scores(method: str, logits: np.ndarray | None = None, pooled: np.ndarray | None = None,
           stats: MahalanobisStats | None = None) -> np.ndarray:  # fmt: skip
    """The in-scope score of each row (higher: more like a known intent)."""
    if method in LOGIT_METHODS:
        _, top, total = softmax_parts(logits)
        return logit_scores(method, top, total)
    if method == "mahalanobis":
        if pooled is None or stats is None:
            raise ValueError("mahalanobis needs the pooled embeddings and the fitted class statistics")
        return stats.score(pooled)
    raise ValueError(f"unknown rejection method {method!r} (one of {', '.join(METHODS)})")


def calibrate(in_scope: np.ndarray, recall: float) -> float:
    """The highest threshold that keeps at least `recall` of these in-scope scores accepted (score >= it)."""
    s = np.sort(np.asarray(in_scope, dtype=np.float64))
    if len(s) == 0:
        raise ValueError("no in-scope rows to calibrate the threshold on")
    keep = int(np.ceil(recall * len(s) - 1e-9))  # rows that must stay at or above the threshold
    return float(s[len(s) - max(1, keep)])


def auroc(in_scope: np.ndarray, out_scope: np.ndarray) -> float:
    """Probability that an in-scope row scores above an out-of-scope one (ties count half)."""
    a, b = np.asarray(in_scope, dtype=np.float64), np.asarray(out_scope, dtype=np.float64)
    both = np.concatenate([a, b])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both))
    sorted_vals = both[order]
    i = 0
    while i < len(both):  # average ranks over ties
        j = i
        while j + 1 < len(both) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2) / (len(a) * len(b)))


def evaluate(in_scope: np.ndarray, out_scope: np.ndarray, predicted: np.ndarray, truth: np.ndarray,
             threshold: float) -> dict[str, Any]:  # fmt: skip
    """Figures at `threshold` on test rows: in-scope accuracy with rejection on (a rejected in-scope row counts
    wrong), in-scope rows accepted, out-of-scope rows rejected; threshold-free AUROC and the FPR (out-of-scope
    rows accepted) at the threshold keeping 95% of these in-scope rows. The last three are None without
    out-of-scope rows."""
    s_in, s_out = np.asarray(in_scope, dtype=np.float64), np.asarray(out_scope, dtype=np.float64)
    accepted = s_in >= threshold
    right = np.asarray(predicted) == np.asarray(truth)
    out: dict[str, Any] = {
        "threshold": round(float(threshold), 6),
        "in_scope_rows": len(s_in),
        "out_of_scope_rows": len(s_out),
        "in_scope_accuracy": round(float(np.mean(right & accepted)), 6) if len(s_in) else None,
        "in_scope_accepted": round(float(np.mean(accepted)), 6) if len(s_in) else None,
        "out_of_scope_recall": None,
        "auroc": None,
        "fpr_at_95": None,
    }
    if len(s_out) and len(s_in):
        at95 = calibrate(s_in, 0.95)
        out["out_of_scope_recall"] = round(float(np.mean(s_out < threshold)), 6)
        out["auroc"] = round(auroc(s_in, s_out), 6)
        out["fpr_at_95"] = round(float(np.mean(s_out >= at95)), 6)
    return out


@dataclass(frozen=True)
class RejectParams:
    """params.yaml `reject:`, read by benchmark (which calibrates every method for every variant) and publish
    (which ships the chosen variant's rule for `method`)."""

    method: str = "energy"  # energy, max_softmax, mahalanobis, or none (always answer an intent)
    in_scope_recall: float = 0.97  # share of validation rows of known intents the threshold keeps accepted
    label: str = "out_of_scope"  # what the server answers for a rejected text

    def __post_init__(self) -> None:
        if self.method not in (*METHODS, "none"):
            raise ParamError(f"reject.method must be one of {', '.join((*METHODS, 'none'))}, got {self.method!r}")
        if not 0.5 <= float(self.in_scope_recall) <= 1.0:
            raise ParamError(f"reject.in_scope_recall must be in [0.5, 1], got {self.in_scope_recall}")
        if not isinstance(self.label, str) or not self.label.strip():
            raise ParamError(f"reject.label must be a non-empty string, got {self.label!r}")


def fit_and_evaluate(val_logits: np.ndarray, test_logits: np.ndarray, oos_logits: np.ndarray, truth: list[int],
                     recall: float) -> dict[str, Any]:  # fmt: skip
    """Every logit method calibrated on the validation logits of known intents and scored on the test rows
    (known intents, and the out-of-scope rows)."""
    predicted = np.asarray(test_logits).argmax(1)
    methods = {}
    for method in LOGIT_METHODS:
        threshold = calibrate(scores(method, val_logits), recall)
        oos = scores(method, oos_logits) if len(oos_logits) else np.zeros(0)
        methods[method] = evaluate(scores(method, test_logits), oos, predicted, np.asarray(truth), threshold)
    return {"in_scope_recall": recall, "val_rows": len(val_logits), "methods": methods}
