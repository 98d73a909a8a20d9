"""flows.reproduce's comparison on lock entries made here (the pipeline runs are in test_e2e and test_publish)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.reproduce import ReproduceError, StageCheck, compare_stage, first_difference, rebuild, table
from stages.runtime.timing import relative_speed, side_by_side


def entry(deps: dict, outs: dict) -> dict:
    return {
        "deps": [{"path": p, "md5": m} for p, m in deps.items()],
        "outs": [{"path": p, "md5": m} for p, m in outs.items()],
    }


def dir_object(cache: Path, md5: str, files: dict[str, str]) -> None:
    obj = cache / md5[:2] / md5[2:]
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_text(json.dumps([{"relpath": k, "md5": v} for k, v in files.items()]))


def test_identical_outputs_pass_and_run_records_are_listed_not_compared(tmp_path):
    a = entry({"in.csv": "1"}, {"model.onnx": "aa", "timings.json": "t1"})
    b = entry({"in.csv": "1"}, {"model.onnx": "aa", "timings.json": "t2"})
    check = compare_stage("quantize", a, b, {"timings.json"}, (tmp_path, tmp_path))
    assert check.ok and check.same_inputs
    assert check.identical == ["model.onnx"] and check.records == ["timings.json"]


def test_a_differing_folder_names_its_first_differing_file(tmp_path):
    dir_object(tmp_path, "d1.dir", {"config.json": "c", "model.safetensors": "w1", "vocab.txt": "v"})
    dir_object(tmp_path, "d2.dir", {"config.json": "c", "model.safetensors": "w2", "vocab.txt": "v2"})
    a = entry({"soft.parquet": "s"}, {"data/05_train/student": "d1.dir"})
    b = entry({"soft.parquet": "s2"}, {"data/05_train/student": "d2.dir"})
    check = compare_stage("train", a, b, set(), (tmp_path, tmp_path))
    assert not check.ok and not check.same_inputs
    assert check.differ == [("data/05_train/student", "data/05_train/student/model.safetensors")]
    assert first_difference("x.json", "1", "2", tmp_path, tmp_path) == "x.json"
    assert "listing not in the DVC cache" in first_difference("f", "e1.dir", "e2.dir", tmp_path, tmp_path)
    # an output missing from one run is a difference too
    assert not compare_stage("s", entry({}, {"a": "1"}), entry({}, {}), set(), (tmp_path, tmp_path)).ok


def test_table_has_a_row_per_stage_with_its_verdict():
    ok = StageCheck("ingest", identical=["a", "b"], records=["data/x/timings.json"])
    bad = StageCheck("train", differ=[("data/05_train/student", "data/05_train/student/model.safetensors")])
    bad.same_inputs = False
    lines = table([ok, bad]).splitlines()
    assert lines[0].split()[:3] == ["stage", "outputs", "identical"]
    assert lines[2].split()[:3] == ["ingest", "2", "yes"] and "timings.json" in lines[2]
    assert "NO (inputs differed)" in lines[3] and "model.safetensors" in lines[3]


def test_rounds_compare_each_callable_with_the_reference_round_by_round():
    calls: list[str] = []
    fns = {"ref": lambda x: calls.append("ref"), "fast": lambda x: calls.append("fast")}
    samples = side_by_side(fns, [0, 1, 2], runs=4, rounds=2, warmup=0)
    assert calls == ["ref", "ref", "fast", "fast", "ref", "ref", "fast", "fast"]  # blocks, in turn
    assert all(len(v) == 4 for v in samples.values())
    speed, noise = relative_speed({"ref": [2.0] * 8, "half": [1.0] * 8}, "ref", rounds=4)
    assert speed == {"ref": 1.0, "half": 0.5} and noise == 0.0
    # a load spike in round 2 slows both alike: the ratio, and so the comparison, does not move
    ref = [1.0, 1.0, 3.0, 3.0, 1.0, 1.0, 1.0, 1.0]
    speed, noise = relative_speed({"ref": ref, "x": [0.8 * t for t in ref]}, "ref", rounds=4)
    assert speed["x"] == 0.8 and noise == 0.0
    # rounds that disagree give a noise that widens the margin of equal speed
    speed, noise = relative_speed({"ref": [1.0] * 8, "x": [1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0]}, "ref", rounds=4)
    assert noise > 0.2


def test_rebuild_refuses_what_a_commit_cannot_reproduce(tmp_path):
    lineage = {"git": {"commit": None}, "stages": [], "published_from": {"file": "m.onnx"}}
    with pytest.raises(ReproduceError, match="outside a git commit"):
        rebuild(tmp_path, lineage)
    lineage["git"] = {"commit": "abc", "modified": ["dvc.lock", "params.yaml"]}
    with pytest.raises(ReproduceError, match="uncommitted changes to params.yaml"):
        rebuild(tmp_path, lineage)
    lineage["git"]["modified"] = ["dvc.lock"]  # a run always rewrites dvc.lock: not a reason to refuse
    with pytest.raises(ReproduceError, match="no stage in lineage.json outputs m.onnx"):
        rebuild(tmp_path, lineage)
