"""fingerprint and build: a stable machine fingerprint, fused ONNX Runtime engines with parity, GPU
engines recorded as skipped (with the reason) where there is no GPU, and built where there is."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import yaml
from onnx import numpy_helper

from stages import build, fingerprint, quantize
from stages.model.encoder import TokenizedTexts, load_tokenizer
from stages.records import BuildManifest
from stages.runner.errors import ParamError, StageError
from stages.runtime.settings import RuntimeParams
from tests.stages.tiny import write_stage_inputs


def run_fingerprint(out: Path) -> int:
    params = out.parent / f"{out.name}.yaml"
    params.write_text(yaml.safe_dump({"fingerprint": {"ignore": []}}))
    return fingerprint.main(["--params", str(params), "--out", str(out)])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("build")
    write_stage_inputs(root, heads=2)
    (root / "data/06_prune").mkdir()
    (root / "data/06_prune/student").symlink_to(root / "data/05_train/student")
    params = root / "params.yaml"
    section = {"latency_runs": 10, "calibration_rows": 8}
    params.write_text(yaml.safe_dump({"quantize": section, "runtime": {"max_length": 16}}))
    d = root / "data"
    argv = ["--params", str(params), "--in", str(d / "06_prune"), "--augment", str(d / "03_augment")]
    assert quantize.main(argv + ["--clean", str(d / "02_clean"), "--out", str(d / "07_quantize")]) == 0
    assert run_fingerprint(d / "00_fingerprint") == 0
    return root


def run_build(root: Path, out: str, code: int = 0, **params) -> dict | None:
    section = {"latency_runs": 20, **params}
    params_file = root / f"{out}.yaml"
    params_file.write_text(yaml.safe_dump({"build": section, "runtime": {"max_length": 16, "per_channel": True}}))
    d = root / "data"
    argv = ["--params", str(params_file), "--in", str(d / "07_quantize"), "--clean", str(d / "02_clean")]
    argv += ["--fingerprint", str(d / "00_fingerprint"), "--out", str(root / out)]
    assert build.main(argv) == code
    return json.loads((root / out / "manifest.json").read_text()) if code == 0 else None


def test_fused_engines_match_the_unfused_models(quantized):
    manifest = run_build(quantized, "a")
    fp32, int8 = manifest["engines"]["onnxruntime_fp32"], manifest["engines"]["onnxruntime_int8"]
    timings = json.loads((quantized / "a" / "timings.json").read_text())["engines"]
    for name, engine in (("onnxruntime_fp32", fp32), ("onnxruntime_int8", int8)):
        assert engine["status"] == "built" and engine["parity"]["passed"]
        assert (quantized / "a" / engine["file"]).is_file()
        assert "latency_ms" not in engine and "build_seconds" not in engine  # timings live in their own file
        assert timings[name]["latency_ms"]["p50"] > 0 and timings[name]["unfused_latency_ms"]["p50"] > 0
    assert fp32["parity"]["max_abs_logit_diff"] <= 1e-4
    assert int8["parity"]["agreement"] >= 0.99
    assert fp32["fused_operators"].get("Attention") == 2  # both layers' attention fused
    # residual Add + LayerNormalization stay apart: the fused CPU kernel is slower than the two
    assert fp32["fused_operators"].get("LayerNormalization", 0) >= 2
    assert "SkipLayerNormalization" not in fp32["fused_operators"]
    graph = onnx.load(str(quantized / "a/engines/onnxruntime_int8.onnx")).graph
    assert "QAttention" in {n.op_type for n in graph.node}
    options = json.loads((quantized / "a/engines/onnxruntime.json").read_text())
    assert options["intra_op_num_threads"] == 2 and options["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert options["disabled_optimizers"] == ["SkipLayerNormFusion"]
    assert not {"Shape", "Range"} & {n.op_type for n in graph.node}  # the unused position-id chain is dropped
    assert manifest["machine"] == json.loads((quantized / "data/00_fingerprint/fingerprint.json").read_text())["digest"]


def test_fused_engine_files_are_deterministic(quantized):
    run_build(quantized, "b", gpu=[])
    run_build(quantized, "c", gpu=[])
    for name in ("onnxruntime_fp32.onnx", "onnxruntime_int8.onnx"):
        assert (quantized / "b/engines" / name).read_bytes() == (quantized / "c/engines" / name).read_bytes()


def test_gpu_engines_are_recorded_as_skipped_with_the_reason(quantized):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: see test_tensorrt_engines_on_gpu")
    manifest = run_build(quantized, "skipped", gpu=["tensorrt", "onnxruntime_cuda"])
    engines = manifest["engines"]
    for name in ("tensorrt_fp16", "tensorrt_int8", "onnxruntime_cuda_fp32"):
        assert engines[name]["status"] == "skipped"
        assert "no CUDA device" in engines[name]["reason"]
    assert engines["onnxruntime_tensorrt_fp16"]["reason"] == "route 'onnxruntime_tensorrt' is not in build.gpu"
    assert not list((quantized / "skipped/engines").glob("*.plan"))


def test_require_gpu_fails_the_stage_where_gpu_engines_are_skipped(quantized, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run_build(quantized, "strict", code=1, require_gpu=True, gpu=["onnxruntime_cuda"])
    assert "build: error: build.require_gpu: onnxruntime_cuda_fp32: skipped: no CUDA device" in capsys.readouterr().err
    assert not [f for f in (quantized / "strict").rglob("*") if f.is_file()]  # nothing written


def test_parity_failure_of_a_fused_engine_fails_naming_it(quantized, monkeypatch, capsys):
    real = build.fuse_for_ort

    def broken(src, dst):
        stats = real(src, dst)
        proto = onnx.load(str(dst))
        head = next(t for t in proto.graph.initializer if "head" in t.name and "weight" in t.name)
        head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * 1.05, head.name))
        onnx.save(proto, str(dst))
        return stats

    monkeypatch.setattr(build, "fuse_for_ort", broken)
    run_build(quantized, "broken", code=1, gpu=[])
    err = capsys.readouterr().err
    assert "build: error: parity: onnxruntime_fp32: max |logit difference|" in err and "against model.onnx" in err
    assert not [f for f in (quantized / "broken").rglob("*") if f.is_file()]


def test_bad_params_name_the_key(quantized, capsys):
    run_build(quantized, "bad", code=1, gpu=["tensorrt", "cuda"])
    assert "build.gpu: unknown route(s) ['cuda']" in capsys.readouterr().err


@pytest.mark.gpu
def test_tensorrt_engines_on_gpu(quantized):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("tensorrt")
    manifest = run_build(quantized, "gpu", require_gpu=False, timing_cache=str(quantized / "timing.cache"))
    engines = manifest["engines"]
    for name in ("tensorrt_fp16", "tensorrt_int8"):
        assert engines[name]["status"] == "built", engines[name]
        assert engines[name]["parity"]["passed"]
        assert engines[name]["profile"]["input_ids"]["max"] == [64, 64]
        assert (quantized / "gpu" / engines[name]["file"]).stat().st_size > 0
    assert (quantized / "timing.cache").stat().st_size > 0
    for name in ("onnxruntime_tensorrt_fp16", "onnxruntime_cuda_fp32"):
        engine = engines[name]
        assert engine["status"] in ("built", "skipped"), engine
        if engine["status"] == "built":
            assert engine["providers"][0] != "CPUExecutionProvider"


def test_build_engines_core_on_tiny_inputs(quantized, tmp_path):
    """The pure core, without params.yaml or the stage's folders: engines into a folder, a typed manifest."""
    q = quantized / "data/07_quantize"
    texts = TokenizedTexts(load_tokenizer(q / "tokenizer"), ["where is my parcel", "refund my money"], 16)
    folder = tmp_path / "engines"
    folder.mkdir()
    p = build.BuildParams(gpu=(), latency_runs=5)
    manifest, timings = build.build_engines(q, folder, texts, p, RuntimeParams(max_length=16), "abc")
    assert isinstance(manifest, BuildManifest) and manifest.machine == "abc"
    assert manifest.engines["onnxruntime_int8"].built and (folder / "onnxruntime_int8.onnx").is_file()
    assert BuildManifest.from_dict(manifest.to_dict()) == manifest  # written and read by the same code
    assert set(timings["engines"]) == {"onnxruntime_fp32", "onnxruntime_int8", "kernels_int8"}
    kernels = manifest.engines["kernels_int8"]
    assert kernels.built and kernels.backend == "kernels" and kernels.source == "model.int8.onnx"
    assert kernels.parity["passed"] and kernels.parity["agreement"] >= p.kernels_min_agreement
    assert kernels.model_path(folder.parent, q) == q / "model.int8.onnx"


