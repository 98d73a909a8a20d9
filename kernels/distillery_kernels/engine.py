"""The whole student on the compiled operators: `Engine.from_onnx(path)` reads the INT8 weights and scales that
`quantize` wrote into its ONNX model (initializers only: protobuf, never a pickle) and runs the same function.

The model is the project's canonical BERT export (stages/runtime/onnx.py, `_CanonicalBert`) after ONNX Runtime's
dynamic INT8 quantization: word and position embeddings (INT8 tables dequantized here, as its DequantizeLinear
does), an embedding LayerNorm, per layer Q/K/V (its own head count, as pruning left it), attention, output
projection + residual LayerNorm, GELU feed-forward + residual LayerNorm; masked mean pooling and the head. The
graph is read by its structure (see `_Graph`), never by names: each INT8 linear is a MatMulInteger followed by
Cast -> Mul (scales) -> Add (bias), six per layer in order, then the head.

The one difference from ONNX Runtime's INT8 model: activations are quantized per row (per token) instead of per
tensor, which is at least as accurate and makes a query's answer independent of the batch it is sent in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import distillery_kernels as kernels


class EngineError(ValueError):
    """The ONNX model is not one this engine can run; the message names what is missing or unexpected."""


@dataclass
class Layer:
    heads: int
    qkv: Any  # PackedWeights: query, key and value side by side, one matmul
    out: Any
    norm1: tuple[np.ndarray, np.ndarray]
    ffn1: Any
    ffn2: Any
    norm2: tuple[np.ndarray, np.ndarray]


class Engine:
    """`logits, pooled = engine.run(input_ids, attention_mask)`: int64 [B, S] each, float32 results."""

    def __init__(self, words: np.ndarray, positions: np.ndarray, norm: tuple[np.ndarray, np.ndarray],
                 layers: list[Layer], head: Any, eps: float, head_dim: int):  # fmt: skip
        ops = kernels.require()
        self.layers, self.head_dim, self.num_labels, self.max_length = layers, head_dim, head.n, len(positions)
        self.words, self.positions, self.norm, self.head, self.eps = words, positions, norm, head, eps
        # the forward pass runs in C++ (one call, the GIL released): between operators Python cost more than
        # the smaller operators themselves
        self.model = ops.Model(words, positions, norm[0], norm[1], eps, head_dim, head)
        for layer in layers:
            self.model.add_layer(layer.heads, layer.qkv, layer.out, layer.ffn1, layer.ffn2, *layer.norm1, *layer.norm2)

    @classmethod
    def from_onnx(cls, path: Path | str, block: tuple[int, int] | None = None) -> Engine:
        import onnx

        return cls.from_proto(onnx.load(str(path)), str(path), block)

    @classmethod
    def from_proto(cls, proto: Any, name: str = "model", block: tuple[int, int] | None = None) -> Engine:
        """The engine of a quantized model; with `block` (block_k, block_n) the layers' linears are packed
        block-sparse (only blocks holding a non-zero weight are stored and multiplied; the head stays dense):
        the same results, bit for bit, faster where pruning left whole blocks zero (prune.magnitude_block)."""
        ops = kernels.require()
        graph = _Graph(proto, name)
        if block is not None:
            block = (int(block[0]), int(block[1]))

        def packed(w: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> Any:
            return ops.PackedWeights(w, scale, bias, block=block) if block else ops.PackedWeights(w, scale, bias)

        head_dim = graph.head_dim()
        norms, linears = graph.norms, graph.linears
        count = (len(norms) - 1) // 2
        if len(norms) != 2 * count + 1 or len(linears) != 6 * count + 1 or count < 1:
            raise EngineError(f"{name}: {len(norms)} LayerNorms and {len(linears)} INT8 linears do not make BERT "
                              "layers (1 + 2 per layer, 6 per layer + the head)")  # fmt: skip
        layers = []
        for i in range(count):
            q, k, v = graph.qkv(linears[6 * i : 6 * i + 3], i)
            width = q[0].shape[1]
            if width % head_dim or k[0].shape[1] != width or v[0].shape[1] != width:
                raise EngineError(f"{name}: layer {i}'s query/key/value widths {width}, {k[0].shape[1]}, "
                                  f"{v[0].shape[1]} are not equal multiples of the head size {head_dim}")  # fmt: skip
            qkv = packed(*(np.concatenate(parts, axis=-1) for parts in zip(q, k, v, strict=True)))
            out, ffn1, ffn2 = (graph.weights(node) for node in linears[6 * i + 3 : 6 * i + 6])
            layers.append(Layer(heads=width // head_dim, qkv=qkv, out=packed(*out),
                                norm1=graph.layernorm(norms[1 + 2 * i]), ffn1=packed(*ffn1),
                                ffn2=packed(*ffn2), norm2=graph.layernorm(norms[2 + 2 * i])))  # fmt: skip
        words, positions = graph.tables()
        head = ops.PackedWeights(*graph.weights(linears[-1]))
        return cls(words, positions, graph.layernorm(norms[0]), layers, head, graph.eps, head_dim)

    @property
    def zero_blocks(self) -> float:
        """The share of the layers' weight blocks that are all zero (0.0 for a dense engine): what it skips."""
        mats = [m for layer in self.layers for m in (layer.qkv, layer.out, layer.ffn1, layer.ffn2)]
        if mats[0].block is None:
            return 0.0
        bk, bn = mats[0].block
        counts = [-(-m.k // bk) * -(-m.n // bn) for m in mats]
        return 1.0 - sum(m.density * c for m, c in zip(mats, counts, strict=True)) / sum(counts)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits [B, labels], pooled [B, width]); a ValueError names a token id or a length out of range."""
        return self.model.run(np.asarray(input_ids, np.int64), np.asarray(attention_mask, np.int64))


class _Graph:
    """The quantized model's graph read by its structure (topological order, operator types and edges), not by
    names: the exporter shares equal initializers (zero biases, unit LayerNorm weights) under one name."""

    def __init__(self, proto: Any, name: str):
        from onnx import numpy_helper

        self.name = name
        self.inits = {t.name: t for t in proto.graph.initializer}
        self.array = lambda key: numpy_helper.to_array(self.inits[key])
        self.nodes = list(proto.graph.node)
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.nodes:
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)
        self.norms = [n for n in self.nodes if n.op_type == "LayerNormalization"]
        self.linears = [n for n in self.nodes if n.op_type == "MatMulInteger"]
        if not self.norms:
            raise EngineError(f"{name}: no LayerNormalization: not the canonical BERT export")
        if not self.linears:
            raise EngineError(f"{name}: no INT8 linear (MatMulInteger): not a model quantize wrote")
        eps = {next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5) for n in self.norms}
        if len(eps) != 1:
            raise EngineError(f"{name}: LayerNorms with different epsilons {sorted(eps)}")
        self.eps = float(eps.pop())

    def only(self, output: str, op: str) -> Any:
        """The single consumer of `output`, which must be an `op`."""
        found = self.consumers.get(output, [])
        if len(found) != 1 or found[0].op_type != op:
            raise EngineError(f"{self.name}: expected one {op} after {output}, found {[n.op_type for n in found]}")
        return found[0]

    def head_dim(self) -> int:
        """From the scores' divisor sqrt(d): the Div that follows a float MatMul by a scalar constant."""
        for node in self.nodes:
            if node.op_type == "Div" and node.input[1] in self.inits:
                src = self.producer.get(node.input[0])
                value = self.array(node.input[1])
                if src is not None and src.op_type == "MatMul" and value.size == 1:
                    return round(float(value.reshape(())) ** 2)
        raise EngineError(f"{self.name}: no attention scores divided by sqrt(head size) found")

    def weights(self, mm: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(INT8 weight [K, N], per-column scale [N], bias [N]) of MatMulInteger -> Cast -> Mul (scales) -> Add."""
        cast = self.only(mm.output[0], "Cast")
        mul = self.only(cast.output[0], "Mul")
        add = self.only(mul.output[0], "Add")
        weight = self.array(mm.input[1]) if mm.input[1] in self.inits else None
        zero = self.array(mm.input[3]) if len(mm.input) > 3 and mm.input[3] in self.inits else None
        if weight is None or weight.dtype != np.int8 or (zero is not None and np.any(zero != 0)):
            raise EngineError(f"{self.name}: {mm.name or mm.output[0]}'s weight is not a symmetric INT8 constant")
        scales = self.producer.get(mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0])
        if scales is None or scales.op_type != "Mul" or scales.input[1] not in self.inits:
            raise EngineError(f"{self.name}: {mm.output[0]}'s weight scale is not a constant")
        bias = next((i for i in add.input if i in self.inits), None)
        if bias is None:
            raise EngineError(f"{self.name}: the Add after {mm.output[0]} reads no constant bias")
        scale = self.array(scales.input[1]).astype(np.float32).reshape(-1)
        if scale.size == 1:
            scale = np.full(weight.shape[1], scale[0], np.float32)
        return weight, scale, self.array(bias).astype(np.float32)

    def qkv(self, nodes: list[Any], layer: int) -> tuple[tuple, tuple, tuple]:
        """The layer's three projections as (query, key, value), told apart by where attention reads them: the
        scores' MatMul reads the query first and the key second, the context's MatMul reads the value second."""
        roles = {}
        for mm in nodes:
            add = self.only(self.only(self.only(mm.output[0], "Cast").output[0], "Mul").output[0], "Add")
            reshape = self.only(add.output[0], "Reshape")
            transpose = self.only(reshape.output[0], "Transpose")
            matmul = self.only(transpose.output[0], "MatMul")
            at = list(matmul.input).index(transpose.output[0])
            scores = [n.op_type for n in self.consumers.get(matmul.output[0], [])] == ["Div"]  # q k^T / sqrt(d)
            role = ("query" if at == 0 else "key") if scores else "value"
            roles[role] = self.weights(mm)
        if set(roles) != {"query", "key", "value"}:
            raise EngineError(f"{self.name}: layer {layer}'s projections read as {sorted(roles)}, not query/key/value")
        return roles["query"], roles["key"], roles["value"]

    def layernorm(self, node: Any) -> tuple[np.ndarray, np.ndarray]:
        if len(node.input) < 3 or any(i not in self.inits for i in node.input[1:3]):
            raise EngineError(f"{self.name}: LayerNorm {node.output[0]} has no constant weight and bias")
        return tuple(self.array(i).astype(np.float32) for i in node.input[1:3])

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(word table, position table) float32: the Gathers on `input_ids` and on the positions, each from a
        float table or an INT8 one dequantized as its DequantizeLinear does."""
        gathers = [n for n in self.nodes if n.op_type == "Gather" and n.input[0] in self.inits]
        words = [g for g in gathers if g.input[1] == "input_ids"]
        others = [g for g in gathers if g.input[1] != "input_ids"]
        if len(words) != 1 or len(others) != 1:
            raise EngineError(f"{self.name}: expected a word and a position table lookup, found {len(gathers)}")
        return self.table(words[0]), self.table(others[0])

    def table(self, gather: Any) -> np.ndarray:
        values = self.array(gather.input[0])
        if values.dtype == np.float32:
            return np.ascontiguousarray(values)
        deq = self.only(gather.output[0], "DequantizeLinear")
        scale = self.array(deq.input[1]).astype(np.float32)
        zero = self.array(deq.input[2]).astype(np.int32) if len(deq.input) > 2 and deq.input[2] else np.int32(0)
        if scale.size > 1:  # per row of the table (axis 0)
            scale, zero = scale.reshape(-1, 1), np.reshape(zero, (-1, 1)) if np.size(zero) > 1 else zero
        return np.ascontiguousarray((values.astype(np.int32) - zero).astype(np.float32) * scale, np.float32)


class _Port:
    def __init__(self, name: str):
        self.name = name


class EngineSession:
    """The engine behind the part of ONNX Runtime's `InferenceSession` the project calls (`run(names, feeds)`,
    `get_inputs`, `get_outputs`, `get_providers`), so build, benchmark and the server time and serve it as they
    do a session. `threads` sets the operators' pool for the whole process (as the server and benchmark run
    one engine at a time); `spinning=False` lets its idle threads sleep at once, as ONNX Runtime's
    `session.intra_op.allow_spinning` 0 does (the server's `serve.spinning`)."""

    OUTPUTS = ("logits", "pooled")

    def __init__(self, path: Path | str, threads: int, spinning: bool = True, block: Any = None):
        self.engine = Engine.from_onnx(path, tuple(block) if block else None)
        self.threads = threads
        kernels.set_threads(threads)
        kernels.ops.set_spinning(spinning)

    def run(self, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if kernels.ops.threads() != self.threads:
            kernels.set_threads(self.threads)
        logits, pooled = self.engine.run(feeds["input_ids"], feeds["attention_mask"])
        found = {"logits": logits, "pooled": pooled}
        unknown = [n for n in names or () if n not in found]
        if unknown:
            raise ValueError(f"the kernels engine has no output(s) {unknown}; it has {list(self.OUTPUTS)}")
        return [found[n] for n in names or self.OUTPUTS]

    def get_inputs(self) -> list[_Port]:
        return [_Port("input_ids"), _Port("attention_mask")]

    def get_outputs(self) -> list[_Port]:
        return [_Port(n) for n in self.OUTPUTS]

    def get_providers(self) -> list[str]:
        return [f"distillery_kernels:{kernels.isa()}"]


def agreement(engine: Engine, session: Any, batches: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Top-1 agreement and the largest logit difference (absolute, and relative to the logits' range) of the
    engine against an ONNX Runtime session of the same model over `batches`."""
    same = total = 0
    worst = spread = 0.0
    for ids, mask in batches:
        ours = engine.run(ids, mask)[0]
        theirs = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
        same += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        total += len(ids)
        worst = max(worst, float(np.abs(ours - theirs).max()))
        spread = max(spread, float(theirs.max() - theirs.min()))
    return {"agreement": same / max(total, 1), "max_abs_logit_diff": worst,
            "max_rel_logit_diff": worst / spread if spread else 0.0}  # fmt: skip


__all__ = ["Engine", "EngineError", "EngineSession", "agreement"]
