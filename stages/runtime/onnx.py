"""ONNX export of a TextClassifier and ONNX Runtime helpers shared by `quantize` and later stages.

The exported graph takes `input_ids` and `attention_mask` (int64, dynamic batch and sequence axes) and
returns `logits`. A BERT encoder is exported in the canonical form of its math (`_CanonicalBert`: one
additive mask, per-layer head counts as constants), which has fewer operators than the traced Hugging
Face module and which ONNX Runtime's transformer optimizer can fuse (`fuse_for_ort`). Sessions are built
with a fixed thread count, and CPU-only unless asked otherwise.

One ONNX Runtime fusion is left out on CPU: SkipLayerNormalization (residual Add + LayerNormalization in one
kernel). On x86 with ONNX Runtime 1.31 and 1.32 that kernel is 2-5x slower than the two operators it
replaces, at every row count from 13 to 4,096 (`bench/int8_speed.py` measures it), so `fuse_for_ort` does not
make it and CPU sessions disable ONNX Runtime's own `SkipLayerNormFusion` (recorded with the session options).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.model.encoder import TextClassifier, TokenizedTexts
from stages.runner.errors import StageError
from stages.runtime.sessions import INPUTS, OUTPUTS
from stages.runtime.timing import percentiles, side_by_side


class _Logits(torch.nn.Module):
    def __init__(self, model: TextClassifier):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(input_ids, attention_mask)


class _CanonicalBert(torch.nn.Module):
    """The classifier's forward pass written out for export, on the model's own modules: word and position
    embeddings (token type 0 folded into the position table) and LayerNorm; then per layer Q/K/V with that
    layer's head count as a constant, scores / sqrt(d) + (1 - mask) * -10000, softmax, output projection and
    post-LayerNorms, GELU (erf) feed-forward; masked mean pooling and the head. The same function as
    `TextClassifier.forward` (the export's parity check holds it to 1e-4); masked positions get exp(-10000) = 0
    in float32 either way."""

    def __init__(self, model: TextClassifier):
        super().__init__()
        self.model = model
        emb = model.encoder.embeddings
        # token type 0 is constant: folded into the position table, so embeddings are two lookups + LayerNorm
        table = emb.position_embeddings.weight + emb.token_type_embeddings.weight[0]
        self.register_buffer("positions", table.detach())

    @staticmethod
    def supports(model: TextClassifier) -> bool:
        config = model.config
        return (
            getattr(config, "model_type", "") == "bert"
            and getattr(config, "position_embedding_type", "absolute") == "absolute"
            and getattr(config, "hidden_act", "") == "gelu"
            and not getattr(config, "is_decoder", False)
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.model.encoder.embeddings
        batch, seq = input_ids.shape[0], input_ids.shape[1]
        positions = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        x = emb.LayerNorm(emb.word_embeddings(input_ids) + torch.nn.functional.embedding(positions, self.positions))
        additive = (1.0 - attention_mask.unsqueeze(1).unsqueeze(2).to(torch.float32)) * -10000.0
        for layer in self.model.encoder.encoder.layer:
            attn = layer.attention.self
            heads, size = attn.num_attention_heads, attn.attention_head_size
            q = attn.query(x).view(batch, seq, heads, size).permute(0, 2, 1, 3)
            k = attn.key(x).view(batch, seq, heads, size).permute(0, 2, 3, 1)
            v = attn.value(x).view(batch, seq, heads, size).permute(0, 2, 1, 3)
            probs = torch.softmax(torch.matmul(q, k) / math.sqrt(size) + additive, dim=-1)
            context = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(batch, seq, heads * size)
            x = layer.attention.output.LayerNorm(layer.attention.output.dense(context) + x)
            hidden = torch.nn.functional.gelu(layer.intermediate.dense(x))
            x = layer.output.LayerNorm(layer.output.dense(hidden) + x)
        mask = attention_mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.model.head(pooled), pooled


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence what the exporter and the quantizer print about themselves (not about the model): torch's
    `torchvision is not installed` registry notes and deprecation warnings, the dynamo exporter's axis-name
    notes, ONNX Runtime's quantizer asking for pre-processing on the root logger. Errors still surface as
    exceptions; the stage's own checks (parity, agreement) judge the result."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def strip_provenance(proto: Any) -> Any:
    """Drop what ties an ONNX model to the machine and checkout that wrote it: the exporter's per-node source
    stack traces (absolute paths of the checkout and the virtualenv), FX node dumps and name scopes, doc
    strings, the graph's ExportedProgram signature, and the producer version. The computation is unchanged;
    the file then hashes the same in every clone. Returns `proto`, edited in place."""

    def clean_graph(graph: Any) -> None:
        del graph.metadata_props[:]
        graph.doc_string = ""
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                if attr.HasField("g"):
                    clean_graph(attr.g)
                for sub in attr.graphs:
                    clean_graph(sub)

    clean_graph(proto.graph)
    for function in proto.functions:
        del function.metadata_props[:]
        function.doc_string = ""
        for node in function.node:
            del node.metadata_props[:]
            node.doc_string = ""
    proto.doc_string = ""
    proto.producer_version = ""  # keeps the bytes independent of the torch / ONNX Runtime build that wrote them
    return proto


def save_portable(proto: Any, path: Path | str) -> None:
    """`onnx.save` after `strip_provenance`: every ONNX file a stage writes goes through here."""
    import onnx

    onnx.save(strip_provenance(proto), str(path))


def export_onnx(model: TextClassifier, tokenizer: Any, path: Path, opset: int) -> str:
    """Export with the dynamo exporter (batch and sequence axes dynamic), outputs `logits` and `pooled`;
    returns the form exported (`canonical` for a BERT encoder, else `traced`). `value_info` is cleared: the
    exporter's intermediate shape annotations confuse ONNX Runtime's quantizer and serve nothing else."""
    import onnx

    model = model.eval().cpu()
    sample = tokenizer(["a short query", "a somewhat longer example query here"], padding=True, return_tensors="pt")
    args = (sample["input_ids"], sample["attention_mask"])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    form = "canonical" if _CanonicalBert.supports(model) else "traced"
    try:
        with quiet_libraries():
            program = torch.onnx.export(
                (_CanonicalBert(model) if form == "canonical" else _Logits(model)).eval(),
                args,
                input_names=list(INPUTS),
                output_names=list(OUTPUTS),
                dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; the first line says what failed
        raise StageError(f"ONNX export failed: {str(exc).strip().splitlines()[0]}") from exc
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        program.save(str(raw))
        proto = onnx.load(str(raw))
    del proto.graph.value_info[:]
    save_portable(proto, path)
    return form


def _split_unsqueezes(proto: Any) -> int:
    """Rewrite each Unsqueeze over several non-negative constant axes as a chain of one-axis Unsqueezes
    (the same tensor). ONNX Runtime's attention fusion matches the mask path as two Unsqueezes, which is
    how the TorchScript exporter wrote it; the dynamo exporter merges them into one. Returns how many."""
    from onnx import helper, numpy_helper

    init = {t.name: t for t in proto.graph.initializer}
    nodes, split = [], 0
    for node in proto.graph.node:
        constant = node.op_type == "Unsqueeze" and len(node.input) == 2 and node.input[1] in init
        axes = numpy_helper.to_array(init[node.input[1]]) if constant else None
        if axes is None or axes.size < 2 or (axes < 0).any():
            nodes.append(node)
            continue
        current = node.input[0]
        for i, axis in enumerate(sorted(int(a) for a in axes.ravel())):
            name = f"{node.output[0]}__axis{axis}"
            if name not in init:
                init[name] = numpy_helper.from_array(np.array([axis], dtype=np.int64), name)
                proto.graph.initializer.append(init[name])
            out = node.output[0] if i == axes.size - 1 else f"{node.output[0]}__part{i}"
            label = f"{node.name or node.output[0]}_{i}"
            nodes.append(helper.make_node("Unsqueeze", [current, name], [out], name=label))
            current = out
        split += 1
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return split


def fuse_for_ort(src: Path, dst: Path) -> dict[str, int]:
    """ONNX Runtime's transformer optimizer (BERT fusions: EmbedLayerNormalization, Attention, LayerNormalization,
    BiasGelu; not SkipLayerNormalization, see the module docstring) on `src`, written to `dst`; returns the fused
    operator counts. Head counts and hidden sizes are read per layer from the graph (a pruned model's layers
    differ). Only the Python fusions are applied (`opt_level=0`): the file stays portable across CPUs; the
    session applies ONNX Runtime's own graph optimizations at load time."""
    import logging

    import onnx
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    proto = onnx.load(str(src))
    _split_unsqueezes(proto)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        onnx.save(proto, str(prepared))
        for name in ("fusion_attention", "fusion_base", "fusion_utils", "onnx_model", "onnx_model_bert"):
            # the optimizer warns once per pruned layer that its width differs from the input's: expected
            logging.getLogger(name).setLevel(logging.ERROR)
        options = FusionOptions("bert")
        options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = False
        model = optimizer.optimize_model(
            str(prepared), model_type="bert", num_heads=0, hidden_size=0, opt_level=0, optimization_options=options
        )
        stats = {k: int(v) for k, v in sorted(model.get_fused_operator_statistics().items()) if v}
        model.save_model_to_file(str(prepared))  # adds the com.microsoft opset the fused nodes need
        save_portable(onnx.load(str(prepared)), dst)
    return stats


