"""Student search: an Optuna study over the student's shape and recipe, each trial a DVC experiment.

    python -m flows.search [--trials N] [--study NAME] [--storage URL] [--apply] [--report-only]

The space, budget and study settings are params.yaml's `search:` section. Each trial:

1. Optuna samples the space (trial 0 is the current params, so the default is always on the plot);
2. `dvc exp run --temp <search.target> -n <study>-t<NNN> -S key=value ...` runs it as a DVC experiment outside
   the workspace (stages whose inputs did not change come from DVC's run cache); `dvc exp show` lists it with
   its params and metrics, `dvc exp apply <name>` takes it into the workspace;
3. while it trains, `train` reports each epoch's validation accuracy to a companion single-objective study
   (`<study>-epochs`: Optuna's pruners do not take multi-objective studies) whose pruner stops weak trials;
4. when it finishes, its INT8 model is read from the experiment and timed at batch 1 (model only, ONNX
   Runtime, `runtime.threads`) interleaved with the workspace's INT8 model, so every trial's latency is
   (its time / the reference's, same rounds) x the reference's time measured when the study began: load on
   the machine between trials cancels out;
5. the study records (validation accuracy of the INT8 student, latency): a Pareto front, with trials over
   `search.max_latency_ms` infeasible (Optuna's constraint, so the sampler steers away from them).

The test split never chooses: the chosen trial (the most accurate feasible one on validation, then the faster)
is scored on test once, and the score is kept in the study. Outputs (`search/<study>/`): `trials.csv` and
`trials.md` (params, val accuracy, latency, size, structurally pruned or not, state) and `front.png` (the
front, with the teacher, TF-IDF and the current default marked).

Several workers share one study through `search.storage` (SQLite by default, `search/<study>.db`; a
PostgreSQL or MySQL URL for workers on several machines): run this module in each (e.g. as a deployment on a
Prefect work pool); a rerun with the same study resumes it. A worker that dies leaves its trial RUNNING; its
heartbeat stops and another worker marks it failed after `HEARTBEAT_GRACE_S`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.logging import get_run_logger  # noqa: E402

from stages.runner.errors import ParamError  # noqa: E402
from stages.runner.params import from_dict  # noqa: E402
from stages.runner.tracking import SEARCH_ENV, make_pruner, study_storage  # noqa: E402

HEARTBEAT_S = 60
HEARTBEAT_GRACE_S = 300
INT8 = "data/07_quantize/model.int8.onnx"
TOKENIZER = "data/07_quantize/tokenizer"
QUANTIZE_METRICS = "data/07_quantize/metrics.json"
PRUNE_METRICS = "data/06_prune/metrics.json"
TRAIN_LIVE = "data/05_train/dvclive/metrics.json"
TRAIN_CURVE = "data/05_train/dvclive/plots/metrics/val_accuracy.tsv"
VAL, TEST = "data/02_clean/val.parquet", "data/02_clean/test.parquet"
SAMPLERS = ("tpe", "nsga2", "random")
# max_latency_ms null: the budget is the reference's p50 plus this share, the spread of a model timed against
# itself (trial 0, the workspace's own model, must not fall outside by noise)
BUDGET_NOISE = 0.02
PRUNERS = ("median", "threshold", "none")


@dataclass(frozen=True)
class SearchParams:
    """params.yaml `search:` (read by this flow, tracked by no stage)."""

    study: str = "distillery-student"
    storage: str | None = None  # None: SQLite at search/<study>.db
    trials: int = 20
    max_latency_ms: float | None = None  # None: the workspace's INT8 student's latency (no slower than today's)
    target: str = "quantize"
    pruner: str = "median"
    pruner_warmup_epochs: int = 1
    min_trials_before_pruning: int = 3
    pruner_threshold: float = 0.0  # threshold: an epoch's val accuracy under this stops the trial
    sampler: str = "tpe"
    seed: int | None = None  # None: each worker seeds its sampler at random (workers sharing a study must differ)
    latency_runs: int = 300
    space: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,60}", self.study):
            raise ParamError(
                f"search.study must be letters, digits, - and _ (an experiment prefix), got {self.study!r}"
            )
        if not isinstance(self.trials, int) or self.trials < 0:
            raise ParamError(f"search.trials must be an integer >= 0, got {self.trials!r}")
        if self.max_latency_ms is not None and not self.max_latency_ms > 0:
            raise ParamError(f"search.max_latency_ms must be > 0 or null, got {self.max_latency_ms!r}")
        if self.sampler not in SAMPLERS:
            raise ParamError(f"search.sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.pruner not in PRUNERS:
            raise ParamError(f"search.pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        if not isinstance(self.latency_runs, int) or self.latency_runs < 20:
            raise ParamError(f"search.latency_runs must be an integer >= 20, got {self.latency_runs!r}")
        if not self.space:
            raise ParamError("search.space is empty: name at least one params.yaml key to search")
        for key, spec in self.space.items():
            Dimension.parse(key, spec)


@dataclass(frozen=True)
class Dimension:
    """One key of the space: a choice among values, or a range (int when both ends are ints)."""

    key: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @classmethod
    def parse(cls, key: str, spec: Any) -> Dimension:
        where = f"search.space.{key}"
        if not isinstance(spec, dict):
            raise ParamError(f"{where} must be {{choice: [...]}} or {{low: .., high: ..}}, got {spec!r}")
        if "choice" in spec:
            choices = spec["choice"]
            if not isinstance(choices, list) or not choices:
                raise ParamError(f"{where}.choice must be a non-empty list, got {choices!r}")
            bad = [c for c in choices if c is not None and not isinstance(c, bool | int | float | str)]
            if bad:
                raise ParamError(f"{where}.choice: {bad[0]!r} is not a number, string, bool or null")
            return cls(key, choices=tuple(choices))
        if "low" not in spec or "high" not in spec:
            raise ParamError(f"{where} needs choice, or low and high")
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)) or not low < high:
            raise ParamError(f"{where}: low and high must be numbers with low < high, got {low!r}, {high!r}")
        log, step = bool(spec.get("log", False)), spec.get("step")
        if log and (low <= 0 or step is not None):
            raise ParamError(f"{where}: log ranges need low > 0 and no step")
        return cls(key, low=low, high=high, log=log, step=step)

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int) and not self.log and (
            self.step is None or isinstance(self.step, int))  # fmt: skip

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.is_int:
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1)
        value = trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        # on a step grid Optuna's value carries float noise (0.30000000000000004): params.yaml gets the grid's 0.3
        return round(value, 12) if self.step else value


def read_search(params_file: Path) -> tuple[SearchParams, dict[str, Any]]:
    """(`search:` as SearchParams, the whole params document)."""
    doc = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
    section = doc.get("search")
    if not isinstance(section, dict):
        raise ParamError(f"{params_file}: no search: section (see params.yaml in the project for one)")
    return from_dict(SearchParams, section, "search"), doc


def lookup(doc: dict[str, Any], dotted: str) -> Any:
    node: Any = doc
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamError(f"search.space.{dotted}: params.yaml has no key {dotted}")
        node = node[part]
    return node


def overrides(values: dict[str, Any]) -> dict[str, Any]:
    """params.yaml values for sampled `values`: `train.teacher_layers` is a string of layer numbers ("0,3,5")
    for Optuna, a list for params.yaml, and sets `train.layers` to its length."""
    out = dict(values)
    layers = out.get("train.teacher_layers")
    if isinstance(layers, str):
        numbers = [int(x) for x in layers.split(",") if x.strip()]
        out["train.teacher_layers"], out["train.layers"] = numbers, len(numbers)
    return out


def default_values(space: dict[str, Dimension], doc: dict[str, Any], root: Path) -> dict[str, Any]:
    """The current params as a point of the space (trial 0). `train.teacher_layers: null` is the evenly
    spaced default of `train`, written as the string the space uses."""
    values = {}
    for key, dim in space.items():
        value = lookup(doc, key)
        if key == "train.teacher_layers" and value is None:
            value = ",".join(map(str, evenly_spaced(int(lookup(doc, "train.layers")), teacher_layers(root))))
        elif key == "train.teacher_layers":
            value = ",".join(str(int(x)) for x in value)
        if dim.choices is not None and value not in dim.choices:
            continue  # not a point of the space: Optuna samples this key for trial 0
        values[key] = value
    return values


def teacher_layers(root: Path) -> int:
    config = root / "data/04_distill/teacher/config.json"
    if config.is_file():
        return int(json.loads(config.read_text(encoding="utf-8"))["num_hidden_layers"])
    return 6  # all-MiniLM-L6-v2, the default teacher


def evenly_spaced(layers: int, teacher: int) -> list[int]:
    """train's default teacher layers for a student of `layers` (teacher_layers: null)."""
    return [round(i * (teacher - 1) / max(1, layers - 1)) for i in range(layers)]


