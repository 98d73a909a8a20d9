"""train (and the distillation library under it) on a tiny teacher built here (no download): learning,
determinism, NaN stop, vocabulary trimming, engines."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from stages.distill import soft_labels
from stages.model.distillation import KdParams, distill_student, kd_loss, soft_targets, teacher_on_mixed
from stages.model.encoder import flops_per_token, load, save
from stages.model.training import OptimParams, TrainingParams, finetune
from stages.runner.errors import ParamError, StageError
from stages.train import TrainParams, build_student, trim_vocabulary
from tests.stages.tiny import LABELS, dataset, tiny_teacher

OPTIM = OptimParams(epochs=8, lr=3e-3, batch_size=8, patience=8, max_length=16, warmup_ratio=0.1)


def distill(student, tok, train, soft, val, p: TrainParams, kd: KdParams | None = None, engine=("torch", 0)):
    kd = kd or KdParams()
    targets = soft_targets(tok, train, soft, LABELS, p.optim.max_length)
    return distill_student(student, tok, targets, val, LABELS, kd, p.optim, engine)


@pytest.fixture(scope="module")
def fitted_teacher():
    teacher, tok = tiny_teacher()
    train, val = dataset(12, 0), dataset(4, 1)
    finetune(teacher, tok, train, val, LABELS, OPTIM)
    return teacher, tok, train, val


def test_student_learns_from_soft_labels(fitted_teacher):
    teacher, tok, train, val = fitted_teacher
    soft = soft_labels(teacher, tok, train, 16)
    p = TrainParams(layers=1, hidden=32, heads=2, ffn=64, init="scratch", optim=OPTIM)
    kept, small_tok = trim_vocabulary(tok, train["text"].to_list())
    student = build_student(teacher, kept, p)
    result = distill(student, small_tok, train, soft, val, p, KdParams(hidden_weight=0.5))
    losses = [c["loss"] for c in result.curves]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert result.best_val_accuracy > 1 / len(LABELS) + 0.2
    assert flops_per_token(student, 32) < flops_per_token(teacher, 32)


def one_layer(**optim) -> TrainParams:
    """A 1-layer student cut from the tiny teacher's last layer, 2 epochs."""
    return TrainParams(
        layers=1,
        hidden=32,
        heads=2,
        ffn=64,
        init="teacher",
        teacher_layers=[1],
        optim=OptimParams(epochs=2, lr=1e-3, batch_size=8, max_length=16, **optim),
    )


def test_same_seed_same_safetensors(tmp_path, fitted_teacher):
    teacher, tok, train, val = fitted_teacher
    soft = soft_labels(teacher, tok, train, 16)
    p = one_layer()
    digests = []
    for run in ("a", "b"):
        kept, small_tok = trim_vocabulary(tok, train["text"].to_list())
        student = build_student(teacher, kept, p)
        distill(student, small_tok, train, soft, val, p)
        save(student, small_tok, LABELS, tmp_path / run)
        digests.append((tmp_path / run / "model.safetensors").read_bytes())
    assert digests[0] == digests[1]
    reloaded, _, labels = load(tmp_path / "a")
    assert labels == LABELS and reloaded.config.vocab_size == len(kept)


def test_nan_loss_stops_naming_the_step(fitted_teacher):
    teacher, tok, train, val = fitted_teacher
    soft = soft_labels(teacher, tok, train, 16)
    poisoned = soft.with_columns(
        pl.when(pl.col("id") == "refund-003")
        .then(pl.lit([float("nan")] * 3))
        .otherwise(pl.col("logits"))
        .cast(pl.List(pl.Float32))
        .alias("logits")
    )
    p = TrainParams(
        layers=1, hidden=32, heads=2, ffn=64, init="scratch", optim=OptimParams(epochs=1, batch_size=4, max_length=16)
    )
    student = build_student(teacher, None, p)
    with pytest.raises(StageError, match=r"loss is nan at step \d+ \(epoch 1, batch \d+\); stopped, no model written"):
        distill(student, tok, train, poisoned, val, p)


def test_trimmed_vocabulary_still_tokenizes_unseen_words(fitted_teacher):
    _, tok, train, _ = fitted_teacher
    kept, small = trim_vocabulary(tok, train["text"].to_list())
    assert len(kept) < len(tok.get_vocab())
    assert "zebra" not in small.get_vocab()
    pieces = small.tokenize("zebras")
    assert "[UNK]" not in pieces and "".join(p.removeprefix("##") for p in pieces) == "zebras"
    inv_small = {i: t for t, i in small.get_vocab().items()}
    inv_full = {i: t for t, i in tok.get_vocab().items()}
    for text in train["text"].to_list():  # same pieces as the full tokenizer on the corpus
        assert [inv_small[i] for i in small(text)["input_ids"]] == [inv_full[i] for i in tok(text)["input_ids"]]


