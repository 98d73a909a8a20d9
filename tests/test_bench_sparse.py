"""bench/sparse_banking77.py's table: the speedups it prints and the row it marks (the Banking77 runs themselves
are a benchmark, not a test)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("sparse_banking77", ROOT / "bench/sparse_banking77.py")
sparse = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(sparse)


def row(val: float, dense: float, sparse_ms: float, zero: float) -> dict:
    return {"zero_blocks": zero, "val": val, "test": val, "dense_1t_ms": 2 * dense, "sparse_1t_ms": 2 * sparse_ms,
            "dense_2t_ms": dense, "sparse_2t_ms": sparse_ms}  # fmt: skip


def test_the_fastest_student_within_the_drop_is_marked_against_the_dense_one(capsys):
    rows = {0.0: row(0.910, 0.30, 0.31, 0.0), 0.5: row(0.908, 0.30, 0.25, 0.5), 0.7: row(0.907, 0.30, 0.20, 0.7),
            0.8: row(0.890, 0.30, 0.15, 0.8)}  # fmt: skip
    sparse.report(rows, (16, 64), 0.5)
    out = capsys.readouterr().out
    marked = [line for line in out.splitlines() if "<- fastest within the drop" in line]
    assert len(marked) == 1 and marked[0].lstrip().startswith("70%")  # 80% is faster but 2 points worse
    assert "1.50x (met)" in out  # 0.30 ms dense / 0.20 ms sparse


def test_a_bad_block_is_named(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["sparse_banking77.py", "--run", str(tmp_path), "--block", "16by64"])
    with pytest.raises(SystemExit):
        sparse.main()
    assert "--block takes BKxBN" in capsys.readouterr().err
