"""The pipeline end to end through DVC, on a copy of the project and the embedded demo data."""

from __future__ import annotations

import json

import yaml

from tests.conftest import copy_project, dvc, pending


def test_repro_then_clean_status_then_only_downstream_of_a_param_change(tmp_path):
    root = copy_project(tmp_path / "project", quick_benchmark=True)
    first = dvc(root, "repro")
    for stage in ("fingerprint", "ingest", "clean", "augment", "distill", "train", "build", "benchmark", "publish"):
        assert f"Running stage '{stage}'" in first.stdout
    for rel in (
        "data/01_ingest/train.parquet",
        "data/02_clean/train.parquet",
        "data/02_clean/labels.json",
        "data/03_augment/train.parquet",
    ):
        assert (root / rel).is_file(), rel
    clean_report = json.loads((root / "data/02_clean/clean.json").read_text())
    assert clean_report["labels"] == 12
    assert pending(root) == {}
    again = dvc(root, "repro")  # the fingerprint reruns, writes the same bytes: nothing after it does
    assert "Running stage 'fingerprint'" in again.stdout
    assert "Stage 'build' didn't change, skipping" in again.stdout
    manifest = json.loads((root / "data/08_build/manifest.json").read_text())
    assert manifest["engines"]["onnxruntime_int8"]["status"] == "built"
    bench = json.loads((root / "data/09_benchmark/metrics.json").read_text())
    expected = {"teacher_fp32", "teacher_int8", "tfidf_logreg", "student_int8", "onnxruntime_int8"}
    assert expected <= set(bench["variants"]) and bench["candidate"] in bench["variants"]
    # Another machine, as DVC sees it: a different fingerprint file rebuilds the engines and what follows.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["fingerprint"]["ignore"] = ["software.torch"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    moved = dvc(root, "repro")
    assert "Running stage 'build'" in moved.stdout and "Running stage 'benchmark'" in moved.stdout
    assert "Stage 'quantize' didn't change, skipping" in moved.stdout

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["clean"]["near_dup_threshold"] = 0.8
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = dvc(root, "repro")
    assert "Stage 'ingest' didn't change, skipping" in second.stdout
    assert "Running stage 'clean'" in second.stdout
    assert pending(root) == {}

    params["augment"]["seed"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = dvc(root, "repro")
    assert "Stage 'ingest' didn't change, skipping" in third.stdout
    assert "Stage 'clean' didn't change, skipping" in third.stdout
    assert "Running stage 'augment'" in third.stdout
