"""Stage `benchmark`: every variant measured side by side, in one run, on the same test rows.

Variants:
- `teacher_fp32`: the fine-tuned teacher in PyTorch.
- `teacher_int8`: the teacher exported and quantized dynamically with ONNX Runtime (what the usual
  export-and-quantize tools give), as `distill` wrote it (`onnx/teacher.int8.onnx`).
- `tfidf_logreg`: word (1-2) and character (2-5) n-gram TF-IDF with logistic regression, fit here on
  clean's training rows. It is the classical baseline a user tries first.
- `student_fp32`: the distilled student before pruning, exported here.
- `student_pruned` and `student_int8`: quantize's `model.onnx` and `model.int8.onnx`.
- Every engine `build` made: the fused ONNX Runtime engines and, on GPU hosts, TensorRT and ONNX
  Runtime's GPU providers.

For each variant:
- test accuracy, macro-F1 and the worst label's F1;
- file size;
- latency at batch 1 over real test queries, p50/p95/p99, model-only and end to end (text in, label out,
  tokenization included) timed on the same calls, within `benchmark.time_budget_s`; also the median of the
  rounds' p95s (`p95_rounds`), the tail statistic `publish.gates.max_p95_ms` reads;
- model-only throughput at batch 32 and 64;
- peak memory of a fresh process that loads the variant and runs it at batch 64;
- efficiency: achieved FLOP/s at batch 64 over the GEMM peak measured here, in this run. The peak is
  ONNX Runtime's MatMul at the model's own shape and at a large square, fp32 and INT8. The fraction uses
  the large square of the variant's precision.
Latencies are measured in interleaved rounds, so load drift falls on all variants alike; the spread of the
per-round ratios gives the noise, and above 5% report.md and the model card flag the timings as noisy.

Publishable variants are quantize's two ONNX files and every engine, the files publish can ship (each row
names its file and SHA-256); teacher and TF-IDF are baselines; `student_fp32` (the unpruned student,
exported here into a temporary folder) is a reference. Benchmark measures and does not choose: publish
applies `publish.gates` and picks the candidate (`stages.publish.choose_candidate`).

Out-of-scope rejection (`reject:`; `stages.model.rejection`): every method calibrated for every variant on
clean's validation rows of known intents and scored on the test rows and clean's test_oos rows; Mahalanobis
for each model that outputs its pooled embedding, its class statistics fitted on clean's training rows.

Outputs: `metrics.json` (per variant: accuracy, macro-F1, per-label F1, size, architecture, file and SHA-256,
rejection figures; the same bytes on every run of the same inputs), `rejection/<variant>.safetensors` (the
Mahalanobis statistics of each publishable variant, which publish ships), `summary.json` (accuracy,
macro-F1 and size per variant: the stage's DVC metric, few columns for `dvc exp show`), `timings.json`
(latency, throughput, memory, efficiency, the GEMM peak, the Pareto front and the round-to-round noise: they
vary between runs and machines), and the timing views `report.md`, `plots/{pareto,latency}.csv` (DVC plots)
and `png/`.
"""

from __future__ import annotations

import json
import sys
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.numpy import save_file

from stages.model import rejection
from stages.model.encoder import FLOPS_SEQ_LEN, TokenizedTexts, flops_per_token, layer_shapes, load, load_tokenizer
from stages.model.evaluation import label_quality
from stages.model.rejection import RejectParams
from stages.plots import latency_png, pareto_png
from stages.records import (
    NOISE_LIMIT,
    BenchmarkResults,
    BenchmarkTimings,
    BuildManifest,
    Latency,
    Percentiles,
    VariantResult,
    VariantTiming,
)
from stages.runner.cli import read_frames, require, stage_args, stage_entrypoint
from stages.runner.errors import ParamError, StageError
from stages.runner.params import read_params
from stages.runner.progress import Progress
from stages.runtime.memory import Probes, peak_memory
from stages.runtime.onnx import export_onnx, feeds
from stages.runtime.sessions import session
from stages.runtime.settings import RuntimeParams
from stages.runtime.tensorrt import TrtRunner
from stages.runtime.timing import (
    Interleaved,
    Query,
    interleaved_queries,
    percentiles,
    relative_speed,
    round_p95s,
    timed_calls,
)
from stages.storage.atomic import outputs
from stages.storage.hashing import sha256_file


