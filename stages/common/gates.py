"""The publish gates (`publish.gates`): benchmark reports them for every publishable variant, publish
checks them again before it writes anything to the registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.common.params import from_dict, load_section


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


def read_gates(params_file: str | Path) -> Gates:
    section = load_section("publish", params_file)
    return from_dict(Gates, section.get("gates") or {}, "publish.gates")


def failed_gates(checked: dict[str, dict[str, Any]]) -> list[str]:
    """`gate: measured X, limit Y` for each failed gate, in a fixed order."""
    return [
        f"{name} measured {g['measured']} (limit {g['limit']})"
        for name, g in sorted(checked.items())
        if not g["passed"]
    ]
