"""The records passed between stages, each a frozen dataclass written and read by the same code.

`to_dict()` gives the JSON object a stage writes; `from_dict()` reads it back, checking the keys, so a
consumer never digs through nested dicts by string: build's `manifest.json` (`BuildManifest`), quantize's
`metrics.json` (`QuantizeReport`), benchmark's `metrics.json` (`BenchmarkResults`) and `timings.json`
(`BenchmarkTimings`). A published version's `runtime.json` and `lineage.json` are records of
stages.registry. Light: no torch, no numpy, so flows/ and deploy/ may import it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Self

from stages.runner.errors import StageError


def optional(default: Any = None) -> Any:
    """A field left out of `to_dict()` while it is None (a key that only some records have)."""
    return dataclasses.field(default=default, metadata={"omit_none": True})


class Record:
    """Mixin for frozen dataclasses that round-trip through JSON objects."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = _plain(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | None = None) -> Self:
        """Build the record from a JSON object; an unknown or missing key is a StageError naming `where`."""
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise StageError(f"{where}: expected an object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise StageError(f"{where}: unknown key(s) {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        values = {}
        for name, f in fields.items():
            if name in data:
                values[name] = _typed(hints[name], data[name], f"{where}.{name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise StageError(f"{where}: missing key {name!r}")
        return cls(**values)

    @classmethod
    def read(cls, path: Path) -> Self:
        """The record in a JSON file; a missing, invalid or wrongly shaped file is a StageError naming it."""
        if not path.is_file():
            raise StageError(f"{path}: not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:  # invalid JSON or not UTF-8
            raise StageError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise StageError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, str(path))


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _typed(hint: Any, value: Any, where: str) -> Any:
    """`value` (plain JSON) as `hint` says: records are built, containers of records walked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        return _typed(hint, value, where)
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_dict(value, where)
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return {k: _typed(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple) and args and isinstance(value, list):
        return [_typed(args[0], v, where) for v in value] if origin is list else tuple(value)
    return value


# ---- quantize ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VariantScore(Record):
    """One model of quantize's frontier, scored on validation rows."""

    accuracy: float
    macro_f1: float
    size_mb: float
    accuracy_drop_points: float | None = optional()  # INT8 variants: points below fp32
    agreement_with_fp32: float | None = optional()  # INT8 variants: share of predictions equal to fp32's
    size_vs_fp32: float | None = optional()


@dataclasses.dataclass(frozen=True)
class QuantizeReport(Record):
    """quantize's metrics.json: the export, its parity, the frontier and the choice (no timings)."""

    opset: int
    threads: int
    export_form: str
    parity: dict[str, Any]
    frontier: dict[str, VariantScore]
    chosen: str
    budget_met: bool
    why: str
    max_accuracy_drop: float
    qat: dict[str, Any] | None = optional()


# ---- build ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Engine(Record):
    """One engine of build's manifest: built (with its file and parity), skipped or failed (with why)."""

    status: str  # built | skipped | failed
    backend: str  # onnxruntime | tensorrt | kernels (distillery_kernels.engine on an INT8 ONNX model)
    precision: str  # fp32 | fp16 | int8
    device: str | None = optional()  # cpu, or "cuda: <GPU name>"
    file: str | None = optional()  # relative to build's output folder
    source: str | None = optional()  # the ONNX file it was made from, when not the engine file itself
    block: list[int] | None = optional()  # kernels_int8_sparse: the block shape its layers are packed in
    zero_blocks: float | None = optional()  # and the share of those blocks that are zero (skipped)
    size_mb: float | None = optional()
    fused_operators: dict[str, int] | None = optional()
    providers: list[str] | None = optional()
    profile: dict[str, Any] | None = optional()
    parity: dict[str, Any] | None = optional()
    parser_messages: list[str] | None = optional()
    tensorrt: str | None = optional()
    timing_cache: str | None = optional()
    reason: str | None = optional()  # skipped or failed: why

    @property
    def built(self) -> bool:
        return self.status == "built"

    def model_path(self, build: Path, quantize: Path) -> Path:
        """The file a session loads: the engine file in build's folder, or for a GPU provider engine its
        `source` (in build's `engines/`, or one of quantize's files)."""
        if self.file and not self.file.endswith("/"):
            return build / self.file
        if not self.source:
            raise StageError(f"engine {self.backend}/{self.precision}: neither a file nor a source")
        return build / self.source if self.source.startswith("engines/") else quantize / self.source


@dataclasses.dataclass(frozen=True)
class BuildManifest(Record):
    """build's manifest.json: every engine, the machine they were built for, the session options file."""

    engines: dict[str, Engine]
    machine: str  # the fingerprint digest
    session_options: str  # relative to build's output folder


# ---- benchmark -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VariantResult(Record):
    """One variant in benchmark's metrics.json: deterministic figures only."""

    accuracy: float
    macro_f1: float
    worst_label_f1: dict[str, Any]  # {"label": name, "f1": value}
    size_mb: float
    precision: str
    device: str
    publishable: bool = False  # a file publish can ship (quantize's two files and every engine)
    file: str | None = optional()
    sha256: str | None = optional()
    per_label_f1: dict[str, float] | None = optional()  # every label of the test rows, by name
    # transformer variants: {"layers": [{"heads", "ffn"}...], "hidden", "parameters", "flops_per_token", "seq_len"}
    architecture: dict[str, Any] | None = optional()
    # out-of-scope rejection: {"in_scope_recall", "val_rows", "methods": {method: stages.model.rejection.evaluate}}
    rejection: dict[str, Any] | None = optional()


@dataclasses.dataclass(frozen=True)
class BenchmarkResults(Record):
    """benchmark's metrics.json: the same bytes on every run of the same inputs."""

    variants: dict[str, VariantResult]
    publishable: list[str]
    not_measured: dict[str, str]
    test_rows: int
    threads: int
    max_length: int


@dataclasses.dataclass(frozen=True)
class Percentiles(Record):
    """Latency in milliseconds over all samples; `p95_rounds` is the median of each interleaved round's p95
    (what tail-latency gates read: a few rounds disturbed by other load cannot move it); `vs_student_pruned`
    is the median per-round ratio to that variant."""

    p50: float
    p95: float
    p99: float
    p95_rounds: float | None = optional()
    vs_student_pruned: float | None = optional()


@dataclasses.dataclass(frozen=True)
class Latency(Record):
    model: Percentiles  # the model alone on prepared inputs
    end_to_end: Percentiles  # text in, label out


@dataclasses.dataclass(frozen=True)
class VariantTiming(Record):
    """One variant in benchmark's timings.json: everything a clock measured."""

    latency_ms: Latency
    throughput_qps: dict[str, float]
    achieved_gflops: float | None = None
    peak_fraction: float | None = None
    peak_memory_mb: float | None = None
    model_memory_mb: float | None = None

    def speed(self) -> float:
        """End-to-end time at batch 1 for comparing variants: the per-round ratio to a common reference
        where benchmark measured one (steadier than a p50), else the p50."""
        e2e = self.latency_ms.end_to_end
        return e2e.p50 if e2e.vs_student_pruned is None else e2e.vs_student_pruned

    def gate_p95(self) -> float:
        """The end-to-end tail latency gates compare: the median of the rounds' p95s where benchmark measured
        it (steady under load that hits a few rounds), else the pooled p95."""
        e2e = self.latency_ms.end_to_end
        return e2e.p95 if e2e.p95_rounds is None else e2e.p95_rounds


NOISE_LIMIT = 0.05  # a relative standard error above this marks a benchmark's timings as noisy


@dataclasses.dataclass(frozen=True)
class BenchmarkTimings(Record):
    """benchmark's timings.json (uncached): latency, throughput, memory, GEMM peak, front, noise."""

    variants: dict[str, VariantTiming]
    peak_gflops: dict[str, Any]
    pareto_front: list[str]
    noise: float  # relative standard error of the end-to-end ratios
    rounds: int
    runs: int  # batch-1 queries timed per variant (rounds x per round)
    seconds: float = 0.0  # spent on batch-1 timing (benchmark.time_budget_s is the target)
    noisy: bool = False  # noise above NOISE_LIMIT: figures unsteady, the report and the model card say so
