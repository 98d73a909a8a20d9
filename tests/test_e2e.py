"""The pipeline end to end through DVC, on a copy of the project and the embedded demo data."""

from __future__ import annotations

import json

import yaml

from tests.conftest import copy_project, dvc


def test_repro_then_clean_status_then_only_downstream_of_a_param_change(tmp_path):
    root = copy_project(tmp_path / "project")
    first = dvc(root, "repro")
    for stage in ("ingest", "clean", "augment", "distill", "train"):
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
    assert json.loads(dvc(root, "status", "--json").stdout) == {}

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["clean"]["near_dup_threshold"] = 0.8
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = dvc(root, "repro")
    assert "Stage 'ingest' didn't change, skipping" in second.stdout
    assert "Running stage 'clean'" in second.stdout
    assert json.loads(dvc(root, "status", "--json").stdout) == {}

    params["augment"]["seed"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = dvc(root, "repro")
    assert "Stage 'ingest' didn't change, skipping" in third.stdout
    assert "Stage 'clean' didn't change, skipping" in third.stdout
    assert "Running stage 'augment'" in third.stdout