def test_the_kernels_engine_is_held_to_onnx_runtime_and_skipped_with_the_reason(quantized, tmp_path, monkeypatch):
    import distillery_kernels

    q = quantized / "data/07_quantize"
    texts = TokenizedTexts(load_tokenizer(q / "tokenizer"), ["where is my parcel", "refund my money"], 16)
    rt = RuntimeParams(max_length=16)
    exact = build.BuildParams(gpu=(), latency_runs=5, kernels_max_logit_share=0.0)
    (tmp_path / "a").mkdir()
    with pytest.raises(StageError, match=r"parity: kernels_int8: max \|logit difference\|"):
        build.build_engines(q, tmp_path / "a", texts, exact, rt, "abc")
    (tmp_path / "b").mkdir()
    off = build.BuildParams(gpu=(), latency_runs=5, kernels=False)
    manifest, _ = build.build_engines(q, tmp_path / "b", texts, off, rt, "abc")
    assert (
        manifest.engines["kernels_int8"].status == "skipped"
        and "build.kernels" in manifest.engines["kernels_int8"].reason
    )
    monkeypatch.setattr(distillery_kernels, "available", lambda: False)
    monkeypatch.setattr(distillery_kernels, "unavailable_reason", lambda: "no compiler at install")
    (tmp_path / "c").mkdir()
    manifest, _ = build.build_engines(q, tmp_path / "c", texts, build.BuildParams(gpu=(), latency_runs=5), rt, "abc")
    assert manifest.engines["kernels_int8"].reason == "no compiler at install"


