"""distill on a tiny teacher built here (no download): fine-tuning learns, soft labels cover every row,
`main` writes the teacher and its metrics, a checkpoint with other labels is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages import distill
from stages.model.encoder import save
from stages.model.training import OptimParams, finetune
from tests.stages.tiny import LABELS, dataset, tiny_teacher, write_stage_inputs


def test_teacher_learns_and_writes_soft_labels():
    teacher, tok = tiny_teacher()
    train, val = dataset(12, 0), dataset(4, 1)
    result = finetune(teacher, tok, train, val, LABELS, OptimParams(epochs=8, lr=3e-3, batch_size=8, max_length=16))
    assert result.best_val_accuracy > 0.8 and result.summary()["engine"]["name"] == "torch"
    soft = distill.soft_labels(teacher, tok, train, 16)
    assert soft.columns == ["id", "logits", "embedding"] and soft.height == train.height
    pred = np.array(soft["logits"].to_list()).argmax(1)
    assert (pred == np.array([LABELS[x] for x in train["label"]])).mean() > 0.8


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distill")
    write_stage_inputs(root, heads=2)
    return root


def run_distill(root: Path, out: str, checkpoint: Path, code: int = 0) -> dict | None:
    params = root / f"{out}.yaml"
    section = {"teacher_checkpoint": str(checkpoint), "optim": {"max_length": 16}}
    params.write_text(yaml.safe_dump({"distill": section, "training": {}}))
    d = root / "data"
    argv = ["--params", str(params), "--in", str(d / "03_augment"), "--clean", str(d / "02_clean")]
    assert distill.main([*argv, "--out", str(root / out)]) == code
    return json.loads((root / out / "metrics.json").read_text()) if code == 0 else None


def test_main_with_a_checkpoint_writes_the_teacher_and_its_soft_labels(inputs):
    metrics = run_distill(inputs, "a", inputs / "data/05_train/student")
    assert metrics["training"] == {"skipped": f"teacher_checkpoint {inputs / 'data/05_train/student'}"}
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0 and metrics["parameters"] > 0
    assert (inputs / "a/teacher/model.safetensors").is_file() and (inputs / "a/soft_labels.parquet").is_file()
    assert run_distill(inputs, "b", inputs / "data/05_train/student") is not None
    assert (inputs / "a/soft_labels.parquet").read_bytes() == (inputs / "b/soft_labels.parquet").read_bytes()


def test_a_checkpoint_with_other_labels_is_refused_and_nothing_written(inputs, tmp_path, capsys):
    teacher, tok = tiny_teacher()
    save(teacher, tok, {"x": 0, "y": 1, "z": 2}, tmp_path / "other")
    run_distill(inputs, "bad", tmp_path / "other", code=1)
    assert "its labels.json differs from the data's" in capsys.readouterr().err
    assert not (inputs / "bad").exists()


def test_bad_params_are_named():
    with pytest.raises(ValueError, match="distill.train_rows must be original or all"):
        distill.DistillParams(train_rows="some")
