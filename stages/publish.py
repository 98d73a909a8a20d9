"""Stage `publish`: gate the benchmark's candidate, then add one immutable version to the model registry.

1. Gates. `publish.gates` are checked on benchmark's measurements. The candidate is the fastest publishable
   variant end to end at batch 1 that passes all of them (`choose_candidate`: variants within the latency
   margin of the fastest count as equally fast, and the more accurate of those wins). When none passes the stage
   fails naming each variant's failed gates with the measured value and limit, and the registry is not
   touched.
2. Provenance. The files to publish must be the bytes benchmark measured (SHA-256 in its metrics) and the
   bytes dvc.lock records for their stages (DVC's MD5), or the stage fails: a lineage manifest that does
   not describe the published bytes would be worse than none.
3. A version `registry/<model>/<version>/` (`publish.registry`, `publish.model`; the format is
   stages.registry's):
   - `model.onnx` (or `model.plan` for a TensorRT engine) and `runtime.json` (backend: onnxruntime, tensorrt,
     or kernels for quantize's INT8 model run by the compiled operators; device, precision,
     session options);
   - `tokenizer/`, `labels.json` (label name -> logit index);
   - `model_card.md`: intended use, data and its hash, metrics against the baselines, gates, limitations,
     how to load it;
   - `lineage.json`: git commit and dirty files, each stage's dvc.lock entry (deps, params and outs with
     their hashes) in pipeline order, the source location and hash, the machine fingerprint, and the
     published files' digests;
   - `SHA256SUMS` (`sha256sum -c` reads it) over every other file; `signature.sig` when
     `publish.signing` configures a key (OpenSSF model-signing).
   The version is written to a temporary folder beside it, synced, then renamed into place, its files made
   read-only, and appended to the model's hash-chained `index.jsonl`; one publisher per model at a time (a
   lock file), and the registry must lie inside the project, reached through no symlink. A version is never
   overwritten. The model files, tokenizer and labels (the payload) define a version's content: publishing
   content the registry already holds reports that version and writes nothing; new content gets a new version
   (`publish.version: auto`: the next major, 1.0.0, 2.0.0, ...; or an explicit `x.y.z`, refused if it exists
   with other content).
4. `publish.tag: true` adds an annotated git tag `<model>@v<version>` on HEAD, the form GTO (DVC's model
   registry tooling) reads.
5. `data/10_publish/receipt.json` records what was published (or found), where, and its digests.

The registry is not a DVC output, so no `dvc repro` can delete a published version.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.model.rejection import RejectParams
from stages.plots import pareto_png
from stages.records import BenchmarkResults, BenchmarkTimings, BuildManifest, Engine, VariantResult, VariantTiming
from stages.registry import (
    Draft,
    Lineage,
    RejectRecord,
    RuntimeRecord,
    Signing,
    append_index,
    check_model_name,
    check_registry_path,
    check_version,
    contained,
    existing_versions,
    file_sums,
    folders,
    index_entry,
    locked,
    next_version,
    payload_digest,
    payload_sums,
    read_sums,
    record_text,
    start_index,
    version_key,
)
from stages.runner.cli import require, stage_args, stage_entrypoint
from stages.runner.errors import ParamError, StageError
from stages.runner.params import from_dict, read_params
from stages.storage.atomic import outputs
from stages.storage.hashing import dvc_md5, sha256_file


@dataclass(frozen=True)
class Gates:
    min_accuracy: float = 0.0  # test accuracy (fraction)
    max_drop_vs_teacher: float = 100.0  # points of test accuracy below teacher_fp32
    max_p95_ms: float = 1e9  # end-to-end p95 at batch 1 (median of benchmark's per-round p95s), milliseconds
    max_size_mb: float = 1e9  # model file size
    min_auroc: float | None = None  # rejection AUROC of reject.method (known intents against test_oos); None: off

    def __post_init__(self) -> None:
        for key in ("min_accuracy", "max_drop_vs_teacher", "max_p95_ms", "max_size_mb", "min_auroc"):
            value = getattr(self, key)
            if key == "min_auroc" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"publish.gates.{key} must be a number, got {value!r}")
        if not 0.0 <= self.min_accuracy <= 1.0:
            raise ValueError(f"publish.gates.min_accuracy is a fraction in [0, 1], got {self.min_accuracy}")
        if self.min_auroc is not None and not 0.0 <= self.min_auroc <= 1.0:
            raise ValueError(f"publish.gates.min_auroc is in [0, 1] (or null), got {self.min_auroc}")

    def check(self, result: VariantResult, timing: VariantTiming, teacher_accuracy: float,
              method: str = "none") -> dict[str, dict[str, Any]]:  # fmt: skip
        """Each gate with the measured value, its limit and whether it passed (`method`: reject.method, whose
        AUROC `min_auroc` reads)."""
        acc, size = result.accuracy, result.size_mb
        drop = round(100 * (teacher_accuracy - acc), 4)
        p95 = timing.gate_p95()
        measured = {
            "min_accuracy": (acc, acc >= self.min_accuracy, self.min_accuracy),
            "max_drop_vs_teacher": (drop, drop <= self.max_drop_vs_teacher, self.max_drop_vs_teacher),
            "max_p95_ms": (p95, p95 <= self.max_p95_ms, self.max_p95_ms),
            "max_size_mb": (size, size <= self.max_size_mb, self.max_size_mb),
        }
        if self.min_auroc is not None:
            auroc = ((result.rejection or {}).get("methods", {}).get(method) or {}).get("auroc")
            # None: no out-of-scope test rows (set clean.oos_label or clean.holdout_labels), or reject.method none
            measured["min_auroc"] = (auroc, auroc is not None and auroc >= self.min_auroc, self.min_auroc)
        return {k: {"measured": v, "passed": bool(ok), "limit": lim} for k, (v, ok, lim) in measured.items()}


def failed_gates(checked: dict[str, dict[str, Any]]) -> list[str]:
    """`gate: measured X, limit Y` for each failed gate, in a fixed order."""
    return [
        f"{name} measured {g['measured']} (limit {g['limit']})"
        for name, g in sorted(checked.items())
        if not g["passed"]
    ]


@dataclass(frozen=True)
class PublishParams:
    model: str = "distillery-intent"  # registry name: lowercase letters, digits and dashes
    registry: str = "registry"  # the registry folder (relative to the repository)
    # Where a DVC experiment (`dvc exp run`, queued or not) publishes instead: never the production registry,
    # unless set to the same folder on purpose.
    experiment_registry: str = "registry-experiments"
    version: str = "auto"  # auto: the next major version; or an explicit x.y.z
    tag: bool = False  # an annotated git tag <model>@v<version> (GTO's form)
    gates: dict[str, float] = field(default_factory=dict)  # see Gates
    # Variants within max(this, twice the noise benchmark measured) end to end count as equally fast (the
    # more accurate wins): timing noise cannot change what is published.
    latency_margin: float = 0.05
    signing: dict[str, str] = field(default_factory=dict)  # see stages.registry.Signing

    def __post_init__(self) -> None:
        check_model_name(self.model)
        for key in ("registry", "experiment_registry"):
            check_registry_path(getattr(self, key), f"publish.{key}")
        if not isinstance(self.signing, dict):
            raise ParamError("publish.signing must be a mapping (method, private_key, password_env, public_key)")
        from_dict(Signing, self.signing, "publish.signing")
        if self.version != "auto":
            check_version(self.version)
        if not isinstance(self.tag, bool):
            raise ParamError(f"publish.tag must be true or false, got {self.tag!r}")
        if not isinstance(self.gates, dict):
            raise ParamError("publish.gates must be a mapping")
        from_dict(Gates, self.gates, "publish.gates")  # validates the gates now, naming a bad key
        if isinstance(self.latency_margin, bool) or not isinstance(self.latency_margin, (int, float)):
            raise ParamError(f"publish.latency_margin must be a number, got {self.latency_margin!r}")
        if not 0 <= self.latency_margin < 1:
            raise ParamError(f"publish.latency_margin must be in [0, 1), got {self.latency_margin}")

    @property
    def sign(self) -> Signing:
        return from_dict(Signing, self.signing, "publish.signing")

    @property
    def gate_limits(self) -> Gates:
        return from_dict(Gates, self.gates, "publish.gates")


# ---- choosing the candidate ---------------------------------------------------------------------------


def choose_candidate(
    results: BenchmarkResults, timings: BenchmarkTimings, gates: Gates, margin: float, method: str = "none"
) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """(the variant to publish or None, each publishable variant's gate results).

    Among the publishable variants passing every gate: the fastest end to end at batch 1; variants within
    `margin` of the fastest count as equally fast, and among those the more accurate wins, then the smaller
    file, then the name. So timing noise below the margin cannot flip the choice."""
    rows, times = results.variants, timings.variants
    if "teacher_fp32" not in rows:
        raise StageError("benchmark metrics have no teacher_fp32 row: the drop gate needs it")
    teacher = rows["teacher_fp32"].accuracy
    missing = sorted(n for n, r in rows.items() if r.publishable and n not in times)
    if missing:
        raise StageError(f"benchmark timings have no row for {', '.join(missing)}: rerun dvc repro -f benchmark")
    checked = {n: gates.check(r, times[n], teacher, method) for n, r in rows.items() if r.publishable and r.file}
    passing = [n for n, g in checked.items() if all(x["passed"] for x in g.values())]
    if not passing:
        return None, checked
    fastest = min(times[n].speed() for n in passing)
    close = [n for n in passing if times[n].speed() <= fastest * (1 + margin)]
    best = min(close, key=lambda n: (-rows[n].accuracy, rows[n].size_mb, n))
    return best, checked


@dataclass(frozen=True)
class Decision:
    candidate: str
    gates: dict[str, dict[str, Any]]  # the candidate's gate results
    margin: float  # the latency margin used


def decide(results: BenchmarkResults, timings: BenchmarkTimings, p: PublishParams, method: str = "none") -> Decision:
    """The candidate under `publish.gates`; a StageError naming each variant's failed gates when none passes
    (the registry is then not touched)."""
    # however noisy the run, a 1.5x speed difference still decides
    margin = min(0.5, max(p.latency_margin, 2 * float(timings.noise or 0.0)))
    best, checked = choose_candidate(results, timings, p.gate_limits, margin, method)
    if not checked:
        raise StageError("benchmark measured no publishable variant (no quantize file or engine)")
    if best is None:
        order = sorted(checked, key=lambda n: (timings.variants[n].speed(), n))
        why = "; ".join(f"{n}: {', '.join(failed_gates(checked[n]))}" for n in order)
        raise StageError(f"no variant passes publish.gates, registry untouched: {why}")
    return Decision(best, checked[best], margin)


# ---- provenance -------------------------------------------------------------------------------------


def read_lock(root: Path) -> dict[str, Any]:
    path = root / "dvc.lock"
    if not path.is_file():
        raise StageError(f"{path}: not found; publish records each stage's dvc.lock entry, run it with dvc repro")
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages") or {}


def stage_order(root: Path) -> list[str]:
    doc = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    return list(doc.get("stages") or {})


def rel(root: Path, path: Path) -> str:
    """`path` relative to the repository, as dvc.lock names it."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def owning_out(lock: dict[str, Any], path: str) -> tuple[str, dict[str, Any]]:
    """The stage and dvc.lock out entry that contain `path` (the out itself or a folder out above it)."""
    for stage, entry in lock.items():
        for out in entry.get("outs") or []:
            if path == out["path"] or path.startswith(out["path"].rstrip("/") + "/"):
                return stage, out
    raise StageError(f"{path}: no stage in dvc.lock outputs it; run the pipeline with dvc repro")


def check_against_lock(root: Path, lock: dict[str, Any], paths: list[Path]) -> list[dict[str, str]]:
    """Each path's owning out must hold the bytes dvc.lock records; returns what was read, with hashes."""
    read = []
    for path in paths:
        stage, out = owning_out(lock, rel(root, path))
        actual = dvc_md5(root / out["path"])
        if actual != out.get("md5"):
            raise StageError(
                f"{out['path']} (stage {stage}): the workspace holds md5 {actual}, dvc.lock records "
                f"{out.get('md5')}; run dvc repro so that lineage describes these bytes"
            )
        entry = {"path": rel(root, path), "stage": stage, "out": out["path"], "md5": actual}
        if entry not in read:
            read.append(entry)
    return read


def git_state(root: Path) -> dict[str, Any]:
    """HEAD commit (null outside git or before the first commit) and the tracked files that differ from it."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)

    head = git("rev-parse", "--verify", "HEAD")
    commit = head.stdout.strip() if head.returncode == 0 else None
    status = git("status", "--porcelain", "--untracked-files=no")
    modified = sorted(line[3:] for line in status.stdout.splitlines() if line.strip()) if status.returncode == 0 else []
    return {"commit": commit, "dirty": bool(modified) or commit is None, "modified": modified}


# ---- model card ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Card:
    """What the model card says, all of it read from the stages' records."""

    model: str
    version: str
    registry: str
    candidate: str
    results: BenchmarkResults
    timings: BenchmarkTimings
    labels: dict[str, int]
    ingest: dict[str, Any]
    gates: dict[str, dict[str, Any]]
    fingerprint: dict[str, Any]
    runtime: RuntimeRecord
    git: dict[str, Any]
    content_digest: str
    reject: RejectRecord | None = None

    @property
    def result(self) -> VariantResult:
        return self.results.variants[self.candidate]


def metrics_table(results: BenchmarkResults, timings: BenchmarkTimings, candidate: str) -> str:
    """The published variant against the baselines: accuracy, worst label, size and latency."""
    order = [candidate] + [n for n in ("teacher_fp32", "teacher_int8", "tfidf_logreg") if n in results.variants]
    lines = [
        "| variant | accuracy | macro-F1 | worst label F1 | size MB | end-to-end p50 / p95 ms (p95: median of rounds) "
        "| model p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in order:
        r, timing = results.variants[n], timings.variants[n]
        t, w = timing.latency_ms, r.worst_label_f1
        lines.append(
            f"| {n}{' (published)' if n == candidate else ''} | {r.accuracy:.4f} | {r.macro_f1:.4f} | "
            f"{w['f1']:.3f} ({w['label']}) | {r.size_mb:.2f} | {t.end_to_end.p50:.3f} / {timing.gate_p95():.3f} | "
            f"{t.model.p50:.3f} |"
        )
    return "\n".join(lines)


def _load_snippet(c: Card) -> list[str]:
    rt = c.runtime
    if rt.backend == "kernels":
        return [
            "The INT8 model run by distillery's compiled operators (`pip install distillery`, built with a C++ "
            "compiler; ONNX Runtime runs the same file too, within the build's parity bounds):",
            "```python",
            "import json, numpy as np",
            "from tokenizers import Tokenizer",
            "from distillery_kernels.engine import EngineSession",
            "",
            f'folder = "{c.registry}/{c.model}/{c.version}"  # this folder',
            'tok = Tokenizer.from_file(f"{folder}/tokenizer/tokenizer.json")',
            f"tok.enable_truncation({c.results.max_length})",
            'names = {i: n for n, i in json.load(open(f"{folder}/labels.json")).items()}',
            f'sess = EngineSession(f"{{folder}}/{rt.file}", threads=2)',
            'enc = tok.encode("where is my order?")',
            'feeds = {"input_ids": np.array([enc.ids]), "attention_mask": np.array([enc.attention_mask])}',
            'logits = sess.run(["logits"], feeds)[0][0]',
            "probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()",
            'print(names[int(probs.argmax())], f"{probs.max():.3f}")  # the label and its softmax score',
            "```",
        ]
    if rt.backend != "onnxruntime":
        return [
            f"A TensorRT plan for {rt.device}: deserialize it with `tensorrt.Runtime(...)."
            "deserialize_cuda_engine(open(path, 'rb').read())` on the same GPU model and TensorRT version "
            "as in `lineage.json` (`fingerprint`); inputs `input_ids` and `attention_mask` (int64), output `logits`."
        ]
    return [
        "```python",
        "import json, numpy as np, onnxruntime as ort",
        "from transformers import AutoTokenizer",
        "",
        f'folder = "{c.registry}/{c.model}/{c.version}"  # this folder',
        'tok = AutoTokenizer.from_pretrained(f"{folder}/tokenizer")',
        'names = {i: n for n, i in json.load(open(f"{folder}/labels.json")).items()}',
        'rt = json.load(open(f"{folder}/runtime.json"))  # the session options the benchmark measured',
        "opts = ort.SessionOptions()",
        'opts.intra_op_num_threads = rt["session_options"]["intra_op_num_threads"]',
        "sess = ort.InferenceSession(",
        f'    f"{{folder}}/{rt.file}", opts, providers=rt["providers"],',
        '    disabled_optimizers=rt["session_options"].get("disabled_optimizers", []),',
        ")",
        f'enc = tok(["where is my order?"], truncation=True, max_length={c.results.max_length}, return_tensors="np")',
        "feeds = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}",
        'logits = sess.run(["logits"], feeds)[0][0]',
        "probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()",
        'print(names[int(probs.argmax())], f"{probs.max():.3f}")  # the label and its softmax score',
        "```",
    ]


def _card_head(c: Card) -> list[str]:
    labels = sorted(c.labels, key=c.labels.get)
    return [
        f"# {c.model} {c.version}",
        "",
        f"A text classifier for {len(labels)} intents, published by distillery from variant `{c.candidate}` "
        f"({c.result.precision}, {c.runtime.backend} on {c.runtime.device}). "
        f"Content digest `{c.content_digest}`.",
        "",
        "## Intended use",
        "",
        "Routing short user messages to one of the intents below, in the language and domain of the "
        "training data. Each message gets exactly one label: there is no 'none of these' class, so text "
        "outside these intents still receives one (check the top score if that matters).",
        "",
        "Labels: " + ", ".join(f"`{n}`" for n in labels) + ".",
        "",
    ]


def _card_model(c: Card) -> list[str]:
    arch = c.result.architecture
    if not arch:
        return []
    teacher = c.results.variants.get("teacher_fp32")
    t_arch = teacher.architecture if teacher is not None else None
    layers = arch["layers"]
    compare = (
        f" ({arch['parameters'] / t_arch['parameters']:.0%} of the teacher's {t_arch['parameters']:,} parameters, "
        f"{arch['flops_per_token'] / t_arch['flops_per_token']:.0%} of its {len(t_arch['layers'])}-layer encoder's "
        "FLOPs)"
        if t_arch
        else ""
    )
    return [
        "## Model",
        "",
        f"A BERT-style encoder of {len(layers)} layers, hidden size {arch['hidden']}, attention heads per layer "
        f"{[x['heads'] for x in layers]}, FFN width per layer {[x['ffn'] for x in layers]} (structured pruning "
        f"leaves layers unequal); {arch['parameters']:,} parameters, {arch['flops_per_token'] / 1e6:.1f} MFLOPs "
        f"per token at {arch['seq_len']} tokens{compare}. Distilled from the fine-tuned teacher, then pruned and "
        f"exported as `{c.candidate}` ({c.result.precision}).",
        "",
    ]


def _card_data(c: Card) -> list[str]:
    rows = c.ingest.get("rows", {})
    return [
        "## Data",
        "",
        *[
            f"- `{s.get('uri')}` ({s.get('role')}, {s.get('format')}, {s.get('rows')} rows), sha256 `{s.get('sha256')}`"
            for s in c.ingest.get("sources", [])
        ],
        f"- After ingest: {rows.get('train', '?')} training and {rows.get('test', '?')} test rows; clean "
        "removes empties, duplicates and train/test leakage, and holds out validation rows from training.",
        "- The accuracy below is on the held-out test rows of the same source.",
        "",
    ]


def _card_metrics(c: Card) -> list[str]:
    cpu = (c.fingerprint.get("cpu") or {}).get("model", "unknown CPU")
    gates = [
        f"| {k} | {g['limit']} | {g['measured']} | {'pass' if g['passed'] else 'FAIL'} |"
        for k, g in sorted(c.gates.items())
    ]
    return [
        f"## Metrics ({c.results.test_rows} test rows, batch 1, {c.results.threads} CPU threads, {cpu})",
        "",
        metrics_table(c.results, c.timings, c.candidate),
        "",
        "Latencies and sizes come from the same benchmark run; latencies are timings on the machine above "
        "and vary between runs and machines. The full table with every variant is `data/09_benchmark/report.md` "
        "of the commit below.",
        "",
        _noise_sentence(c.timings),
        "",
        *_per_label(c.result),
        "## Gates (`publish.gates`)",
        "",
        "| gate | limit | measured | result |",
        "|---|---|---|---|",
        "\n".join(gates),
        "",
    ]


def _noise_sentence(t: BenchmarkTimings) -> str:
    measured = f"Timing noise in that run: {t.noise:.1%} (relative standard error between interleaved rounds)"
    if t.noisy:
        return f"**{measured}: the machine was busy and these latencies are unreliable.** Rerun the benchmark idle."
    return f"{measured}: steady."


def _per_label(r: VariantResult, most: int = 20) -> list[str]:
    """F1 of each label on the test rows, weakest first (the `most` weakest when there are more)."""
    if not r.per_label_f1:
        return []
    ranked = sorted(r.per_label_f1.items(), key=lambda kv: (kv[1], kv[0]))
    shown = ranked[:most]
    title = "F1 per label" if len(shown) == len(ranked) else f"F1 of the {most} weakest of {len(ranked)} labels"
    return [f"{title} (test rows):", "", "| label | F1 |", "|---|---|",
            *[f"| {name} | {f1:.3f} |" for name, f1 in shown], ""]  # fmt: skip


def weakest_label_line(r: VariantResult) -> str:
    """The Limitations line on labels: names a weak label only when one stands out (F1 at least 0.05 below
    macro-F1), else says none does, and says when every label scored perfectly (too easy or too small a test)."""
    w = r.worst_label_f1
    if w["f1"] >= 0.9995:
        return ("- Every label scored F1 1.000 on the test rows: the test set is too small or too easy to show "
                "where this model errs; measure it on harder data before relying on it.")  # fmt: skip
    if w["f1"] <= r.macro_f1 - 0.05:
        return (f"- Weakest label: `{w['label']}` (F1 {w['f1']:.3f} against macro-F1 {r.macro_f1:.3f}); "
                "confusions concentrate there.")  # fmt: skip
    return (f"- No label stands out as weak: the lowest F1 is {w['f1']:.3f} (`{w['label']}`), "
            f"macro-F1 {r.macro_f1:.3f}.")  # fmt: skip


def _card_tail(c: Card) -> list[str]:
    git, spec = c.git, f"{c.model}@{c.version}"
    uncommitted = f" (with uncommitted changes: {', '.join(git['modified'])})" if git["modified"] else ""
    int8 = ["- INT8 weights: predictions can differ from the fp32 model on a small share of inputs."]
    return [
        "## Limitations",
        "",
        f"- Inputs longer than {c.results.max_length} tokens are truncated.",
        weakest_label_line(c.result),
        "- Trained on one dataset; accuracy on other domains, languages or phrasing is not measured.",
        *(int8 if c.result.precision == "int8" else []),
        "",
        "## How to load it",
        "",
        *_load_snippet(c),
        "",
        "## Lineage",
        "",
        f"Git commit `{git['commit'] or 'none'}`{uncommitted}. "
        "`lineage.json` holds each stage's dvc.lock entry, the source hashes and the machine fingerprint; "
        f"`python -m flows.lineage show {spec}` prints the chain and "
        f"`python -m flows.lineage verify {spec}` re-hashes it.",
        "",
    ]


def _card_reject(c: Card) -> list[str]:
    r = c.reject
    if r is None or r.method == "none":
        return ["## Out-of-scope rejection", "", "Off (`reject.method: none`): every text gets one of the labels.", ""]
    t = r.test or {}
    fig = lambda key, pct=True: "not measured" if t.get(key) is None else (f"{t[key]:.1%}" if pct else f"{t[key]:.4f}")  # noqa: E731
    lines = [
        "## Out-of-scope rejection",
        "",
        f"A text whose `{r.method}` score is under {r.threshold:.6g} is answered `{r.label}` (with its score) instead "
        f"of an intent. The threshold keeps {r.in_scope_recall:.0%} of {r.val_rows} validation rows of known intents "
        "accepted (`reject.json`).",
        "",
        f"On the test rows: {fig('in_scope_accepted')} of {t.get('in_scope_rows', '?')} in-scope rows accepted, "
        f"in-scope accuracy with rejection on {fig('in_scope_accuracy')}; {t.get('out_of_scope_rows', 0)} "
        f"out-of-scope rows: rejected {fig('out_of_scope_recall')}, AUROC {fig('auroc', False)}, FPR at 95% "
        f"in-scope recall {fig('fpr_at_95')}.",
        "",
    ]
    if not t.get("out_of_scope_rows"):
        lines += ["No out-of-scope rows were measured (set `clean.holdout_labels` or `clean.oos_label`): how well "
                  "unknown intents are rejected is not known.", ""]  # fmt: skip
    return lines


def model_card(c: Card) -> str:
    parts = [*_card_head(c), *_card_model(c), *_card_data(c), *_card_metrics(c), *_card_reject(c), *_card_tail(c)]
    return "\n".join(parts)


REJECT_STATS = "reject.safetensors"


def reject_record(result: VariantResult, r: RejectParams) -> RejectRecord:
    """reject.json of the candidate: its threshold for `reject.method` as benchmark calibrated it."""
    if r.method == "none":
        return RejectRecord(method="none", label=r.label)
    figures = result.rejection or {}
    method = (figures.get("methods") or {}).get(r.method)
    if method is None:
        raise StageError(f"benchmark's metrics.json has no {r.method} rejection figures for the candidate: rerun "
                         "dvc repro benchmark")  # fmt: skip
    if figures.get("in_scope_recall") != r.in_scope_recall:
        raise StageError(f"benchmark calibrated rejection for in_scope_recall {figures.get('in_scope_recall')}, "
                         f"params.yaml says {r.in_scope_recall}: rerun dvc repro benchmark")  # fmt: skip
    test = {k: v for k, v in method.items() if k != "threshold"}
    stats = REJECT_STATS if r.method == "mahalanobis" else None
    return RejectRecord(method=r.method, label=r.label, threshold=method["threshold"],
                        in_scope_recall=r.in_scope_recall, val_rows=figures.get("val_rows"), test=test,
                        stats=stats)  # fmt: skip


# ---- the version ---------------------------------------------------------------------------------------


def runtime_record(engine: Engine | None, session_options: dict[str, Any] | None, candidate: str,
                   max_length: int | None = None) -> RuntimeRecord:  # fmt: skip
    """runtime.json of a version: the engine's backend and providers (quantize's files run on ONNX Runtime's
    CPU provider) and, for ONNX Runtime, the session options benchmark measured with."""
    backend = engine.backend if engine else "onnxruntime"
    providers = (engine.providers if engine else None) or ["CPUExecutionProvider"]
    options = None
    if backend == "onnxruntime":
        cpu_only = all(p == "CPUExecutionProvider" for p in providers)
        # optimizers disabled for CPU kernels' sake do not apply to GPU sessions
        options = {k: v for k, v in (session_options or {}).items() if cpu_only or k != "disabled_optimizers"}
    return RuntimeRecord(
        variant=candidate,
        file="model" + (".plan" if backend == "tensorrt" else ".onnx"),
        backend=backend,
        device=(engine.device if engine else None) or "cpu",
        providers=providers,
        inputs=["input_ids", "attention_mask"],
        outputs=["logits"],
        session_options=options,
        max_length=max_length,
        block=engine.block if engine and backend == "kernels" else None,
    )


@dataclass(frozen=True)
class Release:
    """Everything one version is made of, read and checked by `gather`."""

    decision: Decision
    results: BenchmarkResults
    timings: BenchmarkTimings
    source: Path  # the model file to publish
    tokenizer: Path
    labels_file: Path
    runtime: RuntimeRecord
    reads: list[dict[str, str]]  # the stage outputs read, with the hashes dvc.lock records
    lock: dict[str, Any]
    ingest: dict[str, Any]
    fingerprint: dict[str, Any]
    reject: RejectRecord
    reject_stats: Path | None = None  # benchmark's Mahalanobis statistics of the candidate (reject.method: mahalanobis)

    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        t = self.timings.variants
        return {n: {**r.to_dict(), **t[n].to_dict()} for n, r in self.results.variants.items() if n in t}


def gather(args: Any, root: Path, p: PublishParams, reject: RejectParams) -> Release:
    """Read benchmark's records, choose the candidate, and check that every file to publish holds the bytes
    benchmark measured and dvc.lock records."""
    results = BenchmarkResults.read(require(args.inp / "metrics.json", "benchmark"))
    timings = BenchmarkTimings.read(require(args.inp / "timings.json", "benchmark (dvc repro benchmark)"))
    decision = decide(results, timings, p, reject.method)
    row = results.variants[decision.candidate]
    source = root / row.file
    if not source.is_file():
        raise StageError(f"{row.file}: the file of variant {decision.candidate} is missing; run dvc repro")
    if sha256_file(source) != row.sha256:
        raise StageError(f"{row.file}: differs from the file benchmark measured; run dvc repro")
    tokenizer, labels_file = args.quantize / "tokenizer", args.clean / "labels.json"
    ingest_file, machine_file = args.ingest / "ingest.json", args.fingerprint / "fingerprint.json"
    manifest_file = args.build / "manifest.json"
    lock = read_lock(root)
    stats = None
    if reject.method == "mahalanobis":
        stats = require(args.inp / "rejection" / f"{decision.candidate}.safetensors", "benchmark (a model with pooled)")
    inputs = [
        source,
        tokenizer,
        labels_file,
        args.inp / "metrics.json",
        args.inp / "timings.json",
        *([stats] if stats else []),
    ]
    reads = check_against_lock(root, lock, [*inputs, ingest_file, machine_file, manifest_file])
    manifest = BuildManifest.read(manifest_file)
    options_file = args.build / manifest.session_options
    options = json.loads(options_file.read_text(encoding="utf-8")) if options_file.is_file() else None
    runtime = runtime_record(manifest.engines.get(decision.candidate), options, decision.candidate, results.max_length)
    read_json = lambda path: json.loads(path.read_text(encoding="utf-8"))  # noqa: E731
    return Release(decision, results, timings, source, tokenizer, labels_file, runtime, reads, lock,
                   read_json(ingest_file), read_json(machine_file), reject_record(row, reject), stats)  # fmt: skip


def lineage_record(root: Path, r: Release, p: PublishParams, version: str, payload: dict[str, str],
                   experiment: str | None = None) -> Lineage:  # fmt: skip
    d, order = r.decision, stage_order(root)
    return Lineage(
        model=p.model,
        version=version,
        variant=d.candidate,
        content_digest=payload_digest(payload),
        git=git_state(root),
        files=payload,
        published_from={"file": rel(root, r.source), "sha256": r.results.variants[d.candidate].sha256 or ""},
        publish={
            "params": {"gates": p.gates, "latency_margin": p.latency_margin, "version": p.version, "tag": p.tag},
            "reads": r.reads,
            "margin_used": d.margin,  # max(latency_margin, twice benchmark's noise), at most 0.5
            **({"experiment": experiment} if experiment else {}),
        },
        stages=[{"name": s, **r.lock[s]} for s in order if s in r.lock and s != "publish"],
        sources=r.ingest.get("sources", []),
        fingerprint=r.fingerprint,
        benchmark={"variant": r.rows[d.candidate], "gates": d.gates},
    )


def choose_version(existing: dict[str, str], digest: str, p: PublishParams, model_dir: Path) -> tuple[str, bool]:
    """(version, new): the version already holding this content, else the next one (never an existing one)."""
    same = sorted((v for v, d in existing.items() if d == digest), key=version_key)
    if same:
        if p.version not in ("auto", same[-1]):
            print(f"publish: content already published as {same[-1]}; publish.version {p.version} not used",
                  file=sys.stderr)  # fmt: skip
        return same[-1], False
    version = next_version(existing, p.version)
    if version in existing or (model_dir / version).exists() or (model_dir / version).is_symlink():
        raise StageError(
            f"publish.version: {model_dir / version} exists with other content (or outside the registry's index); "
            "a version is never overwritten (set publish.version: auto or a new x.y.z, or move the folder away)"
        )
    return version, True


def adopt_unindexed(model_dir: Path, digest: str) -> str | None:
    """A publish killed between renaming its version into place and indexing it leaves a complete, unindexed
    folder: if one holds exactly this content and its SHA256SUMS hold, index it (the rerun finishes the
    publish); returns its version."""
    indexed = set(existing_versions(model_dir))
    for version in folders(model_dir):
        folder = model_dir / version
        sums = read_sums(folder)
        if version in indexed or payload_digest(sums) != digest:
            continue
        if file_sums(folder) == sums:
            append_index(model_dir, index_entry(folder))
            print(f"publish: indexed {version}, left complete but unindexed by an interrupted publish", file=sys.stderr)
            return version
    return None


def publish(root: Path, r: Release, p: PublishParams, base: Path | None = None,
            experiment: str | None = None) -> tuple[str, Path, bool]:  # fmt: skip
    """Add the release to the registry `base / p.registry` (base: the repository) as a new version, or find the
    version that holds its content. Returns (version, its folder, whether this call wrote it). One publisher
    per model at a time: a second waits, then finds the first one's version if the content is the same."""
    base = base or root
    model_dir = contained(base, base / p.registry / p.model)
    with locked(model_dir):
        for stale in model_dir.glob(".publish-*"):  # drafts of a killed publish (none is running: we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        return write_version(root, r, p, model_dir, experiment)


def write_version(root: Path, r: Release, p: PublishParams, model_dir: Path,
                  experiment: str | None) -> tuple[str, Path, bool]:  # fmt: skip
    """The body of `publish`, under the model's lock: draft the payload, finish an interrupted publish of the
    same content, choose the version, then write lineage and card and commit (sign, index) the draft."""
    with Draft(model_dir) as draft:
        start_index(model_dir)
        # The payload first: it decides whether this content is already published.
        draft.add(r.runtime.file, r.source)
        draft.add("tokenizer", r.tokenizer)
        draft.add("labels.json", r.labels_file)
        draft.add("runtime.json", record_text(r.runtime))
        draft.add("reject.json", record_text(r.reject))  # it changes the answers: part of the content
        if r.reject_stats is not None:
            draft.add(REJECT_STATS, r.reject_stats)
        payload = draft.sums()
        adopt_unindexed(model_dir, draft.digest())
        version, new = choose_version(existing_versions(model_dir), draft.digest(), p, model_dir)
        if p.tag:
            tag_precheck(root, f"{p.model}@v{version}")
        if not new:
            return version, model_dir / version, False
        lineage = lineage_record(root, r, p, version, payload, experiment)
        labels = json.loads(r.labels_file.read_text(encoding="utf-8"))
        card = Card(p.model, version, p.registry, r.decision.candidate, r.results, r.timings, labels, r.ingest,
                    r.decision.gates, r.fingerprint, r.runtime, lineage.git, lineage.content_digest,
                    r.reject)  # fmt: skip
        draft.add("lineage.json", record_text(lineage))
        draft.add("model_card.md", model_card(card))
        return version, draft.commit(version, p.sign), True


def tag_precheck(root: Path, tag: str) -> bool:
    """True if `tag` already exists; a StageError if git cannot tag here."""
    head = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        raise StageError(f"publish.tag: {root} is not a git repository with a commit to tag")
    found = subprocess.run(["git", "tag", "--list", tag], cwd=root, capture_output=True, text=True)
    return bool(found.stdout.strip())


def add_tag(root: Path, model: str, version: str) -> str:
    """An annotated tag `<model>@v<version>` on HEAD (GTO's form), unless it exists."""
    tag = f"{model}@v{version}"
    if tag_precheck(root, tag):
        return tag
    made = subprocess.run(
        ["git", "tag", "-a", tag, "-m", f"Registering artifact {model} version v{version}"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        raise StageError(f"publish.tag: {model} {version} is published but git tag {tag} failed: {made.stderr.strip()}")
    return tag


def experiment_target(p: PublishParams, root: Path) -> tuple[PublishParams, Path, str | None]:
    """Where this run publishes: under a DVC experiment (DVC sets `DVC_EXP_NAME` for `dvc exp run`, and
    `DVC_ROOT` to the project when a queued experiment runs in a temporary copy), `publish.experiment_registry`
    of the project, never tagged; else `publish.registry`."""
    experiment = os.environ.get("DVC_EXP_NAME") or None
    if experiment is None:
        return p, root, None
    base = Path(os.environ.get("DVC_ROOT") or root)
    print(f"publish: experiment {experiment}: publishing to {p.experiment_registry}, not {p.registry}", file=sys.stderr)
    return dataclasses.replace(p, registry=p.experiment_registry, tag=False), base, experiment


@stage_entrypoint("publish")
def main(argv: list[str] | None = None) -> int:
    """`python -m stages.publish --in data/09_benchmark --ingest … --clean … --quantize … --build …
    --fingerprint … --out data/10_publish`."""
    more = ("ingest", "clean", "quantize", "build", "fingerprint")
    args = stage_args("publish", __doc__, argv, upstream="benchmark", more=more)
    p = read_params(PublishParams, "publish", args.params)
    reject = read_params(RejectParams, "reject", args.params)
    root = Path.cwd()
    release = gather(args, root, p, reject)
    p, base, experiment = experiment_target(p, root)
    version, target, new = publish(root, release, p, base, experiment)
    tag = add_tag(root, p.model, version) if p.tag else None
    d = release.decision
    # Only what the same inputs always give: the payload's digests (not the model card's or lineage's, which
    # quote timings) and each gate's limit and outcome (the measured latencies are in lineage.json). Whether
    # this run wrote the version or found it is printed, not recorded, so a forced rerun changes nothing.
    files = payload_sums(read_sums(target))
    receipt = {
        "model": p.model,
        "version": version,
        "path": rel(base, target),  # relative to the project (also for a queued experiment)
        "variant": d.candidate,
        "content_digest": payload_digest(files),
        "files": files,
        "gates": {k: {"limit": g["limit"], "passed": g["passed"]} for k, g in sorted(d.gates.items())},
        "tag": tag,
        "benchmark_report": rel(root, args.inp / "report.md"),
        **({"experiment": experiment} if experiment else {}),
    }
    title = f"{p.model} {version}: {d.candidate} published ({release.results.test_rows} test rows)"
    with outputs() as w:
        w.json(args.out / "receipt.json", receipt)
        # a run record (timings): the benchmark's picture with the published variant circled
        front = release.timings.pareto_front
        w.file(args.out / "pareto.png", lambda path: pareto_png(path, release.rows, front, title, d.candidate))
    if new:
        print(f"publish: {p.model} {version} <- {d.candidate} ({rel(root, release.source)})", file=sys.stderr)
    else:
        print(
            f"publish: {d.candidate} is already published as {p.model} {version}; registry unchanged", file=sys.stderr
        )
    print(f"publish: {'published' if new else 'existing'} {p.model}@{version} -> {rel(base, target)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
