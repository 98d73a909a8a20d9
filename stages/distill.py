"""Stage `distill`: fine-tune the teacher on the training rows, then write its soft labels.

The teacher is a transformers encoder with mean pooling and a linear head (default all-MiniLM-L6-v2, from
the offline package). It trains on augment's rows with early stopping on clean's validation split, and
writes its logits and pooled embedding for every training row: the targets the student learns from.
With `distill.teacher_checkpoint` a fine-tuned teacher folder is loaded instead and fine-tuning is skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch

from stages.common.atomic import outputs
from stages.common.cli import read_frames, stage_args, stage_params
from stages.common.encoder import (
    DEFAULT_TEACHER,
    TextClassifier,
    TokenizedTexts,
    load,
    load_pretrained,
    predict_logits,
    resolve_teacher,
    save,
)
from stages.common.errors import StageError, stage_entrypoint
from stages.common.metrics import accuracy, macro_f1
from stages.common.params import from_dict
from stages.common.training import (
    OptimParams,
    engine_params,
    fit,
    is_main_process,
    make_deterministic,
    resolve_engine,
)


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
            raise ValueError(f"distill.train_rows must be original or all, got {self.train_rows!r}")


def evaluate(
    model: TextClassifier, tokenizer: Any, frame: pl.DataFrame, labels: dict[str, int], max_length: int
) -> dict[str, float]:
    logits, _ = predict_logits(model, tokenizer, frame["text"].to_list(), max_length)
    truth = [labels[x] for x in frame["label"]]
    pred = logits.argmax(1).tolist()
    return {"accuracy": round(accuracy(truth, pred), 6), "macro_f1": round(macro_f1(truth, pred, len(labels)), 6)}


def finetune(
    model: TextClassifier,
    tokenizer: Any,
    train: pl.DataFrame,
    val: pl.DataFrame,
    labels: dict[str, int],
    p: OptimParams,
    engine: str = "torch",
    zero_stage: int = 0,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Cross-entropy fine-tuning with early stopping; leaves the best epoch's weights in `model`. Returns the
    training summary (deterministic) and its wall-clock timings."""
    texts = TokenizedTexts(tokenizer, train["text"].to_list(), p.max_length)
    targets = torch.tensor([labels[x] for x in train["label"]])

    def step_loss(forward: Any, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        logits, _ = forward(**texts.batch(rows, device))
        return torch.nn.functional.cross_entropy(logits.float(), targets[rows].to(device))

    def val_acc(m: torch.nn.Module) -> float:
        return evaluate(m, tokenizer, val, labels, p.max_length)["accuracy"]

    result = fit(
        model,
        train.height,
        step_loss,
        val_acc,
        p,
        name="distill: teacher fine-tune",
        lengths=texts.lengths,
        engine=engine,
        zero_stage=zero_stage,
    )
    model.float().load_state_dict(result.best_state)
    return result.summary(), result.timings()


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


@stage_entrypoint("distill")
def main(argv: list[str] | None = None) -> int:
    """`python -m stages.distill --in data/03_augment --clean data/02_clean --out data/04_distill`."""
    args = stage_args("distill", __doc__, argv, upstream="augment", more=("clean",))
    p = stage_params(DistillParams, "distill", args.params)
    make_deterministic(p.optim.seed, p.optim.deterministic)
    train = read_frames(args.inp, ("train",), upstream="augment")["train"].sort("id")
    held = read_frames(args.clean, ("val", "test"), upstream="clean")
    labels_file = args.clean / "labels.json"
    if not labels_file.is_file():
        raise StageError(f"{labels_file}: not found; run the clean stage first")
    labels = json.loads(labels_file.read_text(encoding="utf-8"))
    if p.teacher_checkpoint:
        model, tokenizer, ckpt_labels = load(p.teacher_checkpoint)
        if ckpt_labels != labels:
            raise StageError(
                f"distill.teacher_checkpoint {p.teacher_checkpoint}: its labels.json differs from the data's"
            )
        training = {"skipped": f"teacher_checkpoint {p.teacher_checkpoint}"}
        timings: dict[str, Any] = {}
    else:
        model, tokenizer = load_pretrained(resolve_teacher(p.teacher, p.allow_download), len(labels), p.allow_download)
        rows = (
            train.filter(pl.col("op") == "original") if p.train_rows == "original" and "op" in train.columns else train
        )
        engine, zero_stage = engine_params(args.params)
        engine, why = resolve_engine(engine)
        training, timings = finetune(model, tokenizer, rows, held["val"], labels, p.optim, engine, zero_stage)
        training["rows"] = rows.height
        training["engine"]["chosen_by"] = why
        if not is_main_process():
            return 0  # other DeepSpeed ranks trained their share; rank 0 writes
    metrics = {
        "teacher": p.teacher_checkpoint or p.teacher,
        "val": evaluate(model, tokenizer, held["val"], labels, p.optim.max_length),
        "test": evaluate(model, tokenizer, held["test"], labels, p.optim.max_length),
        "parameters": sum(t.numel() for t in model.parameters()),
        "training": training,
    }
    soft = soft_labels(model, tokenizer, train, p.optim.max_length)
    with outputs() as w:
        save(model, tokenizer, labels, w.directory(args.out / "teacher"))
        w.parquet(args.out / "soft_labels.parquet", soft)
        w.json(args.out / "metrics.json", metrics)
        w.json(args.out / "timings.json", {"training": timings})
    print(
        f"distill: teacher val accuracy {metrics['val']['accuracy']:.4f}, test {metrics['test']['accuracy']:.4f} "
        f"(macro-F1 {metrics['test']['macro_f1']:.4f}); soft labels for {soft.height} rows -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
