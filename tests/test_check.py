"""`python -m stages.check`: every params section validated up front, every error at once, named section.key."""

from __future__ import annotations

import subprocess
import sys

import yaml

from stages.check import check, section_classes
from tests.conftest import ROOT


def test_the_project_params_are_valid_and_every_stage_section_is_known():
    classes = section_classes(ROOT / "dvc.yaml")
    assert {"ingest", "clean", "train", "kd", "training", "runtime", "publish", "lineage"} <= set(classes)
    assert classes["runtime"][1] == ["quantize", "build", "benchmark"]  # the stages that read it
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert check(doc, classes) == []


def test_every_error_is_reported_at_once_naming_section_and_key(tmp_path):
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    doc["clean"]["near_dup_threshold"] = "high"
    doc["train"]["optim"]["epoch"] = doc["train"]["optim"].pop("epochs")
    doc["publish"]["gates"]["max_p95_ms"] = [1]
    doc["augmnt"] = doc.pop("augment")
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "stages.check", "--params", str(bad)], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 1
    err = proc.stderr
    assert "augmnt: unknown section (did you mean augment?)" in err
    assert "augment: missing (read by augment)" in err
    assert "clean.near_dup_threshold" in err and "'high'" in err
    assert "train.optim" in err and "epoch (did you mean epochs?)" in err
    assert "publish.gates.max_p95_ms must be a number" in err
    assert "5 error(s)" in err and "nothing was run" in err
