"""The compiled operators (kernels/) against ONNX Runtime's at the student's shapes, on 1 and 2 threads.

    python bench/kernels_speed.py [--runs 2000] [--tokens 13] [--batch 32] [--run DIR [--block 16x64]]
                                  [--json FILE] [--sparse-only | --model-only]

(Not `bench/kernels.py`: a script's folder comes first on sys.path, and a kernels.py there would stand in for
Hugging Face's `kernels` package, which transformers imports, in every bench script that loads a model.)

One table per batch (1 query of `--tokens` tokens, the Banking77 test median; and `--batch` such queries): each
operator of a transformer layer (hidden 384, 12 heads of 32, feed-forward 1536), ours against the ONNX Runtime
kernel that does the same work in the project's sessions:

- INT8 linear (per-row activation quantization, INT8 x INT8 -> INT32, dequantize + bias, GELU for the first
  feed-forward) against DynamicQuantizeMatMul (+ Add for the bias, + Gelu);
- residual add + LayerNorm against Add + LayerNormalization and against SkipLayerNormalization;
- attention over q, k, v against MultiHeadAttention.

Then the block-sparse INT8 linear against the dense one at the feed-forward's shapes, per block shape
(block_k x block_n) and share of zero blocks (0 and 50-90%), on 1 and 2 threads (`--sparse-only`: just this table).

With `--run DIR` (a project folder whose `quantize` and `build` stages ran, e.g. a `bench/banking77.py --keep`
folder) a third table: the whole student on the kernels engine (distillery_kernels.engine, from quantize's INT8
model) against ONNX Runtime's fused INT8 engine from `build`, on 1 and 2 threads: at batch 1 (the test queries,
cycled) and at batch `--batch` twice, of queries sorted by length (little padding) and of queries in test order (as
a server batches them: padded to the longest, and the engine computes real tokens only); with the engine's
agreement and largest logit difference on the validation split. `--block 16x64` adds the block-sparse engine over
the same INT8 model (for a student `prune.magnitude_block` pruned; `--model-only`: just this table).

Everything is timed side by side in interleaved rounds in one process (read the ratios, not the microseconds: this
machine is noisy). The INT8 linears also show the share of the machine's INT8 peak they reach, measured here by a
register-only VNNI loop on the same threads, and ours on 2 threads against ours on 1 (the target: >= 1.7x at one
query's rows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import distillery_kernels as kernels  # noqa: E402
from stages.runtime.sessions import session  # noqa: E402
from stages.runtime.timing import percentiles, side_by_side  # noqa: E402

THREADS = (1, 2)
HIDDEN, HEADS, FFN = 384, 12, 1536
LINEARS = {"attention q/k/v/out": (HIDDEN, HIDDEN, False), "feed-forward 1 + GELU": (HIDDEN, FFN, True),
           "feed-forward 2": (FFN, HIDDEN, False)}  # fmt: skip


def ort_graph(kind: str, batch: int, seq: int, k: int = HIDDEN, n: int = HIDDEN, gelu: bool = False) -> bytes:
    """One operator as ONNX Runtime runs it: `linear` (DynamicQuantizeMatMul, its bias Add, Gelu when `gelu`),
    `add_layernorm`, `skip_layernorm` or `attention` (MultiHeadAttention with a key padding mask)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    f32 = TensorProto.FLOAT
    shape = [batch, seq, k]
    inputs = [helper.make_tensor_value_info("x", f32, shape)]
    out_shape = shape
    ms = "com.microsoft"
    if kind == "linear":
        w = rng.integers(-127, 128, (k, n)).astype(np.int8)
        inits = [numpy_helper.from_array(w, "q"), numpy_helper.from_array(np.full(n, 0.01, np.float32), "s"),
                 numpy_helper.from_array(np.zeros(n, np.int8), "z"),
                 numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")]  # fmt: skip
        nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "q", "s", "z"], ["mm"], domain=ms),
                 helper.make_node("Add", ["mm", "b"], ["biased" if gelu else "y"])]  # fmt: skip
        if gelu:
            nodes.append(helper.make_node("Gelu", ["biased"], ["y"], domain=ms))
        out_shape = [batch, seq, n]
    elif kind in ("add_layernorm", "skip_layernorm"):
        inputs.append(helper.make_tensor_value_info("r", f32, shape))
        inits = [numpy_helper.from_array(np.ones(k, np.float32), "g"),
                 numpy_helper.from_array(np.zeros(k, np.float32), "b")]  # fmt: skip
        if kind == "add_layernorm":
            norm = helper.make_node("LayerNormalization", ["sum", "g", "b"], ["y"], axis=-1, epsilon=1e-12)
            nodes = [helper.make_node("Add", ["x", "r"], ["sum"]), norm]
        else:
            nodes = [helper.make_node("SkipLayerNormalization", ["x", "r", "g", "b"], ["y"], domain=ms, epsilon=1e-12)]
    else:
        inputs += [helper.make_tensor_value_info("k", f32, shape), helper.make_tensor_value_info("v", f32, shape),
                   helper.make_tensor_value_info("mask", TensorProto.INT32, [batch, seq])]  # fmt: skip
        inits = []
        nodes = [helper.make_node("MultiHeadAttention", ["x", "k", "v", "", "mask"], ["y"], domain=ms,
                                  num_heads=HEADS)]  # fmt: skip
    graph = helper.make_graph(nodes, kind, inputs, [helper.make_tensor_value_info("y", f32, out_shape)], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8).SerializeToString()