def test_the_kernels_engines_run_the_dynamic_variant_where_quantize_chose_the_static_one(quantized, tmp_path):
    """A static QDQ model.int8.onnx has no INT8 weights the engine takes: build runs the dynamic variant quantize
    also wrote (and says so in `source`), or without one skips, naming the file."""
    import shutil

    q = tmp_path / "07_quantize"
    shutil.copytree(quantized / "data/07_quantize", q)
    shutil.copyfile(q / "variants/static.onnx", q / "model.int8.onnx")
    texts = TokenizedTexts(load_tokenizer(q / "tokenizer"), ["where is my parcel", "refund my money"], 16)
    p, rt = build.BuildParams(gpu=(), latency_runs=5), RuntimeParams(max_length=16)
    (tmp_path / "a").mkdir()
    manifest, _ = build.build_engines(q, tmp_path / "a", texts, p, rt, "abc")
    kernels = manifest.engines["kernels_int8"]
    assert kernels.built and kernels.source == "variants/dynamic.onnx" and kernels.parity["passed"]
    assert kernels.model_path(tmp_path, q) == q / "variants/dynamic.onnx"
    (q / "variants/dynamic.onnx").unlink()
    (tmp_path / "b").mkdir()
    manifest, _ = build.build_engines(q, tmp_path / "b", texts, p, rt, "abc")
    kernels = manifest.engines["kernels_int8"]
    assert kernels.status == "skipped" and kernels.reason.startswith("cannot run model.int8.onnx: ")


def test_the_block_sparse_kernels_engine_needs_zero_blocks_and_matches_the_dense_one(quantized, tmp_path):
    """kernels_int8_sparse: off without build.kernels_sparse_block; skipped (saying the share) on a dense student;
    where built, the dense kernels engine's results (the same products, zero blocks skipped)."""
    q = quantized / "data/07_quantize"
    texts = TokenizedTexts(load_tokenizer(q / "tokenizer"), ["where is my parcel", "refund my money"], 16)
    rt = RuntimeParams(max_length=16)
    (tmp_path / "a").mkdir()
    manifest, _ = build.build_engines(q, tmp_path / "a", texts, build.BuildParams(gpu=(), latency_runs=5), rt, "abc")
    assert "build.kernels_sparse_block is null" in manifest.engines["kernels_int8_sparse"].reason
    (tmp_path / "b").mkdir()
    blocks = build.BuildParams(gpu=(), latency_runs=5, kernels_sparse_block=[4, 16])
    manifest, _ = build.build_engines(q, tmp_path / "b", texts, blocks, rt, "abc")
    sparse = manifest.engines["kernels_int8_sparse"]
    assert sparse.status == "skipped" and "0.0% of the INT8 layers' 4x16 weight blocks are zero" in sparse.reason
    (tmp_path / "c").mkdir()
    anyway = build.BuildParams(gpu=(), latency_runs=5, kernels_sparse_block=[8, 32], kernels_sparse_min_zero_blocks=0.0)
    manifest, timings = build.build_engines(q, tmp_path / "c", texts, anyway, rt, "abc")
    sparse, dense = manifest.engines["kernels_int8_sparse"], manifest.engines["kernels_int8"]
    assert sparse.built and sparse.block == [8, 32] and sparse.zero_blocks == 0.0
    assert sparse.parity == dense.parity and "kernels_int8_sparse" in timings["engines"]
    assert BuildManifest.from_dict(manifest.to_dict()) == manifest
    with pytest.raises(ParamError, match=r"build.kernels_sparse_block must be null or \[block_k, block_n\]"):
        build.BuildParams(kernels_sparse_block=[4, 8])
