"""The training loop shared by `distill` (teacher fine-tuning) and `train` (the student).

AdamW without weight decay on norms and biases, linear warm-up then cosine decay, gradient accumulation,
gradient clipping, mixed precision (bf16 autocast on CPU, fp16 with loss scaling on CUDA), early stopping
on validation accuracy, seeded data order, a progress bar with loss and throughput. A NaN or infinite
loss stops the run, naming the step; the caller then writes no model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.common.errors import StageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class OptimParams:
    epochs: int = 5
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01  # not applied to LayerNorm weights and biases
    warmup_ratio: float = 0.1  # share of optimizer steps with a linear warm-up
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU (bf16 autocast is slower on CPUs without AMX)
    patience: int = 2  # epochs without a better validation accuracy before stopping
    max_length: int = 64  # tokens per text; intents are short
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "grad_accum", "patience", "max_length"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_val_accuracy: float
    curves: list[dict[str, Any]]  # step, epoch, loss, lr, val_accuracy (at epoch ends)
    seconds: float
    stopped_early: bool

    def summary(self) -> dict[str, Any]:
        """What a stage's metrics.json records about the training run (curves go to their own file)."""
        return {
            "best_epoch": self.best_epoch,
            "val_accuracy": self.best_val_accuracy,
            "seconds": round(self.seconds, 1),
            "stopped_early": self.stopped_early,
        }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only: decaying norms and biases hurts and regularizes nothing."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def autocast_for(precision: str, device: torch.device) -> tuple[Any, bool]:
    """(autocast context factory, needs a grad scaler)."""
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return (lambda: torch.autocast(device.type, enabled=False)), False
    if precision == "bf16":
        return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), False
    if device.type != "cuda":
        raise StageError("precision fp16 needs CUDA; use bf16 (or fp32) on CPU")
    return (lambda: torch.autocast("cuda", dtype=torch.float16)), True


def fit(
    model: nn.Module,
    n_rows: int,
    step_loss: Callable[[nn.Module, np.ndarray], torch.Tensor],
    val_accuracy: Callable[[nn.Module], float],
    p: OptimParams,
    name: str,
    device: torch.device | None = None,
) -> FitResult:
    """Train `model` on rows 0..n_rows-1; `step_loss(model, row_indices)` returns a batch's loss."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    device = device or torch.device("cpu")
    torch.manual_seed(p.seed)
    rng = np.random.default_rng(p.seed)
    model.to(device)
    autocast, scaled = autocast_for(p.precision, device)
    scaler = torch.amp.GradScaler("cuda") if scaled else None
    optimizer = torch.optim.AdamW(param_groups(model, p.weight_decay), lr=p.lr)
    micro_per_epoch = math.ceil(n_rows / p.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / p.grad_accum)
    total = steps_per_epoch * p.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, int(p.warmup_ratio * total)))
    best_acc, best_epoch, best_state, stale = -1.0, 0, None, 0
    curves: list[dict[str, Any]] = []
    step, start, seen = 0, time.perf_counter(), 0
    stopped_early = False
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(name, total=total, info="")
        for epoch in range(1, p.epochs + 1):
            model.train()
            order = rng.permutation(n_rows)
            optimizer.zero_grad(set_to_none=True)
            for micro in range(micro_per_epoch):
                rows = order[micro * p.batch_size : (micro + 1) * p.batch_size]
                with autocast():
                    loss = step_loss(model, rows)
                if not torch.isfinite(loss):
                    raise StageError(
                        f"{name}: loss is {loss.item()} at step {step + 1} (epoch {epoch}, batch {micro + 1}); "
                        "stopped, no model written"
                    )
                scaled_loss = loss / p.grad_accum
                (scaler.scale(scaled_loss) if scaler else scaled_loss).backward()
                seen += len(rows)
                if (micro + 1) % p.grad_accum and micro + 1 != micro_per_epoch:
                    continue
                if scaler:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), p.max_grad_norm)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                step += 1
                curves.append(
                    {
                        "step": step,
                        "epoch": epoch,
                        "loss": round(loss.item(), 6),
                        "lr": schedule.get_last_lr()[0],
                        "val_accuracy": None,
                    }
                )
                rate = seen / max(1e-9, time.perf_counter() - start)
                bar.update(task, advance=1, info=f"epoch {epoch} loss {loss.item():.4f} {rate:.0f} rows/s")
            acc = val_accuracy(model)
            curves[-1]["val_accuracy"] = round(acc, 6)
            if acc > best_acc:
                best_acc, best_epoch, stale = acc, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
                if stale >= p.patience:
                    stopped_early = epoch < p.epochs
                    break
    return FitResult(best_state, best_epoch, best_acc, curves, time.perf_counter() - start, stopped_early)
