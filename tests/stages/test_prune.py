"""prune on a tiny student: shapes shrink, the model reloads and exports, 0 shares pass through."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from stages import prune
from stages.model.encoder import TokenizedTexts, layer_shapes, load
from stages.quantize import check_parity
from stages.runner.errors import ParamError
from stages.runtime.onnx import export_onnx
from tests.stages.tiny import write_stage_inputs

RECOVERY = {"epochs": 1, "batch_size": 8, "lr": 1e-3, "max_length": 16}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prune")
    write_stage_inputs(root, heads=4)
    return root


def run_prune(root: Path, out: str, **params) -> dict:
    section = {"optim": RECOVERY, "min_heads_per_layer": 1, "min_ffn_per_layer": 8, **params}
    params_file = root / f"{out}.yaml"
    # the tiny inputs hold soft labels but no teacher folder, which mixed rows (kd.mix_share) need
    shared = {"kd": {"alpha": 0.7, "temperature": 2.0, "mix_share": 0.0}, "training": {"engine": "torch"}}
    params_file.write_text(yaml.safe_dump({"prune": section, **shared}))
    d = root / "data"
    argv = ["--params", str(params_file), "--in", str(d / "05_train"), "--augment", str(d / "03_augment")]
    argv += ["--distill", str(d / "04_distill"), "--clean", str(d / "02_clean"), "--out", str(root / out)]
    assert prune.main(argv) == 0
    return json.loads((root / out / "metrics.json").read_text())


def test_structured_pruning_shrinks_reloads_and_exports(inputs, tmp_path):
    metrics = run_prune(inputs, "structured", heads=0.5, ffn=0.5)
    model, tok, _ = load(inputs / "structured/student")
    shapes = layer_shapes(model)
    assert sum(s["heads"] for s in shapes) == 4 and all(s["heads"] >= 1 for s in shapes)
    assert sum(s["ffn"] for s in shapes) == 64
    layer = model.encoder.encoder.layer[0]
    assert layer.attention.self.query.weight.shape == (shapes[0]["heads"] * 8, 32)
    assert layer.intermediate.dense.weight.shape == (shapes[0]["ffn"], 32)
    assert metrics["pruned"] and metrics["flops_reduction"] > 0.4
    assert metrics["after"]["parameters"] < metrics["before"]["parameters"]
    onnx_path = tmp_path / "pruned.onnx"
    export_onnx(model, tok, onnx_path, 18)
    texts = TokenizedTexts(tok, ["where is my parcel", "refund my money now please"], 16)
    assert check_parity(model, onnx_path, texts, 1e-4) < 1e-4


def test_zero_shares_pass_the_student_through(inputs):
    metrics = run_prune(inputs, "same", heads=0.0, ffn=0.0)
    assert not metrics["pruned"] and "passed through" in metrics["note"]
    before = (inputs / "data/05_train/student/model.safetensors").read_bytes()
    assert (inputs / "same/student/model.safetensors").read_bytes() == before


def test_magnitude_reaches_its_sparsity_and_says_dense_gets_nothing(inputs):
    metrics = run_prune(inputs, "magnitude", heads=0.0, ffn=0.0, magnitude=0.5)
    assert metrics["sparsity"]["encoder_matrices"] == pytest.approx(0.5, abs=0.01)
    assert "no speed" in metrics["sparsity"]["note"]
    assert metrics["recovery"]["engine"]["name"] == "torch"


def test_block_magnitude_zeroes_whole_kernel_blocks_at_its_share():
    """Blocks are block_k inputs x block_n outputs of each Linear (an [out, in] weight): as the kernels cut the
    [in, out] INT8 matrix; edge blocks of odd shapes count too."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(96, 40, generator=gen), torch.randn(40, 100, generator=gen)]
    prune.apply_masks(weights, 0.6, (8, 32))
    for w in weights:
        blocks = prune.block_scores(w, (8, 32))
        rows, cols = -(-w.shape[0] // 32), -(-w.shape[1] // 8)
        assert blocks.shape == (rows, cols)
        padded = torch.full((rows * 32, cols * 8), float("nan"))
        padded[: w.shape[0], : w.shape[1]] = w
        cut = padded.reshape(rows, 32, cols, 8).transpose(1, 2).flatten(2)
        zeros, real = (cut == 0).sum(-1), (~cut.isnan()).sum(-1)
        # randn has no zeros: a block is emptied whole or kept whole
        assert torch.all((zeros == 0) | (zeros == real)) and torch.equal(blocks == 0, zeros == real)
    total = sum(prune.block_scores(w, (8, 32)).numel() for w in weights)
    assert prune.block_sparsity_of(weights, (8, 32)) == pytest.approx(int(0.6 * total) / total, abs=1 / total)
    with pytest.raises(ParamError, match=r"prune.magnitude_block must be null or \[block_k, block_n\]"):
        prune.PruneParams(magnitude=0.5, magnitude_block=[6, 16])


def test_per_matrix_scope_takes_the_same_share_of_each_matrix_where_global_empties_the_small_one():
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(64, 64, generator=gen), 0.1 * torch.randn(64, 64, generator=gen)]  # one 10x smaller
    glob = prune.magnitude_masks(weights, 0.5, (16, 16))
    assert glob[1].sum() == 0 and glob[0].float().mean() == 1.0  # the smaller matrix goes entirely
    for keep in prune.magnitude_masks(weights, 0.5, (16, 16), per_matrix=True):
        assert keep.float().mean() == pytest.approx(0.5)
    singles = prune.magnitude_masks(weights, 0.25, per_matrix=True)
    assert all(keep.float().mean() == pytest.approx(0.75, abs=1 / 4096) for keep in singles)
    with pytest.raises(ParamError, match="prune.magnitude_scope must be global or matrix"):
        prune.PruneParams(magnitude=0.5, magnitude_scope="layer")