def same_as(doc: dict[str, Any], key: str, value: Any, teacher: int) -> bool:
    """Whether params.yaml `doc` already has `value` at `key` (teacher_layers null counts as train's default)."""
    try:
        current = lookup(doc, key)
    except ParamError:
        return False
    if key == "train.teacher_layers" and current is None:
        current = evenly_spaced(int(lookup(doc, "train.layers")), teacher)
    return current == value


def set_args(values: dict[str, Any], doc: dict[str, Any] | None = None, teacher: int = 6) -> list[str]:
    """`-S key=value` arguments (values as YAML, which DVC parses), leaving out what params.yaml `doc` already
    holds: a trial of the workspace's own params (trial 0) changes nothing, so reruns no stage."""
    args = []
    for key, value in sorted(overrides(values).items()):
        if doc is not None and same_as(doc, key, value, teacher):
            continue
        text = yaml.safe_dump(value, default_flow_style=True).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip()
        args += ["-S", f"{key}={text}"]
    return args


def exp_name(study: str, number: int) -> str:
    return f"{study}-t{number:03d}"


@dataclass
class Context:
    """What every trial of one run shares."""

    root: Path
    p: SearchParams
    storage_url: str
    space: dict[str, Dimension]
    threads: int
    max_length: int = 64  # runtime.max_length: tokens per text at inference
    doc: dict[str, Any] = field(default_factory=dict)  # the workspace's params.yaml
    teacher: int = 6  # the teacher's layer count
    reference: Any = None  # the workspace's INT8 model (bytes, tokenizer folder) for interleaved timing
    reference_ms: float | None = None
    log_dir: Path | None = None