def test_kd_loss_is_the_formula():
    s, t, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0])
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / 2, -1), torch.softmax(t / 2, -1), reduction="batchmean")
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.isclose(kd_loss(s, t, y, 0.7, 2.0), 0.7 * 4 * kl + 0.3 * ce)


def test_bad_params_are_named():
    with pytest.raises(ParamError, match="train.teacher_layers names 1 layers but train.layers is 2"):
        TrainParams(layers=2, teacher_layers=[0])
    with pytest.raises(ParamError, match="train.hidden"):
        TrainParams(hidden=100, heads=12)
    with pytest.raises(ParamError, match=r"kd.alpha must be in \[0, 1\]"):
        KdParams(alpha=1.5)
    teacher, _ = tiny_teacher()
    with pytest.raises(StageError, match="train.init: teacher needs hidden/heads/ffn"):
        build_student(teacher, None, TrainParams(layers=1, hidden=64, heads=2, ffn=64))


def test_teacher_folder_round_trip(tmp_path):
    teacher, tok = tiny_teacher()
    save(teacher, tok, LABELS, tmp_path / "t")
    model, tok2, labels = load(tmp_path / "t")
    batch = tok(["refund my money"], return_tensors="pt")
    with torch.no_grad():
        a = teacher.eval()(batch["input_ids"], batch["attention_mask"])[0]
        b = model(batch["input_ids"], batch["attention_mask"])[0]
    assert torch.equal(a, b) and labels == LABELS
    assert json.loads((tmp_path / "t" / "config.json").read_text())["num_labels"] == 3


def test_engine_choice():
    assert TrainingParams(engine="torch").resolve() == ("torch", "training.engine: torch")
    if not torch.cuda.is_available():
        assert TrainingParams().resolve() == ("torch", "auto: no CUDA and no deepspeed launcher")
    with pytest.raises(ParamError, match="training.engine must be one of"):
        TrainingParams(engine="jax")
    with pytest.raises(ParamError, match="training.zero_stage must be 0, 1, 2 or 3"):
        TrainingParams(zero_stage=4)


def _curves(fitted_teacher, engine, zero_stage=0, **optim):
    teacher, tok, train, val = fitted_teacher
    soft = soft_labels(teacher, tok, train, 16)
    p = one_layer(**optim)
    student = build_student(teacher, None, p)
    result = distill(student, tok, train, soft, val, p, engine=(engine, zero_stage))
    return student, {"curves": result.curves, "engine": result.engine}


@pytest.mark.slow
def test_deepspeed_zero0_matches_the_torch_loop(fitted_teacher):
    """Same loss, same data order, same schedule: fp32 runs agree step by step (ZeRO 0, one process)."""
    pytest.importorskip("deepspeed")
    _, ours = _curves(fitted_teacher, "torch", grad_accum=2)
    _, theirs = _curves(fitted_teacher, "deepspeed", grad_accum=2)
    assert theirs["engine"]["name"] == "deepspeed" and len(ours["curves"]) == len(theirs["curves"])
    for a, b in zip(ours["curves"], theirs["curves"], strict=True):
        assert (a["step"], a["epoch"]) == (b["step"], b["epoch"])
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


@pytest.mark.slow
def test_deepspeed_zero2_bf16_trains_and_saves_fp32(tmp_path, fitted_teacher):
    pytest.importorskip("deepspeed")
    student, summary = _curves(fitted_teacher, "deepspeed", zero_stage=2, precision="bf16")
    assert summary["engine"] == {
        "name": "deepspeed",
        "precision": "bf16",
        "device": "cpu",
        "zero_stage": 2,
        "world_size": 1,
        "deterministic": True,
        "cpu_threads": torch.get_num_threads(),
    }
    losses = [c["loss"] for c in summary["curves"]]
    assert all(np.isfinite(losses)) and np.mean(losses[-2:]) < np.mean(losses[:2])
    assert {t.dtype for t in student.state_dict().values() if t.is_floating_point()} == {torch.float32}
    save(student, fitted_teacher[1], LABELS, tmp_path / "ds")
    reloaded, _, _ = load(tmp_path / "ds")
    assert reloaded.config.num_hidden_layers == 1


def test_ranks_run_the_same_number_of_steps(fitted_teacher, monkeypatch):
    """Under the launcher every backward is a collective: rank 0 and 1 must step equally often, even when
    the epoch's batch count is odd (36 rows / 8 = 5 batches)."""
    steps = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        _, summary = _curves(fitted_teacher, "torch")
        steps.append([c["step"] for c in summary["curves"]])
    assert steps[0] == steps[1] == [1, 2, 3, 4]