def ours(threads: int, fn):
    """`fn` on `threads` pool threads (a no-op switch when the pool already has them)."""

    def call(_):
        kernels.set_threads(threads)
        return fn()

    return call


def ort(sess, feed):
    return lambda _: sess.run(None, feed)


def measure(batch: int, seq: int, runs: int) -> list[dict]:
    """Rows of the table for one batch shape: op, ours/ORT p50 us per thread count."""
    ops = kernels.require()
    rng = np.random.default_rng(1)
    rows = batch * seq
    x = rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32)
    r = rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32)
    gamma, beta = np.ones(HIDDEN, np.float32), np.zeros(HIDDEN, np.float32)
    mask = np.ones((batch, seq), np.int64)
    mask[batch // 2 :, seq * 2 // 3 :] = 0  # half the batch padded, as a batch of real queries is
    fns, entries = {}, []
    for name, (k, n, gelu) in LINEARS.items():
        w = rng.integers(-127, 128, (k, n)).astype(np.int8)
        packed = ops.PackedWeights(w, np.full(n, 0.01, np.float32), rng.standard_normal(n).astype(np.float32))
        xi = rng.standard_normal((batch, seq, k)).astype(np.float32)
        for t in THREADS:
            fns[f"{name}|ours|{t}"] = ours(t, lambda xi=xi, p=packed, g=gelu: ops.linear(xi, p, g))
            fns[f"{name}|ort|{t}"] = ort(session(ort_graph("linear", batch, seq, k, n, gelu), t), {"x": xi})
        entries.append((name, f"{rows}x{k} @ {k}x{n}", rows * k * n))
    for t in THREADS:
        fns[f"add + LayerNorm|ours|{t}"] = ours(t, lambda: ops.add_layernorm(x, r, gamma, beta, 1e-12))
        fns[f"add + LayerNorm|ort|{t}"] = ort(session(ort_graph("add_layernorm", batch, seq), t), {"x": x, "r": r})
        fns[f"add + LayerNorm|skip|{t}"] = ort(session(ort_graph("skip_layernorm", batch, seq), t), {"x": x, "r": r})
        fns[f"attention|ours|{t}"] = ours(t, lambda: ops.attention(x, r, x, mask, HEADS))
        feed = {"x": x, "k": r, "v": x, "mask": mask.astype(np.int32)}
        fns[f"attention|ort|{t}"] = ort(session(ort_graph("attention", batch, seq), t), feed)
    entries += [("add + LayerNorm", f"{rows}x{HIDDEN}", 0), ("attention", f"{batch}x{seq}, {HEADS} heads of 32", 0)]
    samples = side_by_side(fns, [None], runs, rounds=8, warmup=100)
    p50 = {key: percentiles(values)["p50"] * 1000.0 for key, values in samples.items()}  # microseconds
    peaks = {}
    for t in THREADS:
        kernels.set_threads(t)
        peaks[t] = ops.peak_macs_per_second(0.3)
    out = []
    for name, shape, macs in entries:
        row = {"op": name, "shape": shape}
        for t in THREADS:
            row[f"ours_{t}t_us"] = round(p50[f"{name}|ours|{t}"], 1)
            row[f"ort_{t}t_us"] = round(p50[f"{name}|ort|{t}"], 1)
            if f"{name}|skip|{t}" in p50:
                row[f"ort_fused_{t}t_us"] = round(p50[f"{name}|skip|{t}"], 1)
            if macs and peaks[t]:
                row[f"peak_{t}t"] = round(macs / (p50[f"{name}|ours|{t}"] * 1e-6) / peaks[t], 3)
        row["scaling"] = round(row["ours_1t_us"] / row["ours_2t_us"], 2)
        out.append(row)
    return out


SPARSE_BLOCKS = ((4, 16), (16, 16), (32, 16), (16, 32), (16, 64), (32, 64))
SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9)  # 0.0: what the block layout costs (or saves) with nothing to skip


