"""The pipeline end to end through DVC, on a copy of the project and the embedded demo data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.reproduce import rerun, table
from tests.conftest import copy_project, dvc, pending

ROOT = Path(__file__).resolve().parents[1]


def machine_strings(root: Path) -> dict[str, bytes]:
    """What would tie an artifact to this machine and checkout: the project folder, the environment's
    folder, the home folder and the host name (when long enough not to occur by chance in weights)."""
    found = {"project root": str(root.resolve()), "environment": sys.prefix, "home": str(Path.home())}
    host = socket.gethostname()
    if len(host) >= 6:
        found["hostname"] = host
    if os.environ.get("USER", "") not in ("", "root") and len(os.environ["USER"]) >= 4:
        found["user"] = f"/{os.environ['USER']}/"
    return {k: v.encode() for k, v in found.items()}


def scan_outputs(root: Path) -> list[str]:
    """Every file a run wrote (stage outputs, the registry), searched for `machine_strings`."""
    needles = machine_strings(root)
    hits = []
    files = [p for p in (root / "data").rglob("*") if p.is_file() and not p.is_relative_to(root / "data/sample")]
    files += [p for p in (root / "registry").rglob("*") if p.is_file()]
    for path in files:
        data = path.read_bytes()
        hits += [f"{path.relative_to(root)}: {what}" for what, needle in needles.items() if needle in data]
    return hits


@pytest.mark.slow
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
    assert len(list((root / "data").rglob("*.onnx"))) >= 5 and (root / "registry").is_dir()
    assert scan_outputs(root) == []  # no path, home or host name inside any output or published file
    # bench/students_speed.py times runs' students side by side (here the run beside itself): a row per student
    # and engine, the kernels engine's test accuracy, ratios against the first student's kernels row
    speed = subprocess.run([sys.executable, str(ROOT / "bench/students_speed.py"), f"today={root}", f"new={root}",
                            "--calls", "80", "--rounds", "4"], capture_output=True, text=True)  # fmt: skip
    assert speed.returncode == 0, speed.stderr[-3000:]
    rows = {tuple(line.split()[:2]): line.split() for line in speed.stdout.splitlines()[2:]}
    assert set(rows) == {(s, e) for s in ("today", "new") for e in ("kernels", "ort_int8")}, speed.stdout
    assert rows[("today", "kernels")][5] == "1.000" and rows[("today", "kernels")][2] == rows[("new", "kernels")][2]
    # Reproducible: every stage through quantize, rerun on the same inputs, writes the same bytes.
    checks = rerun(root, until="quantize")
    assert [c.stage for c in checks] == ["ingest", "clean", "augment", "distill", "train", "prune", "quantize"]
    assert all(c.ok for c in checks), table(checks)
    assert sum(len(c.identical) for c in checks) >= 20 and pending(root) == {}
    again = dvc(root, "repro")  # the fingerprint reruns, writes the same bytes: nothing after it does
    assert "Running stage 'fingerprint'" in again.stdout
    assert "Stage 'build' didn't change, skipping" in again.stdout
    manifest = json.loads((root / "data/08_build/manifest.json").read_text())
    assert manifest["engines"]["onnxruntime_int8"]["status"] == "built"
    bench = json.loads((root / "data/09_benchmark/metrics.json").read_text())
    expected = {"teacher_fp32", "teacher_int8", "tfidf_logreg", "student_int8", "onnxruntime_int8"}
    assert expected <= set(bench["variants"]) and {"student_int8", "onnxruntime_int8"} <= set(bench["publishable"])
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
