"""The training loop shared by `distill` (teacher fine-tuning) and `train` (the student).

AdamW without weight decay on norms and biases, linear warm-up then cosine decay, gradient accumulation,
gradient clipping, mixed precision (bf16 autocast on CPU, fp16 with loss scaling on CUDA), early stopping
on validation accuracy, seeded data order. Progress (`stages.runner.progress`: a bar on a terminal, a line
every few seconds in a log) shows step, loss and rows/s, and every epoch prints its validation accuracy.
A NaN or infinite loss stops the run, naming the step; the caller then writes no model.

Two engines run the same loop (same loss, same batches in the same order, same schedule): `torch`, a
plain loop, and `deepspeed`, the DeepSpeed engine with ZeRO stage 0-3 (one process on CPU, or one per
GPU under the `deepspeed` launcher; each rank takes every world-size-th batch).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.model.encoder import TokenizedTexts
from stages.model.evaluation import evaluate
from stages.runner.errors import ParamError, StageError
from stages.runner.progress import Progress

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ENGINES = ("auto", "torch", "deepspeed")


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
    # Batches drawn from windows of this many batches' rows sorted by length, so each batch pads to a
    # near-equal width (2x faster on short, varied queries); 0 = plain shuffle. Seeded like the shuffle.
    length_window: int = 50
    seed: int = 0
    # PyTorch's deterministic algorithms, every generator seeded: the same commit, data, params and machine
    # (whose core count fixes the thread count) give byte-identical weights. On CUDA some kernels are slower,
    # and an op with no deterministic kernel fails the stage naming it (set false there to trade bytes for speed).
    deterministic: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.deterministic, bool):
            raise ParamError(f"deterministic must be true or false, got {self.deterministic!r}")
        if not isinstance(self.length_window, int) or self.length_window < 0:
            raise ParamError(f"length_window must be an integer >= 0, got {self.length_window!r}")
        for key in ("epochs", "batch_size", "grad_accum", "patience", "max_length"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ParamError(f"{key} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ParamError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ParamError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.precision not in PRECISIONS:
            raise ParamError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_val_accuracy: float
    curves: list[dict[str, Any]]  # step, epoch, loss, lr, val_accuracy (at epoch ends)
    seconds: float  # wall-clock: a timing, never written next to results (see `timings`)
    rows_per_second: float
    stopped_early: bool
    engine: dict[str, Any]  # which engine ran and how (precision, ZeRO stage, world size, device, determinism)
    recipe: dict[str, Any] | None = None  # what the loss compared beyond logits (distillation's layer terms)

    def summary(self) -> dict[str, Any]:
        """What a stage's metrics.json records about the training run: only figures that are the same on
        every run of the same inputs (curves go to their own file, wall-clock figures to `timings()`)."""
        summary = {
            "best_epoch": self.best_epoch,
            "val_accuracy": self.best_val_accuracy,
            "stopped_early": self.stopped_early,
            "engine": self.engine,
        }
        if self.recipe is not None:
            summary["layer_distillation"] = self.recipe
        return summary

    def timings(self) -> dict[str, float]:
        """The run's wall-clock figures, for the stage's timings.json."""
        return {"seconds": round(self.seconds, 1), "rows_per_second": round(self.rows_per_second, 1)}


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


def epoch_batches(
    rng: np.random.Generator, n_rows: int, batch_size: int, lengths: np.ndarray | None, window: int
) -> list[np.ndarray]:
    """One epoch's batches of row indices: a seeded shuffle; with `lengths` and `window`, rows are sorted
    by length within each window of `window` batches and the batches shuffled again."""
    order = rng.permutation(n_rows)
    if lengths is None or window == 0:
        return [order[i : i + batch_size] for i in range(0, n_rows, batch_size)]
    batches = []
    for start in range(0, n_rows, batch_size * window):
        chunk = order[start : start + batch_size * window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass(frozen=True)
class TrainingParams:
    """params.yaml `training:`: the engine every training run uses (distill's teacher fine-tune, train,
    prune's recovery); each of those stages tracks the whole section."""

    engine: str = "auto"  # torch, deepspeed, or auto (deepspeed with CUDA or under its launcher)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3 (engine deepspeed only)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ParamError(f"training.engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.zero_stage not in (0, 1, 2, 3) or isinstance(self.zero_stage, bool):
            raise ParamError(f"training.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")

    def resolve(self) -> tuple[str, str]:
        """(engine to use, why). `auto`: deepspeed when CUDA is present or the deepspeed launcher started
        us (and deepspeed imports), else torch."""
        if self.engine == "torch":
            return "torch", "training.engine: torch"
        launched = "CROSS_RANK" in os.environ  # set by the deepspeed launcher, not by torchrun
        if self.engine == "auto" and not (torch.cuda.is_available() or launched):
            return "torch", "auto: no CUDA and no deepspeed launcher"
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            if self.engine == "deepspeed":
                raise StageError(f"training.engine: deepspeed asked for but it does not import ({exc})") from exc
            return "torch", f"auto: deepspeed does not import ({exc})"
        if self.engine == "deepspeed":
            return "deepspeed", "training.engine: deepspeed"
        return "deepspeed", "auto: " + ("deepspeed launcher" if launched else "CUDA present")


def make_deterministic(seed: int, deterministic: bool) -> dict[str, Any]:
    """Seed every generator a training run draws from, and (with `deterministic`) make PyTorch use only
    deterministic kernels. Returns what is recorded in metrics (the mode and the CPU thread count, which
    sets how CPU reductions are split and so the last bits of their sums)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    if deterministic and torch.cuda.is_available():
        # cuBLAS needs a fixed workspace to be deterministic; set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    return {"deterministic": deterministic, "cpu_threads": torch.get_num_threads()}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when not launched distributed."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Only rank 0 writes a stage's outputs."""
    return world()[0] == 0


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise StageError("precision fp16 needs CUDA; use bf16 (or fp32) on CPU")
    return precision


class TorchEngine:
    """The plain loop: fused AdamW, LambdaLR, autocast (+ GradScaler for fp16), clipping."""

    name = "torch"

    def __init__(self, model: nn.Module, p: OptimParams, schedule: Callable[[int], float], device: torch.device):
        self.module = model.to(device)
        self.device = device
        self.precision = resolve_precision(p.precision, device)
        self.max_grad_norm = p.max_grad_norm
        self.grad_accum = p.grad_accum
        self.optimizer = torch.optim.AdamW(param_groups(model, p.weight_decay), lr=p.lr, fused=True)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.optimizer.zero_grad(set_to_none=True)

    def autocast(self) -> Any:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def __call__(self, **batch: torch.Tensor) -> Any:
        return self.module(**batch)

    def micro_step(self, loss: torch.Tensor, boundary: bool) -> None:
        scaled = loss / self.grad_accum
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        if not boundary:
            return
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()

    def lr(self) -> float:
        return self.schedule.get_last_lr()[0]

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def release(self) -> None:
        """Nothing to undo for the plain loop."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "precision": self.precision, "device": str(self.device), "world_size": 1}


class DeepSpeedEngine:
    """The DeepSpeed engine: ZeRO stage `zero_stage`, bf16/fp16 through DeepSpeed's own mixed precision,
    the same AdamW groups and schedule as client optimizer and scheduler, clipping by DeepSpeed.
    The gradient-accumulation boundary is set by the loop, so it falls where the torch engine's does."""

    name = "deepspeed"

    def __init__(
        self,
        model: nn.Module,
        p: OptimParams,
        schedule: Callable[[int], float],
        device: torch.device,
        zero_stage: int,
    ):
        import deepspeed
        import torch.distributed as dist

        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
        self.device = device
        self.precision = resolve_precision(p.precision, device)
        self.zero_stage = zero_stage
        optimizer = torch.optim.AdamW(param_groups(model, p.weight_decay), lr=p.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        config = {
            "train_micro_batch_size_per_gpu": p.batch_size,
            "gradient_accumulation_steps": p.grad_accum,
            "gradient_clipping": p.max_grad_norm,
            "zero_optimization": {"stage": zero_stage},
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16"},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, self.schedule = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        self.module = self.engine.module
        self.world_size = dist.get_world_size()

    def autocast(self) -> Any:
        return contextlib.nullcontext()  # DeepSpeed holds bf16/fp16 weights itself

    def __call__(self, **batch: torch.Tensor) -> Any:
        return self.engine(**batch)

    def micro_step(self, loss: torch.Tensor, boundary: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
        self.engine.step()  # updates only at the boundary

    def lr(self) -> float:
        return self.schedule.get_last_lr()[0]

    def state(self) -> dict[str, torch.Tensor]:
        """The fp32 master weights (not the bf16/fp16 working copy), gathered across ranks under ZeRO 3."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        for name, param in self.module.named_parameters():
            full = safe_get_full_fp32_param(param)
            if full is not None:  # under ZeRO 3 the module's own tensor is an empty partition: use ds_shape
                shape = getattr(param, "ds_shape", None) or state[name].shape
                state[name] = full.detach().float().cpu().clone().reshape(shape)
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}

    def release(self) -> None:
        """After training: under ZeRO 3, drop DeepSpeed's hooks and give every parameter full-size storage
        again, so the caller can load the best state into a plain module."""
        if self.zero_stage != 3:
            return
        self.engine.destroy()
        for param in self.module.parameters():
            if hasattr(param, "ds_shape"):
                param.data = torch.zeros(param.ds_shape, dtype=torch.float32, device=param.device)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "precision": self.precision,
            "device": str(self.device),
            "zero_stage": self.zero_stage,
            "world_size": self.world_size,
        }


def agree(value: float) -> float:
    """Rank 0's value on every rank, so all ranks take the same early-stopping decision."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


@dataclass
class _Run:
    """What one `fit` call carries from step to step."""

    runner: Any
    step_loss: Callable[[Callable[..., Any], np.ndarray, torch.device], torch.Tensor]
    device: torch.device
    p: OptimParams
    name: str
    total: int
    on_step: Callable[[nn.Module, int, int], None] | None
    step: int = 0
    seen: int = 0
    start: float = 0.0
    curves: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Best:
    """The best epoch so far (by validation accuracy) and how many epochs have not beaten it."""

    accuracy: float = -1.0
    epoch: int = 0
    state: dict[str, torch.Tensor] | None = None
    stale: int = 0
    stopped_early: bool = False

    def update(self, run: _Run, epoch: int, acc: float, select_from: int = 1) -> str:
        """Take epoch `epoch`'s accuracy; returns the epoch's summary line. An epoch before `select_from` is
        reported but neither chosen nor counted toward patience."""
        if epoch < select_from:
            return (
                f"{run.name}: epoch {epoch}/{run.p.epochs}  loss {run.curves[-1]['loss']:.4f}  val accuracy {acc:.4f}"
                f"  (not chosen: the best is taken from epoch {select_from})  {time.perf_counter() - run.start:.0f} s"
            )
        better = acc > self.accuracy
        if better:
            self.accuracy, self.epoch, self.state, self.stale = acc, epoch, run.runner.state(), 0
        else:
            self.stale += 1
        best = " (best)" if better else f" (best {self.accuracy:.4f} at epoch {self.epoch})"
        return (
            f"{run.name}: epoch {epoch}/{run.p.epochs}  loss {run.curves[-1]['loss']:.4f}  val accuracy {acc:.4f}"
            f"{best}  {time.perf_counter() - run.start:.0f} s"
        )


def _epoch(run: _Run, epoch: int, batches: list[np.ndarray], advance: Callable[[str], None]) -> None:
    """One epoch's optimizer steps over `batches` (this rank's share)."""
    p, world_size = run.p, world()[1]
    for micro, rows in enumerate(batches):
        with run.runner.autocast():
            loss = run.step_loss(run.runner, rows, run.device)
        if not torch.isfinite(loss):
            raise StageError(
                f"{run.name}: loss is {loss.item()} at step {run.step + 1} (epoch {epoch}, batch {micro + 1}); "
                "stopped, no model written"
            )
        boundary = (micro + 1) % p.grad_accum == 0 or micro + 1 == len(batches)
        run.runner.micro_step(loss, boundary)
        run.seen += len(rows) * world_size
        if not boundary:
            continue
        run.step += 1
        if run.on_step is not None:
            run.on_step(run.runner.module, run.step, run.total)
        run.curves.append(
            {
                "step": run.step,
                "epoch": epoch,
                "loss": round(loss.item(), 6),
                "lr": run.runner.lr(),
                "val_accuracy": None,
            }
        )
        rate = run.seen / max(1e-9, time.perf_counter() - run.start)
        advance(f"epoch {epoch} loss {loss.item():.4f} {rate:.0f} rows/s")


def _runner(model: nn.Module, p: OptimParams, schedule: Any, device: torch.device, engine: str, zero_stage: int,
            name: str, edits: bool) -> Any:  # fmt: skip
    """The training engine; `edits`: the caller edits weights after each step (DeepSpeed keeps its own copies)."""
    if engine == "deepspeed" and edits:
        raise StageError(f"{name}: per-step weight edits (magnitude pruning) need the torch engine")
    if engine == "deepspeed":
        return DeepSpeedEngine(model, p, schedule, device, zero_stage)
    return TorchEngine(model, p, schedule, device)


def fit(
    model: nn.Module,
    n_rows: int,
    step_loss: Callable[[Callable[..., Any], np.ndarray, torch.device], torch.Tensor],
    val_accuracy: Callable[[nn.Module], float],
    p: OptimParams,
    name: str,
    lengths: np.ndarray | None = None,
    engine: str = "torch",
    zero_stage: int = 0,
    device: torch.device | None = None,
    on_step: Callable[[nn.Module, int, int], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    select_from: int = 1,
) -> FitResult:
    """Train `model` on rows 0..n_rows-1. `step_loss(forward, rows, device)` returns a batch's loss, calling
    `forward(**batch)` for the model; `lengths` (tokens per row) lets batches group rows of similar length;
    `val_accuracy(model)` runs after each epoch on the plain module; `on_step(model, step, total)` after each
    optimizer step (e.g. to apply pruning masks; torch engine only, DeepSpeed keeps its own weight copies);
    `on_epoch(epoch, {"loss", "lr", "val_accuracy"})` after each epoch on rank 0 (tracking; an exception
    it raises, such as a search pruning the trial, ends the run). `select_from`: the first epoch that may be
    the best (earlier ones train on, e.g. while a sparsity schedule ramps up)."""
    if not 1 <= select_from <= p.epochs:
        raise StageError(f"{name}: select_from must be an epoch in [1, {p.epochs}], got {select_from}")
    device = device or default_device()
    mode = make_deterministic(p.seed, p.deterministic)
    rng = np.random.default_rng(p.seed)
    rank, world_size = world()
    # Every rank must run the same number of micro-batches (each backward is a collective): with N ranks
    # the last (batches mod N) batches of an epoch are left out; the order changes every epoch.
    micro_per_epoch = max(1, math.ceil(n_rows / p.batch_size) // world_size)
    total = math.ceil(micro_per_epoch / p.grad_accum) * p.epochs
    schedule = cosine_with_warmup(total, int(p.warmup_ratio * total))
    runner = _runner(model, p, schedule, device, engine, zero_stage, name, edits=on_step is not None)
    run = _Run(runner, step_loss, device, p, name, total, on_step, start=time.perf_counter())
    best = _Best()
    with Progress(name, total=total, enabled=rank == 0) as bar:
        for epoch in range(1, p.epochs + 1):
            runner.module.train()
            batches = epoch_batches(rng, n_rows, p.batch_size, lengths, p.length_window)[rank::world_size]
            _epoch(run, epoch, batches[:micro_per_epoch], lambda info: bar.advance(info=info))
            acc = agree(val_accuracy(runner.module))
            run.curves[-1]["val_accuracy"] = round(acc, 6)
            bar.note(best.update(run, epoch, acc, select_from))
            if on_epoch is not None and rank == 0:
                losses = [row["loss"] for row in run.curves if row["epoch"] == epoch]
                on_epoch(epoch, {"loss": round(sum(losses) / len(losses), 6), "lr": run.curves[-1]["lr"],
                                 "val_accuracy": round(acc, 6)})  # fmt: skip
            if best.stale >= p.patience:
                best.stopped_early = epoch < p.epochs
                if best.stopped_early:
                    bar.note(f"{name}: no better val accuracy for {best.stale} epochs: stopping early")
                break
    seconds = time.perf_counter() - run.start
    runner.release()
    rate, engine_record = run.seen / max(1e-9, seconds), {**runner.describe(), **mode}
    return FitResult(best.state, best.epoch, best.accuracy, run.curves, seconds, rate, best.stopped_early,
                     engine_record)  # fmt: skip


def finetune(
    model: nn.Module,
    tokenizer: Any,
    train: Any,
    val: Any,
    labels: dict[str, int],
    p: OptimParams,
    engine: tuple[str, int] = ("torch", 0),
    name: str = "distill: teacher fine-tune",
) -> FitResult:
    """Cross-entropy fine-tuning of a classifier on a frame's `text`/`label` rows with early stopping on
    `val`; leaves the best epoch's weights in `model`. `engine` is (engine name, ZeRO stage)."""
    texts = TokenizedTexts(tokenizer, train["text"].to_list(), p.max_length)
    targets = torch.tensor([labels[x] for x in train["label"]])

    def step_loss(forward: Any, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        logits, _ = forward(**texts.batch(rows, device))
        return torch.nn.functional.cross_entropy(logits.float(), targets[rows].to(device))

    def val_acc(m: nn.Module) -> float:
        return evaluate(m, tokenizer, val, labels, p.max_length)["accuracy"]

    result = fit(model, train.height, step_loss, val_acc, p, name, texts.lengths, engine[0], engine[1])
    model.float().load_state_dict(result.best_state)
    return result
