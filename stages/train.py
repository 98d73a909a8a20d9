"""Stage `train`: the student, trained by knowledge distillation from the teacher's soft labels.

Architecture from params (layers, hidden size, heads, FFN size). `init: teacher` copies the embeddings and
the chosen teacher layers (DistilBERT-style); `scratch` starts fresh. The vocabulary is trimmed to the
word pieces of the training corpus, special tokens and every single-character piece, so unseen words
still tokenize. The loss is `kd:` in params.yaml (stages.model.distillation), shared with prune's
recovery; the engine is `training:`, shared with distill and prune.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import torch

from stages.model.distillation import KdParams, distill_student, soft_targets, teacher_on_mixed
from stages.model.encoder import FLOPS_SEQ_LEN, TextClassifier, flops_per_token, load, save
from stages.model.evaluation import evaluate
from stages.model.training import OptimParams, TrainingParams, is_main_process, make_deterministic
from stages.runner.cli import read_frames, stage_args, stage_entrypoint
from stages.runner.errors import ParamError, StageError
from stages.runner.params import from_dict, read_params
from stages.runner.tracking import EpochTracker
from stages.storage.atomic import outputs


@dataclass(frozen=True)
class TrainParams:
    layers: int = 2
    hidden: int = 384
    heads: int = 12
    ffn: int = 1536
    init: str = "teacher"  # teacher: copy embeddings and `teacher_layers`; scratch: random init
    teacher_layers: tuple[int, ...] | None = None  # null: evenly spaced, first and last included
    trim_vocab: bool = True  # keep only word pieces the corpus uses (+ specials, single characters)
    optim: OptimParams = field(default_factory=lambda: OptimParams(epochs=6, lr=2e-4, batch_size=32))

    def __post_init__(self) -> None:
        if isinstance(self.optim, dict):
            object.__setattr__(self, "optim", from_dict(OptimParams, self.optim, "train.optim"))
        if self.teacher_layers is not None:
            object.__setattr__(self, "teacher_layers", tuple(self.teacher_layers))
            if len(self.teacher_layers) != self.layers:
                raise ParamError(
                    f"train.teacher_layers names {len(self.teacher_layers)} layers but train.layers is {self.layers}"
                )
        for key in ("layers", "hidden", "heads", "ffn"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ParamError(f"train.{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.hidden % self.heads:
            raise ParamError(f"train.hidden ({self.hidden}) must be divisible by train.heads ({self.heads})")
        if self.init not in ("teacher", "scratch"):
            raise ParamError(f"train.init must be teacher or scratch, got {self.init!r}")


def trim_vocabulary(tokenizer: Any, texts: list[str]) -> tuple[list[int], Any]:
    """(kept token ids of the original vocabulary, in order; a tokenizer over exactly those tokens).

    Kept: every piece the corpus uses, the special tokens, and every single-character piece (with and
    without `##`), so WordPiece can always fall back to characters for unseen words. The new tokenizer is
    the teacher's own (same normalizer, pre-tokenizer, post-processor) with the vocabulary swapped and the
    special-token ids renumbered. For words of the corpus it gives the same pieces: greedy longest match
    on a subset that contains all the original pieces picks the same ones."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = tokenizer.get_vocab()
    inverse = {i: t for t, i in vocab.items()}
    used = {i for ids in tokenizer(texts)["input_ids"] for i in ids}
    used |= set(tokenizer.all_special_ids)
    used |= {i for t, i in vocab.items() if len(t) == 1 or (t.startswith("##") and len(t) == 3)}
    kept = sorted(used)
    new_id = {old: n for n, old in enumerate(kept)}
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "WordPiece":
        raise StageError(f"train.trim_vocab needs a WordPiece tokenizer, the teacher has {spec['model']['type']}")
    spec["model"]["vocab"] = {inverse[old]: n for n, old in enumerate(kept)}
    for added in spec.get("added_tokens") or []:
        added["id"] = new_id[added["id"]]
    for special in ((spec.get("post_processor") or {}).get("special_tokens") or {}).values():
        special["ids"] = [new_id[i] for i in special["ids"]]
    if spec.get("padding"):
        spec["padding"]["pad_id"] = new_id[spec["padding"]["pad_id"]]
    backend = Tokenizer.from_str(json.dumps(spec))
    trimmed = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=tokenizer.model_max_length,
        **{k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
    )
    return kept, trimmed


