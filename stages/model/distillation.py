"""Knowledge distillation: the loss (`kd:` in params.yaml, shared by train and prune's recovery) and the
training run that fits a student to the teacher's soft labels.

Loss: alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE(labels), plus `hidden_weight` * MSE
between the pooled embeddings (through a learned projection when the widths differ), plus intermediate-layer
terms (TinyBERT / MiniLM style) where student layer i is matched to teacher layer `layer_map[i]`:
`layer_hidden_weight` * MSE between their outputs (per token, through a learned projection per layer when the
widths differ) and `layer_attention_weight` * KL between their attention distributions (per head and query
token, on layers whose head counts match). The layer terms need the teacher's hidden states and attention,
which no file holds (per token, for every training row, they would take gigabytes on Banking77 and tie
distill's outputs to train's layer choice): the frozen teacher computes them with a row's first batch and
they are kept in memory for later epochs (`TeacherStates`).

Mixed rows (`mix_share`): texts made of the first half of one original training row and the second half of
another of a different label, labelled by the teacher only (no hard label, so the cross-entropy skips them).
On such in-between texts the teacher is unsure; a student that learns this is unsure where the teacher is on
queries of no known intent, which is what out-of-scope rejection scores (`reject:`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from stages.model.encoder import TextClassifier, TokenizedTexts, predict_logits
from stages.model.evaluation import evaluate
from stages.model.training import FitResult, OptimParams, fit
from stages.runner.errors import ParamError, StageError


@dataclass(frozen=True)
class KdParams:
    """params.yaml `kd:`: the distillation loss."""

    alpha: float = 0.7  # weight of the distillation term against the hard-label cross-entropy
    temperature: float = 2.0  # softens both distributions so the teacher's ranking of wrong labels counts
    hidden_weight: float = 0.0  # weight of pooled-embedding MSE against the teacher; 0 turns it off
    layer_hidden_weight: float = 0.0  # per-layer hidden-state MSE (student layer i vs teacher layer_map[i]); 0 off
    layer_attention_weight: float = 0.0  # per-layer attention KL where head counts match; 0 off
    # teacher layer matched to each student layer; None: the layers the student was initialised from
    # (train.teacher_layers, recorded in its config.json), else evenly spaced, first and last included
    layer_map: tuple[int, ...] | None = None
    mix_share: float = 1.0  # mixed rows added (train and prune make them), per original training row; 0 off

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ParamError(f"kd.alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ParamError(f"kd.temperature must be > 0, got {self.temperature}")
        for key in ("hidden_weight", "layer_hidden_weight", "layer_attention_weight", "mix_share"):
            if not isinstance(getattr(self, key), int | float) or getattr(self, key) < 0:
                raise ParamError(f"kd.{key} must be a number >= 0, got {getattr(self, key)!r}")
        if self.layer_map is not None:
            if not all(isinstance(i, int) and i >= 0 for i in self.layer_map):
                raise ParamError(f"kd.layer_map must list teacher layer numbers (>= 0), got {self.layer_map!r}")
            object.__setattr__(self, "layer_map", tuple(self.layer_map))

    @property
    def layers(self) -> bool:
        """Whether an intermediate-layer term is on (and so the teacher runs on every batch)."""
        return self.layer_hidden_weight > 0 or self.layer_attention_weight > 0


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE(labels); the cross-entropy is the mean over
    the rows with a label (a mixed row's label is MIXED)."""
    t = temperature
    soft = nn.functional.kl_div(
        nn.functional.log_softmax(student_logits / t, dim=-1),
        nn.functional.softmax(teacher_logits / t, dim=-1),
        reduction="batchmean",
    )
    known = labels != MIXED
    if bool(known.all()):
        hard = nn.functional.cross_entropy(student_logits, labels)
    elif bool(known.any()):
        hard = nn.functional.cross_entropy(student_logits[known], labels[known])
    else:
        return alpha * t * t * soft
    return alpha * t * t * soft + (1.0 - alpha) * hard


MIXED = -100  # the label id of a mixed row: the teacher's soft labels only