def test_choose_removed_keeps_the_per_layer_minimum():
    scores = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.9, 0.8, 0.7])]
    assert prune.choose_removed(scores, 0.5, 1) == [[0, 1], [2]]
    assert prune.choose_removed(scores, 0.0, 1) == [[], []]


def test_bad_share_is_named():
    with pytest.raises(ParamError, match=r"prune.heads must be a share in \[0, 1\)"):
        prune.PruneParams(heads=1.5)


def test_prune_core_on_tiny_inputs(inputs):
    """`prune(model, targets, p)` without params.yaml or folders: heads go, the report says which."""
    import polars as pl

    from stages.model.distillation import KdParams, soft_targets
    from stages.model.training import OptimParams

    d = inputs / "data"
    student, tok, labels = load(d / "05_train/student")
    train = pl.read_parquet(d / "03_augment/train.parquet").sort("id")
    soft = pl.read_parquet(d / "04_distill/soft_labels.parquet")
    val = pl.read_parquet(d / "02_clean/val.parquet")
    targets = soft_targets(tok, train, soft, labels, 16)
    p = prune.PruneParams(heads=0.5, ffn=0.25, min_heads_per_layer=1, min_ffn_per_layer=8,
                          optim=OptimParams(epochs=1, batch_size=8, max_length=16))  # fmt: skip
    report, timings = prune.prune(student, tok, targets, val, labels, p, KdParams(), ("torch", "test", 0))
    assert sum(s["heads"] for s in layer_shapes(student)) == 4
    assert sum(len(h) for h in report["removed"]["heads"].values()) == 4
    assert report["recovery"]["engine"]["chosen_by"] == "test" and timings["recovery"]["seconds"] >= 0


def test_magnitude_ramps_over_its_share_of_recovery_and_the_best_epoch_is_one_at_the_target(inputs):
    """magnitude_ramp 0.5 of 4 epochs: sparsity rises through epochs 1-2 and holds for 3-4; epoch 1 (below the
    target) is never chosen, whatever its accuracy."""
    import polars as pl

    from stages.model.distillation import KdParams, soft_targets
    from stages.model.training import OptimParams

    d = inputs / "data"
    student, tok, labels = load(d / "05_train/student")
    targets = soft_targets(tok, pl.read_parquet(d / "03_augment/train.parquet").sort("id"),
                           pl.read_parquet(d / "04_distill/soft_labels.parquet"), labels, 16)  # fmt: skip
    p = prune.PruneParams(heads=0.0, ffn=0.0, magnitude=0.6, magnitude_ramp=0.5,
                          optim=OptimParams(epochs=4, batch_size=8, max_length=16, patience=4))  # fmt: skip
    assert p.ramp_epochs == 2
    seen = {}
    weights = prune.encoder_matrices(student)
    report, _ = prune.prune(student, tok, targets, pl.read_parquet(d / "02_clean/val.parquet"), labels, p,
                            KdParams(), ("torch", "test", 0),
                            on_epoch=lambda epoch, _: seen.update({epoch: prune.sparsity_of(weights)}))  # fmt: skip
    assert 0.1 < seen[1] < 0.5 and all(seen[e] == pytest.approx(0.6, abs=0.01) for e in (2, 3, 4)), seen
    assert report["recovery"]["best_epoch"] >= 2
    with pytest.raises(ParamError, match=r"prune.magnitude_ramp must be a share in \(0, 1\]"):
        prune.PruneParams(magnitude=0.5, magnitude_ramp=0.0)