def measure_sparse(batch: int, seq: int, runs: int) -> list[dict]:
    """The block-sparse INT8 linear against the dense one (the same weights with a share of their blocks zeroed, at
    random) at the feed-forward's shapes: p50 us per (linear, block shape, sparsity, threads), side by side."""
    ops = kernels.require()
    rng = np.random.default_rng(2)
    fns, cases = {}, []
    for name in ("feed-forward 1 + GELU", "feed-forward 2"):
        k, n, gelu = LINEARS[name]
        dense = rng.integers(-127, 128, (k, n)).astype(np.int8)
        scale, bias = np.full(n, 0.01, np.float32), rng.standard_normal(n).astype(np.float32)
        xi = rng.standard_normal((batch, seq, k)).astype(np.float32)
        packed = ops.PackedWeights(dense, scale, bias)
        for t in THREADS:
            fns[f"{name}|dense|{t}"] = ours(t, lambda xi=xi, p=packed, g=gelu: ops.linear(xi, p, g))
        for bk, bn in SPARSE_BLOCKS:
            for sparsity in SPARSITIES:
                drop = rng.random((k // bk, n // bn)) < sparsity
                w = np.where(np.repeat(np.repeat(drop, bk, axis=0), bn, axis=1), 0, dense).astype(np.int8)
                sp = ops.PackedWeights(w, scale, bias, block=(bk, bn))
                key = f"{name}|{bk}x{bn}|{sparsity}"
                for t in THREADS:
                    fns[f"{key}|{t}"] = ours(t, lambda xi=xi, p=sp, g=gelu: ops.linear(xi, p, g))
                cases.append((name, f"{bk}x{bn}", sparsity, key, round(1 - sp.density, 3)))
    samples = side_by_side(fns, [None], runs, rounds=8, warmup=50)
    p50 = {key: percentiles(values)["p50"] * 1000.0 for key, values in samples.items()}
    return [
        {"op": name, "block": block, "sparsity": sparsity, "zero_blocks": zero,
         **{f"dense_{t}t_us": round(p50[f"{name}|dense|{t}"], 1) for t in THREADS},
         **{f"sparse_{t}t_us": round(p50[f"{key}|{t}"], 1) for t in THREADS}}
        for name, block, sparsity, key, zero in cases
    ]  # fmt: skip


def print_sparse(title: str, rows: list[dict]) -> None:
    """Speedup of the block-sparse linear over the dense one, per block shape (rows) and sparsity (columns)."""
    print(f"\n{title}: dense p50 us / block-sparse p50 us (same weights, zero blocks skipped)")
    print(f"{'op':<24}{'block':<8}" + "".join(f"{f'{s:.0%} {t}t':>10}" for t in THREADS for s in SPARSITIES))
    for op in dict.fromkeys(r["op"] for r in rows):
        for block in dict.fromkeys(r["block"] for r in rows if r["op"] == op):
            by = {r["sparsity"]: r for r in rows if r["op"] == op and r["block"] == block}
            cells = "".join(f"{by[s][f'dense_{t}t_us'] / by[s][f'sparse_{t}t_us']:>9.2f}x" for t in THREADS
                            for s in SPARSITIES)  # fmt: skip
            print(f"{op:<24}{block:<8}{cells}")
    dense = {r["op"]: r for r in rows}
    print("dense p50 us: " + ", ".join(f"{op} {r['dense_1t_us']:.1f} (1t), {r['dense_2t_us']:.1f} (2t)"
                                       for op, r in dense.items()))  # fmt: skip


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    head = f"{'op':<24}{'shape':<26}" + "".join(
        f"{f'ours {t}t':>9}{f'ORT {t}t':>9}{'speedup':>9}{'% peak':>8}" for t in THREADS
    )
    print(head + f"{'ours 2t/1t':>11}")
    for row in rows:
        cells = ""
        for t in THREADS:
            peak = f"{100 * row[f'peak_{t}t']:.0f}%" if f"peak_{t}t" in row else "-"
            cells += f"{row[f'ours_{t}t_us']:>9.1f}{row[f'ort_{t}t_us']:>9.1f}"
            cells += f"{row[f'ort_{t}t_us'] / row[f'ours_{t}t_us']:>8.2f}x{peak:>8}"
        print(f"{row['op']:<24}{row['shape']:<26}{cells}{row['scaling']:>10.2f}x")
        if "ort_fused_1t_us" in row:
            fused = ""
            for t in THREADS:
                theirs = row[f"ort_fused_{t}t_us"]
                fused += f"{'':>9}{theirs:>9.1f}{theirs / row[f'ours_{t}t_us']:>8.2f}x{'':>8}"
            print(f"{'  (ORT SkipLayerNorm)':<24}{'':<26}{fused}")


def whole_model(run: Path, batch: int, runs: int, block: tuple[int, int] | None) -> dict:
    """The student on the engine (and block-sparse, with `block`) against ONNX Runtime's fused INT8 engine: p50 ms
    per call at batch 1, at `batch` of similar lengths and at `batch` as queries arrive; and parity."""
    import polars as pl
    from transformers import AutoTokenizer

    from distillery_kernels.engine import Engine, agreement
    from stages.model.encoder import TokenizedTexts
    from stages.runtime.onnx import feeds

    int8, fused = run / "data/07_quantize/model.int8.onnx", run / "data/08_build/engines/onnxruntime_int8.onnx"
    for path in (int8, fused):
        if not path.is_file():
            raise SystemExit(f"bench/kernels_speed: {path} not found: run `dvc repro build` in {run} first")
    engines = {"ours": Engine.from_onnx(int8)}
    if block:
        engines["sparse"] = Engine.from_onnx(int8, block)
    tokenizer = AutoTokenizer.from_pretrained(str(run / "data/07_quantize/tokenizer"))

    def tokenized(split: str) -> TokenizedTexts:
        return TokenizedTexts(tokenizer, pl.read_parquet(run / f"data/02_clean/{split}.parquet")["text"].to_list(), 64)

    test, val = tokenized("test"), tokenized("val")
    pairs = lambda rows: [(f["input_ids"], f["attention_mask"]) for f in rows]  # noqa: E731
    singles = pairs(feeds(test.batch([i])) for i in range(len(test)))
    order = np.argsort(test.lengths, kind="stable")
    starts = range(0, len(test) - batch + 1, batch)
    sorted_ = pairs(feeds(test.batch(order[s : s + batch])) for s in starts)
    arrival = pairs(feeds(test.batch(list(range(s, s + batch)))) for s in starts)
    val_batches = pairs(feeds(val.batch(list(range(s, min(s + 64, len(val)))))) for s in range(0, len(val), 64))
    out = {"parity": {name: agreement(e, session(int8, 2), val_batches) for name, e in engines.items()},
           "zero_blocks": engines["sparse"].zero_blocks if block else 0.0,
           "padding": {"sorted": padding(sorted_), "arrival": padding(arrival)}}  # fmt: skip
    cases = (("batch_1", singles, runs), (f"batch_{batch}_sorted", sorted_, max(100, runs // 10)),
             (f"batch_{batch}_arrival", arrival, max(100, runs // 10)))  # fmt: skip
    for label, inputs, n in cases:
        fns = {}
        for t in THREADS:
            sess = session(fused, t)
            fns[f"ort|{t}"] = lambda a, s=sess: s.run(["logits"], {"input_ids": a[0], "attention_mask": a[1]})
            for name, engine in engines.items():
                fns[f"{name}|{t}"] = lambda a, t=t, e=engine: (kernels.set_threads(t), e.run(*a))
        samples = side_by_side(fns, inputs, n, rounds=8, warmup=20)
        out[label] = {key: round(percentiles(v)["p50"], 4) for key, v in samples.items()}
    return out


def padding(batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """The share of a batch's [batch, seq] slots that are padding: work ORT does and the engine skips."""
    return 1.0 - sum(int(m.sum()) for _, m in batches) / sum(m.size for _, m in batches)


def ratio(row: dict, name: str, threads: int) -> str:
    ours, ort = row[f"{name}|{threads}"], row[f"ort|{threads}"]
    return f"{ours:>10.3f}{ort / ours:>8.2f}x"


def print_whole_model(run: Path, batch: int, model: dict) -> None:
    names = [n for n in ("ours", "sparse") if f"{n}|1" in model["batch_1"]]
    print(f"\nwhole student ({run}): kernels engine vs ONNX Runtime's fused INT8 engine, p50 ms per call;"
          f" speedup = ORT / ours" + (f"; sparse: block-sparse engine, {100 * model['zero_blocks']:.1f}% zero blocks"
                                       if "sparse" in names else ""))  # fmt: skip
    head = "".join(f"{f'ORT {t}t':>9}" + "".join(f"{f'{n} {t}t':>10}{'speedup':>9}" for n in names) for t in THREADS)
    print(f"{'batch':<14}{head}")
    for label in ("batch_1", f"batch_{batch}_sorted", f"batch_{batch}_arrival"):
        row = model[label]
        cells = "".join(f"{row[f'ort|{t}']:>9.3f}" + "".join(ratio(row, n, t) for n in names) for t in THREADS)
        print(f"{label.replace('batch_', ''):<14}{cells}")
    pad = model["padding"]
    print(
        f"padding: {100 * pad['sorted']:.1f}% of the slots in batches of similar lengths (sorted), "
        f"{100 * pad['arrival']:.1f}% as queries arrive (test order); the engine computes real tokens only"
    )
    for name, parity in model["parity"].items():
        share = 100 * parity["max_rel_logit_diff"]
        print(f"parity on validation ({name}): agreement {parity['agreement']:.4f}, max |logit diff| "
              f"{parity['max_abs_logit_diff']:.4f} ({share:.2f}% of the logit range)")  # fmt: skip


def block_arg(text: str) -> tuple[int, int]:
    try:
        bk, bn = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--block takes BKxBN, e.g. 16x64; got {text!r}") from None
    return bk, bn


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2000, help="timed calls per operator, thread count and engine")
    ap.add_argument("--tokens", type=int, default=13, help="tokens per query (Banking77's test median: 13)")
    ap.add_argument("--batch", type=int, default=32, help="queries in the batched table")
    ap.add_argument("--run", type=Path, help="also time the whole student of this project folder (after build)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--sparse-only", action="store_true", help="only the block-sparse table")
    ap.add_argument("--model-only", action="store_true", help="only the whole-student table (needs --run)")
    ap.add_argument("--block", type=block_arg, help="with --run: also the block-sparse engine, e.g. 16x64")
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit(f"bench/kernels_speed: {kernels.unavailable_reason()}")
    print(f"bench/kernels_speed: code path {kernels.isa()}; {args.runs} calls per operator; times are p50 microseconds;"
          " speedup = ORT / ours on the same threads", flush=True)  # fmt: skip
    results = {}
    if args.model_only and not args.run:
        raise SystemExit("bench/kernels_speed: --model-only needs --run DIR")
    shapes = ((1, args.runs), (args.batch, max(200, args.runs // 10)))
    for batch, runs in () if args.sparse_only or args.model_only else shapes:
        rows = measure(batch, args.tokens, runs)
        results[f"batch_{batch}"] = rows
        print_table(f"batch {batch} x {args.tokens} tokens ({batch * args.tokens} rows)", rows)
    if not (args.sparse_only or args.model_only):
        one = {row["op"]: row for row in results["batch_1"]}
        print("\nINT8 linear, ours on 2 threads vs 1 at one query's rows (target >= 1.7x): " + ", ".join(
            f"{name} {one[name]['scaling']:.2f}x" for name in LINEARS))  # fmt: skip
    for batch, runs in () if args.model_only else shapes:
        rows = measure_sparse(batch, args.tokens, max(100, runs // 4))
        results[f"sparse_batch_{batch}"] = rows
        print_sparse(f"block-sparse INT8 linear, batch {batch} x {args.tokens} tokens", rows)
    if args.run:
        model = whole_model(args.run, args.batch, args.runs, args.block)
        results["whole_model"] = model
        print_whole_model(args.run, args.batch, model)
    if args.json:
        args.json.write_text(json.dumps({"isa": kernels.isa(), "tokens": args.tokens, **results}, indent=2) + "\n")
    kernels.set_threads(1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