def test_the_deepspeed_launchers_local_rank_argument_is_accepted():
    from stages.runner.cli import stage_args

    args = stage_args("train", "doc", ["--local_rank=1", "--out", "x"], upstream=None)
    assert str(args.out) == "x"


def layer_gap(student, teacher, tok, small_tok, texts, mapping) -> float:
    """Mean masked MSE between each student layer's output and its matched teacher layer's."""
    from stages.model.distillation import masked_mse

    s_batch = small_tok(texts, padding=True, return_tensors="pt")
    t_batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        s = student.encode(**s_batch, hidden_states=True)[2].hidden_states
        t = teacher.encode(**t_batch, hidden_states=True)[2].hidden_states
    mask = t_batch["attention_mask"]
    return float(np.mean([masked_mse(s[i + 1], t[j + 1], mask).item() for i, j in enumerate(mapping)]))


def test_layer_terms_pull_student_layers_toward_the_teachers(fitted_teacher):
    """Intermediate-layer distillation (hidden-state MSE + attention KL, on a trimmed vocabulary): the
    student's layer output ends closer to its matched teacher layer than training on logits alone leaves it,
    the recipe is recorded, and the student's attention implementation is restored afterwards."""
    teacher, tok, train, val = fitted_teacher
    soft = soft_labels(teacher, tok, train, 16)
    p = TrainParams(layers=1, hidden=32, heads=2, ffn=64, init="scratch", optim=OPTIM)
    gaps, recipes = {}, {}
    for name, kd in {"logits": KdParams(), "layers": KdParams(layer_hidden_weight=5.0, layer_attention_weight=1.0,
                                                             layer_map=[1])}.items():  # fmt: skip
        kept, small_tok = trim_vocabulary(tok, train["text"].to_list())
        student = build_student(teacher, kept, p)
        targets = soft_targets(small_tok, train, soft, LABELS, 16, tok if kd.layers else None)
        result = distill_student(student, small_tok, targets, val, LABELS, kd, p.optim, teacher=teacher)
        recipes[name] = result.summary().get("layer_distillation")
        assert student.config._attn_implementation == teacher.config._attn_implementation == "sdpa"
        gaps[name] = layer_gap(student, teacher, tok, small_tok, val["text"].to_list(), [1])
    assert gaps["layers"] < 0.5 * gaps["logits"], gaps
    assert recipes["logits"] is None
    assert recipes["layers"] == {"layer_map": [1], "hidden_weight": 5.0, "attention_weight": 1.0,
                                 "attention_layers": [0]}  # fmt: skip


def test_layer_terms_need_the_teacher_and_a_matching_map(fitted_teacher):
    teacher, tok, train, val = fitted_teacher
    soft = soft_labels(teacher, tok, train, 16)
    p = one_layer()
    student = build_student(teacher, None, p)
    assert student.config.teacher_layers == [1]  # the default map, saved in config.json
    targets = soft_targets(tok, train, soft, LABELS, 16, tok)
    with pytest.raises(StageError, match="need the teacher"):
        distill_student(student, tok, targets, val, LABELS, KdParams(layer_hidden_weight=1.0), p.optim)
    with pytest.raises(ParamError, match="kd.layer_map names 2 teacher layers but the student has 1"):
        distill_student(student, tok, targets, val, LABELS, KdParams(layer_hidden_weight=1.0, layer_map=[0, 1]),
                        p.optim, teacher=teacher)  # fmt: skip
    with pytest.raises(ParamError, match="kd.layer_attention_weight must be a number >= 0"):
        KdParams(layer_attention_weight=-1)


def test_teacher_states_are_kept_for_later_epochs_and_match_the_computed_ones(fitted_teacher):
    from stages.model.distillation import TeacherStates

    teacher, tok, train, _ = fitted_teacher
    texts = soft_targets(tok, train, soft_labels(teacher, tok, train, 16), LABELS, 16, tok).teacher_texts
    teacher.set_attention("eager")
    try:
        states = TeacherStates(teacher, hidden=[1], attention=[0], budget_mb=64)
        first = np.array([0, 1, 2, 3])
        computed = states(first, texts.batch(first))
        assert sorted(states.kept) == [0, 1, 2, 3] and states.used > 0
        # the same rows in another batch (other padding): taken from memory, equal on the real tokens
        again = np.array([3, 0, 1, 2])
        kept = states(again, texts.batch(again))
        lengths = texts.batch(first)["attention_mask"].sum(1)
        for b, row in enumerate(again):
            n = int(lengths[row])
            assert torch.equal(kept[0][0][b, :n], computed[0][0][row, :n])
            assert torch.equal(kept[1][0][b, :, :n, :n], computed[1][0][row, :, :n, :n])
        none = TeacherStates(teacher, hidden=[1], attention=[], budget_mb=0)
        none(first, texts.batch(first))
        assert none.kept == {}
    finally:
        teacher.set_attention("sdpa")


