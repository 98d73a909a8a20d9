"""Out-of-scope rejection (`stages/model/rejection.py`) on synthetic sets whose answer is known: well-separated
clusters of known intents, and an unknown cluster far away from them."""

from __future__ import annotations

import numpy as np
import pytest

from stages.model import rejection

CLASSES, DIM = 4, 8


def clusters(rows_per_class: int, seed: int, unknown: int = 0):
    """Pooled embeddings around one centre per class (and `unknown` rows around a far centre), labels, and the
    logits of a linear classifier that knows the classes (the unknown rows land on one of them, weakly)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(CLASSES, DIM) * 6.0
    y = np.repeat(np.arange(CLASSES), rows_per_class)
    x = centres[y] + rng.normal(0, 0.5, (len(y), DIM))
    far = np.full(DIM, -4.0) + rng.normal(0, 0.5, (unknown, DIM))
    logits = lambda z: z @ centres.T / 6.0  # noqa: E731
    return x, y, logits(x), far, logits(far)


@pytest.mark.parametrize("method", rejection.METHODS)
def test_each_method_tells_the_far_cluster_from_the_known_ones(method):
    x, y, logits, _, _ = clusters(50, seed=0)
    stats = rejection.MahalanobisStats.fit(x, y, CLASSES)
    vx, vy, vlogits, _, _ = clusters(50, seed=1)
    tx, ty, tlogits, far, far_logits = clusters(50, seed=2, unknown=60)
    score = lambda lg, px: rejection.scores(method, lg, px, stats)  # noqa: E731
    threshold = rejection.calibrate(score(vlogits, vx), 0.97)
    got = rejection.evaluate(score(tlogits, tx), score(far_logits, far), tlogits.argmax(1), ty, threshold)
    assert got["auroc"] > 0.99 and got["fpr_at_95"] < 0.05 and got["out_of_scope_recall"] > 0.9, got
    assert got["in_scope_accepted"] >= 0.9 and got["in_scope_accuracy"] >= 0.9


def test_calibration_keeps_the_asked_recall_on_validation():
    rng = np.random.default_rng(3)
    for n in (1, 7, 100, 1001):
        s = rng.normal(size=n)
        for recall in (0.5, 0.9, 0.97, 1.0):
            t = rejection.calibrate(s, recall)
            assert np.mean(s >= t) >= recall - 1e-12  # at least the recall asked...
            assert np.mean(s > t) < recall or n == 1  # ...and the threshold is the highest that keeps it
    with pytest.raises(ValueError, match="no in-scope rows"):
        rejection.calibrate(np.array([]), 0.97)


def test_auroc_counts_ties_half_and_matches_pairs():
    assert rejection.auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    pairs = np.mean([(u > v) + 0.5 * (u == v) for u in a for v in b])
    assert rejection.auroc(a, b) == pytest.approx(pairs)


def test_scores_of_logit_methods():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    soft = rejection.scores("max_softmax", logits)
    assert soft[0] == pytest.approx(np.exp(2) / (np.exp(2) + 2)) and soft[1] == pytest.approx(1 / 3)
    assert rejection.scores("energy", logits)[1] == pytest.approx(np.log(3))
    with pytest.raises(ValueError, match="unknown rejection method"):
        rejection.scores("entropy", logits)
    with pytest.raises(ValueError, match="pooled"):
        rejection.scores("mahalanobis", logits)


def test_a_class_without_training_rows_is_never_the_nearest():
    x, y, *_ = clusters(20, seed=5)
    keep = y != 3
    stats = rejection.MahalanobisStats.fit(x[keep], y[keep], CLASSES)
    assert np.isinf(stats.means[3]).all() and np.isfinite(rejection.scores("mahalanobis", None, x, stats)).all()
