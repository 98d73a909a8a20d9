"""benchmark's pure parts: the worst label, the Pareto front, the typed records it writes."""

from __future__ import annotations

import numpy as np

from stages.benchmark import pareto_front, report_table
from stages.model.evaluation import label_quality
from stages.records import BenchmarkResults, BenchmarkTimings, Latency, Percentiles, VariantResult, VariantTiming


def row(acc: float, p50: float, p95: float = 1.0, size: float = 1.0) -> dict:
    return {"accuracy": acc, "size_mb": size, "latency_ms": {"end_to_end": {"p50": p50, "p95": p95}}}


def test_quality_names_the_worst_label():
    logits = np.eye(3)[[0, 0, 1, 2, 2, 2]]
    q = label_quality(logits, [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    assert q["accuracy"] == round(5 / 6, 6)
    assert q["worst_label_f1"] == {"label": "b", "f1": round(2 / 3, 6)}


def test_pareto_front_keeps_only_undominated_variants():
    rows = {"slow_best": row(0.95, 10.0), "fast_ok": row(0.90, 1.0), "dominated": row(0.89, 2.0), "tie": row(0.90, 1.0)}
    assert pareto_front(rows) == ["fast_ok", "slow_best", "tie"]


def test_records_round_trip_and_leave_out_absent_keys():
    result = VariantResult(0.9, 0.88, {"label": "a", "f1": 0.5}, 1.5, "int8", "cpu", True, "x.onnx", "ab" * 32)
    baseline = VariantResult(0.8, 0.7, {"label": "b", "f1": 0.1}, 0.2, "fp32", "cpu")
    results = BenchmarkResults({"x": result, "tfidf": baseline}, ["x"], {}, 48, 2, 64)
    data = results.to_dict()
    assert "file" not in data["variants"]["tfidf"] and data["variants"]["x"]["file"] == "x.onnx"
    assert BenchmarkResults.from_dict(data) == results
    p = Percentiles(1.0, 2.0, 3.0)
    timing = VariantTiming(Latency(p, Percentiles(2.0, 3.0, 4.0, vs_student_pruned=0.9)), {"batch_32": 10.0})
    timings = BenchmarkTimings({"x": timing}, {}, ["x"], 0.01, 2, 40)
    assert BenchmarkTimings.from_dict(timings.to_dict()) == timings
    assert timing.speed() == 0.9 and VariantTiming(Latency(p, p), {}).speed() == 1.0


def test_report_table_has_a_row_per_variant():
    rows = {
        "x": {
            **row(0.9, 1.0),
            "macro_f1": 0.8,
            "worst_label_f1": {"label": "a", "f1": 0.5},
            "latency_ms": {"model": {"p50": 0.5, "p95": 0.6, "p99": 0.7}, "end_to_end": {"p50": 1.0, "p95": 1.1}},
            "throughput_qps": {"batch_32": 100.0, "batch_64": 200.0},
        }
    }
    table = report_table(rows).splitlines()
    assert len(table) == 3 and table[2].startswith("| x | 0.9000 | 0.8000 |")


def test_interleaved_queries_time_model_inside_end_to_end_within_the_budget():
    import time

    from stages.runtime.timing import Query, interleaved_queries, round_p95s

    def slow(ms: float):
        def run(x):
            end = time.perf_counter() + ms / 1000.0
            while time.perf_counter() < end:
                pass
            return x

        return run

    queries = {
        "a": Query(prepare=slow(0.3), run=slow(0.5), finish=lambda out: out),
        "b": Query(prepare=slow(0.1), run=slow(1.0), finish=lambda out: out),
    }
    got = interleaved_queries(queries, ["x", "y", "z"], budget_s=0.6, rounds=4, min_per_round=3, settle_s=0.01)
    assert got.rounds == 4 and got.per_round >= 3 and got.seconds < 2.0
    for name in queries:
        model, e2e = got.model[name], got.end_to_end[name]
        assert len(model) == len(e2e) == got.rounds * got.per_round
        assert all(m <= e for m, e in zip(model, e2e, strict=True))  # same calls: model-only inside end to end
    assert min(got.model["b"]) >= 1.0 and min(got.end_to_end["a"]) >= 0.8
    # one disturbed round moves the pooled p95 but not the median of the rounds' p95s
    steady = [1.0] * 20 * 3 + [50.0] * 20
    assert round_p95s(steady, rounds=4) == 1.0


def test_report_flags_noisy_timings():
    from stages.benchmark import noise_line

    steady = BenchmarkTimings({}, {}, [], 0.01, 10, 100)
    noisy = BenchmarkTimings({}, {}, [], 0.12, 10, 100, noisy=True)
    assert "steady" in noise_line(steady) and "noisy" not in noise_line(steady).lower()
    assert "**Timings are noisy**" in noise_line(noisy) and "12.0%" in noise_line(noisy)