@dataclass(frozen=True)
class BenchmarkParams:
    time_budget_s: float = 15.0  # seconds of batch-1 timing for all variants together
    rounds: int = 10  # ...taken in this many interleaved rounds over all variants
    throughput_batches: int = 4  # batches of 32 and of 64 timed per variant
    memory: bool = True  # peak memory per variant (a fresh process each)
    gemm_square: int = 1024  # the large-square GEMM of the peak measurement (M = K = N)
    tfidf_c: float = 10.0  # inverse regularization of the logistic regression
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("rounds", "throughput_batches", "gemm_square"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ParamError(f"benchmark.{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.rounds < 4:
            raise ParamError(f"benchmark.rounds must be at least 4 (their spread gives the noise), got {self.rounds}")
        if self.time_budget_s <= 0:
            raise ParamError(f"benchmark.time_budget_s must be > 0 seconds, got {self.time_budget_s}")
        if self.tfidf_c <= 0:
            raise ParamError(f"benchmark.tfidf_c must be > 0, got {self.tfidf_c}")


# ---- variants ----------------------------------------------------------------------------------------


class Variant(ABC):
    """One model under test. `batch(texts)` prepares inputs (tokenizing, or vectorizing); `run_batch`
    runs the model alone on them and returns logits; `label(text)` goes from text to label id."""

    name: str
    precision: str = "fp32"
    device: str = "cpu"
    files: list[Path]
    tokenizer: Any = None
    flops_model: Any = None  # a TextClassifier with the variant's shapes, for FLOPs per token
    max_length: int = 64
    artifact: Path | None = None  # the file publish would ship: set only for a file in a stage's outputs

    def batch(self, texts: list[str]) -> Any:
        return feeds(TokenizedTexts(self.tokenizer, texts, self.max_length).batch(range(len(texts))))

    @abstractmethod
    def run_batch(self, batch: Any) -> np.ndarray: ...

    def label(self, text: str) -> int:
        return int(np.argmax(self.run_batch(self.batch([text]))[0]))

    def run_pooled(self, batch: Any) -> np.ndarray | None:
        """The pooled sentence embeddings of a batch, for Mahalanobis rejection; None when the model has none."""
        return None

    def rows(self, run: Any, texts: list[str]) -> np.ndarray:
        """`run` over all rows, in batches of 64 formed from texts sorted by length (as the stages score)."""
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = [run(self.batch([texts[i] for i in order[s : s + 64]])) for s in range(0, len(texts), 64)]
        return np.concatenate(out)[np.argsort(order, kind="stable")]

    def logits(self, texts: list[str]) -> np.ndarray:
        return self.rows(self.run_batch, texts)

    def pooled(self, texts: list[str]) -> np.ndarray | None:
        if not texts or self.run_pooled(self.batch(texts[:1])) is None:
            return None
        return self.rows(self.run_pooled, texts)

    def size_mb(self) -> float:
        return round(sum(f.stat().st_size for f in self.files) / 1e6, 4)


class OrtVariant(Variant):
    def __init__(self, name: str, path: Path, tokenizer: Any, rt: RuntimeParams, **kw: Any):
        self.name, self.files, self.tokenizer, self.max_length = name, [path], tokenizer, rt.max_length
        self.precision = kw.get("precision", "fp32")
        self.flops_model = kw.get("flops_model")
        providers = kw.get("providers")
        self.sess = session(path, rt.threads, providers=providers)
        if providers and self.sess.get_providers()[0] != providers[0]:
            raise StageError(f"{name}: {providers[0]} fell back to {self.sess.get_providers()}")
        self.device = "cuda" if providers else "cpu"

    def run_batch(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.sess.run(["logits"], batch)[0]

    def run_pooled(self, batch: dict[str, np.ndarray]) -> np.ndarray | None:
        if "pooled" not in {o.name for o in self.sess.get_outputs()}:
            return None  # exported before models carried it
        return self.sess.run(["pooled"], batch)[0]


class KernelsVariant(OrtVariant):
    """The kernels engine (distillery_kernels.engine) on quantize's INT8 model, through its session adaptor."""

    def __init__(self, name: str, path: Path, tokenizer: Any, rt: RuntimeParams, **kw: Any):
        from distillery_kernels.engine import EngineSession

        self.name, self.files, self.tokenizer, self.max_length = name, [path], tokenizer, rt.max_length
        self.precision, self.flops_model, self.device = "int8", kw.get("flops_model"), "cpu"
        self.block = kw.get("block")  # block-sparse packing (kernels_int8_sparse), None: dense
        self.sess = EngineSession(path, rt.threads, block=self.block)


class TorchVariant(Variant):
    def __init__(self, name: str, folder: Path, rt: RuntimeParams):
        self.name, self.files, self.max_length = name, [folder / "model.safetensors"], rt.max_length
        self.model, self.tokenizer, _ = load(folder)
        self.flops_model = self.model

    @torch.no_grad()
    def run_batch(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.model(**{k: torch.from_numpy(v) for k, v in batch.items()})[0].numpy()

    @torch.no_grad()
    def run_pooled(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.model(**{k: torch.from_numpy(v) for k, v in batch.items()})[1].numpy()


class TfidfVariant(Variant):
    """Word 1-2-gram and character 2-5-gram (within word boundaries) TF-IDF, logistic regression."""

    def __init__(self, train: pl.DataFrame, labels: dict[str, int], p: BenchmarkParams):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_union

        self.name, self.files = "tfidf_logreg", []
        self.vectorizer = make_union(
            TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2),
        )
        x = self.vectorizer.fit_transform(train["text"].to_list())
        y = np.array([labels[v] for v in train["label"]])
        self.clf = LogisticRegression(C=p.tfidf_c, max_iter=2000, random_state=p.seed).fit(x, y)
        self.n_labels = len(labels)

    def batch(self, texts: list[str]) -> Any:
        return self.vectorizer.transform(texts)

    def run_batch(self, batch: Any) -> np.ndarray:
        """Scores for every label id (labels absent from training score -inf)."""
        scores = self.clf.decision_function(batch).reshape(batch.shape[0], -1)
        full = np.full((batch.shape[0], self.n_labels), -np.inf)
        full[:, self.clf.classes_] = scores
        return full

    def size_mb(self) -> float:
        """Weights and vocabulary as they would be stored (float32 numbers, UTF-8 terms)."""
        parts = [v for _, v in self.vectorizer.transformer_list]
        vocab = sum(len(t.encode()) + 4 for v in parts for t in v.vocabulary_)
        numbers = self.clf.coef_.size + self.clf.intercept_.size + sum(v.idf_.size for v in parts)
        return round((vocab + 4 * numbers) / 1e6, 4)


class TrtVariant(Variant):
    def __init__(self, name: str, plan: Path, tokenizer: Any, rt: RuntimeParams, precision: str, flops_model: Any):
        self.name, self.files, self.tokenizer, self.max_length = name, [plan], tokenizer, rt.max_length
        self.precision, self.flops_model, self.device = precision, flops_model, "cuda"
        self.runner = TrtRunner(plan.read_bytes())

    def run_batch(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.runner.run(batch)


# ---- measurements ------------------------------------------------------------------------------------


def throughput(variant: Variant, texts: list[str], batch_size: int, batches: int) -> tuple[float, float]:
    """(queries per second, achieved FLOP/s) of the model alone over consecutive test rows."""
    n = len(texts)
    prepared = [
        variant.batch([texts[(s + i) % n] for i in range(batch_size)])
        for s in range(0, batches * batch_size, batch_size)
    ]
    variant.run_batch(prepared[0])  # warm-up
    seconds = sum(timed_calls(variant.run_batch, prepared)) / 1000.0
    flops = 0.0
    if variant.flops_model is not None:
        for batch in prepared:
            width = batch["input_ids"].shape[1]
            flops += batch_size * width * flops_per_token(variant.flops_model, width)
    return round(batch_size * batches / seconds, 2), flops / seconds


def gemm_peaks(threads: int, square: int, model_shape: tuple[int, int, int]) -> dict[str, Any]:
    """GFLOP/s of ONNX Runtime's MatMul (fp32) and MatMulInteger (uint8 x int8) on this machine, at the
    model's own (M, K, N) and at a large square."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"shapes": {"model": list(model_shape), "large_square": [square] * 3}}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "int8"):
            out[precision] = {}
            for label, (m, k, n) in (("model", model_shape), ("large_square", (square, square, square))):
                if precision == "fp32":
                    weight = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
                    node = helper.make_node("MatMul", ["a", "w"], ["y"])
                    a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
                    a = rng.standard_normal((m, k)).astype(np.float32)
                else:
                    weight = numpy_helper.from_array(rng.integers(-127, 127, (k, n), dtype=np.int8), "w")
                    node = helper.make_node("MatMulInteger", ["a", "w"], ["y"])
                    a_type, y_type = TensorProto.UINT8, TensorProto.INT32
                    a = rng.integers(0, 255, (m, k), dtype=np.uint8)
                graph = helper.make_graph(
                    [node],
                    "gemm",
                    [helper.make_tensor_value_info("a", a_type, [m, k])],
                    [helper.make_tensor_value_info("y", y_type, [m, n])],
                    [weight],
                )
                model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
                path = Path(tmp) / f"{precision}_{label}.onnx"
                onnx.save(model, str(path))
                sess = session(path, threads)
                sess.run(["y"], {"a": a})
                runs = max(3, min(50, int(2e10 / (2 * m * k * n))))
                best = min(timed_calls(lambda x, s=sess: s.run(["y"], {"a": x}), [a] * runs))
                out[precision][label] = round(2 * m * k * n / (best / 1000.0) / 1e9, 2)
    return out


def pareto_front(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Variants no other variant beats on both accuracy (higher) and end-to-end p50 (lower)."""
    front = []
    for name, row in rows.items():
        lat, acc = row["latency_ms"]["end_to_end"]["p50"], row["accuracy"]
        dominated = any(
            (o["accuracy"] >= acc and o["latency_ms"]["end_to_end"]["p50"] <= lat)
            and (o["accuracy"] > acc or o["latency_ms"]["end_to_end"]["p50"] < lat)
            for other, o in rows.items()
            if other != name
        )
        if not dominated:
            front.append(name)
    return sorted(front)


def report_table(rows: dict[str, dict[str, Any]]) -> str:
    head = (
        "| variant | acc | macro-F1 | worst label F1 | MB | model p50 / p95 / p99 ms "
        "| end-to-end p50 / p95 / p95 (rounds) ms | qps @32 | qps @64 | peak MB | of GEMM peak |"
    )
    lines = [head, "|" + "---|" * 11]
    for name, r in rows.items():
        m, e = r["latency_ms"]["model"], r["latency_ms"]["end_to_end"]
        mem = r.get("peak_memory_mb")
        frac = r.get("peak_fraction")
        lines.append(
            f"| {name} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
            f"{r['worst_label_f1']['f1']:.3f} ({r['worst_label_f1']['label']}) | {r['size_mb']:.2f} | "
            f"{m['p50']:.3f} / {m['p95']:.3f} / {m['p99']:.3f} | {e['p50']:.3f} / {e['p95']:.3f} / "
            f"{e.get('p95_rounds', e['p95']):.3f} | "
            f"{r['throughput_qps']['batch_32']:.0f} | {r['throughput_qps']['batch_64']:.0f} | "
            f"{'-' if mem is None else f'{mem:.0f}'} | {'-' if frac is None else f'{frac:.1%}'} |"
        )
    return "\n".join(lines)


def write_plots(folder: Path, m: Measured) -> None:
    r, t = m.results, m.timings
    runs = f"{r.test_rows} test rows, {t.runs} queries per variant, {r.threads} threads"
    pareto_png(folder / "pareto.png", m.rows(), t.pareto_front, f"Accuracy against latency ({runs})")
    latency_png(folder / "latency.png", m.samples, f"Model-only latency at batch 1 ({runs})")


# ---- the variants of this run ----------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """The folders benchmark reads, by the stage that writes each."""

    clean: Path
    distill: Path
    train: Path
    prune: Path
    quantize: Path
    build: Path


def baselines(inputs: Inputs, train: pl.DataFrame, labels: dict[str, int], p: BenchmarkParams,
              rt: RuntimeParams, work: Path) -> list[Variant]:  # fmt: skip
    """The teacher (PyTorch, and as distill exported and quantized it), TF-IDF, the unpruned student (exported
    here into `work`)."""
    teacher = TorchVariant("teacher_fp32", inputs.distill / "teacher", rt)
    teacher_int8 = require(inputs.distill / "onnx" / "teacher.int8.onnx", "distill")
    variants: list[Variant] = [
        teacher,
        OrtVariant("teacher_int8", teacher_int8, teacher.tokenizer, rt, precision="int8", flops_model=teacher.model),
        TfidfVariant(train, labels, p),
    ]
    student, student_tok, _ = load(inputs.train / "student")
    student_onnx = work / "student.onnx"
    export_onnx(student, student_tok, student_onnx, 18)
    variants.append(OrtVariant("student_fp32", student_onnx, student_tok, rt, flops_model=student))
    return variants


def engine_variant(name: str, engine: Any, inputs: Inputs, tokenizer: Any, rt: RuntimeParams, pruned: Any) -> Variant:
    """The variant of one built engine of build's manifest."""
    path, kw = engine.model_path(inputs.build, inputs.quantize), {"precision": engine.precision, "flops_model": pruned}
    if engine.backend == "tensorrt":
        return TrtVariant(name, path, tokenizer, rt, engine.precision, pruned)
    if engine.backend == "kernels":  # a RuntimeError with the reason where the operators are not built here
        return KernelsVariant(name, path, tokenizer, rt, flops_model=pruned, block=engine.block)
    if engine.device == "cpu":
        return OrtVariant(name, path, tokenizer, rt, **kw)
    return OrtVariant(name, path, tokenizer, rt, providers=[engine.providers[0], "CPUExecutionProvider"], **kw)


def publishable_variants(inputs: Inputs, rt: RuntimeParams) -> tuple[list[Variant], dict[str, str]]:
    """quantize's two files and every engine build made (what publish can ship), and the engines not
    measured here with why."""
    tokenizer = load_tokenizer(inputs.quantize / "tokenizer")
    pruned, _, _ = load(inputs.prune / "student")
    q = inputs.quantize
    variants: list[Variant] = [
        OrtVariant("student_pruned", q / "model.onnx", tokenizer, rt, flops_model=pruned),
        OrtVariant("student_int8", q / "model.int8.onnx", tokenizer, rt, precision="int8", flops_model=pruned),
    ]
    manifest = BuildManifest.read(require(inputs.build / "manifest.json", "build"))
    skipped = {}
    for name, engine in sorted(manifest.engines.items()):
        if not engine.built:
            skipped[name] = f"{engine.status}: {engine.reason or ''}"
            continue
        try:
            variants.append(engine_variant(name, engine, inputs, tokenizer, rt, pruned))
        except (StageError, ImportError, RuntimeError) as exc:
            skipped[name] = f"could not load here: {exc}"
    for v in variants:
        v.artifact = v.files[0]
    return variants, skipped


def teacher_probe(inputs: Inputs) -> dict[str, Any]:
    return {"kind": "torch", "path": str(inputs.distill / "teacher")}


def memory_probes(variants: list[Variant], inputs: Inputs) -> dict[str, dict[str, Any]]:
    """What each fresh memory-probe process loads: the PyTorch teacher and every CPU ONNX variant."""
    probes = {}
    for v in variants:
        if isinstance(v, TorchVariant):
            probes[v.name] = teacher_probe(inputs)
        elif isinstance(v, OrtVariant) and v.device == "cpu":
            tok_dir = inputs.distill / "teacher" if v.name == "teacher_int8" else inputs.quantize / "tokenizer"
            if v.name == "student_fp32":
                tok_dir = inputs.train / "student"
            kind = "kernels" if isinstance(v, KernelsVariant) else "onnx"
            probes[v.name] = {"kind": kind, "path": str(v.files[0]), "tokenizer": str(tok_dir)}
            if isinstance(v, KernelsVariant) and v.block:
                probes[v.name]["block"] = list(v.block)
    return probes


# ---- the measurement ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """What `benchmark` returns: results (deterministic), timings, and the raw model-only samples (plots)."""

    results: BenchmarkResults
    timings: BenchmarkTimings
    samples: dict[str, list[float]]

    def rows(self) -> dict[str, dict[str, Any]]:
        """Each variant's results and timings in one dict, for the report and plots."""
        t = self.timings.variants
        return {n: {**r.to_dict(), **t[n].to_dict()} for n, r in self.results.variants.items()}


@dataclass(frozen=True)
class ScopeRows:
    """What out-of-scope rejection is fitted on (clean's training rows: Mahalanobis class statistics),
    calibrated on (validation rows of known intents) and scored against (clean's test_oos rows:
    `clean.oos_label` and held-out intents). `stats` collects each variant's fitted Mahalanobis statistics."""

    train: list[str]
    train_labels: list[int]
    val: list[str]
    test_oos: list[str]
    recall: float
    stats: dict[str, rejection.MahalanobisStats] = field(default_factory=dict)


def score(v: Variant, texts: list[str], truth: list[int], names: list[str],
          scope: ScopeRows | None = None) -> VariantResult:  # fmt: skip
    print(f"benchmark: scoring {v.name}", file=sys.stderr)
    logits = v.logits(texts)
    row = {**label_quality(logits, truth, names), "size_mb": v.size_mb()}
    if scope is not None and scope.val:
        oos = v.logits(scope.test_oos) if scope.test_oos else np.zeros((0, len(names)))
        row["rejection"] = rejection.fit_and_evaluate(v.logits(scope.val), logits, oos, truth, scope.recall)
        fitted = mahalanobis(v, texts, truth, names, scope, logits)
        if fitted is not None:
            scope.stats[v.name], row["rejection"]["methods"]["mahalanobis"] = fitted
    extra = {"file": v.artifact.as_posix(), "sha256": sha256_file(v.artifact)} if v.artifact is not None else {}
    arch = architecture(v.flops_model) if v.flops_model is not None else None
    return VariantResult(**row, precision=v.precision, device=v.device, publishable=v.artifact is not None,
                         architecture=arch, **extra)  # fmt: skip


def mahalanobis(v: Variant, texts: list[str], truth: list[int], names: list[str], scope: ScopeRows,
                logits: np.ndarray) -> tuple[rejection.MahalanobisStats, dict[str, Any]] | None:  # fmt: skip
    """Mahalanobis rejection of a variant whose model outputs the pooled embedding: class means and shared
    covariance from the training rows, threshold on validation, figures on the test rows."""
    train = v.pooled(scope.train)
    if train is None:
        return None
    stats = rejection.MahalanobisStats.fit(train, np.asarray(scope.train_labels), len(names))
    of = lambda rows: rejection.scores("mahalanobis", None, v.pooled(rows), stats)  # noqa: E731
    threshold = rejection.calibrate(of(scope.val), scope.recall)
    oos = of(scope.test_oos) if scope.test_oos else np.zeros(0)
    return stats, rejection.evaluate(of(texts), oos, logits.argmax(1), np.asarray(truth), threshold)


def architecture(model: Any) -> dict[str, Any]:
    """Shapes, parameter count and encoder FLOPs per token of the PyTorch model a variant was made from."""
    return {
        "layers": layer_shapes(model),
        "hidden": int(model.config.hidden_size),
        "parameters": int(sum(t.numel() for t in model.parameters())),
        "flops_per_token": int(flops_per_token(model, FLOPS_SEQ_LEN)),
        "seq_len": FLOPS_SEQ_LEN,
    }


def latencies(variants: list[Variant], texts: list[str], names: list[str], p: BenchmarkParams) -> Interleaved:
    """Model-only and end-to-end batch-1 samples of every variant, from the same calls, in interleaved
    rounds within `benchmark.time_budget_s`."""
    print(f"benchmark: batch-1 latency of {len(variants)} variants, {p.rounds} interleaved rounds, "
          f"~{p.time_budget_s:g} s", file=sys.stderr)  # fmt: skip
    queries = {
        v.name: Query(
            prepare=lambda text, v=v: v.batch([text]),
            run=v.run_batch,
            finish=lambda scores: names[int(np.argmax(scores[0]))],
        )
        for v in variants
    }
    with Progress("benchmark: latency", total=p.rounds * len(variants), unit="chunk") as bar:
        step = lambda r, name: bar.advance(info=f"round {r + 1} {name}")  # noqa: E731
        sampled = interleaved_queries(queries, texts, p.time_budget_s, p.rounds, on_chunk=step)
    print(f"benchmark: {sampled.per_round * sampled.rounds} queries per variant in {sampled.seconds:.0f} s",
          file=sys.stderr)  # fmt: skip
    return sampled


def timing_of(v: Variant, texts: list[str], latency: Latency, peaks: dict[str, Any], memory: dict[str, float],
              p: BenchmarkParams) -> VariantTiming:  # fmt: skip
    print(f"benchmark: throughput of {v.name} at batch 32 and 64", file=sys.stderr)
    qps32, _ = throughput(v, texts, 32, p.throughput_batches)
    qps64, achieved = throughput(v, texts, 64, p.throughput_batches)
    peak = peaks.get(v.precision, {}).get("large_square") if v.device == "cpu" else None
    counted = v.flops_model is not None
    return VariantTiming(
        latency_ms=latency,
        throughput_qps={"batch_32": qps32, "batch_64": qps64},
        achieved_gflops=round(achieved / 1e9, 2) if counted else None,
        peak_fraction=round(achieved / 1e9 / peak, 4) if (counted and peak) else None,
        peak_memory_mb=memory.get("peak_mb"),
        model_memory_mb=memory.get("model_mb"),
    )


def probe_spec(spec: dict[str, Any], test: pl.DataFrame, rt: RuntimeParams) -> dict[str, Any]:
    """A memory probe's spec with what every probe runs: the first 256 test texts at the runtime settings."""
    return {**spec, "threads": rt.threads, "max_length": rt.max_length, "texts": test["text"].to_list()[:256]}


def benchmark(variants: list[Variant], test: pl.DataFrame, labels: dict[str, int], p: BenchmarkParams,
              rt: RuntimeParams, probes: dict[str, dict[str, Any]], skipped: dict[str, str],
              started: Probes | None = None, scope: ScopeRows | None = None) -> Measured:  # fmt: skip
    """Score, time and measure every variant on the test rows, side by side in one run. `started`: memory
    probes launched earlier (the PyTorch teacher's, while the baselines were exported), waited for before
    anything is timed."""
    names = [k for k, _ in sorted(labels.items(), key=lambda kv: kv[1])]
    texts, truth = test["text"].to_list(), [labels[x] for x in test["label"]]
    results = {v.name: score(v, texts, truth, names, scope) for v in variants}
    early = started.results() if started is not None else {}
    sampled = latencies(variants, texts, names, p)
    model, e2e = sampled.model, sampled.end_to_end
    peaks = gemm_peaks(rt.threads, p.gemm_square, model_shape(variants, texts, rt.max_length))
    rest = {k: probe_spec(s, test, rt) for k, s in probes.items() if k not in early}
    memory = {**early, **peak_memory(rest)} if p.memory else {}
    # each variant relative to student_pruned within a round, and the noise of that estimate: publish's
    # choice between close variants rests on them
    relative, noise = relative_speed(e2e, reference="student_pruned", rounds=sampled.rounds)
    timing = {}
    for v in variants:
        latency = Latency(
            Percentiles(**percentiles(model[v.name]), p95_rounds=round_p95s(model[v.name], sampled.rounds)),
            Percentiles(
                **percentiles(e2e[v.name]),
                p95_rounds=round_p95s(e2e[v.name], sampled.rounds),
                vs_student_pruned=relative[v.name],
            ),  # fmt: skip
        )
        timing[v.name] = timing_of(v, texts, latency, peaks, memory.get(v.name, {}), p)
    publishable = [n for n, r in results.items() if r.publishable]
    res = BenchmarkResults(results, publishable, skipped, len(texts), rt.threads, rt.max_length)
    merged = {n: {**results[n].to_dict(), **timing[n].to_dict()} for n in results}
    runs = sampled.rounds * sampled.per_round
    times = BenchmarkTimings(timing, peaks, pareto_front(merged), noise, sampled.rounds, runs, sampled.seconds,
                             noisy=noise > NOISE_LIMIT)  # fmt: skip
    return Measured(res, times, model)


def report_md(m: Measured, p: BenchmarkParams) -> str:
    """report.md: the table and how to read it (a view of timings.json: uncached)."""
    r, t = m.results, m.timings
    peaks, skipped = t.peak_gflops, r.not_measured
    return "\n".join(
        [
            "# Benchmark",
            "",
            f"{r.test_rows} test rows; batch-1 latency over {t.runs} real queries per variant, in "
            f"{t.rounds} interleaved rounds ({t.seconds:.0f} s); {r.threads} CPU threads. Model-only and end-to-end "
            "times come from the same calls (tokenizing, the model, the label), so the model alone never exceeds "
            "end to end. Timings, throughput, memory and efficiency vary between runs and machines; accuracy "
            "figures do not.",
            "",
            noise_line(t),
            "",
            report_table(m.rows()),
            "",
            f"GEMM peak here (GFLOP/s): fp32 {peaks['fp32']['large_square']} (square {p.gemm_square}), "
            f"{peaks['fp32']['model']} at the model's shape {peaks['shapes']['model']}; INT8 "
            f"{peaks['int8']['large_square']} / {peaks['int8']['model']}. The fraction is against ONNX Runtime's "
            "GEMM; PyTorch's own GEMM kernels can beat it (a fraction above 100%).",
            "",
            f"Publishable (publish chooses among them under `publish.gates`): {', '.join(r.publishable)}. "
            f"Pareto front: {', '.join(t.pareto_front)}.",
            "",
            *([f"Not measured: {', '.join(f'{k} ({v})' for k, v in skipped.items())}.", ""] if skipped else []),
            *rejection_table(r),
        ]
    )


def rejection_table(r: BenchmarkResults) -> list[str]:
    """Out-of-scope rejection of every variant and method: calibrated on validation, scored on the test rows."""
    rows = {n: v.rejection for n, v in r.variants.items() if v.rejection}
    if not rows:
        return []
    first = next(iter(rows.values()))
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    lines = [
        "## Out-of-scope rejection",
        "",
        f"Thresholds keep {first['in_scope_recall']:.0%} of {first['val_rows']} validation rows of known intents; "
        f"test: {next(iter(first['methods'].values()))['out_of_scope_rows']} out-of-scope rows (clean's test_oos). "
        "Accuracy counts a rejected in-scope row wrong.",
        "",
        "| variant | method | AUROC | FPR at 95% TPR | out-of-scope rejected | in-scope accepted | in-scope acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rej in rows.items():
        for method, m in rej["methods"].items():
            lines.append(f"| {name} | {method} | {fmt(m['auroc'])} | {fmt(m['fpr_at_95'])} | "
                         f"{fmt(m['out_of_scope_recall'])} | {fmt(m['in_scope_accepted'])} | "
                         f"{fmt(m['in_scope_accuracy'])} |")  # fmt: skip
    return [*lines, ""]


def summary(r: BenchmarkResults) -> dict[str, Any]:
    """summary.json, the benchmark's DVC metric: accuracy, macro-F1 and size per variant (deterministic), a
    few columns per variant so `dvc exp show` and `dvc metrics diff` stay readable; the rest is in
    metrics.json and timings.json."""
    keep = ("accuracy", "macro_f1", "size_mb")
    return {name: {k: getattr(v, k) for k in keep} for name, v in r.variants.items()}


def noise_line(t: BenchmarkTimings) -> str:
    """How far this run's timings can be trusted, for report.md and the model card."""
    verdict = (
        f"**Timings are noisy** (above {NOISE_LIMIT:.0%}): the machine was busy; rerun `benchmark` on an idle "
        "machine before trusting a latency figure or a close call between variants."
        if t.noisy
        else f"Timings are steady (below {NOISE_LIMIT:.0%})."
    )
    return (
        f"Timing noise: {t.noise:.1%} (relative standard error of each variant's time against student_pruned "
        f"in the same round; variants closer than about twice that cannot be told apart). {verdict} Tail-latency "
        "gates read `p95_rounds`, the median of the rounds' p95s, which a few disturbed rounds cannot move."
    )


@stage_entrypoint("benchmark")
def main(argv: list[str] | None = None) -> int:
    """`python -m stages.benchmark --in data/08_build --clean … --distill … --train … --prune … --quantize …
    --out data/09_benchmark`."""
    upstream = ("clean", "distill", "train", "prune", "quantize")
    args = stage_args("benchmark", __doc__, argv, upstream="build", more=upstream)
    inputs = Inputs(build=args.inp, **{k: getattr(args, k) for k in upstream})
    p = read_params(BenchmarkParams, "benchmark", args.params)
    rt = read_params(RuntimeParams, "runtime", args.params)
    torch.set_num_threads(rt.threads)
    torch.manual_seed(p.seed)
    reject = read_params(RejectParams, "reject", args.params)
    frames = read_frames(args.clean, ("train", "test", "val", "test_oos"), upstream="clean")
    labels = json.loads(require(args.clean / "labels.json", "clean").read_text(encoding="utf-8"))
    started = Probes()
    if p.memory:  # the slowest probe (it imports torch) runs while the baselines are exported: nothing is timed
        started.start("teacher_fp32", probe_spec(teacher_probe(inputs), frames["test"], rt))
    with tempfile.TemporaryDirectory() as tmp:
        variants = baselines(inputs, frames["train"], labels, p, rt, Path(tmp))
        published, skipped = publishable_variants(inputs, rt)
        variants += published
        probes = memory_probes(variants, inputs)
        train = frames["train"]
        scope = ScopeRows(train["text"].to_list(), [labels[x] for x in train["label"]], frames["val"]["text"].to_list(),
                          frames["test_oos"]["text"].to_list(), reject.in_scope_recall)  # fmt: skip
        m = benchmark(variants, frames["test"], labels, p, rt, probes, skipped, started, scope)
    with outputs() as w:
        w.json(args.out / "metrics.json", m.results.to_dict())
        w.json(args.out / "summary.json", summary(m.results))
        w.json(args.out / "timings.json", m.timings.to_dict())
        stats_dir = w.directory(args.out / "rejection")  # what publish ships for reject.method: mahalanobis
        for name in m.results.publishable:
            if name in scope.stats:
                save_file(scope.stats[name].tensors(), str(stats_dir / f"{name}.safetensors"))
        w.text(args.out / "report.md", report_md(m, p))
        w.text(args.out / "plots" / "pareto.csv", pareto_csv(m.rows(), m.timings.pareto_front))
        w.text(args.out / "plots" / "latency.csv", latency_csv(m.rows()))
        write_plots(w.directory(args.out / "png"), m)
    print(report_table(m.rows()))
    print(f"benchmark: {len(m.results.variants)} variants, {len(m.results.publishable)} publishable -> {args.out}")
    return 0


def model_shape(variants: list[Variant], texts: list[str], max_length: int) -> tuple[int, int, int]:
    """(M, K, N) of the pruned student's first FFN matmul at batch 64 and the test rows' mean length."""
    v = next(v for v in variants if v.name == "student_pruned")
    tok = TokenizedTexts(v.tokenizer, texts, max_length)
    layer = v.flops_model.encoder.encoder.layer[0]
    return (
        64 * int(round(float(tok.lengths.mean()))),
        layer.intermediate.dense.in_features,
        layer.intermediate.dense.out_features,
    )


def pareto_csv(rows: dict[str, dict[str, Any]], front: list[str]) -> str:
    lines = ["variant,latency_p50_ms,accuracy,pareto"]
    for name, r in rows.items():
        lines.append(f"{name},{r['latency_ms']['end_to_end']['p50']},{r['accuracy']},{int(name in front)}")
    return "\n".join(lines) + "\n"


def latency_csv(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["variant,p50_ms,p95_ms,p99_ms"]
    for name, r in rows.items():
        m = r["latency_ms"]["model"]
        lines.append(f"{name},{m['p50']},{m['p95']},{m['p99']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
