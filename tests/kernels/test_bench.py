"""bench/kernels.py: each ONNX Runtime graph it times computes what the operator beside it computes (so the table
compares like with like), and the script runs end to end on a few calls (timings are not tested)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

import distillery_kernels as kernels
from stages.runtime.sessions import session

SPEC = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).resolve().parents[2] / "bench/kernels.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)
ops = kernels.require()


def test_ort_attention_and_layernorm_compute_what_ours_do():
    rng = np.random.default_rng(0)
    x, r, v = rng.standard_normal((3, 2, 7, bench.HIDDEN)).astype(np.float32)
    mask = np.ones((2, 7), np.int64)
    mask[1, 4:] = 0
    feed = {"x": x, "k": r, "v": v, "mask": mask.astype(np.int32)}
    theirs = session(bench.ort_graph("attention", 2, 7), 1).run(None, feed)
    ours = ops.attention(x, r, v, mask, bench.HEADS)
    np.testing.assert_allclose(ours, theirs[0], atol=1e-4)
    ones, zeros = np.ones(bench.HIDDEN, np.float32), np.zeros(bench.HIDDEN, np.float32)
    for kind in ("add_layernorm", "skip_layernorm"):
        theirs = session(bench.ort_graph(kind, 2, 7), 1).run(None, {"x": x, "r": r})[0]
        np.testing.assert_allclose(ops.add_layernorm(x, r, ones, zeros, 1e-12), theirs, atol=1e-4)


def test_ort_linear_is_the_same_quantized_product_up_to_its_per_tensor_activation_scale():
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(bench.ort_graph("linear", 1, 5, 64, 48, gelu=True))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    x = np.random.default_rng(1).standard_normal((1, 5, 64)).astype(np.float32)
    theirs = session(model.SerializeToString(), 1).run(None, {"x": x})[0]
    ours = ops.linear(x, ops.PackedWeights(weights["q"], weights["s"], weights["b"]), gelu=True)
    assert ours.shape == theirs.shape == (1, 5, 48)
    assert np.abs(ours - theirs).max() < 0.02 * np.abs(theirs).max()


def test_the_script_prints_both_tables_and_writes_its_figures(tmp_path, monkeypatch, capsys):
    out = tmp_path / "kernels.json"
    monkeypatch.setattr(sys, "argv", ["kernels.py", "--runs", "16", "--batch", "2", "--json", str(out)])
    monkeypatch.setattr(bench, "side_by_side", lambda fns, args, runs, rounds, warmup: _quick(fns))
    assert bench.main() == 0
    printed = capsys.readouterr().out
    assert "batch 1 x 13 tokens" in printed and "batch 2 x 13 tokens" in printed and "target >= 1.7x" in printed
    figures = json.loads(out.read_text())
    assert {row["op"] for row in figures["batch_1"]} == {*bench.LINEARS, "add + LayerNorm", "attention"}
    assert all(row["ours_1t_us"] > 0 and row["ort_2t_us"] > 0 for row in figures["batch_2"])
    assert "block-sparse INT8 linear, batch 1 x 13 tokens" in printed
    sparse = figures["sparse_batch_1"]
    assert len(sparse) == 2 * len(bench.SPARSE_BLOCKS) * len(bench.SPARSITIES)
    # the zeroed share of blocks is drawn at random around each target
    assert all(abs(row["zero_blocks"] - row["sparsity"]) < 0.1 and row["sparse_2t_us"] > 0 for row in sparse)


def _quick(fns):
    """Two timed calls of each, as side_by_side returns them (milliseconds)."""
    import time

    samples = {}
    for name, fn in fns.items():
        samples[name] = []
        for _ in range(2):
            start = time.perf_counter()
            fn(None)
            samples[name].append((time.perf_counter() - start) * 1000.0)
    return samples
