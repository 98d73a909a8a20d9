"""ONNX export of a TextClassifier and ONNX Runtime helpers shared by `quantize` and later stages.

The exported graph takes `input_ids` and `attention_mask` (int64, dynamic batch and sequence axes) and
returns `logits`. Sessions are built with a fixed thread count, and CPU-only unless asked otherwise.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.common.encoder import TextClassifier, TokenizedTexts
from stages.common.errors import StageError

INPUTS = ("input_ids", "attention_mask")


class _Logits(torch.nn.Module):
    def __init__(self, model: TextClassifier):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)[0]


def export_onnx(model: TextClassifier, tokenizer: Any, path: Path, opset: int) -> None:
    """Export with the dynamo exporter (batch and sequence axes dynamic). `value_info` is cleared: the
    exporter's intermediate shape annotations confuse ONNX Runtime's quantizer and serve nothing else."""
    import onnx

    model = model.eval().cpu()
    sample = tokenizer(["a short query", "a somewhat longer example query here"], padding=True, return_tensors="pt")
    args = (sample["input_ids"], sample["attention_mask"])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    try:
        program = torch.onnx.export(
            _Logits(model).eval(),
            args,
            input_names=list(INPUTS),
            output_names=["logits"],
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
    proto.producer_version = ""  # keeps the bytes independent of the torch build that wrote them
    onnx.save(proto, str(path))


def session(path: Path | str, threads: int = 2, providers: list[str] | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def feeds(batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: batch[name].numpy().astype(np.int64) for name in INPUTS}


def ort_logits(sess: Any, texts: TokenizedTexts, batch_size: int = 64) -> np.ndarray:
    """Logits for every text in order (batches sorted by length, as in `predict_logits`)."""
    order = np.argsort(texts.lengths, kind="stable")
    out = []
    for start in range(0, len(texts), batch_size):
        out.append(sess.run(["logits"], feeds(texts.batch(order[start : start + batch_size])))[0])
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out)[np.argsort(order, kind="stable")]


def latency_ms(sess: Any, texts: TokenizedTexts, runs: int, warmup: int = 10) -> dict[str, float]:
    """Model-only latency at batch 1 over real queries (cycled): p50/p95/p99 in milliseconds. Timings vary
    from run to run and machine to machine."""
    samples = []
    for i in range(warmup + runs):
        one = feeds(texts.batch([i % len(texts)]))
        start = time.perf_counter()
        sess.run(["logits"], one)
        if i >= warmup:
            samples.append((time.perf_counter() - start) * 1000.0)
    qs = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50": round(statistics.median(samples), 4), "p95": round(qs[94], 4), "p99": round(qs[98], 4)}


def size_mb(path: Path) -> float:
    return round(os.path.getsize(path) / 1e6, 4)