def feeds(batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: batch[name].numpy().astype(np.int64) for name in INPUTS}


def batched_logits(run: Any, texts: TokenizedTexts, batch_size: int = 64) -> np.ndarray:
    """`run(feeds)` over every text, in order (batches sorted by length, as in `predict_logits`)."""
    order = np.argsort(texts.lengths, kind="stable")
    out = [run(feeds(texts.batch(order[s : s + batch_size]))) for s in range(0, len(texts), batch_size)]
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out)[np.argsort(order, kind="stable")]


def ort_logits(sess: Any, texts: TokenizedTexts, batch_size: int = 64) -> np.ndarray:
    """Logits of an ONNX Runtime session for every text, in order."""
    return batched_logits(lambda one: sess.run(["logits"], one)[0], texts, batch_size)


def quantize_dynamic_int8(src: Path, dst: Path, per_channel: bool, contrib_ops: bool = False) -> None:
    """ONNX Runtime dynamic INT8 (weights INT8, activations quantized on the fly). `contrib_ops`: the graph
    holds fused com.microsoft operators, which have no ONNX shape inference (their outputs are float)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT} if contrib_ops else {}
    with quiet_libraries():
        quantize_dynamic(str(src), str(dst), per_channel=per_channel, weight_type=QuantType.QInt8, extra_options=extra)
    proto = onnx.load(str(dst))
    drop_unused_nodes(proto)
    save_portable(proto, dst)


def drop_unused_nodes(proto: Any) -> int:
    """Remove nodes none of whose outputs reach a graph output (ONNX Runtime runs them anyway), then the
    initializers no node reads (ONNX Runtime warns about each at every load); returns how many nodes.
    Quantizing EmbedLayerNormalization leaves such a chain: its INT8 form takes no position ids."""
    wanted = {o.name for o in proto.graph.output}
    kept = list(proto.graph.node)
    while True:
        used = wanted | {name for node in kept for name in node.input}
        alive = [node for node in kept if any(out in used for out in node.output)]
        if len(alive) == len(kept):
            break
        kept = alive
    dropped = len(proto.graph.node) - len(kept)
    if dropped:
        del proto.graph.node[:]
        proto.graph.node.extend(kept)
    read = {name for node in kept for name in node.input} | {o.name for o in proto.graph.output}
    unused = [t for t in proto.graph.initializer if t.name not in read]
    for tensor in unused:
        proto.graph.initializer.remove(tensor)
    return dropped


def _batch1(texts: TokenizedTexts) -> list[dict[str, np.ndarray]]:
    return [feeds(texts.batch([i])) for i in range(len(texts))]


def latency_ms(sess: Any, texts: TokenizedTexts, runs: int, warmup: int = 10) -> dict[str, float]:
    """Model-only latency at batch 1 over real queries (cycled) of a session (or any callable on feeds):
    p50/p95/p99 in milliseconds. Timings vary from run to run and machine to machine."""
    return latency_side_by_side({"one": sess}, texts, runs, rounds=1, warmup=warmup)["one"]


def _callables(sessions: dict[str, Any]) -> dict[str, Any]:
    return {
        name: sess if callable(sess) else (lambda one, s=sess: s.run(["logits"], one))
        for name, sess in sessions.items()
    }


def latency_samples(
    sessions: dict[str, Any], texts: TokenizedTexts, runs: int, rounds: int = 5, warmup: int = 10
) -> dict[str, list[float]]:
    """Batch-1 milliseconds of several sessions (ONNX Runtime sessions, or any callable on feeds), in
    interleaved rounds over the same queries (`side_by_side`). Each session runs a block of calls at a time:
    calling them in turn per query would let one session's spinning threads slow the next one's call."""
    return side_by_side(_callables(sessions), _batch1(texts), runs, rounds=rounds, warmup=warmup)


def latency_side_by_side(
    sessions: dict[str, Any], texts: TokenizedTexts, runs: int, rounds: int = 5, warmup: int = 10
) -> dict[str, dict[str, float]]:
    """`latency_ms` of several sessions, measured in interleaved rounds over the same queries."""
    samples = latency_samples(sessions, texts, runs, rounds, warmup)
    return {name: percentiles(values) for name, values in samples.items()}


def size_mb(path: Path) -> float:
    return round(os.path.getsize(path) / 1e6, 4)
