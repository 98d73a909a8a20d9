"""Knowledge distillation: the loss (`kd:` in params.yaml, shared by train and prune's recovery) and the
training run that fits a student to the teacher's soft labels.

Loss: alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE(labels), plus `hidden_weight` * MSE
between the pooled embeddings (through a learned projection when the widths differ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from stages.model.encoder import TextClassifier, TokenizedTexts
from stages.model.evaluation import evaluate
from stages.model.training import FitResult, OptimParams, fit
from stages.runner.errors import ParamError, StageError


@dataclass(frozen=True)
class KdParams:
    """params.yaml `kd:`: the distillation loss."""

    alpha: float = 0.7  # weight of the distillation term against the hard-label cross-entropy
    temperature: float = 2.0  # softens both distributions so the teacher's ranking of wrong labels counts
    hidden_weight: float = 0.0  # weight of pooled-embedding MSE against the teacher; 0 turns it off

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ParamError(f"kd.alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ParamError(f"kd.temperature must be > 0, got {self.temperature}")
        if self.hidden_weight < 0:
            raise ParamError(f"kd.hidden_weight must be >= 0, got {self.hidden_weight}")


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE(labels)."""
    t = temperature
    soft = nn.functional.kl_div(
        nn.functional.log_softmax(student_logits / t, dim=-1),
        nn.functional.softmax(teacher_logits / t, dim=-1),
        reduction="batchmean",
    )
    hard = nn.functional.cross_entropy(student_logits, labels)
    return alpha * t * t * soft + (1.0 - alpha) * hard


@dataclass(frozen=True)
class SoftTargets:
    """Training rows joined with the teacher's outputs, row by row, tokenized for the student."""

    texts: TokenizedTexts
    logits: torch.Tensor  # the teacher's logits
    pooled: torch.Tensor  # the teacher's pooled embedding
    labels: torch.Tensor  # label ids

    def __len__(self) -> int:
        return len(self.texts)


def soft_targets(
    tokenizer: Any, train: pl.DataFrame, soft: pl.DataFrame, labels: dict[str, int], max_length: int
) -> SoftTargets:
    """Join `train` (sorted by id) with distill's soft labels; a row without soft labels is an error."""
    # the rows keep train's order (sorted by id): the batches, and so the weights, depend on it
    joined = train.join(soft, on="id", how="left", maintain_order="left")
    missing = joined.filter(pl.col("logits").is_null())["id"].to_list()
    if missing:
        raise StageError(f"soft labels missing for {len(missing)} training row(s), e.g. {missing[:3]}; rerun distill")
    return SoftTargets(
        TokenizedTexts(tokenizer, joined["text"].to_list(), max_length),
        torch.tensor(np.array(joined["logits"].to_list(), dtype=np.float32)),
        torch.tensor(np.array(joined["embedding"].to_list(), dtype=np.float32)),
        torch.tensor([labels[x] for x in joined["label"]]),
    )


class Distiller(nn.Module):
    """The student plus, for hidden-state distillation, a projection to the teacher's width (not saved)."""

    def __init__(self, student: TextClassifier, teacher_width: int):
        super().__init__()
        self.student = student
        width = student.config.hidden_size
        self.project = nn.Identity() if width == teacher_width else nn.Linear(width, teacher_width)

    def forward(self, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, pooled = self.student(**batch)
        return logits, self.project(pooled)


def distill_student(
    student: TextClassifier,
    tokenizer: Any,
    targets: SoftTargets,
    val: pl.DataFrame,
    labels: dict[str, int],
    kd: KdParams,
    optim: OptimParams,
    engine: tuple[str, int] = ("torch", 0),
    on_step: Any = None,
    name: str = "train: student distillation",
) -> FitResult:
    """Train the student in place on `targets` (its best epoch's weights are left in it); `engine` is
    (engine name, ZeRO stage). `on_step(distiller, step, total)` runs after each optimizer step (see `fit`)."""
    model = Distiller(student, targets.pooled.shape[1])

    def step_loss(forward: Any, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        logits, pooled = forward(**targets.texts.batch(rows, device))
        soft, hard = targets.logits[rows].to(device), targets.labels[rows].to(device)
        loss = kd_loss(logits.float(), soft, hard, kd.alpha, kd.temperature)
        if kd.hidden_weight > 0:
            loss = loss + kd.hidden_weight * nn.functional.mse_loss(pooled.float(), targets.pooled[rows].to(device))
        return loss

    def val_acc(m: nn.Module) -> float:
        return evaluate(m.student, tokenizer, val, labels, optim.max_length)["accuracy"]

    result = fit(
        model,
        len(targets),
        step_loss,
        val_acc,
        optim,
        name=name,
        lengths=targets.texts.lengths,
        engine=engine[0],
        zero_stage=engine[1],
        on_step=on_step,
    )
    model.float().load_state_dict(result.best_state)
    return result