def copied_folders(root: Path, target: str) -> list[str]:
    """The workspace's output folders holding `cache: false` outputs (run records: timings, Data Docs) of
    `target` and the stages before it. DVC's run cache skips stages that have such an output, so a temporary
    experiment without them would rerun every stage from ingest; copied in (`-C`; DVC copies a path only
    where its folder exists, so whole folders), the stages whose inputs a trial leaves alone stay up to date."""
    from flows.dag import read_graph

    doc = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    stages = doc.get("stages") or {}
    scope = read_graph(root).scope(target)
    folders = set()
    for name in scope:
        for kind in ("outs", "metrics", "plots"):
            for item in stages[name].get(kind) or []:
                if isinstance(item, dict):
                    ((path, spec),) = item.items()
                    if (spec or {}).get("cache") is False and (root / path).exists():
                        parts = Path(path).parts
                        folders.add(str(Path(*parts[:2])) if len(parts) > 2 else path)
    return sorted(folders)


def dvc_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def run_experiment(ctx: Context, name: str, values: dict[str, Any], companion_id: int, log: Any) -> tuple[int, str]:
    """`dvc exp run --temp` for one trial, its output in `search/<study>/logs/<name>.log`; (exit code, tail)."""
    spec = {"storage": ctx.storage_url, "study": f"{ctx.p.study}-epochs", "trial_id": companion_id,
            "stages": ["train"], "pruner": pruner_spec(ctx.p)}  # fmt: skip
    env = {**os.environ, SEARCH_ENV: json.dumps(spec)}
    copies = [arg for path in copied_folders(ctx.root, ctx.p.target) for arg in ("-C", path)]
    cmd = dvc_cmd("exp", "run", "--temp", "-n", name, *copies, *set_args(values, ctx.doc, ctx.teacher), ctx.p.target)
    assert ctx.log_dir is not None
    path = ctx.log_dir / f"{name}.log"
    tail: list[str] = []
    with open(path, "w", encoding="utf-8", buffering=1) as fh:  # line-buffered: `tail -f` follows the trial
        proc = subprocess.Popen(cmd, cwd=ctx.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            line = line.rstrip()
            if line and (
                "epoch" in line and "val accuracy" in line or line.startswith(("train:", "prune:", "quantize:"))
            ):
                log.info("%s | %s", name, line)
            tail = (tail + [line])[-20:]
        code = proc.wait()
    return code, "\n".join(t for t in tail if t)


def exp_rev(root: Path, name: str) -> str:
    """The commit of experiment `name` (its ref under refs/exps)."""
    from dvc.repo import Repo
    from dvc.repo.experiments.utils import resolve_name

    with Repo(str(root)) as repo:
        ref = resolve_name(repo.scm, name)[name]
        if ref is None:
            raise TrialFailed(f"experiment {name} ran but `dvc exp list` does not show it")
        return repo.scm.get_ref(str(ref))


def exp_files(root: Path, rev: str) -> Any:
    """Experiment `rev`'s files (git-tracked and DVC-tracked), one repository opened for all reads."""
    from dvc.api import DVCFileSystem

    return DVCFileSystem(str(root), rev=rev)


def materialize(fs: Any, into: Path) -> tuple[bytes, Path]:
    """(INT8 model bytes, tokenizer folder in `into`) of an experiment's files (`exp_files`)."""
    folder = into / "tokenizer"
    fs.get(TOKENIZER, str(folder), recursive=True)
    with fs.open(INT8, "rb") as fh:
        return fh.read(), folder


def text_encoder(tokenizer: Path, max_length: int) -> Any:
    """The tokenizer of an exported model (`tokenizer.json`, as the server loads it: no torch)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]") or 0)
    return tok


def encoded(tok: Any, texts: list[str]) -> dict[str, Any]:
    import numpy as np

    rows = tok.encode_batch(texts)
    return {"input_ids": np.array([r.ids for r in rows], dtype=np.int64),
            "attention_mask": np.array([r.attention_mask for r in rows], dtype=np.int64)}  # fmt: skip


def batch1_calls(model: bytes, tokenizer: Path, texts: list[str], threads: int, max_length: int) -> Any:
    """A callable running the model on the i-th text alone (its own vocabulary's ids), model only."""
    from stages.runtime.sessions import session

    sess = session(model, threads)
    tok = text_encoder(tokenizer, max_length)
    one = [encoded(tok, [text]) for text in texts]
    return lambda i: sess.run(["logits"], one[i])


def timed(ctx: Context, model: bytes, tokenizer: Path) -> tuple[float, float | None]:
    """(latency ms, time relative to the reference) of an INT8 model at batch 1, model only, interleaved
    with the reference (the workspace's INT8 model) when there is one: (its time / the reference's, round by
    round) x the reference's time when the study began."""
    import polars as pl

    from stages.runtime.timing import percentiles, relative_speed, side_by_side

    texts = pl.read_parquet(ctx.root / VAL)["text"].to_list()[:256]
    fns = {"trial": batch1_calls(model, tokenizer, texts, ctx.threads, ctx.max_length)}
    if ctx.reference is not None:
        fns["reference"] = batch1_calls(*ctx.reference, texts, ctx.threads, ctx.max_length)
    rounds = 6
    samples = side_by_side(fns, list(range(len(texts))), ctx.p.latency_runs, rounds=rounds)
    if ctx.reference is None:
        return percentiles(samples["trial"])["p50"], None
    ratios, _ = relative_speed(samples, "reference", rounds)
    assert ctx.reference_ms is not None
    return round(ratios["trial"] * ctx.reference_ms, 4), round(ratios["trial"], 4)


def trial_record(fs: Any) -> dict[str, Any]:
    """Validation accuracy, size and pruning of a finished trial, from its experiment's files (`exp_files`)."""
    quant, prune, live = (json.loads(fs.read_text(path)) for path in (QUANTIZE_METRICS, PRUNE_METRICS, TRAIN_LIVE))
    chosen = quant["frontier"][quant["chosen"]]
    return {
        "val_accuracy": chosen["accuracy"],
        "size_mb": chosen["size_mb"],
        "int8": quant["chosen"],
        "structurally_pruned": bool(prune.get("pruned")),
        "flops_per_token": prune["after"]["flops_per_token"],
        "train_epochs_run": int(live.get("step", 0)),
        "epoch_curve": epoch_curve(fs.read_text(TRAIN_CURVE)) if fs.exists(TRAIN_CURVE) else [],
    }


def epoch_curve(tsv: str) -> list[list[float]]:
    """[[epoch, val accuracy], ...] from DVCLive's step plot (`step<TAB>val_accuracy` rows)."""
    rows = [line.split("\t") for line in tsv.splitlines()[1:] if line.strip()]
    return [[int(step), float(value)] for step, value in rows]


@task(cache_policy=NO_CACHE)
def run_trial(ctx: Context, number: int, values: dict[str, Any], companion_id: int) -> dict[str, Any]:
    """One trial as a DVC experiment; its record, or {"pruned_at": epoch} / {"failed": reason}."""
    import optuna

    log = get_run_logger()
    name = exp_name(ctx.p.study, number)
    changed = set_args(values, ctx.doc, ctx.teacher)[1::2]
    log.info("trial %d (%s): %s", number, name, " ".join(changed) or "the workspace's params")
    code, tail = run_experiment(ctx, name, values, companion_id, log)
    if code != 0:
        companion = optuna.load_study(study_name=f"{ctx.p.study}-epochs", storage=study_storage(ctx.storage_url))
        attrs = next((t.user_attrs for t in companion.get_trials(deepcopy=False) if t._trial_id == companion_id), {})
        if "pruned_at_epoch" in attrs:
            return {"pruned_at": attrs["pruned_at_epoch"], "name": name}
        return {"failed": tail.splitlines()[-1] if tail else f"exit code {code}", "name": name}
    rev = exp_rev(ctx.root, name)
    fs = exp_files(ctx.root, rev)
    record = {"name": name, "rev": rev, **trial_record(fs)}
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = materialize(fs, Path(tmp))
        record["latency_ms"], record["latency_vs_reference"] = timed(ctx, model, tokenizer)
    log.info("trial %d: val accuracy %.4f, %.3f ms, %.2f MB", number, record["val_accuracy"], record["latency_ms"],
             record["size_mb"])  # fmt: skip
    return record


class TrialFailed(RuntimeError):
    """A trial's experiment failed (not pruned): Optuna records it FAIL and the study goes on."""


def pruner_spec(p: SearchParams) -> dict[str, Any]:
    """The pruner's settings, as the stages that report epochs rebuild it (`make_pruner`)."""
    return {"kind": p.pruner, "warmup": p.pruner_warmup_epochs, "startup": p.min_trials_before_pruning,
            "lower": p.pruner_threshold}  # fmt: skip


def open_studies(ctx: Context) -> tuple[Any, Any]:
    """(the main two-objective study, the companion study of per-epoch accuracy that prunes)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = study_storage(ctx.storage_url, HEARTBEAT_S, HEARTBEAT_GRACE_S)

    p = ctx.p
    sampler = {  # the latency budget reaches them as each trial's constraint (Trial.set_constraint)
        "tpe": lambda: optuna.samplers.TPESampler(seed=p.seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=p.seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=p.seed),
    }[p.sampler]()
    study = optuna.create_study(study_name=p.study, storage=storage, sampler=sampler, load_if_exists=True,
                                directions=["maximize", "minimize"])  # fmt: skip
    study.set_metric_names(["val_accuracy", "latency_ms"])
    pruner = make_pruner(pruner_spec(p))
    # the companion is driven by ask/tell, which Optuna's heartbeat does not cover: a storage without one
    companion = optuna.create_study(study_name=f"{p.study}-epochs", storage=study_storage(ctx.storage_url),
                                    pruner=pruner, direction="maximize", load_if_exists=True)  # fmt: skip
    return study, companion


def objective(ctx: Context, companion: Any) -> Any:
    import optuna

    def run(trial: Any) -> tuple[float, float]:
        values = {key: dim.suggest(trial) for key, dim in ctx.space.items()}
        epochs = companion.ask()
        trial.set_user_attr("exp", exp_name(ctx.p.study, trial.number))
        trial.set_user_attr("epochs_trial", epochs._trial_id)
        result = run_trial(ctx, trial.number, values, epochs._trial_id)
        if "pruned_at" in result:
            companion.tell(epochs, state=optuna.trial.TrialState.PRUNED)
            trial.set_user_attr("pruned_at_epoch", result["pruned_at"])
            raise optuna.TrialPruned(f"pruned at epoch {result['pruned_at']}")
        if "failed" in result:
            companion.tell(epochs, state=optuna.trial.TrialState.FAIL)
            trial.set_user_attr("error", result["failed"][-500:])
            raise TrialFailed(result["failed"])
        if not companion._storage.get_trial(epochs._trial_id).intermediate_values:
            # train did not run in this experiment (trial 0, or a run-cache hit): its epochs are the kept run's,
            # so the median pruner has them from the start
            for step, accuracy in result["epoch_curve"]:
                epochs.report(accuracy, step)
        companion.tell(epochs, result["val_accuracy"])
        for key, value in result.items():
            trial.set_user_attr(key, value)
        trial.set_constraint("latency_over_budget_ms", result["latency_ms"] - ctx.p.max_latency_ms)
        return result["val_accuracy"], result["latency_ms"]

    return run


def set_reference(ctx: Context, study: Any, log: Any) -> None:
    """The workspace's INT8 model, if built, is every trial's timing reference; its p50 when the study began
    is kept in the study, so all workers scale by the same figure."""
    import hashlib

    from stages.runtime.timing import percentiles, side_by_side

    if not (ctx.root / INT8).is_file() or not (ctx.root / TOKENIZER).is_dir():
        log.warning("no %s in the workspace (run `dvc repro quantize`): trials are timed alone", INT8)
        return
    model, tokenizer = (ctx.root / INT8).read_bytes(), ctx.root / TOKENIZER
    ctx.reference = (model, tokenizer)
    digest = hashlib.sha256(model).hexdigest()
    attrs = study.user_attrs
    if "reference_ms" in attrs:
        ctx.reference_ms = float(attrs["reference_ms"])
        if attrs.get("reference_sha256") != digest:
            log.warning("the workspace's INT8 model changed since the study began: latencies are scaled by the "
                        "old reference's %.4f ms, measured against the new one", ctx.reference_ms)  # fmt: skip
        return
    import polars as pl

    texts = pl.read_parquet(ctx.root / VAL)["text"].to_list()[:256]
    fn = batch1_calls(model, tokenizer, texts, ctx.threads, ctx.max_length)
    ctx.reference_ms = percentiles(side_by_side({"r": fn}, list(range(len(texts))), ctx.p.latency_runs)["r"])["p50"]
    study.set_user_attr("reference_ms", ctx.reference_ms)
    study.set_user_attr("reference_sha256", digest)
    log.info("timing reference: the workspace's INT8 student, p50 %.4f ms at batch 1", ctx.reference_ms)


def front_numbers(rows: list[dict[str, Any]]) -> set[int]:
    """Trial numbers on the Pareto front (max accuracy, min latency) of the feasible complete trials."""
    done = [r for r in rows if r["state"] == "COMPLETE" and r["feasible"]]
    front = set()
    for r in done:
        dominated = any(
            o["val_accuracy"] >= r["val_accuracy"] and o["latency_ms"] <= r["latency_ms"]
            and (o["val_accuracy"] > r["val_accuracy"] or o["latency_ms"] < r["latency_ms"])
            for o in done
        )  # fmt: skip
        if not dominated:
            front.add(r["number"])
    return front


def table_rows(study: Any, p: SearchParams) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        row = {
            "number": t.number,
            "state": t.state.name,
            "exp": a.get("exp", exp_name(p.study, t.number)),
            "val_accuracy": a.get("val_accuracy"),
            "latency_ms": a.get("latency_ms"),
            "size_mb": a.get("size_mb"),
            "structurally_pruned": a.get("structurally_pruned"),
            "pruned_at_epoch": a.get("pruned_at_epoch"),
            "feasible": a.get("latency_ms") is not None and a["latency_ms"] <= p.max_latency_ms,
            "params": dict(sorted(t.params.items())),
            "error": a.get("error"),
            "minutes": round(t.duration.total_seconds() / 60, 1) if t.duration else None,
        }
        rows.append(row)
    front = front_numbers(rows)
    for row in rows:
        row["on_front"] = row["number"] in front
    return rows


def choose(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The most accurate feasible complete trial on validation, then the faster, then the earlier."""
    done = [r for r in rows if r["state"] == "COMPLETE" and r["feasible"]]
    return min(done, key=lambda r: (-r["val_accuracy"], r["latency_ms"], r["number"])) if done else None


def test_once(ctx: Context, study: Any, chosen: dict[str, Any], log: Any) -> dict[str, Any]:
    """The chosen trial's test accuracy, computed the first time it is chosen and kept in the study."""
    kept = study.user_attrs.get("chosen_test")
    if kept and kept.get("number") == chosen["number"]:
        return kept
    import io as _io

    import numpy as np
    import polars as pl

    from stages.runtime.sessions import session

    rev = study.trials[chosen["number"]].user_attrs["rev"]
    fs = exp_files(ctx.root, rev)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = materialize(fs, Path(tmp))
        labels = json.loads((tokenizer / "labels.json").read_text(encoding="utf-8"))
        test = pl.read_parquet(_io.BytesIO(fs.read_bytes(TEST)))
        sess, tok, texts = session(model, ctx.threads), text_encoder(tokenizer, ctx.max_length), test["text"].to_list()
        logits = np.concatenate([sess.run(["logits"], encoded(tok, texts[i : i + 64]))[0]
                                 for i in range(0, len(texts), 64)])  # fmt: skip
    truth = np.array([labels[x] for x in test["label"]])
    accuracy = round(float((logits.argmax(1) == truth).mean()), 6)
    result = {"number": chosen["number"], "exp": chosen["exp"], "test_rows": test.height, "accuracy": accuracy}
    study.set_user_attr("chosen_test", result)
    log.info("chosen trial %d (%s): test accuracy %.4f (scored once)", chosen["number"], chosen["exp"],
             result["accuracy"])  # fmt: skip
    return result


def cell(value: Any) -> str:
    """A parameter as the table shows it: floats to 4 significant digits (0.30000000000000004 -> 0.3)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict[str, Any]], p: SearchParams, chosen: dict[str, Any] | None,
             test: dict[str, Any] | None) -> str:  # fmt: skip
    keys = sorted({k for r in rows for k in r["params"]})
    head = ["#", "state", "val acc", "latency ms", "MB", "pruned (structure)", "stopped at epoch", "front", "min",
            *keys]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:

        def num(v: Any, f: str) -> str:
            return "" if v is None else format(v, f)

        mark = "**chosen**" if chosen and r["number"] == chosen["number"] else ("yes" if r["on_front"] else "")
        state = r["state"] if r["feasible"] or r["state"] != "COMPLETE" else "over budget"
        cells = [str(r["number"]), state, num(r["val_accuracy"], ".4f"), num(r["latency_ms"], ".3f"),
                 num(r["size_mb"], ".2f"), "" if r["structurally_pruned"] is None else str(r["structurally_pruned"]),
                 num(r["pruned_at_epoch"], "d"), mark, num(r["minutes"], ".1f"),
                 *(cell(r["params"].get(k, "")) for k in keys)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    states = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    minutes = sum(r["minutes"] or 0 for r in rows)
    summary = (f"{len(rows)} trials: {states['COMPLETE']} complete, {states['PRUNED']} pruned by Optuna, "
               f"{states['FAIL']} failed, {states['RUNNING']} running; budget {p.max_latency_ms} ms; "
               f"{minutes:.0f} minutes of trials")  # fmt: skip
    if chosen:
        summary += (f"\n\nChosen (most accurate within the budget on validation): trial {chosen['number']} "
                    f"(`dvc exp apply {chosen['exp']}`), val {chosen['val_accuracy']:.4f}, "
                    f"{chosen['latency_ms']:.3f} ms, {chosen['size_mb']:.2f} MB")  # fmt: skip
        if test:
            summary += f"; test accuracy {test['accuracy']:.4f} on {test['test_rows']} rows (scored once)"
    return f"# Study {p.study}\n\n{summary}\n\n" + "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys = sorted({k for r in rows for k in r["params"]})
    buf = io.StringIO()
    fields = ["number", "state", "exp", "val_accuracy", "latency_ms", "size_mb", "structurally_pruned",
              "pruned_at_epoch", "feasible", "on_front", "minutes", *keys, "error"]  # fmt: skip
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**{k: r.get(k) for k in fields if k not in keys}, **r["params"]})
    atomic_text(path, buf.getvalue())


def atomic_text(path: Path, text: str) -> None:
    from stages.storage.atomic import outputs

    with outputs() as w:
        w.text(path, text)


def landmarks(root: Path) -> dict[str, tuple[float, float, str]]:
    """Teacher and TF-IDF points for the plot: (latency ms, accuracy, what the numbers are) from the last
    benchmark run and the teacher's validation score, where those files exist."""
    marks: dict[str, tuple[float, float, str]] = {}
    timings, metrics = root / "data/09_benchmark/timings.json", root / "data/09_benchmark/metrics.json"
    distill = root / "data/04_distill/metrics.json"
    if not (timings.is_file() and metrics.is_file()):
        return marks
    t = json.loads(timings.read_text(encoding="utf-8"))["variants"]
    m = json.loads(metrics.read_text(encoding="utf-8"))["variants"]

    def p50(name: str) -> float | None:
        return (t.get(name) or {}).get("latency_ms", {}).get("model", {}).get("p50")

    if p50("teacher_int8") and distill.is_file():
        val = json.loads(distill.read_text(encoding="utf-8"))["val"]["accuracy"]
        marks["teacher (INT8 time, fp32 val acc)"] = (p50("teacher_int8"), val, "teacher")
    if p50("tfidf_logreg") and "tfidf_logreg" in m:
        marks["TF-IDF + logreg (test acc)"] = (p50("tfidf_logreg"), m["tfidf_logreg"]["accuracy"], "tfidf")
    return marks


def front_png(rows: list[dict[str, Any]], p: SearchParams, chosen: dict[str, Any] | None, root: Path,
              path: Path) -> None:  # fmt: skip
    from stages.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    done = [r for r in rows if r["state"] == "COMPLETE"]
    ok = [r for r in done if r["feasible"]]
    over = [r for r in done if not r["feasible"]]
    ax.scatter([r["latency_ms"] for r in ok], [r["val_accuracy"] for r in ok], c="tab:blue", label="trial")
    ax.scatter([r["latency_ms"] for r in over], [r["val_accuracy"] for r in over], c="0.6", marker="x",
               label="trial over budget")  # fmt: skip
    front = sorted((r for r in ok if r["on_front"]), key=lambda r: r["latency_ms"])
    ax.plot([r["latency_ms"] for r in front], [r["val_accuracy"] for r in front], c="tab:red", label="Pareto front")
    for r in done:
        ax.annotate(str(r["number"]), (r["latency_ms"], r["val_accuracy"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    default = next((r for r in done if r["number"] == 0), None)
    if default:
        ax.scatter([default["latency_ms"]], [default["val_accuracy"]], s=160, marker="*", c="gold",
                   edgecolors="k", label="current default (trial 0)", zorder=5)  # fmt: skip
    if chosen:
        ax.scatter([chosen["latency_ms"]], [chosen["val_accuracy"]], s=220, facecolors="none", edgecolors="k",
                   linewidths=2, label=f"chosen (trial {chosen['number']})", zorder=6)  # fmt: skip
    for label, (ms, acc, kind) in landmarks(root).items():
        ax.scatter([ms], [acc], marker="s" if kind == "teacher" else "^", s=80, label=label)
    ax.axvline(p.max_latency_ms, ls="--", c="0.4", label=f"budget {p.max_latency_ms} ms")
    ax.set_xlabel("INT8 model-only latency at batch 1 (ms)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"study {p.study}: {len(done)} complete of {len(rows)} trials")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from stages.storage.atomic import outputs

    # a temporary file of its own: workers sharing a study each write the report, the last one wins
    with outputs() as w:
        w.file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def report(ctx: Context, study: Any, log: Any) -> dict[str, Any]:
    rows = table_rows(study, ctx.p)
    chosen = choose(rows)
    test = test_once(ctx, study, chosen, log) if chosen else None
    out = ctx.root / "search" / ctx.p.study
    text = markdown(rows, ctx.p, chosen, test)
    atomic_text(out / "trials.md", text)
    write_csv(rows, out / "trials.csv")
    front_png(rows, ctx.p, chosen, ctx.root, out / "front.png")
    log.info("study %s:\n%s", ctx.p.study, text)
    return {"trials": len(rows), "chosen": chosen, "test": test, "table": str(out / "trials.md"), "rows": rows,
            "states": {s: sum(r["state"] == s for r in rows) for s in {r["state"] for r in rows}}}  # fmt: skip


def storage_url(root: Path, p: SearchParams) -> str:
    if p.storage:
        return p.storage
    path = (root / "search" / f"{p.study}.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


@flow(name="distillery-search")
def search(root: str = ".", trials: int | None = None, study: str | None = None, storage: str | None = None,
           apply: bool = False, report_only: bool = False) -> dict[str, Any]:  # fmt: skip
    """The study: `trials` new trials (default `search.trials`), then the table, the plot and the choice."""
    import dataclasses

    log = get_run_logger()
    base = Path(root).resolve()
    p, doc = read_search(base / "params.yaml")
    changes = {k: v for k, v in {"trials": trials, "study": study, "storage": storage}.items() if v is not None}
    p = dataclasses.replace(p, **changes)
    runtime = doc.get("runtime") or {}
    threads, max_length = int(runtime.get("threads", 2)), int(runtime.get("max_length", 64))
    space = {key: Dimension.parse(key, spec) for key, spec in p.space.items()}
    for key in space:
        lookup(doc, key)
    ctx = Context(base, p, storage_url(base, p), space, threads, max_length, doc, teacher_layers(base),
                  log_dir=base / "search" / p.study / "logs")  # fmt: skip
    ctx.log_dir.mkdir(parents=True, exist_ok=True)
    main_study, companion = open_studies(ctx)
    if not report_only and p.trials > 0:
        set_reference(ctx, main_study, log)
    if p.max_latency_ms is None:  # the budget is the reference's latency: no slower than the workspace's student
        reference_ms = main_study.user_attrs.get("reference_ms")
        if reference_ms is None:
            raise ParamError("search.max_latency_ms: null means the workspace's INT8 student's latency, and there is "
                             f"none to time: run `dvc repro {p.target}` first, or set a budget in ms")  # fmt: skip
        ctx.p = p = dataclasses.replace(p, max_latency_ms=round(float(reference_ms) * (1 + BUDGET_NOISE), 4))
        log.info("latency budget: %.4f ms, the workspace's INT8 student's p50 + %.0f%%", p.max_latency_ms,
                 100 * BUDGET_NOISE)  # fmt: skip
    if not report_only and p.trials > 0:
        if not main_study.trials:
            main_study.enqueue_trial(default_values(space, doc, base), skip_if_exists=True)
        main_study.optimize(objective(ctx, companion), n_trials=p.trials, catch=(TrialFailed,))
    result = report(ctx, main_study, log)
    if apply and result["chosen"]:
        subprocess.run(dvc_cmd("exp", "apply", result["chosen"]["exp"]), cwd=base, check=True)
        log.info("applied %s to the workspace (params.yaml and outputs)", result["chosen"]["exp"])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.search", description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="the repository (default: current folder)")
    ap.add_argument("--trials", type=int, help="trials to add in this run (default: search.trials)")
    ap.add_argument("--study", help="study name (default: search.study)")
    ap.add_argument("--storage", help="SQLAlchemy URL of the study (default: search.storage, else SQLite)")
    ap.add_argument("--apply", action="store_true", help="dvc exp apply the chosen trial at the end")
    ap.add_argument("--report-only", action="store_true", help="write the table and plot; run no trial")
    args = ap.parse_args(argv)
    root = Path(args.root)
    head = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        print("search: error: trials are DVC experiments, which need a git repository with a commit "
              "(git init && git add -A && git commit)", file=sys.stderr)  # fmt: skip
        return 2
    try:
        result = search(root=args.root, trials=args.trials, study=args.study, storage=args.storage,
                        apply=args.apply, report_only=args.report_only)  # fmt: skip
    except ParamError as exc:
        print(f"search: error: {exc}", file=sys.stderr)
        return 2
    chosen = result["chosen"]
    states = ", ".join(f"{v} {k.lower()}" for k, v in sorted(result["states"].items()))
    print(f"search: {result['trials']} trials ({states}); table {result['table']}")
    if chosen:
        test = result["test"] or {}
        print(f"search: chosen trial {chosen['number']} ({chosen['exp']}): val {chosen['val_accuracy']:.4f}, "
              f"{chosen['latency_ms']:.3f} ms, test {test.get('accuracy', float('nan')):.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