def mixed_texts(train: pl.DataFrame, share: float, seed: int) -> list[str]:
    """round(share x original rows) texts, each the first half of one original row's words and the second half
    of another's, of a different label; seeded, in a fixed order."""
    rows = train.filter(pl.col("op") == "original") if "op" in train.columns else train
    texts, label_of = rows["text"].to_list(), rows["label"].to_list()
    if len(set(label_of)) < 2:
        return []
    rng = np.random.default_rng([seed, 0x6D6978])
    out = []
    while len(out) < round(share * len(texts)):
        a, b = (int(i) for i in rng.integers(0, len(texts), size=2))
        if label_of[a] == label_of[b]:
            continue
        first, second = texts[a].split(), texts[b].split()
        out.append(" ".join(first[: (len(first) + 1) // 2] + second[len(second) // 2 :]))
    return out


def teacher_on_mixed(teacher: TextClassifier, teacher_tokenizer: Any, train: pl.DataFrame, kd: KdParams,
                     max_length: int, seed: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:  # fmt: skip
    """(texts, the teacher's logits, its pooled embeddings) of `kd.mix_share`'s mixed rows."""
    texts = mixed_texts(train, kd.mix_share, seed)
    logits, pooled = predict_logits(teacher, teacher_tokenizer, texts, max_length)
    return texts, logits, pooled


@dataclass(frozen=True)
class SoftTargets:
    """Training rows joined with the teacher's outputs, row by row, tokenized for the student."""

    texts: TokenizedTexts
    logits: torch.Tensor  # the teacher's logits
    pooled: torch.Tensor  # the teacher's pooled embedding
    labels: torch.Tensor  # label ids (MIXED for a mixed row)
    teacher_texts: TokenizedTexts | None = None  # the same rows in the teacher's vocabulary (layer terms)

    def __len__(self) -> int:
        return len(self.texts)


def soft_targets(
    tokenizer: Any, train: pl.DataFrame, soft: pl.DataFrame, labels: dict[str, int], max_length: int,
    teacher_tokenizer: Any = None, mixed: tuple[list[str], torch.Tensor, torch.Tensor] | None = None,
) -> SoftTargets:  # fmt: skip
    """Join `train` (sorted by id) with distill's soft labels; a row without soft labels is an error. With
    `teacher_tokenizer` the rows are also tokenized for the teacher (the layer terms run it on each batch;
    a trimmed student vocabulary gives the same word pieces under other ids). `mixed` (`teacher_on_mixed`)
    rows follow the training rows."""
    # the rows keep train's order (sorted by id): the batches, and so the weights, depend on it
    joined = train.join(soft, on="id", how="left", maintain_order="left")
    missing = joined.filter(pl.col("logits").is_null())["id"].to_list()
    if missing:
        raise StageError(f"soft labels missing for {len(missing)} training row(s), e.g. {missing[:3]}; rerun distill")
    texts = joined["text"].to_list()
    logits = torch.tensor(np.array(joined["logits"].to_list(), dtype=np.float32))
    pooled = torch.tensor(np.array(joined["embedding"].to_list(), dtype=np.float32))
    ids = torch.tensor([labels[x] for x in joined["label"]])
    if mixed and mixed[0]:
        texts = texts + mixed[0]
        logits, pooled = torch.cat([logits, mixed[1].float()]), torch.cat([pooled, mixed[2].float()])
        ids = torch.cat([ids, torch.full((len(mixed[0]),), MIXED, dtype=ids.dtype)])
    return SoftTargets(
        TokenizedTexts(tokenizer, texts, max_length), logits, pooled, ids,
        None if teacher_tokenizer is None else TokenizedTexts(teacher_tokenizer, texts, max_length),
    )  # fmt: skip


def layer_map(student: TextClassifier, teacher: TextClassifier, kd: KdParams) -> tuple[int, ...]:
    """The teacher layer matched to each student layer: `kd.layer_map`, else the layers the student was
    initialised from (its config's `teacher_layers`), else evenly spaced with first and last included."""
    n_student, n_teacher = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    chosen = kd.layer_map or getattr(student.config, "teacher_layers", None)
    if chosen is None:
        chosen = tuple(round(i * (n_teacher - 1) / max(1, n_student - 1)) for i in range(n_student))
    chosen = tuple(chosen)
    if len(chosen) != n_student:
        raise ParamError(f"kd.layer_map names {len(chosen)} teacher layers but the student has {n_student}")
    bad = [j for j in chosen if not 0 <= j < n_teacher]
    if bad:
        raise ParamError(f"kd.layer_map: {bad} outside the teacher's layers 0..{n_teacher - 1}")
    return chosen


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over the real (unpadded) tokens of (batch, tokens, width) states."""
    m = mask.unsqueeze(-1).to(student.dtype)
    return ((student - teacher) ** 2 * m).sum() / (m.sum() * student.shape[-1]).clamp(min=1.0)


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of (batch, heads, query, key) attention distributions, averaged over heads and
    real query tokens (padded keys hold ~0 probability in both)."""
    eps = 1e-12
    kl = (teacher * (torch.log(teacher + eps) - torch.log(student + eps))).sum(-1)  # (batch, heads, query)
    m = mask.to(kl.dtype).unsqueeze(1)
    return (kl * m).sum() / (m.sum() * kl.shape[1]).clamp(min=1.0)


class Distiller(nn.Module):
    """The student plus what distillation alone needs (not saved): a projection to the teacher's width for
    the pooled embedding and, for the layer terms, one per matched layer."""

    def __init__(self, student: TextClassifier, teacher_width: int, layers: int = 0):
        super().__init__()
        self.student = student
        width = student.config.hidden_size
        self.project = nn.Identity() if width == teacher_width else nn.Linear(width, teacher_width)
        self.layer_project = nn.ModuleList(
            nn.Identity() if width == teacher_width else nn.Linear(width, teacher_width) for _ in range(layers)
        )

    def forward(self, hidden_states: bool = False, attentions: bool = False, **batch: torch.Tensor) -> tuple[Any, ...]:
        """(logits, projected pooled embedding, each layer's projected output or None, each layer's attention
        probabilities or None). Projections run here, inside the engine's forward (ZeRO-3 gathers them)."""
        logits, pooled, out = self.student.encode(**batch, hidden_states=hidden_states, attentions=attentions)
        layers = None
        if hidden_states:
            layers = [project(h) for project, h in zip(self.layer_project, out.hidden_states[1:], strict=True)]
        return logits, self.project(pooled), layers, out.attentions if attentions else None


TEACHER_CACHE_MB = 4096  # teacher states kept for later epochs, at most (Banking77, 2 layers: about 1 GB)


class TeacherStates:
    """The frozen teacher's outputs of the matched layers (and their attention) for rows of the training set.

    A row's states are computed with its first batch and kept (float16, unpadded) up to `TEACHER_CACHE_MB`, so
    later epochs skip the teacher's forward pass: the layer terms then cost little more than logits alone.
    Every batch gets the float16-rounded values, computed or kept, so each epoch sees the same targets."""

    def __init__(self, teacher: TextClassifier, hidden: list[int], attention: list[int], budget_mb: int):
        self.teacher, self.hidden, self.attention = teacher, hidden, attention
        self.kept: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.budget, self.used = budget_mb * 1_000_000, 0

    def __call__(
        self, rows: np.ndarray, batch: dict[str, torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(hidden states per matched layer (batch, tokens, width), attention per compared layer (batch, heads,
        tokens, tokens)), zero where padded."""
        mask = batch["attention_mask"]
        lengths = mask.sum(1).tolist()
        if all(int(r) in self.kept for r in rows):
            per_row = [self.kept[int(r)] for r in rows]
            size, first = mask.shape[1], per_row[0]
            hidden = [torch.zeros(len(rows), size, first[0][k].shape[-1]) for k in range(len(self.hidden))]
            attention = [torch.zeros(len(rows), first[1][k].shape[0], size, size) for k in range(len(self.attention))]
            for b, (hs, atts) in enumerate(per_row):
                n = lengths[b]
                for k, h in enumerate(hs):
                    hidden[k][b, :n] = h.float()
                for k, a in enumerate(atts):
                    attention[k][b, :, :n, :n] = a.float()
            return [h.to(mask.device) for h in hidden], [a.to(mask.device) for a in attention]
        with torch.no_grad():
            _, _, out = self.teacher.encode(**batch, hidden_states=True, attentions=bool(self.attention))
        hidden = [out.hidden_states[j + 1].half() for j in self.hidden]
        attention = [out.attentions[j].half() for j in self.attention]
        for b, r in enumerate(rows):
            n = lengths[b]
            if int(r) in self.kept or self.used >= self.budget:
                continue
            states = ([h[b, :n].cpu().clone() for h in hidden], [a[b, :, :n, :n].cpu().clone() for a in attention])
            self.kept[int(r)] = states
            self.used += sum(t.numel() * 2 for group in states for t in group)
        return [h.float() for h in hidden], [a.float() for a in attention]


class LayerTerms:
    """The intermediate-layer loss of one batch: the frozen teacher's states (`TeacherStates`) against the
    student's matched layers."""

    def __init__(self, student: TextClassifier, teacher: TextClassifier, kd: KdParams):
        self.kd, self.teacher = kd, teacher.eval()
        self.map = layer_map(student, teacher, kd)
        t_heads = [layer.attention.self.num_attention_heads for layer in teacher.encoder.encoder.layer]
        s_heads = [layer.attention.self.num_attention_heads for layer in student.encoder.encoder.layer]
        # attention is compared on the layers whose head counts match (structured pruning changes them)
        self.attention_layers = [i for i, j in enumerate(self.map) if s_heads[i] == t_heads[j]]
        self.attentions = kd.layer_attention_weight > 0 and bool(self.attention_layers)
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.states = TeacherStates(
            teacher,
            list(self.map) if kd.layer_hidden_weight > 0 else [],
            [self.map[i] for i in self.attention_layers] if self.attentions else [],
            TEACHER_CACHE_MB,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "layer_map": list(self.map),
            "hidden_weight": self.kd.layer_hidden_weight,
            "attention_weight": self.kd.layer_attention_weight,
            "attention_layers": self.attention_layers if self.attentions else [],
        }

    def __call__(self, layers: Any, attentions: Any, rows: np.ndarray, teacher_batch: dict[str, torch.Tensor]
                 ) -> torch.Tensor:  # fmt: skip
        """The layer terms of training rows `rows`, from the student's projected layer outputs and attention
        (`Distiller.forward`)."""
        t_hidden, t_attention = self.states(rows, teacher_batch)
        mask = teacher_batch["attention_mask"]
        loss = torch.zeros((), device=mask.device)
        if self.kd.layer_hidden_weight > 0:
            terms = [masked_mse(layers[i].float(), t_hidden[i], mask) for i in range(len(self.map))]
            loss = loss + self.kd.layer_hidden_weight * torch.stack(terms).mean()
        if self.attentions:
            terms = [
                attention_kl(attentions[i].float(), t_attention[k], mask) for k, i in enumerate(self.attention_layers)
            ]
            loss = loss + self.kd.layer_attention_weight * torch.stack(terms).mean()
        return loss


def batch_loss(targets: SoftTargets, kd: KdParams, terms: LayerTerms | None, name: str) -> Any:
    """`fit`'s step_loss for distillation: the loss of one batch of rows of `targets`."""

    def step_loss(forward: Any, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        batch = targets.texts.batch(rows, device)
        want = terms is not None
        logits, pooled, layers, attentions = forward(**batch, hidden_states=want and kd.layer_hidden_weight > 0,
                                                     attentions=want and terms.attentions)  # fmt: skip
        soft, hard = targets.logits[rows].to(device), targets.labels[rows].to(device)
        loss = kd_loss(logits.float(), soft, hard, kd.alpha, kd.temperature)
        if kd.hidden_weight > 0:
            loss = loss + kd.hidden_weight * nn.functional.mse_loss(pooled.float(), targets.pooled[rows].to(device))
        if terms is not None:
            teacher_batch = targets.teacher_texts.batch(rows, device)
            if teacher_batch["attention_mask"].shape != batch["attention_mask"].shape:
                raise StageError(f"{name}: the teacher's tokens of a batch differ from the student's in length")
            loss = loss + terms(layers, attentions, rows, teacher_batch)
        return loss

    return step_loss


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
    teacher: TextClassifier | None = None,
    on_epoch: Any = None,
    select_from: int = 1,
) -> FitResult:
    """Train the student in place on `targets` (its best epoch's weights are left in it); `engine` is
    (engine name, ZeRO stage). `on_step(distiller, step, total)` runs after each optimizer step and
    `on_epoch(epoch, record)` after each epoch; the best epoch is one from `select_from` on (see `fit`). The
    layer terms of `kd` need `teacher` and `targets.teacher_texts`."""
    terms = None
    if kd.layers:
        if teacher is None or targets.teacher_texts is None:
            raise StageError(f"{name}: kd.layer_hidden_weight / kd.layer_attention_weight need the teacher")
        terms = LayerTerms(student, teacher, kd)
    model = Distiller(student, targets.pooled.shape[1], len(terms.map) if terms else 0)
    restore = student.set_attention("eager") if terms is not None and terms.attentions else None
    if restore is not None:
        teacher.set_attention("eager")

    step_loss = batch_loss(targets, kd, terms, name)

    def val_acc(m: nn.Module) -> float:
        return evaluate(m.student, tokenizer, val, labels, optim.max_length)["accuracy"]

    try:
        if teacher is not None and terms is not None:
            teacher.to(next(student.parameters()).device)
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
            on_epoch=on_epoch,
            select_from=select_from,
        )
    finally:
        if restore is not None:
            student.set_attention(restore)
            teacher.set_attention(restore)
    model.float().load_state_dict(result.best_state)
    if terms is not None:
        result.recipe = terms.describe()
    return result
