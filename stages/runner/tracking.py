"""Per-epoch tracking of a training run: DVCLive, MLflow (optional) and a search trial's pruning hook.

- DVCLive, always: the stage writes `<out>/dvclive/` (`metrics.json`, the last epoch's figures, and
  `plots/metrics/*.tsv`, one row per epoch) as a declared output, so `dvc exp show` lists the figures and
  `dvc plots diff` draws the curves of any two runs. No timestamps, no run names: the files are the same
  on every run of the same inputs. DVCLive's own experiment saving and dvc.yaml editing are off (the stage
  runs under `dvc repro` or `dvc exp run`, which record the experiment themselves).
- MLflow, when `tracking.mlflow_uri` is set in params.yaml (off by default; needs `pip install mlflow`): a
  run per stage run in experiment `tracking.mlflow_experiment`, the same per-epoch metrics. No stage tracks
  the `tracking` section, so turning it on reruns nothing.
- A search trial (`flows.search` sets `DISTILLERY_SEARCH_TRIAL`): each epoch's validation accuracy is
  reported to the study's Optuna trial, and when its pruner says so the stage stops with `TrialPruned` (no
  output written). A completed trial is unaffected, so its outputs are those of a plain run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stages.runner.errors import ParamError, StageError
from stages.runner.params import from_dict

SEARCH_ENV = "DISTILLERY_SEARCH_TRIAL"


class TrialPruned(StageError):
    """The search's pruner stopped this trial: its per-epoch validation accuracy was weak."""


@dataclass(frozen=True)
class TrackingParams:
    """params.yaml `tracking:` (read by this module, tracked by no stage)."""

    mlflow_uri: str | None = None  # e.g. http://mlflow:5000 or file:./mlruns; None: no MLflow
    mlflow_experiment: str = "distillery"

    def __post_init__(self) -> None:
        if self.mlflow_uri is not None and not isinstance(self.mlflow_uri, str):
            raise ParamError(f"tracking.mlflow_uri must be a URI string or null, got {self.mlflow_uri!r}")


def read_tracking(params_file: str | Path) -> TrackingParams:
    path = Path(params_file)
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    section = (doc or {}).get("tracking") or {}
    if not isinstance(section, dict):
        raise ParamError(f"tracking: must be a mapping, got {section!r}")
    return from_dict(TrackingParams, section, "tracking")


def study_storage(url: str, heartbeat_s: int | None = None, grace_s: int | None = None) -> Any:
    """Optuna's storage for a SQLAlchemy URL; SQLite waits up to a minute for a lock (several workers). With
    `heartbeat_s`, running trials beat, and one silent for `grace_s` is marked failed (its worker died)."""
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s, grace_period=grace_s)


def make_pruner(spec: dict[str, Any]) -> Any:
    """An Optuna pruner from the search's settings: {"kind": "median", "startup": trials that complete before
    any is pruned, "warmup": epochs every trial runs}, {"kind": "threshold", "lower": accuracy floor,
    "warmup": ...} or {"kind": "none"}."""
    import optuna

    # epochs count from 1 and Optuna prunes from step n_warmup_steps on: warmup + 1 spares epochs 1..warmup
    kind, warmup = spec.get("kind", "median"), int(spec.get("warmup", 0)) + 1
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(spec.get("startup", 5)), n_warmup_steps=warmup)
    if kind == "threshold":
        return optuna.pruners.ThresholdPruner(lower=float(spec["lower"]), n_warmup_steps=warmup)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ParamError(f"search.pruner must be median, threshold or none, got {kind!r}")


class _SearchTrial:
    """The Optuna trial a search runs this stage for (companion study of per-epoch accuracy)."""

    def __init__(self, spec: dict[str, Any]):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # a study's pruner is not stored with it: the search passes its settings along
        study = optuna.load_study(study_name=spec["study"], storage=study_storage(spec["storage"]),
                                  pruner=make_pruner(spec.get("pruner") or {}))  # fmt: skip
        self.trial = optuna.trial.Trial(study, int(spec["trial_id"]))
        self.offset = int(spec.get("step_offset", 0))

    def report(self, epoch: int, accuracy: float, last: bool = False) -> None:
        """Report an epoch; prune unless it is the stage's last (what is left is cheaper than a trial's restart,
        and the finished trial tells the sampler more than a pruned one)."""
        self.trial.report(accuracy, self.offset + epoch)
        if not last and self.trial.should_prune():
            self.trial.set_user_attr("pruned_at_epoch", epoch)
            raise TrialPruned(
                f"search: trial pruned at epoch {epoch} (val accuracy {accuracy:.4f} below the pruner's bar)"
            )


def search_trial(stage: str) -> _SearchTrial | None:
    """The trial to report to when `flows.search` runs this stage, else None."""
    raw = os.environ.get(SEARCH_ENV)
    if not raw:
        return None
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StageError(f"{SEARCH_ENV} is not JSON: {exc}") from exc
    return _SearchTrial(spec) if stage in spec.get("stages", ["train"]) else None


def _live(folder: Path) -> Any:
    """A DVCLive logger without DVCLive's DVC integration: the stage runs under `dvc repro` or `dvc exp run`,
    which record the run themselves; DVCLive's own would open the repository at start (and fails in a git
    repository without a commit yet, as a fresh `git init` is)."""
    from dvclive import Live

    class LocalLive(Live):
        def _init_dvc(self) -> None:
            self._dvc_file = "dvc.yaml"  # never written: dvcyaml=None

    return LocalLive(str(folder), save_dvc_exp=False, dvcyaml=None, report=None)


class EpochTracker:
    """`on_epoch` for `fit`: logs each epoch's loss, validation accuracy and learning rate."""

    def __init__(self, folder: Path, stage: str, params_file: str | Path = "params.yaml", epochs: int | None = None):
        """`epochs`: the stage's planned epochs (a search never prunes the last)."""
        self.live = _live(folder)
        self.epochs = epochs
        self.trial = search_trial(stage)
        self.mlflow = None
        settings = read_tracking(params_file)
        if settings.mlflow_uri:
            self.mlflow = _start_mlflow(settings, stage)

    def __call__(self, epoch: int, record: dict[str, float]) -> None:
        self.live.step = epoch
        for name, value in record.items():
            self.live.log_metric(name, value)
        self.live.make_summary()
        if self.mlflow is not None:
            self.mlflow.log_metrics(record, step=epoch)
        if self.trial is not None:
            self.trial.report(epoch, record["val_accuracy"], last=epoch == self.epochs)

    def close(self, failed: bool = False) -> None:
        if self.mlflow is not None:
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
            self.mlflow = None

    def __enter__(self) -> EpochTracker:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        self.close(failed=kind is not None)


def _start_mlflow(settings: TrackingParams, stage: str) -> Any:
    try:
        import mlflow
    except ImportError as exc:
        raise ParamError("tracking.mlflow_uri is set but mlflow is not installed: pip install mlflow") from exc
    mlflow.set_tracking_uri(settings.mlflow_uri)
    mlflow.set_experiment(settings.mlflow_experiment)
    mlflow.start_run(run_name=stage, tags={"distillery.stage": stage})
    return mlflow
