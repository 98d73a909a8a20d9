"""bench/int8_speed.py's kernel graphs: each runs and computes what its name says (timings are not tested)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from stages.runtime.sessions import session

SPEC = importlib.util.spec_from_file_location("int8_speed", Path(__file__).resolve().parents[1] / "bench/int8_speed.py")
int8_speed = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(int8_speed)


def run(kind: str, rows: int = 5, k: int = 8, n: int = 12) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    sess = session(int8_speed._graph(kind, rows, k, n), threads=1)
    rng = np.random.default_rng(3)
    feed = {i.name: rng.standard_normal((1, rows, k)).astype(np.float32) for i in sess.get_inputs()}
    return sess.run(None, feed)[0], feed


def test_int8_matmul_approximates_the_fp32_one():
    fp32, feed = run("fp32")
    int8, _ = run("int8")
    assert fp32.shape == int8.shape == (1, 5, 12)
    assert np.abs(fp32 - int8).max() < 0.05 * np.abs(fp32).max()


def test_both_layernorm_forms_compute_the_same():
    fused, feed = run("skip_layernorm")
    plain, _ = run("add_layernorm")
    total = feed["x"] + feed["r"]
    expected = (total - total.mean(-1, keepdims=True)) / np.sqrt(total.var(-1, keepdims=True) + 1e-12)
    np.testing.assert_allclose(plain, expected, atol=1e-4)
    np.testing.assert_allclose(fused, expected, atol=1e-4)


def test_kernel_table_has_every_kernel_on_every_thread_count():
    table = int8_speed.kernel_table(rows=4, k=8, n=12, runs=16)
    assert set(table) == set(int8_speed.KERNELS)
    assert all(set(v) == set(int8_speed.THREADS) and min(v.values()) > 0 for v in table.values())
