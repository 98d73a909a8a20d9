"""The kernels engine runs the whole student from the INT8 ONNX model quantize writes: its logits against ONNX
Runtime's on the same file, pruned heads (a different head count per layer), byte-identical reruns, and clear
errors for a model it cannot run or an input out of range."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import distillery_kernels as kernels
from distillery_kernels.engine import Engine, EngineError, agreement
from stages.model.encoder import TokenizedTexts, shrink_layer
from stages.runtime.onnx import export_onnx, feeds, quantize_dynamic_int8
from stages.runtime.sessions import session
from tests.stages.tiny import dataset, tiny_teacher


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> tuple[Path, object]:
    """A tiny BERT student with layer 0 pruned to 3 of its 4 heads and 50 of its 64 feed-forward neurons, as prune
    does, exported and quantized as quantize does."""
    model, tok = tiny_teacher(seed=4, heads=4)
    shrink_layer(model.encoder.encoder.layer[0], heads=[0, 1, 3], neurons=list(range(50)))
    root = tmp_path_factory.mktemp("engine")
    fp32, int8 = root / "model.onnx", root / "model.int8.onnx"
    assert export_onnx(model, tok, fp32, 18) == "canonical"
    quantize_dynamic_int8(fp32, int8, per_channel=True)
    return int8, tok


@pytest.fixture(scope="module")
def batches(quantized):
    _, tok = quantized
    texts = TokenizedTexts(tok, dataset(12, seed=5)["text"].to_list() + ["a", "zebras track my parcel please now"], 16)
    rows = [feeds(texts.batch(list(range(s, min(s + 8, len(texts)))))) for s in range(0, len(texts), 8)]
    return [(b["input_ids"], b["attention_mask"]) for b in rows]


def test_the_engine_reads_the_models_shape(quantized):
    engine = Engine.from_onnx(quantized[0])
    assert [layer.heads for layer in engine.layers] == [3, 4] and engine.head_dim == 8 and engine.num_labels == 3


@pytest.mark.parametrize("threads", [1, 2])
def test_logits_match_onnx_runtime_on_the_same_int8_model(quantized, batches, threads):
    kernels.set_threads(threads)
    try:
        figures = agreement(Engine.from_onnx(quantized[0]), session(quantized[0], 1), batches)
    finally:
        kernels.set_threads(1)
    # per-row activation scales where ONNX Runtime has one per tensor: close, not equal
    assert figures["max_rel_logit_diff"] < 0.05, figures
    assert figures["agreement"] >= 0.9, figures


def test_a_query_gets_the_same_bytes_alone_in_a_batch_and_on_a_rerun(quantized, batches):
    engine = Engine.from_onnx(quantized[0])
    ids, mask = batches[0]
    length = int(mask[1].sum())
    together = engine.run(ids, mask)[0]
    alone = engine.run(ids[1:2, :length], mask[1:2, :length])[0]
    assert together[1].tobytes() == alone[0].tobytes()
    assert engine.run(ids, mask)[0].tobytes() == together.tobytes()
    assert Engine.from_onnx(quantized[0]).run(ids, mask)[0].tobytes() == together.tobytes()


def padded_forward(engine: Engine, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The student on the padded [batch, seq] layout, composed from the single operators in Python: what the
    engine's packed forward (padding dropped) must equal bit for bit."""
    ops, eps, inner = kernels.require(), engine.eps, lambda layer: layer.heads * engine.head_dim
    batch, seq = ids.shape
    x = ops.add_layernorm(engine.words[ids], np.ascontiguousarray(np.broadcast_to(engine.positions[:seq],
                          (batch, seq, engine.words.shape[1]))), *engine.norm, eps)  # fmt: skip
    for layer in engine.layers:
        qkv = ops.linear(x, layer.qkv)
        q, k, v = (np.ascontiguousarray(qkv[..., i * inner(layer) : (i + 1) * inner(layer)]) for i in range(3))
        x = ops.add_layernorm(ops.linear(ops.attention(q, k, v, mask, layer.heads), layer.out), x, *layer.norm1, eps)
        x = ops.add_layernorm(ops.linear(ops.linear(x, layer.ffn1, gelu=True), layer.ffn2), x, *layer.norm2, eps)
    pooled = np.zeros((batch, x.shape[2]), np.float32)
    for b in range(batch):
        for t in range(seq):  # in order, one float32 add per token, as the engine sums
            if mask[b, t]:
                pooled[b] += x[b, t]
        pooled[b] /= np.float32(max(int(mask[b].astype(bool).sum()), 1))
    return ops.linear(pooled, engine.head), pooled


@pytest.mark.parametrize("isa", ["portable", "auto"])
def test_dropping_padding_gives_each_token_the_padded_layouts_bits(quantized, batches, isa):
    """The engine computes real tokens only; right and left padding, holes and an empty row give the logits and
    pooled vectors of the padded computation byte for byte, on both code paths and 1 or 2 threads."""
    ids, mask = batches[0]
    left = np.zeros_like(mask)
    holes = mask.copy()
    for b in range(len(mask)):
        n = int(mask[b].sum())
        left[b, mask.shape[1] - n :] = 1
        holes[b, 1:n:3] = 0
    holes[-1] = 0  # a row with no token at all
    engine = Engine.from_onnx(quantized[0])
    kernels.set_isa(isa)
    try:
        for threads in (1, 2):
            kernels.set_threads(threads)
            for m in (mask, left, holes):
                logits, pooled = engine.run(ids, m)
                want_logits, want_pooled = padded_forward(engine, ids, m)
                assert pooled.tobytes() == want_pooled.tobytes()
                assert logits.tobytes() == want_logits.tobytes()
    finally:
        kernels.set_isa("auto")
        kernels.set_threads(1)


def test_a_block_sparse_student_runs_block_sparse_with_the_dense_engines_bytes(tmp_path, batches):
    """prune.magnitude_block's zero blocks survive export and INT8 quantization, and the engine packed
    block-sparse skips them: the same logits, bit for bit, as the dense packing of the same file."""
    from stages.prune import apply_masks, encoder_matrices

    model, tok = tiny_teacher(seed=4, heads=4)
    apply_masks(encoder_matrices(model), 0.6, (4, 16))
    fp32, int8 = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    assert export_onnx(model, tok, fp32, 18) == "canonical"
    quantize_dynamic_int8(fp32, int8, per_channel=True)
    dense, sparse = Engine.from_onnx(int8), Engine.from_onnx(int8, block=(4, 16))
    assert dense.zero_blocks == 0.0 and sparse.zero_blocks == pytest.approx(0.6, abs=0.05)
    for ids, mask in batches:
        for got, want in zip(sparse.run(ids, mask), dense.run(ids, mask), strict=True):
            assert got.tobytes() == want.tobytes()


def test_a_model_it_cannot_run_and_inputs_out_of_range_are_named(quantized, tmp_path):
    import onnx

    proto = onnx.load(str(quantized[0]))
    fp32 = Path(quantized[0]).with_name("model.onnx")
    with pytest.raises(EngineError, match="no INT8 linear"):
        Engine.from_onnx(fp32)  # the fp32 export: no INT8 weights
    kept = [t for t in proto.graph.initializer if not t.name.endswith("LayerNorm.weight")]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    with pytest.raises(EngineError, match="LayerNorm"):
        Engine.from_proto(proto, "broken")
    engine = Engine.from_onnx(quantized[0])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.run(np.array([[1, 10_000]]), np.ones((1, 2), np.int64))
    with pytest.raises(ValueError, match="at most 64"):
        engine.run(np.ones((1, 65), np.int64), np.ones((1, 65), np.int64))
