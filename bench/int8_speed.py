"""Where INT8 speed goes at batch 1 on a small CPU: every ONNX model of a run on 1 and 2 threads, and the kernels.

    python bench/int8_speed.py [--run DIR] [--runs 1200] [--json FILE]

`--run` is a project folder whose `quantize` and `build` stages have run (default: this checkout; a
`bench/banking77.py --keep` folder holds the Banking77 run). Two tables:

1. Models: model-only p50 at batch 1 over the test queries (cycled) of the fp32 export
   (`data/07_quantize/model.onnx`), each INT8 variant of `quantize`, and the fused engines of `build`,
   each on 1 and 2 intra-op threads. All sessions are timed side by side in interleaved rounds, so a drift in
   machine load falls on all of them alike. Ratios are against the fp32 export and against the fused fp32
   engine on the same thread count.
2. Kernels: one-kernel graphs at the model's shapes (rows = median query length, the widest weight: the
   first feed-forward): fp32 MatMul against ONNX Runtime's DynamicQuantizeMatMul (INT8 weights, activations
   quantized on the fly), and a residual Add + LayerNormalization, which both precisions pay alike, against
   ONNX Runtime's fused SkipLayerNormalization kernel (which the project's CPU sessions leave out).

Timings vary from run to run and machine to machine; read the ratios, not the milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.model.encoder import TokenizedTexts  # noqa: E402
from stages.runtime.onnx import latency_side_by_side  # noqa: E402
from stages.runtime.sessions import session  # noqa: E402
from stages.runtime.timing import percentiles, side_by_side  # noqa: E402

THREADS = (1, 2)


def models(run: Path) -> dict[str, Path]:
    """The run's ONNX models by name, in the order they are reported."""
    quantized, engines = run / "data/07_quantize", run / "data/08_build/engines"
    found = {"fp32 export": quantized / "model.onnx"}
    for path in sorted((quantized / "variants").glob("*.onnx")):
        found[f"int8 {path.stem}"] = path
    found["fused fp32 (build)"] = engines / "onnxruntime_fp32.onnx"
    found["fused int8 (build)"] = engines / "onnxruntime_int8.onnx"
    missing = [str(p) for p in found.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"int8_speed: {', '.join(missing)} not found: run `dvc repro build` in {run} first")
    return found


def model_table(run: Path, texts: TokenizedTexts, runs: int) -> dict[str, dict[int, float]]:
    """p50 ms of every model on every thread count, all timed in the same interleaved rounds."""
    sessions = {(name, t): session(path, t) for name, path in models(run).items() for t in THREADS}
    timed = latency_side_by_side({f"{n}|{t}": s for (n, t), s in sessions.items()}, texts, runs, rounds=8)
    table: dict[str, dict[int, float]] = {}
    for key, value in timed.items():
        name, threads = key.rsplit("|", 1)
        table.setdefault(name, {})[int(threads)] = value["p50"]
    return table