def build_student(teacher: TextClassifier, kept: list[int] | None, p: TrainParams) -> TextClassifier:
    from transformers import BertConfig, BertModel

    cfg = teacher.config.to_dict()
    cfg.update(num_hidden_layers=p.layers, hidden_size=p.hidden, num_attention_heads=p.heads, intermediate_size=p.ffn)
    if kept is not None:
        cfg["vocab_size"] = len(kept)
        cfg["pad_token_id"] = kept.index(teacher.config.pad_token_id or 0)
    for key in ("transformers_version", "id2label", "label2id", "num_labels"):
        cfg.pop(key, None)
    student = TextClassifier(BertModel(BertConfig(**cfg), add_pooling_layer=False), teacher.head.out_features)
    if p.init == "scratch":
        return student
    t = teacher.config
    if (p.hidden, p.heads, p.ffn) != (t.hidden_size, t.num_attention_heads, t.intermediate_size):
        raise StageError(
            f"train.init: teacher needs hidden/heads/ffn equal to the teacher's ({t.hidden_size}/"
            f"{t.num_attention_heads}/{t.intermediate_size}); use init: scratch for other sizes"
        )
    n = t.num_hidden_layers
    layers = p.teacher_layers or tuple(round(i * (n - 1) / max(1, p.layers - 1)) for i in range(p.layers))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise StageError(f"train.teacher_layers: {bad} outside the teacher's 0..{n - 1}")
    src, dst = teacher.encoder, student.encoder
    with torch.no_grad():
        emb = src.embeddings.word_embeddings.weight
        dst.embeddings.word_embeddings.weight.copy_(emb[kept] if kept is not None else emb)
        for name in ("position_embeddings", "token_type_embeddings", "LayerNorm"):
            getattr(dst.embeddings, name).load_state_dict(getattr(src.embeddings, name).state_dict())
        for i, j in enumerate(layers):
            dst.encoder.layer[i].load_state_dict(src.encoder.layer[j].state_dict())
        student.head.load_state_dict(teacher.head.state_dict())
    student.config.teacher_layers = list(layers)  # in config.json: kd.layer_map's default, and provenance
    return student


def curves_csv(curves: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", "epoch", "loss", "lr", "val_accuracy"], lineterminator="\n")
    writer.writeheader()
    for row in curves:
        writer.writerow(
            {
                **row,
                "lr": f"{row['lr']:.8g}",
                "val_accuracy": "" if row["val_accuracy"] is None else row["val_accuracy"],
            }
        )
    return buf.getvalue()


def report(student: TextClassifier, teacher: TextClassifier, tokenizer: Any, held: dict[str, pl.DataFrame],
           labels: dict[str, int], max_length: int) -> dict[str, Any]:  # fmt: skip
    """metrics.json without the training summary: scores, size and FLOPs against the teacher's."""
    return {
        "val": evaluate(student, tokenizer, held["val"], labels, max_length),
        "test": evaluate(student, tokenizer, held["test"], labels, max_length),
        "parameters": sum(t.numel() for t in student.parameters()),
        "vocab_size": student.config.vocab_size,
        "flops_per_token": flops_per_token(student, FLOPS_SEQ_LEN),
        "teacher_flops_per_token": flops_per_token(teacher, FLOPS_SEQ_LEN),
        "flops_seq_len": FLOPS_SEQ_LEN,
    }


@stage_entrypoint("train")
def main(argv: list[str] | None = None) -> int:
    """`python -m stages.train --in … --distill … --clean … --out data/05_train` (see dvc.yaml)."""
    args = stage_args("train", __doc__, argv, upstream="augment", more=("distill", "clean"))
    p = read_params(TrainParams, "train", args.params)
    kd = read_params(KdParams, "kd", args.params)
    training = read_params(TrainingParams, "training", args.params)
    make_deterministic(p.optim.seed, p.optim.deterministic)
    train = read_frames(args.inp, ("train",), upstream="augment")["train"].sort("id")
    soft = read_frames(args.distill, ("soft_labels",), upstream="distill")["soft_labels"]
    held = read_frames(args.clean, ("val", "test"), upstream="clean")
    teacher, teacher_tok, labels = load(args.distill / "teacher")
    kept, tokenizer = trim_vocabulary(teacher_tok, train["text"].to_list()) if p.trim_vocab else (None, teacher_tok)
    student = build_student(teacher, kept, p)
    engine, why = training.resolve()
    mixed = None
    if kd.mix_share:
        mixed = teacher_on_mixed(teacher, teacher_tok, train, kd, p.optim.max_length, p.optim.seed)
    targets = soft_targets(tokenizer, train, soft, labels, p.optim.max_length, teacher_tok if kd.layers else None,
                           mixed)  # fmt: skip
    if mixed:
        print(f"train: {len(mixed[0])} mixed rows (kd.mix_share {kd.mix_share}) with the teacher's soft labels")
    main_rank = is_main_process()
    with outputs() as w:  # DVCLive writes its folder epoch by epoch; it lands only if the stage succeeds
        tracker = (
            EpochTracker(w.directory(args.out / "dvclive"), "train", args.params, p.optim.epochs) if main_rank else None
        )
        with tracker or contextlib.nullcontext():
            result = distill_student(
                student, tokenizer, targets, held["val"], labels, kd, p.optim, (engine, training.zero_stage),
                teacher=teacher if kd.layers else None, on_epoch=tracker,
            )  # fmt: skip
        if not main_rank:
            return 0  # other DeepSpeed ranks trained their share; rank 0 writes
        summary = result.summary()
        summary["engine"]["chosen_by"] = why
        metrics = {**report(student, teacher, tokenizer, held, labels, p.optim.max_length), "training": summary}
        save(student.eval(), tokenizer, labels, w.directory(args.out / "student"))
        w.json(args.out / "metrics.json", metrics)
        w.text(args.out / "curves.csv", curves_csv(result.curves))
        w.json(args.out / "timings.json", {"training": result.timings()})
    ratio = metrics["flops_per_token"] / metrics["teacher_flops_per_token"]
    print(
        f"train: student test accuracy {metrics['test']['accuracy']:.4f} (macro-F1 {metrics['test']['macro_f1']:.4f}), "
        f"{metrics['parameters']:,} parameters, {ratio:.2f}x the teacher's FLOPs per token -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
