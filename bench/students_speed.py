"""Students of several runs side by side: test accuracy, size and model-only p50 at batch 1, on the engine
`publish` ships (the kernels engine) and on ONNX Runtime, timed in one process in interleaved rounds.

    python bench/students_speed.py NAME=DIR [NAME=DIR ...] [--calls 3000] [--rounds 10] [--threads 2] [--json FILE]

Each DIR is a project folder whose `quantize` stage ran (e.g. a `bench/banking77.py --keep` folder); the first
is the reference the ratios are taken against. "today's student" in the student search issue is the previous
defaults' student: time it here beside the new defaults' to compare them in one run. Each student runs on its
own tokenizer (trimmed vocabularies differ between runs) over the same test texts, one query per call, cycled.

Engines per student, on `--threads` threads (2, as params.yaml's `runtime.threads`):
- kernels: quantize's INT8 model on distillery_kernels (or its dynamic variant where quantize chose the static
  QDQ one, as `build` does);
- ort_int8: the same file in ONNX Runtime (unfused; `build`'s fused INT8 engine where the folder has one).
Test accuracy is the kernels engine's, computed here over the test split.

Ratios are per round (each round's median over the reference's), then the median over rounds, so load that
drifts between rounds cancels; the noise in the header is the run's own spread of those ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.runtime.timing import percentiles, relative_speed, side_by_side  # noqa: E402


def student(name: str, run: Path, threads: int) -> dict:
    """The folder's INT8 student on both engines, its test queries' feeds and its test accuracy on the kernels
    engine."""
    import polars as pl
    import yaml
    from transformers import AutoTokenizer

    from distillery_kernels.engine import EngineError, EngineSession
    from stages.model.encoder import TokenizedTexts
    from stages.runtime.onnx import feeds, ort_logits, size_mb
    from stages.runtime.sessions import session

    quantized = run / "data/07_quantize"
    chosen, dynamic = quantized / "model.int8.onnx", quantized / "variants/dynamic.onnx"
    if not chosen.is_file():
        raise SystemExit(f"bench/students_speed: {chosen} not found: run `dvc repro quantize` in {run} first")
    engine, source = None, None
    for candidate in (chosen, dynamic) if dynamic.is_file() else (chosen,):
        try:
            engine, source = EngineSession(candidate, threads), candidate
            break
        except EngineError as exc:
            print(f"bench/students_speed: {name}: kernels cannot run {candidate.name}: {exc}", file=sys.stderr)
    if engine is None:
        raise SystemExit(f"bench/students_speed: {name}: no INT8 model the kernels engine runs")
    fused = run / "data/08_build/engines/onnxruntime_int8.onnx"
    ort_path = fused if fused.is_file() else source
    max_length = yaml.safe_load((run / "params.yaml").read_text())["runtime"]["max_length"]
    tokenizer = AutoTokenizer.from_pretrained(str(quantized / "tokenizer"))
    test = pl.read_parquet(run / "data/02_clean/test.parquet")
    texts = test["text"].to_list()
    tokenized = TokenizedTexts(tokenizer, texts, max_length)
    singles = [feeds(tokenized.batch([i])) for i in range(len(tokenized))]
    ids = json.loads((quantized / "tokenizer/labels.json").read_text())
    truth = np.array([ids[label] for label in test["label"].to_list()])
    predicted = ort_logits(engine, tokenized).argmax(1)
    shapes = json.loads((run / "data/06_prune/student/config.json").read_text()).get("layer_shapes", [])
    return {
        "sessions": {"kernels": engine, "ort_int8": session(ort_path, threads)},
        "ort_source": ort_path.relative_to(run).as_posix(),
        "singles": singles,
        "texts": texts,
        "test_accuracy": float((predicted == truth).mean()),
        "size_mb": size_mb(source),
        "shape": "heads/ffn per layer: " + (", ".join(f"{x['heads']}/{x['ffn']}" for x in shapes) or "unpruned"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="NAME=DIR, the first the reference")
    ap.add_argument("--calls", type=int, default=3000, help="timed calls per student and engine")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    runs = {}
    for item in args.runs:
        name, _, folder = item.partition("=")
        if not folder or not Path(folder).is_dir():
            raise SystemExit(f"bench/students_speed: {item!r} is not NAME=DIR with DIR a folder")
        runs[name] = student(name, Path(folder), args.threads)
    first = next(iter(runs.values()))
    if any(r["texts"] != first["texts"] for r in runs.values()):
        raise SystemExit("bench/students_speed: the runs' test splits differ: they cannot be compared query by query")

    fns = {}
    for name, r in runs.items():
        for engine, sess in r["sessions"].items():
            fns[f"{name}|{engine}"] = lambda i, s=sess, q=r["singles"]: s.run(["logits"], q[i])
    samples = side_by_side(fns, list(range(len(first["singles"]))), args.calls, rounds=args.rounds, warmup=50)
    reference = next(iter(fns))
    ratios, noise = relative_speed(samples, reference, args.rounds)

    print(
        f"model-only p50 at batch 1, {args.threads} threads, {len(first['singles'])} test queries cycled, "
        f"{args.calls} calls each in {args.rounds} interleaved rounds; x: time / {reference}'s (noise +-{noise:.3f})"
    )
    print(f"{'student':<14}{'engine':<10}{'test acc':>9}{'MB':>7}{'p50 ms':>9}{'x':>8}  shape / ORT file")
    out = {}
    for key, values in samples.items():
        name, engine = key.split("|")
        r, p50 = runs[name], percentiles(values)["p50"]
        accuracy = round(r["test_accuracy"], 6)
        out[key] = {"p50_ms": round(p50, 4), "ratio": round(ratios[key], 4), "test_accuracy": accuracy}
        acc = f"{r['test_accuracy']:.4f}"
        note = r["shape"] if engine == "kernels" else r["ort_source"]
        print(f"{name:<14}{engine:<10}{acc:>9}{r['size_mb']:>7.2f}{p50:>9.3f}{ratios[key]:>8.3f}  {note}")
    if args.json:
        args.json.write_text(json.dumps({"noise": round(noise, 4), "rows": out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