def test_mixed_rows_join_halves_of_two_labels_and_carry_the_teachers_labels_only(fitted_teacher):
    """kd.mix_share: seeded texts from halves of two original rows of different labels; their label is MIXED,
    so the cross-entropy skips them (a batch of only mixed rows is the soft term alone, never NaN) and a batch
    without any is the plain loss; train and prune make the same ones."""
    from stages.model.distillation import MIXED, mixed_texts, teacher_on_mixed

    teacher, tok, train, val = fitted_teacher
    rows = train.with_columns(op=pl.lit("original"))
    texts = mixed_texts(rows, 0.5, 7)
    assert len(texts) == round(0.5 * rows.height) and texts == mixed_texts(rows, 0.5, 7) != mixed_texts(rows, 0.5, 8)
    halves = [(t.split()[: (len(t.split()) + 1) // 2], t.split()[len(t.split()) // 2 :], label)
              for t, label in zip(train["text"], train["label"], strict=True)]  # fmt: skip
    for text in texts:
        assert any(a + b == text.split() and la != lb for a, _, la in halves for _, b, lb in halves), text
    kd = KdParams(mix_share=0.5)
    mixed = teacher_on_mixed(teacher, tok, rows, kd, 16, 7)
    assert mixed[0] == texts and mixed[1].shape == (len(texts), len(LABELS))
    targets = soft_targets(tok, train, soft_labels(teacher, tok, train, 16), LABELS, 16, mixed=mixed)
    assert len(targets) == train.height + len(texts)
    assert (targets.labels[train.height :] == MIXED).all() and (targets.labels[: train.height] >= 0).all()

    torch.manual_seed(0)
    student, teacher_logits = torch.randn(6, len(LABELS)), torch.randn(6, len(LABELS))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    plain = kd_loss(student, teacher_logits, labels, 0.7, 2.0)
    assert torch.equal(plain, 0.7 * 4 * torch.nn.functional.kl_div(
        torch.log_softmax(student / 2, -1), torch.softmax(teacher_logits / 2, -1), reduction="batchmean")
        + 0.3 * torch.nn.functional.cross_entropy(student, labels))  # fmt: skip
    half = kd_loss(student, teacher_logits, torch.tensor([0, 1, 2, MIXED, MIXED, MIXED]), 0.7, 2.0)
    soft = kd_loss(student, teacher_logits, labels, 1.0, 2.0)
    assert torch.allclose(half, 0.7 * soft + 0.3 * torch.nn.functional.cross_entropy(student[:3], labels[:3]))
    only = kd_loss(student, teacher_logits, torch.full((6,), MIXED), 0.7, 2.0)
    assert torch.isfinite(only) and torch.allclose(only, 0.7 * soft)
    with pytest.raises(ParamError, match="kd.mix_share must be a number >= 0"):
        KdParams(mix_share=-0.5)


def test_a_student_trains_with_mixed_rows_and_follows_the_teacher_on_them(fitted_teacher):
    """Training with mixed rows runs end to end and the student's distribution on unseen mixed texts ends
    closer to the teacher's than a student trained without them."""
    from stages.model.distillation import mixed_texts
    from stages.model.encoder import predict_logits

    teacher, tok, train, val = fitted_teacher
    soft = soft_labels(teacher, tok, train, 16)
    p = TrainParams(layers=1, hidden=32, heads=2, ffn=64, init="scratch", optim=OPTIM)
    probe = mixed_texts(train, 1.0, 99)
    want = torch.softmax(predict_logits(teacher, tok, probe, 16)[0], -1)
    gaps = {}
    for share in (0.0, 2.0):
        kd = KdParams(mix_share=share)
        mixed = teacher_on_mixed(teacher, tok, train, kd, 16, 0) if share else None
        student = build_student(teacher, None, p)
        targets = soft_targets(tok, train, soft, LABELS, 16, mixed=mixed)
        result = distill_student(student, tok, targets, val, LABELS, kd, p.optim)
        assert result.best_val_accuracy > 1 / len(LABELS)
        got = torch.softmax(predict_logits(student, tok, probe, 16)[0], -1)
        gaps[share] = float((got - want).abs().sum(-1).mean())
    assert gaps[2.0] < gaps[0.0], gaps
