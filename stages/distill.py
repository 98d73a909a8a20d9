"""Stage `distill`: fine-tune the teacher on the training rows, then write its soft labels.

The teacher is a transformers encoder with mean pooling and a linear head (default all-MiniLM-L6-v2, from
the offline package). It trains on augment's rows with early stopping on clean's validation split, and
writes its logits and pooled embedding for every training row: the targets the student learns from.
With `distill.teacher_checkpoint` a fine-tuned teacher folder is loaded instead and fine-tuning is skipped.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from stages.model.encoder import (
    DEFAULT_TEACHER,
    TextClassifier,
    load,
    load_pretrained,
    predict_logits,
    resolve_teacher,
    save,
)
from stages.model.evaluation import evaluate
from stages.model.training import OptimParams, TrainingParams, finetune, is_main_process, make_deterministic
from stages.runner.cli import read_frames, require, stage_args, stage_entrypoint
from stages.runner.errors import ParamError, StageError
from stages.runner.params import from_dict, read_params
from stages.runtime.onnx import export_onnx, quantize_dynamic_int8
from stages.storage.atomic import outputs


@dataclass(frozen=True)
class DistillParams:
    teacher: str = DEFAULT_TEACHER  # packaged default, a local folder, or a hub id (with allow_download)
    teacher_checkpoint: str | None = None  # an already fine-tuned teacher folder: skips fine-tuning
    allow_download: bool = False  # never reach a hub unless turned on
    # Rows the teacher fine-tunes on. `original`: the rows before augmentation (TinyBERT's recipe: the
    # teacher learns from real data, then labels the augmented rows for the student; half the time).
    # `all`: augmented rows too. Soft labels are written for every row either way.
    train_rows: str = "original"
    # Fine-tuning: a plain fine-tune of MiniLM converges in a few epochs at this rate.
    optim: OptimParams = field(default_factory=lambda: OptimParams(epochs=5, lr=1e-4, batch_size=32))

    def __post_init__(self) -> None:
        if isinstance(self.optim, dict):
            object.__setattr__(self, "optim", from_dict(OptimParams, self.optim, "distill.optim"))
        if self.train_rows not in ("original", "all"):
            raise ParamError(f"distill.train_rows must be original or all, got {self.train_rows!r}")


def soft_labels(model: TextClassifier, tokenizer: Any, train: pl.DataFrame, max_length: int) -> pl.DataFrame:
    """The teacher's logits and pooled embedding for every training row, by id."""
    logits, pooled = predict_logits(model, tokenizer, train["text"].to_list(), max_length)
    return pl.DataFrame(
        {
            "id": train["id"],
            "logits": pl.Series(logits.numpy().astype(np.float32).tolist(), dtype=pl.List(pl.Float32)),
            "embedding": pl.Series(pooled.numpy().astype(np.float32).tolist(), dtype=pl.List(pl.Float32)),
        }
    )


def teacher(
    p: DistillParams, train: pl.DataFrame, val: pl.DataFrame, labels: dict[str, int], training: TrainingParams
) -> tuple[TextClassifier, Any, dict[str, Any], dict[str, Any]]:
    """(teacher, tokenizer, training summary, timings): the fine-tuned teacher, or the checkpoint
    `distill.teacher_checkpoint` names (then nothing trains)."""
    if p.teacher_checkpoint:
        model, tokenizer, ckpt_labels = load(p.teacher_checkpoint)
        if ckpt_labels != labels:
            raise StageError(
                f"distill.teacher_checkpoint {p.teacher_checkpoint}: its labels.json differs from the data's"
            )
        return model, tokenizer, {"skipped": f"teacher_checkpoint {p.teacher_checkpoint}"}, {}
    model, tokenizer = load_pretrained(resolve_teacher(p.teacher, p.allow_download), len(labels), p.allow_download)
    rows = train.filter(pl.col("op") == "original") if p.train_rows == "original" and "op" in train.columns else train
    engine, why = training.resolve()
    result = finetune(model, tokenizer, rows, val, labels, p.optim, (engine, training.zero_stage))
    summary = result.summary()
    summary["rows"] = rows.height
    summary["engine"]["chosen_by"] = why
    return model, tokenizer, summary, result.timings()


def report(
    model: TextClassifier, tokenizer: Any, held: dict[str, pl.DataFrame], labels: dict[str, int], p: DistillParams
) -> dict[str, Any]:
    """metrics.json: the teacher's name, validation and test scores, parameter count."""
    return {
        "teacher": p.teacher_checkpoint or p.teacher,
        "val": evaluate(model, tokenizer, held["val"], labels, p.optim.max_length),
        "test": evaluate(model, tokenizer, held["test"], labels, p.optim.max_length),
        "parameters": sum(t.numel() for t in model.parameters()),
    }


def export_baselines(model: TextClassifier, tokenizer: Any, folder: Path) -> None:
    """The teacher as `benchmark`'s baselines: exported to ONNX (`teacher.onnx`) and quantized dynamically
    per channel (`teacher.int8.onnx`), what the usual export-and-quantize tools give. Made here, by the stage
    that owns the teacher, so they are versioned with it and re-measuring (`dvc repro -f benchmark`) does not
    export again."""
    print("distill: exporting the teacher to ONNX (fp32 and INT8 baselines for benchmark)", file=sys.stderr)
    export_onnx(model, tokenizer, folder / "teacher.onnx", opset=18)
    quantize_dynamic_int8(folder / "teacher.onnx", folder / "teacher.int8.onnx", per_channel=True)


@stage_entrypoint("distill")
def main(argv: list[str] | None = None) -> int:
    """`python -m stages.distill --in data/03_augment --clean data/02_clean --out data/04_distill`."""
    args = stage_args("distill", __doc__, argv, upstream="augment", more=("clean",))
    p = read_params(DistillParams, "distill", args.params)
    training = read_params(TrainingParams, "training", args.params)
    make_deterministic(p.optim.seed, p.optim.deterministic)
    train = read_frames(args.inp, ("train",), upstream="augment")["train"].sort("id")
    held = read_frames(args.clean, ("val", "test"), upstream="clean")
    labels = json.loads(require(args.clean / "labels.json", "clean").read_text(encoding="utf-8"))
    model, tokenizer, summary, timings = teacher(p, train, held["val"], labels, training)
    if not is_main_process():
        return 0  # other DeepSpeed ranks trained their share; rank 0 writes
    metrics = {**report(model, tokenizer, held, labels, p), "training": summary}
    soft = soft_labels(model, tokenizer, train, p.optim.max_length)
    with outputs() as w:
        save(model, tokenizer, labels, w.directory(args.out / "teacher"))
        export_baselines(model, tokenizer, w.directory(args.out / "onnx"))
        w.parquet(args.out / "soft_labels.parquet", soft)
        w.json(args.out / "metrics.json", metrics)
        w.json(args.out / "timings.json", {"training": timings})
    test = metrics["test"]
    print(
        f"distill: teacher val accuracy {metrics['val']['accuracy']:.4f}, test {test['accuracy']:.4f} "
        f"(macro-F1 {test['macro_f1']:.4f}); soft labels for {soft.height} rows -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
