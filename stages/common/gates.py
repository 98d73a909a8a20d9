"""The publish gates (`publish.gates`) and the one candidate rule: publish checks the gates on benchmark's
figures and chooses the variant it ships (`choose_candidate`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Gates:
    min_accuracy: float = 0.0  # test accuracy (fraction)
    max_drop_vs_teacher: float = 100.0  # points of test accuracy below teacher_fp32
    max_p95_ms: float = 1e9  # end-to-end p95 latency at batch 1, milliseconds
    max_size_mb: float = 1e9  # model file size

    def __post_init__(self) -> None:
        for key in ("min_accuracy", "max_drop_vs_teacher", "max_p95_ms", "max_size_mb"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"publish.gates.{key} must be a number, got {value!r}")
        if not 0.0 <= self.min_accuracy <= 1.0:
            raise ValueError(f"publish.gates.min_accuracy is a fraction in [0, 1], got {self.min_accuracy}")

    def check(self, row: dict[str, Any], teacher_accuracy: float) -> dict[str, dict[str, Any]]:
        """Each gate with the measured value, its limit and whether it passed."""
        drop = round(100 * (teacher_accuracy - row["accuracy"]), 4)
        p95 = row["latency_ms"]["end_to_end"]["p95"]
        measured = {
            "min_accuracy": (row["accuracy"], row["accuracy"] >= self.min_accuracy, self.min_accuracy),
            "max_drop_vs_teacher": (drop, drop <= self.max_drop_vs_teacher, self.max_drop_vs_teacher),
            "max_p95_ms": (p95, p95 <= self.max_p95_ms, self.max_p95_ms),
            "max_size_mb": (row["size_mb"], row["size_mb"] <= self.max_size_mb, self.max_size_mb),
        }
        return {k: {"measured": v, "passed": bool(ok), "limit": lim} for k, (v, ok, lim) in measured.items()}


def failed_gates(checked: dict[str, dict[str, Any]]) -> list[str]:
    """`gate: measured X, limit Y` for each failed gate, in a fixed order."""
    return [
        f"{name} measured {g['measured']} (limit {g['limit']})"
        for name, g in sorted(checked.items())
        if not g["passed"]
    ]


def merged_rows(results: dict[str, Any], timings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """benchmark's per-variant results (deterministic) joined with its timings (latency, throughput, memory)."""
    times = timings.get("variants") or {}
    return {name: {**row, **times.get(name, {})} for name, row in (results.get("variants") or {}).items()}


def e2e_speed(row: dict[str, Any]) -> float:
    """End-to-end time at batch 1 for comparing variants: the median over benchmark's rounds of the ratio to
    a common reference within each round, where benchmark measured one (steadier than a p50), else the p50."""
    e2e = row["latency_ms"]["end_to_end"]
    return e2e.get("vs_student_pruned", e2e["p50"])


def choose_candidate(
    rows: dict[str, dict[str, Any]], gates: Gates, margin: float
) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """(the variant to publish or None, each publishable variant's gate results).

    Among the publishable variants (those with a `file`) passing every gate: the fastest end to end at batch
    1; variants within `margin` of the fastest count as equally fast, and among those the more accurate wins,
    then the smaller file, then the name. So timing noise below the margin cannot flip the choice (publish
    passes max(publish.latency_margin, twice the noise benchmark measured))."""
    if "teacher_fp32" not in rows:
        raise ValueError("benchmark metrics have no teacher_fp32 row: the drop gate needs it")
    teacher = rows["teacher_fp32"]["accuracy"]
    checked = {n: gates.check(r, teacher) for n, r in rows.items() if r.get("publishable") and r.get("file")}
    passing = [n for n, g in checked.items() if all(x["passed"] for x in g.values())]
    if not passing:
        return None, checked
    fastest = min(e2e_speed(rows[n]) for n in passing)
    close = [n for n in passing if e2e_speed(rows[n]) <= fastest * (1 + margin)]
    best = min(close, key=lambda n: (-rows[n]["accuracy"], rows[n]["size_mb"], n))
    return best, checked
