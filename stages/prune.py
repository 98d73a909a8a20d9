"""Stage `prune`: structured pruning of the student (attention heads, FFN neurons), optional magnitude
pruning, and a recovery fine-tune with the distillation loss.

Importance is first-order Taylor (gradient based): for a head or an FFN neuron, |sum of weight x gradient|
over the parameters it owns, on batches of training rows under the distillation loss, averaged over
batches and normalised per layer (Molchanov et al. 2017; Michel et al. 2019 for heads). The least
important heads and neurons are removed physically (the matrices shrink, so dense runtimes compute
less), never below `min_heads_per_layer` / `min_ffn_per_layer`. Then the student recovers for
`optim.epochs` with the distillation loss (`kd:`) against the teacher's soft labels, on the `training:`
engine.

`magnitude` > 0 adds magnitude pruning over the encoder's matrices, reaching that sparsity along a cosine
schedule over the first `magnitude_ramp` of recovery (rounded up to whole epochs), then fine-tuning at it: of
single weights, or with `magnitude_block` of whole blocks (block_k inputs x block_n outputs, ranked by mean |w|),
the blocks the block-sparse INT8 kernels skip; the same share of each matrix (`magnitude_scope: matrix`) or
under one threshold for all (`global`, which can empty a matrix whose weights are small). The best epoch is
chosen among those at the target. Zeros stored in dense matrices make no dense runtime faster: metrics.json says
so. `heads: 0`, `ffn: 0` and `magnitude: 0` pass the student through unchanged.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from stages.model.distillation import (
    KdParams,
    SoftTargets,
    distill_student,
    kd_loss,
    soft_targets,
    teacher_on_mixed,
)
from stages.model.encoder import FLOPS_SEQ_LEN, TextClassifier, flops_per_token, layer_shapes, load, save, shrink_layer
from stages.model.evaluation import evaluate
from stages.model.training import OptimParams, TrainingParams, is_main_process, make_deterministic
from stages.runner.cli import read_frames, stage_args, stage_entrypoint
from stages.runner.errors import ParamError
from stages.runner.params import block_shape, from_dict, read_params
from stages.runner.tracking import EpochTracker
from stages.storage.atomic import outputs


@dataclass(frozen=True)
class PruneParams:
    heads: float = 0.25  # share of all attention heads removed
    ffn: float = 0.4  # share of all FFN neurons removed
    min_heads_per_layer: int = 2  # no layer goes below this many heads
    min_ffn_per_layer: int = 128  # nor below this FFN width
    importance_batches: int = 32  # training batches scored for importance
    magnitude: float = 0.0  # global magnitude sparsity of encoder matrices after recovery; 0 = off
    # None: single weights (unstructured); [block_k, block_n]: whole blocks of block_k inputs x block_n outputs,
    # the blocks the block-sparse INT8 kernels skip (kernels/: block_k a multiple of 4, block_n 16, 32 or 64)
    magnitude_block: tuple[int, int] | None = None
    magnitude_ramp: float = 0.5  # share of recovery over which sparsity rises to `magnitude` (whole epochs)
    magnitude_scope: str = "matrix"  # matrix: each loses the same share; global: one threshold over all matrices
    optim: OptimParams = field(default_factory=lambda: OptimParams(epochs=2, lr=1e-4, batch_size=32))

    def __post_init__(self) -> None:
        if isinstance(self.optim, dict):
            object.__setattr__(self, "optim", from_dict(OptimParams, self.optim, "prune.optim"))
        for key in ("heads", "ffn", "magnitude"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ParamError(f"prune.{key} must be a share in [0, 1), got {value!r}")
        object.__setattr__(self, "magnitude_block", block_shape(self.magnitude_block, "prune.magnitude_block"))
        ramp = self.magnitude_ramp
        if isinstance(ramp, bool) or not isinstance(ramp, (int, float)) or not 0.0 < ramp <= 1.0:
            raise ParamError(f"prune.magnitude_ramp must be a share in (0, 1], got {ramp!r}")
        if self.magnitude_scope not in ("global", "matrix"):
            raise ParamError(f"prune.magnitude_scope must be global or matrix, got {self.magnitude_scope!r}")
        for key in ("min_heads_per_layer", "min_ffn_per_layer", "importance_batches"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ParamError(f"prune.{key} must be a positive integer, got {getattr(self, key)!r}")

    @property
    def structured(self) -> bool:
        return self.heads > 0 or self.ffn > 0

    @property
    def ramp_epochs(self) -> int:
        """The recovery epochs over which magnitude sparsity ramps up; the best epoch is chosen after them."""
        return max(1, math.ceil(round(self.magnitude_ramp * self.optim.epochs, 9)))


def _owned(layer: nn.Module) -> tuple[list[tuple[torch.Tensor, int]], list[tuple[torch.Tensor, int]]]:
    """(parameters a head owns, parameters an FFN neuron owns), each with the dimension that indexes units."""
    attn = layer.attention.self
    heads = [(getattr(attn, n).weight, 0) for n in ("query", "key", "value")]
    heads += [(getattr(attn, n).bias, 0) for n in ("query", "key", "value")]
    heads += [(layer.attention.output.dense.weight, 1)]
    ffn = [(layer.intermediate.dense.weight, 0), (layer.intermediate.dense.bias, 0), (layer.output.dense.weight, 1)]
    return heads, ffn


def _unit_scores(params: list[tuple[torch.Tensor, int]], units: int) -> torch.Tensor:
    """sum(w * grad) per unit (a head's block of rows/columns, or one neuron)."""
    total = torch.zeros(units, dtype=torch.float64)
    for tensor, dim in params:
        contrib = (tensor.detach() * tensor.grad).double()
        if contrib.ndim == 2 and dim == 1:
            contrib = contrib.sum(0)
        elif contrib.ndim == 2:
            contrib = contrib.sum(1)
        total += contrib.reshape(units, -1).sum(1)
    return total


def taylor_importance(
    student: TextClassifier, targets: SoftTargets, p: PruneParams, kd: KdParams
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: head scores and FFN-neuron scores (|Taylor| averaged over batches, normalised per layer)."""
    rng = np.random.default_rng(p.optim.seed)
    order = rng.permutation(len(targets))
    layers = list(student.encoder.encoder.layer)
    heads = [torch.zeros(layer.attention.self.num_attention_heads, dtype=torch.float64) for layer in layers]
    ffn = [torch.zeros(layer.intermediate.dense.out_features, dtype=torch.float64) for layer in layers]
    student.train()
    batches = [order[i : i + p.optim.batch_size] for i in range(0, len(order), p.optim.batch_size)]
    for rows in batches[: p.importance_batches]:
        student.zero_grad(set_to_none=True)
        logits, _ = student(**targets.texts.batch(rows))
        kd_loss(logits.float(), targets.logits[rows], targets.labels[rows], kd.alpha, kd.temperature).backward()
        for i, layer in enumerate(layers):
            head_params, ffn_params = _owned(layer)
            heads[i] += _unit_scores(head_params, len(heads[i])).abs()
            ffn[i] += _unit_scores(ffn_params, len(ffn[i])).abs()
    student.zero_grad(set_to_none=True)
    student.eval()
    return [s / (s.norm() + 1e-12) for s in heads], [s / (s.norm() + 1e-12) for s in ffn]


def choose_removed(scores: list[torch.Tensor], share: float, minimum: int) -> list[list[int]]:
    """The `share` of all units with the lowest scores, across layers, keeping `minimum` per layer.
    Ties break by (layer, index), so the choice is deterministic."""
    total = sum(len(s) for s in scores)
    budget = int(math.floor(share * total))
    ranked = sorted((float(layer[j]), i, j) for i, layer in enumerate(scores) for j in range(len(layer)))
    removed: list[list[int]] = [[] for _ in scores]
    for _, i, j in ranked:
        if budget == 0:
            break
        if len(scores[i]) - len(removed[i]) > minimum:
            removed[i].append(j)
            budget -= 1
    return removed


def structured_prune(student: TextClassifier, removed_heads: list[list[int]], removed_ffn: list[list[int]]) -> None:
    for layer, heads, neurons in zip(student.encoder.encoder.layer, removed_heads, removed_ffn, strict=True):
        kept_heads = sorted(set(range(layer.attention.self.num_attention_heads)) - set(heads))
        kept_neurons = sorted(set(range(layer.intermediate.dense.out_features)) - set(neurons))
        shrink_layer(layer, kept_heads, kept_neurons)


def encoder_matrices(student: TextClassifier) -> list[nn.Parameter]:
    """The weight matrices magnitude pruning acts on: every Linear inside the encoder layers."""
    return [m.weight for m in student.encoder.encoder.layer.modules() if isinstance(m, nn.Linear)]


def block_scores(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Mean |w| of each block of a Linear's weight [out, in]: block_k inputs x block_n outputs (the [in, out] matrix
    the INT8 model multiplies by, cut as the block-sparse kernels cut it); edge blocks average what they hold."""
    bk, bn = block
    out_f, in_f = w.shape
    rows, cols = -(-out_f // bn), -(-in_f // bk)
    padded = torch.zeros(rows * bn, cols * bk, dtype=w.dtype, device=w.device)
    count = torch.zeros_like(padded)
    padded[:out_f, :in_f] = w.detach().abs()
    count[:out_f, :in_f] = 1
    return padded.reshape(rows, bn, cols, bk).sum((1, 3)) / count.reshape(rows, bn, cols, bk).sum((1, 3))


def magnitude_masks(
    weights: list[torch.Tensor], sparsity: float, block: tuple[int, int] | None = None, per_matrix: bool = False
) -> list[torch.Tensor]:
    """Keep-masks zeroing the `sparsity` share of smallest |w| across all matrices (one global threshold), or with
    `block` the share of blocks of smallest mean |w|; `per_matrix`: each matrix loses that share by its own
    threshold (no matrix is emptied because its weights are smaller than another's)."""
    scores = [block_scores(w, block) if block else w.detach().abs() for w in weights]
    keep = []
    for group in [[x] for x in scores] if per_matrix else [scores]:
        flat = torch.cat([x.flatten() for x in group])
        k = int(sparsity * flat.numel())
        threshold = torch.kthvalue(flat, k).values if k else None
        keep += [x > threshold if threshold is not None else torch.ones_like(x, dtype=torch.bool) for x in group]
    if not block:
        return keep
    bk, bn = block
    return [
        m.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[: w.shape[0], : w.shape[1]]
        for m, w in zip(keep, weights, strict=True)
    ]


@torch.no_grad()
def apply_masks(
    weights: list[torch.Tensor], sparsity: float, block: tuple[int, int] | None = None, per_matrix: bool = False
) -> None:
    for w, keep in zip(weights, magnitude_masks(weights, sparsity, block, per_matrix), strict=True):
        w.mul_(keep)


def block_sparsity_of(weights: list[torch.Tensor], block: tuple[int, int]) -> float:
    """The share of blocks (as `block_scores` cuts them) that are all zero."""
    scores = torch.cat([block_scores(w, block).flatten() for w in weights])
    return float((scores == 0).float().mean())


def sparsity_of(weights: list[torch.Tensor]) -> float:
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / max(1, sum(w.numel() for w in weights))


def cosine_sparsity(target: float, step: int, total: int) -> float:
    """0 at step 0, `target` from step `total` on, along half a cosine (gentle at both ends)."""
    return target * 0.5 * (1.0 - math.cos(math.pi * min(1.0, step / max(1, total))))


def shape_report(
    student: TextClassifier, tokenizer: Any, held: dict[str, pl.DataFrame], labels: dict[str, int], max_length: int
) -> dict[str, Any]:
    """Scores, size, FLOPs and layer shapes of the student as it is now."""
    return {
        "val": evaluate(student, tokenizer, held["val"], labels, max_length),
        "test": evaluate(student, tokenizer, held["test"], labels, max_length),
        "parameters": sum(x.numel() for x in student.parameters()),
        "flops_per_token": flops_per_token(student, FLOPS_SEQ_LEN),
        "layers": layer_shapes(student),
    }


def remove_units(student: TextClassifier, targets: SoftTargets, p: PruneParams, kd: KdParams) -> dict[str, Any]:
    """Score heads and FFN neurons, remove the least important in place; returns what was removed."""
    head_scores, ffn_scores = taylor_importance(student, targets, p, kd)
    removed_heads = choose_removed(head_scores, p.heads, p.min_heads_per_layer)
    removed_ffn = choose_removed(ffn_scores, p.ffn, p.min_ffn_per_layer)
    structured_prune(student, removed_heads, removed_ffn)
    return {
        "heads": {str(i): sorted(h) for i, h in enumerate(removed_heads)},
        "ffn_neurons": [len(n) for n in removed_ffn],
        "importance": "first-order Taylor |sum(w * grad)| under the distillation loss, "
        f"{p.importance_batches} batches, normalised per layer",
    }


def prune(
    student: TextClassifier,
    tokenizer: Any,
    targets: SoftTargets,
    val: pl.DataFrame,
    labels: dict[str, int],
    p: PruneParams,
    kd: KdParams,
    engine: tuple[str, str, int],
    teacher: TextClassifier | None = None,
    on_epoch: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Prune `student` in place (structured, then recovery with magnitude sparsity on its schedule) and return
    (what metrics.json records about it, the recovery's timings). `engine` is (name, why, ZeRO stage); the
    recovery's layer terms (kd.layer_*) need `teacher`; `on_epoch` tracks the recovery's epochs."""
    metrics: dict[str, Any] = {"pruned": True}
    if p.structured:
        metrics["removed"] = remove_units(student, targets, p, kd)
    metrics["after_pruning_before_recovery"] = {"val": evaluate(student, tokenizer, val, labels, p.optim.max_length)}
    name, why, zero_stage = engine
    on_step, weights, select_from = None, encoder_matrices(student), 1
    if p.magnitude > 0:
        name, why = "torch", "prune.magnitude > 0 edits weights every step: torch engine"
        select_from, per_matrix = p.ramp_epochs, p.magnitude_scope == "matrix"

        def on_step(_: nn.Module, step: int, total: int) -> None:  # the ramp ends with epoch `select_from`
            ramp = total * select_from // p.optim.epochs
            apply_masks(weights, cosine_sparsity(p.magnitude, step, ramp), p.magnitude_block, per_matrix)

    result = distill_student(
        student,
        tokenizer,
        targets,
        val,
        labels,
        kd,
        p.optim,
        (name, zero_stage),
        on_step,
        name="prune: recovery",
        teacher=teacher,
        on_epoch=on_epoch,
        select_from=select_from,
    )
    if p.magnitude > 0:  # the chosen epoch trained at the target; this only re-asserts it
        apply_masks(weights, p.magnitude, p.magnitude_block, per_matrix)
    metrics["recovery"] = result.summary()
    metrics["recovery"]["engine"]["chosen_by"] = why
    return metrics, {"recovery": result.timings()}


def outcome(before: dict[str, Any], after: dict[str, Any], student: TextClassifier, p: PruneParams) -> dict[str, Any]:
    """The comparison metrics.json ends with: FLOPs saved, accuracy lost, sparsity reached."""
    note = (
        "zeros from magnitude pruning are stored densely: dense runtimes (ONNX Runtime, TensorRT) get "
        "no speed from them; only the structured part (smaller matrices) is faster"
        if p.magnitude > 0
        else "no magnitude pruning (prune.magnitude: 0)"
    )
    if p.magnitude > 0 and p.magnitude_block:
        note += "; the block-sparse INT8 kernels (build's kernels_int8_sparse) skip the zero blocks"
    sparsity: dict[str, Any] = {"encoder_matrices": round(sparsity_of(encoder_matrices(student)), 6)}
    if p.magnitude_block:
        sparsity["block"] = list(p.magnitude_block)
        sparsity["zero_blocks"] = round(block_sparsity_of(encoder_matrices(student), p.magnitude_block), 6)
    return {
        "after": after,
        "flops_reduction": round(1 - after["flops_per_token"] / before["flops_per_token"], 6),
        "test_accuracy_drop": round(before["test"]["accuracy"] - after["test"]["accuracy"], 6),
        "sparsity": {**sparsity, "note": note},
    }


def recover(args: Any, student: TextClassifier, tokenizer: Any, labels: dict[str, int], val: pl.DataFrame,
            p: PruneParams, kd: KdParams, live: Path) -> tuple[dict[str, Any] | None, dict[str, Any]]:  # fmt: skip
    """`prune` with the stage's inputs read from disk and its recovery tracked into `live` (DVCLive);
    (None, {}) on DeepSpeed ranks other than 0."""
    training = read_params(TrainingParams, "training", args.params)
    train = read_frames(args.augment, ("train",), upstream="augment")["train"].sort("id")
    soft = read_frames(args.distill, ("soft_labels",), upstream="distill")["soft_labels"]
    teacher, teacher_tok, mixed = None, None, None
    if kd.layers or kd.mix_share:
        teacher, teacher_tok, _ = load(args.distill / "teacher")
    if kd.mix_share:  # seeded by prune.optim.seed: the same texts as train's where the seeds are equal
        mixed = teacher_on_mixed(teacher, teacher_tok, train, kd, p.optim.max_length, p.optim.seed)
    targets = soft_targets(tokenizer, train, soft, labels, p.optim.max_length, teacher_tok if kd.layers else None,
                           mixed)  # fmt: skip
    engine = (*training.resolve(), training.zero_stage)
    main_rank = is_main_process()
    with EpochTracker(live, "prune", args.params) if main_rank else contextlib.nullcontext() as tracker:
        changes, timings = prune(student, tokenizer, targets, val, labels, p, kd, engine, teacher, tracker)
    return (changes, timings) if main_rank else (None, {})


@stage_entrypoint("prune")
def main(argv: list[str] | None = None) -> int:
    """`python -m stages.prune --in data/05_train --aug … --distill … --clean … --out data/06_prune`."""
    args = stage_args("prune", __doc__, argv, upstream="train", more=("augment", "distill", "clean"))
    p = read_params(PruneParams, "prune", args.params)
    kd = read_params(KdParams, "kd", args.params)
    make_deterministic(p.optim.seed, p.optim.deterministic)
    student, tokenizer, labels = load(args.inp / "student")
    held = read_frames(args.clean, ("val", "test"), upstream="clean")
    before = shape_report(student, tokenizer, held, labels, p.optim.max_length)
    metrics: dict[str, Any] = {"before": before, "flops_seq_len": FLOPS_SEQ_LEN, "pruned": False}
    timings: dict[str, Any] = {}
    with outputs() as w:  # DVCLive writes its folder epoch by epoch; it lands only if the stage succeeds
        live = w.directory(args.out / "dvclive")
        if not p.structured and p.magnitude == 0:
            metrics["note"] = "prune.heads, prune.ffn and prune.magnitude are 0: student passed through"
            with EpochTracker(live, "prune", args.params) as tracker:  # epoch 0: the student as it came
                tracker(0, {"val_accuracy": before["val"]["accuracy"]})
        else:
            changes, timings = recover(args, student, tokenizer, labels, held["val"], p, kd, live)
            if changes is None:
                return 0  # other DeepSpeed ranks trained their share; rank 0 writes
            metrics.update(changes)
        student.eval()
        metrics.update(outcome(before, shape_report(student, tokenizer, held, labels, p.optim.max_length), student, p))
        save(student, tokenizer, labels, w.directory(args.out / "student"))
        w.json(args.out / "metrics.json", metrics)
        w.json(args.out / "timings.json", timings)
    after = metrics["after"]
    print(
        f"prune: FLOPs/token {before['flops_per_token'] / 1e6:.1f}M -> {after['flops_per_token'] / 1e6:.1f}M "
        f"(-{metrics['flops_reduction']:.1%}), test accuracy {before['test']['accuracy']:.4f} -> "
        f"{after['test']['accuracy']:.4f}, sparsity {metrics['sparsity']['encoder_matrices']:.1%} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
