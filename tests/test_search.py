"""The student search (flows.search) and per-epoch tracking (stages.runner.tracking): the space, the choice,
the pruning hook, and (slow) a 3-trial study on the demo data whose trials are DVC experiments, resumed by
two workers sharing its SQLite study."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.search import Dimension, SearchParams, choose, default_values, front_numbers, overrides, set_args
from stages.runner.errors import ParamError
from stages.runner.tracking import SEARCH_ENV, EpochTracker, TrialPruned
from tests.conftest import copy_project, dvc

SPACE = {"train.teacher_layers": {"choice": ["0,5", "2,5"]}, "prune.ffn": {"low": 0.0, "high": 0.4, "step": 0.2}}


def test_space_keys_parse_and_bad_ones_are_named():
    assert Dimension.parse("kd.alpha", {"low": 0.3, "high": 0.9}).is_int is False
    assert Dimension.parse("train.optim.epochs", {"low": 2, "high": 8}).is_int is True
    assert Dimension.parse("kd.temperature", {"choice": [1.0, 2.0]}).choices == (1.0, 2.0)
    with pytest.raises(ParamError, match=r"search.space.kd.alpha: low and high must be numbers with low < high"):
        Dimension.parse("kd.alpha", {"low": 0.9, "high": 0.3})
    with pytest.raises(ParamError, match=r"search.space.train.lr: log ranges need low > 0"):
        Dimension.parse("train.lr", {"low": 0, "high": 1, "log": True})
    with pytest.raises(ParamError, match=r"search.space.x.choice: \[0, 5\] is not a number"):
        Dimension.parse("x", {"choice": [[0, 5]]})
    with pytest.raises(ParamError, match="search.space is empty"):
        SearchParams(space={})
    with pytest.raises(ParamError, match="search.sampler must be one of"):
        SearchParams(space=SPACE, sampler="grid")


def test_teacher_layers_set_the_layer_count_and_values_become_dvc_set_params():
    values = {"train.teacher_layers": "0,3,5", "kd.alpha": 0.5, "augment.per_row": 0}
    assert overrides(values)["train.layers"] == 3
    assert set_args(values) == ["-S", "augment.per_row=0", "-S", "kd.alpha=0.5", "-S", "train.layers=3",
                                "-S", "train.teacher_layers=[0, 3, 5]"]  # fmt: skip
    # what the workspace already holds is left out: teacher_layers null with 2 layers is [0, 5]
    doc = {"train": {"layers": 2, "teacher_layers": None}, "kd": {"alpha": 0.5}, "augment": {"per_row": 1}}
    assert set_args({**values, "train.teacher_layers": "0,5"}, doc) == ["-S", "augment.per_row=0"]
    assert set_args({**values, "train.teacher_layers": "1,5"}, doc)[-2:] == ["-S", "train.teacher_layers=[1, 5]"]


def test_the_current_params_are_trial_zero(tmp_path):
    doc = {"train": {"layers": 2, "teacher_layers": None}, "prune": {"ffn": 0.4}, "kd": {"alpha": 0.7}}
    space = {k: Dimension.parse(k, v) for k, v in {**SPACE, "kd.alpha": {"choice": [0.5, 0.9]}}.items()}
    # teacher_layers null is train's evenly spaced default; alpha 0.7 is not a choice, so Optuna samples it
    assert default_values(space, doc, tmp_path) == {"train.teacher_layers": "0,5", "prune.ffn": 0.4}


def test_the_choice_is_the_most_accurate_trial_within_the_budget():
    def row(n, acc, ms, feasible=True, state="COMPLETE"):
        return {"number": n, "state": state, "val_accuracy": acc, "latency_ms": ms, "feasible": feasible}

    rows = [row(0, 0.90, 0.30), row(1, 0.92, 0.40), row(2, 0.95, 0.90, feasible=False), row(3, 0.92, 0.35),
            row(4, 0.89, 0.20), row(5, None, None, feasible=False, state="PRUNED")]  # fmt: skip
    assert front_numbers(rows) == {0, 3, 4}
    assert choose(rows)["number"] == 3  # as accurate as 1, faster; 2 is over the budget
    assert choose([rows[2], rows[5]]) is None


def test_epochs_go_to_dvclive_and_a_search_trial_is_pruned(tmp_path, monkeypatch):
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s-epochs", storage=storage, direction="maximize")
    trial = study.ask()
    spec = {"storage": storage, "study": "s-epochs", "trial_id": trial._trial_id,
            "pruner": {"kind": "threshold", "lower": 0.5}}  # fmt: skip
    monkeypatch.setenv(SEARCH_ENV, json.dumps(spec))
    tracker = EpochTracker(tmp_path / "dvclive", "train", tmp_path / "params.yaml", epochs=3)
    tracker(1, {"loss": 1.5, "lr": 1e-4, "val_accuracy": 0.6})
    with pytest.raises(TrialPruned, match="trial pruned at epoch 2"):
        tracker(2, {"loss": 1.2, "lr": 5e-5, "val_accuracy": 0.4})
    stored = study.trials[0]
    assert stored.intermediate_values == {1: 0.6, 2: 0.4} and stored.user_attrs["pruned_at_epoch"] == 2
    # the last epoch is reported, never pruned: the rest of the trial costs less than it tells
    spec["trial_id"] = study.ask()._trial_id
    monkeypatch.setenv(SEARCH_ENV, json.dumps(spec))
    last = EpochTracker(tmp_path / "dvclive-last", "train", tmp_path / "params.yaml", epochs=1)
    last(1, {"loss": 1.5, "lr": 1e-4, "val_accuracy": 0.1})
    assert study.trials[1].intermediate_values == {1: 0.1}
    assert json.loads((tmp_path / "dvclive/metrics.json").read_text()) == {
        "loss": 1.2, "lr": 5e-5, "val_accuracy": 0.4, "step": 2}  # fmt: skip
    # one row per epoch, no timestamps: the same inputs give the same bytes
    assert (tmp_path / "dvclive/plots/metrics/val_accuracy.tsv").read_text() == "step\tval_accuracy\n1\t0.6\n2\t0.4\n"
    monkeypatch.delenv(SEARCH_ENV)
    (tmp_path / "params.yaml").write_text("tracking:\n  mlflow_uri: file:./mlruns\n")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        with pytest.raises(ParamError, match="tracking.mlflow_uri is set but mlflow is not installed"):
            EpochTracker(tmp_path / "live2", "train", tmp_path / "params.yaml")


def tiny_search_project(root: Path) -> Path:
    """The demo project with 1-2 epoch trainings, a 2-key space and quick timings, committed and built
    through quantize (the workspace's INT8 model is the timing reference)."""
    copy_project(root)
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["distill"]["optim"]["epochs"] = 1
    p["train"]["optim"]["epochs"] = 2
    p["prune"]["optim"]["epochs"] = 1
    p["prune"]["ffn"] = 0.4  # on SPACE's grid: trial 0 (the workspace's params) is a point of the space
    p["quantize"].update(latency_runs=40, variants=["dynamic"])
    p["search"].update(trials=3, latency_runs=40, max_latency_ms=50.0, space=SPACE, pruner="none")
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git[:1], "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "demo"], cwd=root, check=True)
    dvc(root, "repro", "quantize")
    subprocess.run([*git[:1], "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "built"], cwd=root, check=True)
    return root


def exp_names(root: Path) -> dict[str, dict]:
    """`dvc exp show --json`: experiment name -> its params.yaml values and metrics files."""
    shown = json.loads(dvc(root, "exp", "show", "--json").stdout)
    out = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name"):
                    out[rev["name"]] = rev["data"]
    return out


def test_two_workers_writing_the_plot_at_once_both_succeed(tmp_path, monkeypatch):
    """Workers sharing a study each write front.png; one writing while the other is mid-write must not take
    the other's temporary file (a shared temporary name failed the second rename)."""
    from matplotlib.figure import Figure

    from flows import search as mod

    def row(n, acc, ms):
        return {"number": n, "state": "COMPLETE", "val_accuracy": acc, "latency_ms": ms, "feasible": True,
                "on_front": True}  # fmt: skip

    rows, path = [row(0, 0.9, 0.3), row(1, 0.92, 0.4)], tmp_path / "front.png"
    p = SearchParams(max_latency_ms=1.0, space=SPACE)
    save, inner = Figure.savefig, []

    def savefig(fig, fname, *args, **kwargs):
        save(fig, fname, *args, **kwargs)
        if not inner:  # the other worker writes its plot between this one's write and its rename
            inner.append(fname)
            mod.front_png(rows, p, rows[1], tmp_path, path)

    monkeypatch.setattr(Figure, "savefig", savefig)
    mod.front_png(rows, p, rows[0], tmp_path, path)
    assert inner and path.stat().st_size > 10_000 and sorted(x.name for x in tmp_path.iterdir()) == ["front.png"]


@pytest.mark.slow
def test_a_study_of_dvc_experiments_resumes_with_two_workers(tmp_path, prefect_harness):
    from flows.search import search

    root = tiny_search_project(tmp_path / "project")
    first = search(root=str(root))
    assert first["trials"] == 3 and first["states"] == {"COMPLETE": 3}, first
    chosen = first["chosen"]
    assert 0 < first["test"]["accuracy"] <= 1 and first["test"]["number"] == chosen["number"]
    shown = exp_names(root)
    assert {f"distillery-student-t00{i}" for i in range(3)} <= set(shown)
    t1 = shown["distillery-student-t001"]
    assert "train" in t1["params"]["params.yaml"]["data"] and t1["metrics"]["data/05_train/dvclive/metrics.json"]
    out = root / "search" / "distillery-student"
    assert (out / "front.png").stat().st_size > 10_000 and "| **chosen** |" in (out / "trials.md").read_text()
    # trial 0 is the current params: train.teacher_layers null is [0, 5]; prune.ffn 0.4
    rows = (out / "trials.csv").read_text().splitlines()
    assert rows[1].startswith("0,COMPLETE,distillery-student-t000,") and rows[1].endswith(',0.4,"0,5",')

    # two workers resume the same SQLite study at once: trials 3 and 4, nothing rerun or lost
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "flows.search", "--trials", "1"]
    workers = [subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]  # fmt: skip
    logs = [w.communicate(timeout=900)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(x[-3000:] for x in logs)
    import optuna

    db = f"sqlite:///{out.parent / 'distillery-student.db'}"
    study = optuna.load_study(study_name="distillery-student", storage=db)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3, 4]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert {"distillery-student-t003", "distillery-student-t004"} <= set(exp_names(root))
    # the first three trials are as they were: values, and the test score taken once
    assert [t.values for t in study.trials[:3]] == [[r["val_accuracy"], r["latency_ms"]] for r in first["rows"]]
    # trial 0 ran no stage: its epochs, taken from the workspace's DVCLive plot, are in the pruner's study
    epochs = optuna.load_study(study_name="distillery-student-epochs", storage=db).trials
    curve = (root / "data/05_train/dvclive/plots/metrics/val_accuracy.tsv").read_text().splitlines()[1:]
    assert epochs[0].intermediate_values == {int(s): float(v) for s, v in (line.split("\t") for line in curve)}

    # a pruner that stops every trial after its first epoch: the trial is PRUNED, train wrote nothing
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["search"].update(pruner="threshold", pruner_threshold=1.01, pruner_warmup_epochs=0)
    p["train"]["optim"]["seed"] = 1  # outside the space: train reruns whatever point the sampler picks
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    last = search(root=str(root), trials=1)
    pruned = last["rows"][5]
    assert (pruned["state"], pruned["pruned_at_epoch"]) == ("PRUNED", 1)
    log = (out / "logs" / "distillery-student-t005.log").read_text()
    assert "search: trial pruned at epoch 1" in log and "distillery-student-t005" not in exp_names(root)
    assert last["test"] == first["test"] or last["chosen"]["number"] != first["chosen"]["number"]
