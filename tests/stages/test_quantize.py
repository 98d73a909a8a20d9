"""quantize on a tiny student: parity guard, INT8 variants, accuracy-aware choice, identical bytes."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import yaml
from onnx import numpy_helper

from stages import quantize
from stages.model.encoder import TokenizedTexts, load
from stages.runner.errors import StageError
from stages.runtime.onnx import export_onnx
from tests.stages.tiny import write_stage_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quantize")
    write_stage_inputs(root, heads=2)
    (root / "data/06_prune").mkdir()
    (root / "data/06_prune/student").symlink_to(root / "data/05_train/student")
    return root


def run_quantize(root: Path, out: str, code: int = 0, **params) -> dict | None:
    section = {"latency_runs": 20, "calibration_rows": 8, **params}
    params_file = root / f"{out}.yaml"
    params_file.write_text(yaml.safe_dump({"quantize": section, "runtime": {"max_length": 16}}))
    d = root / "data"
    argv = ["--params", str(params_file), "--in", str(d / "06_prune"), "--augment", str(d / "03_augment")]
    argv += ["--clean", str(d / "02_clean"), "--out", str(root / out)]
    assert quantize.main(argv) == code
    return json.loads((root / out / "metrics.json").read_text()) if code == 0 else None


def test_exports_quantizes_and_records_the_frontier(inputs):
    metrics = run_quantize(inputs, "a")
    out = inputs / "a"
    assert {p.name for p in (out / "variants").iterdir()} == {"dynamic.onnx", "static.onnx"}
    assert metrics["parity"]["max_abs_logit_diff"] <= 1e-4
    assert set(metrics["frontier"]) == {"fp32", "dynamic", "static"}
    assert metrics["chosen"] in ("dynamic", "static")
    chosen = (out / "variants" / f"{metrics['chosen']}.onnx").read_bytes()
    assert (out / "model.int8.onnx").read_bytes() == chosen
    timings = json.loads((out / "timings.json").read_text())
    for name in ("dynamic", "static"):
        assert {"accuracy", "size_mb", "accuracy_drop_points"} <= set(metrics["frontier"][name])
        assert "latency_ms" not in metrics["frontier"][name]  # timings live in their own file
        assert timings["latency_ms"][name]["p50"] > 0 and timings["time_vs_fp32"][name] > 0
        assert 0.0 <= metrics["frontier"][name]["agreement_with_fp32"] <= 1.0
    assert timings["noise"] >= 0 and timings["fastest"] in ("dynamic", "static")
    graph = onnx.load(str(out / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in dims)  # batch and sequence are dynamic


def test_two_runs_write_identical_model_files(inputs):
    run_quantize(inputs, "b")
    run_quantize(inputs, "c")
    for name in ("model.onnx", "model.int8.onnx", "variants/dynamic.onnx", "variants/static.onnx", "metrics.json"):
        assert (inputs / "b" / name).read_bytes() == (inputs / "c" / name).read_bytes(), name
    assert (inputs / "b/timings.json").is_file()  # the timings, the one file allowed to differ


def test_calibration_reads_a_validation_split_of_any_size(inputs):
    _, tok, _ = load(inputs / "data/05_train/student")
    texts = TokenizedTexts(tok, [f"query number {i}" for i in range(50)], 16)  # not a multiple of 16
    reader = quantize._Rows(texts, rows=256)  # more calibration rows asked for than there are
    sizes = []
    while (batch := reader.get_next()) is not None:
        sizes.append(batch["input_ids"].shape[0])
    assert sizes == [16, 16, 16, 2]
    assert [b["input_ids"].shape[0] for b in quantize._Rows(texts, rows=20).batches] == [16, 4]


def test_parity_check_fails_on_a_broken_export(inputs, tmp_path):
    model, tok, _ = load(inputs / "data/05_train/student")
    path = tmp_path / "m.onnx"
    export_onnx(model, tok, path, 18)
    proto = onnx.load(str(path))
    head = next(t for t in proto.graph.initializer if "head" in t.name and "weight" in t.name)
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * 1.05, head.name))
    onnx.save(proto, str(path))
    texts = TokenizedTexts(tok, ["where is my parcel", "cancel my plan"], 16)
    with pytest.raises(StageError, match=r"ONNX parity: max \|logit difference\| .* exceeds quantize.parity_tolerance"):
        quantize.check_parity(model, path, texts, 1e-4)


def frontier(**rows):
    return {
        name: {"accuracy": acc, "accuracy_drop_points": drop, "agreement_with_fp32": agree}
        for name, (acc, drop, agree) in rows.items()
    }


def test_choice_is_the_most_accurate_within_budget_then_closest_to_fp32_then_order():
    f = frontier(dynamic=(0.90, 0.4, 0.99), static=(0.91, 1.4, 0.98))
    assert quantize.choose(f, 0.5)[:2] == ("dynamic", True)  # static is more accurate but over budget
    assert quantize.choose(f, 2.0)[:2] == ("static", True)
    f = frontier(dynamic=(0.90, 0.2, 0.99), static=(0.90, 0.2, 0.97))
    assert quantize.choose(f, 0.5)[0] == "dynamic"  # equal accuracy: the closer to fp32
    f = frontier(static=(0.90, 0.2, 0.99), dynamic=(0.90, 0.2, 0.99))
    assert quantize.choose(f, 0.5)[0] == "static"  # all equal: the earlier in quantize.variants


def test_a_missed_budget_keeps_the_most_accurate_and_says_so(inputs):
    f = frontier(dynamic=(0.80, 3.0, 0.9), static=(0.82, 1.0, 0.9))
    name, met, why = quantize.choose(f, 0.5)
    assert (name, met) == ("static", False) and "no INT8 variant within 0.5 points" in why


def test_strict_fails_when_the_budget_is_missed(inputs, monkeypatch, capsys):
    monkeypatch.setattr(quantize, "choose", lambda *a: ("dynamic", False, "no INT8 variant within 0.0 points"))
    run_quantize(inputs, "strict", code=1, strict=True, variants=["dynamic"])
    assert "quantize: error: quantize.strict: no INT8 variant" in capsys.readouterr().err
    assert not (inputs / "strict").exists()  # fails closed: nothing written


def test_qat_adds_a_variant(inputs):
    metrics = run_quantize(inputs, "qat", qat=True, qat_epochs=1, variants=["dynamic"])
    assert set(metrics["frontier"]) == {"fp32", "dynamic", "qat"}
    assert metrics["qat"]["best_epoch"] == 1
    assert (inputs / "qat/variants/qat.onnx").is_file()


def test_quantize_core_in_memory(inputs):
    """The pure core on a tiny model and frame: serialized models out, a typed report, no paths."""
    import polars as pl

    from stages.records import QuantizeReport
    from stages.runtime.settings import RuntimeParams

    model, tok, labels = load(inputs / "data/05_train/student")
    val = pl.read_parquet(inputs / "data/02_clean/val.parquet")
    p = quantize.QuantizeParams(variants=("dynamic",), latency_runs=10, rounds=2, calibration_rows=8)
    q = quantize.quantize(model, tok, val, None, labels, p, RuntimeParams(max_length=16))
    assert q.report.chosen == "dynamic" and q.chosen == q.variants["dynamic"]
    assert q.fp32[:4] != q.chosen[:4] or len(q.fp32) != len(q.chosen)
    assert QuantizeReport.from_dict(q.report.to_dict()) == q.report
    assert set(q.report.frontier) == {"fp32", "dynamic"} and "fastest" in q.timings
