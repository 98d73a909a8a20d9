"""bench/kernels_speed.py: each ONNX Runtime graph it times computes what the operator beside it computes (so the table
compares like with like), and the script runs end to end on a few calls (timings are not tested)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import distillery_kernels as kernels
from stages.runtime.sessions import session

SPEC = importlib.util.spec_from_file_location(
    "bench_kernels", Path(__file__).resolve().parents[2] / "bench/kernels_speed.py"
)
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


def test_the_whole_student_table_times_dense_and_sparse_engines_on_sorted_and_arrival_batches(
    tmp_path, monkeypatch, capsys
):
    """`--run DIR --model-only --block`: a project folder as quantize and build leave it (a tiny student; its INT8
    model stands in for the fused one ORT runs)."""
    import shutil

    import polars as pl

    from stages.runtime.onnx import export_onnx, quantize_dynamic_int8
    from tests.stages.tiny import dataset, tiny_teacher

    quantize, engines, clean = (tmp_path / f"data/{d}" for d in ("07_quantize", "08_build/engines", "02_clean"))
    for folder in (quantize, engines, clean):
        folder.mkdir(parents=True)
    model, tok = tiny_teacher(seed=4, heads=4)
    export_onnx(model, tok, quantize / "model.onnx", 18)
    quantize_dynamic_int8(quantize / "model.onnx", quantize / "model.int8.onnx", per_channel=True)
    shutil.copy(quantize / "model.int8.onnx", engines / "onnxruntime_int8.onnx")
    tok.save_pretrained(str(quantize / "tokenizer"))
    for split, seed in (("test", 1), ("val", 2)):
        rows = dataset(3, seed=seed)
        longer = [text + " please now" * (i % 3) for i, text in enumerate(rows["text"])]  # mixed lengths
        rows.with_columns(text=pl.Series(longer)).write_parquet(clean / f"{split}.parquet")
    out = tmp_path / "kernels.json"
    argv = ["kernels.py", "--model-only", "--run", str(tmp_path), "--block", "4x16", "--batch", "4", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(bench, "side_by_side", lambda fns, args, runs, rounds, warmup: _quick_over(fns, args))
    assert bench.main() == 0
    printed = capsys.readouterr().out
    assert "batch 1 x" not in printed and "block-sparse INT8 linear" not in printed  # --model-only
    assert "4_sorted" in printed and "4_arrival" in printed and "parity on validation (sparse)" in printed
    model = json.loads(out.read_text())["whole_model"]
    assert set(model["batch_4_arrival"]) == {f"{name}|{t}" for name in ("ort", "ours", "sparse") for t in (1, 2)}
    assert model["parity"]["sparse"] == model["parity"]["ours"]  # a dense student: the same bytes, block-sparse
    assert model["zero_blocks"] == 0.0 and 0.0 < model["padding"]["sorted"] < model["padding"]["arrival"] < 1.0
    monkeypatch.setattr(sys, "argv", ["kernels.py", "--model-only", "--run", str(tmp_path), "--block", "16"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--block takes BKxBN, e.g. 16x64; got '16'" in capsys.readouterr().err


def _quick_over(fns, inputs):
    """Each function once over the first input (milliseconds), as side_by_side returns its samples."""
    import time

    samples = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn(inputs[0])
        samples[name] = [(time.perf_counter() - start) * 1000.0]
    return samples


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