def _graph(kind: str, rows: int, k: int, n: int) -> bytes:
    """A one-kernel model: `fp32` MatMul (k x n), `int8` DynamicQuantizeMatMul (per-column INT8 weights of
    the same matrix), `add_layernorm` (residual Add, then LayerNormalization over width k) or `skip_layernorm`
    (the same as ONNX Runtime's one SkipLayerNormalization kernel)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    gamma, beta = (
        numpy_helper.from_array(np.ones(k, np.float32), "g"),
        numpy_helper.from_array(np.zeros(k, np.float32), "b"),
    )
    inputs, width = ["x"], n
    if kind == "fp32":
        inits = [numpy_helper.from_array(w, "w")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    elif kind == "int8":
        scale = (np.abs(w).max(0) / 127.0).astype(np.float32)
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        inits = [numpy_helper.from_array(a, nm) for a, nm in ((q, "q"), (scale, "s"), (np.zeros(n, np.int8), "z"))]
        nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "q", "s", "z"], ["y"], domain="com.microsoft")]
    elif kind == "add_layernorm":
        inits, inputs, width = [gamma, beta], ["x", "r"], k
        nodes = [
            helper.make_node("Add", ["x", "r"], ["sum"]),
            helper.make_node("LayerNormalization", ["sum", "g", "b"], ["y"], axis=-1, epsilon=1e-12),
        ]
    else:
        inits, inputs, width = [gamma, beta], ["x", "r"], k
        nodes = [
            helper.make_node(
                "SkipLayerNormalization", ["x", "r", "g", "b"], ["y"], domain="com.microsoft", epsilon=1e-12
            )
        ]
    graph = helper.make_graph(
        nodes,
        kind,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, rows, k]) for name in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, width])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8).SerializeToString()


KERNELS = {
    "fp32": "MatMul fp32",
    "int8": "DynamicQuantizeMatMul int8",
    "add_layernorm": "Add + LayerNormalization",
    "skip_layernorm": "SkipLayerNormalization",
}


def kernel_table(rows: int, k: int, n: int, runs: int) -> dict[str, dict[int, float]]:
    """p50 microseconds of each of `KERNELS` per thread count, the sessions as `session` builds them (so
    `add_layernorm` stays two operators)."""
    rng = np.random.default_rng(1)
    feed = {name: rng.standard_normal((1, rows, k)).astype(np.float32) for name in ("x", "r")}
    fns = {}
    for kind in KERNELS:
        for t in THREADS:
            sess = session(_graph(kind, rows, k, n), t)
            names = [i.name for i in sess.get_inputs()]
            fns[f"{kind}|{t}"] = lambda one, s=sess, names=names: s.run(None, {x: one[x] for x in names})
    samples = side_by_side(fns, [feed], runs, rounds=8, warmup=100)
    table: dict[str, dict[int, float]] = {}
    for key, values in samples.items():
        kind, threads = key.rsplit("|", 1)
        table.setdefault(kind, {})[int(threads)] = round(percentiles(values)["p50"] * 1000.0, 1)
    return table


def first_layer_widths(path: Path) -> tuple[int, int]:
    """(hidden, feed-forward width) of the fp32 export: the widest MatMul weight (the first feed-forward)."""
    import onnx

    graph = onnx.load(str(path)).graph
    weights = {t.name: tuple(t.dims) for t in graph.initializer}
    shapes = [weights[node.input[1]] for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights]
    if not shapes:
        raise SystemExit(f"int8_speed: no MatMul with a constant weight in {path}")
    return max(shapes, key=lambda shape: (shape[1], -shape[0]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=ROOT, help="project folder whose quantize and build stages ran")
    ap.add_argument("--runs", type=int, default=1200, help="timed batch-1 calls per model and thread count")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    import polars as pl
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.run / "data/07_quantize/tokenizer"))
    test = pl.read_parquet(args.run / "data/02_clean/test.parquet")["text"].to_list()
    texts = TokenizedTexts(tokenizer, test, 64)
    rows = int(statistics.median(texts.lengths))
    print(
        f"int8_speed: {len(texts)} test queries, median {rows} tokens; {args.runs} batch-1 calls per model", flush=True
    )

    table = model_table(args.run, texts, args.runs)
    base, fused = table["fp32 export"], table["fused fp32 (build)"]
    head = f"{'model':<22}" + "".join(
        f" {f'p50 ms {t}t':>10} {f'vs fp32 {t}t':>11} {f'vs fused {t}t':>12}" for t in THREADS
    )
    print("\n" + head)
    for name, by_threads in table.items():
        cells = "".join(
            f" {by_threads[t]:>10.3f} {base[t] / by_threads[t]:>10.2f}x {fused[t] / by_threads[t]:>11.2f}x"
            for t in THREADS
        )
        print(f"{name:<22}{cells}")

    k, n = first_layer_widths(args.run / "data/07_quantize/model.onnx")
    kernels = kernel_table(rows, k, n, max(args.runs, 2000))
    print(f"\nkernels at {rows} tokens (hidden {k}, feed-forward {n}), p50 us per call")
    print(f"{'kernel':<30}" + "".join(f" {f'{t} thread' + ('s' if t > 1 else ''):>10}" for t in THREADS))
    for kind, label in KERNELS.items():
        print(f"{label:<30}" + "".join(f" {kernels[kind][t]:>10.1f}" for t in THREADS))
    for t in THREADS:
        print(
            f"on {t} thread(s): INT8 MatMul {kernels['fp32'][t] / kernels['int8'][t]:.2f}x faster than fp32; "
            f"SkipLayerNormalization {kernels['skip_layernorm'][t] / kernels['add_layernorm'][t]:.2f}x slower than "
            "Add + LayerNormalization"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"median_tokens": rows, "models_p50_ms": table, "kernels_p50_us": kernels}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
