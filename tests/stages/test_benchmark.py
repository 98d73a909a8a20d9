"""benchmark's pure parts: the worst label, the Pareto front, the gates and the candidate rule."""

from __future__ import annotations

import numpy as np
import pytest

from stages.benchmark import pareto_front, quality
from stages.common.gates import Gates, choose_candidate


def row(acc: float, p50: float, p95: float = 1.0, size: float = 1.0) -> dict:
    return {"accuracy": acc, "size_mb": size, "latency_ms": {"end_to_end": {"p50": p50, "p95": p95}}}


def test_quality_names_the_worst_label():
    logits = np.eye(3)[[0, 0, 1, 2, 2, 2]]
    q = quality(logits, [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    assert q["accuracy"] == round(5 / 6, 6)
    assert q["worst_label_f1"] == {"label": "b", "f1": round(2 / 3, 6)}


def test_pareto_front_keeps_only_undominated_variants():
    rows = {"slow_best": row(0.95, 10.0), "fast_ok": row(0.90, 1.0), "dominated": row(0.89, 2.0), "tie": row(0.90, 1.0)}
    assert pareto_front(rows) == ["fast_ok", "slow_best", "tie"]


def test_gates_report_each_measured_value_and_limit():
    gates = Gates(min_accuracy=0.9, max_drop_vs_teacher=1.0, max_p95_ms=5.0, max_size_mb=10.0)
    checked = gates.check(row(0.905, 1.0, p95=6.0, size=4.0), teacher_accuracy=0.92)
    assert checked["min_accuracy"] == {"measured": 0.905, "passed": True, "limit": 0.9}
    assert checked["max_drop_vs_teacher"]["measured"] == 1.5 and not checked["max_drop_vs_teacher"]["passed"]
    assert not checked["max_p95_ms"]["passed"] and checked["max_size_mb"]["passed"]


def publishable(acc: float, p50: float, size: float = 1.0) -> dict:
    return {**row(acc, p50, size=size), "publishable": True, "file": "x.onnx"}


def test_candidate_is_the_fastest_passing_variant_and_noise_below_the_margin_cannot_flip_it():
    teacher = row(0.95, 10.0)
    gates = Gates(min_accuracy=0.5)
    rows = {"teacher_fp32": teacher, "a": publishable(0.90, 1.00), "b": publishable(0.91, 1.03)}
    assert choose_candidate(rows, gates, 0.05)[0] == "b"  # 3% apart: equally fast, the more accurate wins
    rows["b"] = publishable(0.91, 0.97)
    assert choose_candidate(rows, gates, 0.05)[0] == "b"
    rows["b"] = publishable(0.91, 1.20)  # 20% slower: speed decides
    assert choose_candidate(rows, gates, 0.05)[0] == "a"
    rows = {"teacher_fp32": teacher, "a": publishable(0.90, 1.0, size=4.0), "b": publishable(0.90, 1.01, size=3.0)}
    assert choose_candidate(rows, gates, 0.05)[0] == "b"  # same accuracy: the smaller file
    # the per-call ratio to a common reference, when benchmark measured one, is what counts
    rows["a"]["latency_ms"]["end_to_end"]["vs_student_pruned"] = 0.5
    rows["b"]["latency_ms"]["end_to_end"]["vs_student_pruned"] = 1.0
    assert choose_candidate(rows, gates, 0.05)[0] == "a"


def test_no_passing_variant_gives_no_candidate_and_every_gate_result():
    rows = {"teacher_fp32": row(0.95, 10.0), "a": publishable(0.90, 1.0, size=30.0)}
    best, checked = choose_candidate(rows, Gates(max_size_mb=25.0), 0.05)
    assert best is None and not checked["a"]["max_size_mb"]["passed"]
    with pytest.raises(ValueError, match="teacher_fp32"):
        choose_candidate({"a": rows["a"]}, Gates(), 0.05)
