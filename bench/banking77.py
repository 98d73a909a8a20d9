"""Banking77 through the pipeline: teacher, student, pruned and INT8 student, engines and the benchmark.

    python bench/banking77.py [--keep DIR] [--reuse DIR] [--distill-epochs 5] [--train-epochs 6]

Runs `dvc repro --single-item` stage by stage on a scratch copy of the project with `ingest.source`
pointed at ../shared/datasets/banking77 (label column `category`) and params.yaml's recipe (what the student
search chose there), times each stage, and prints one table:
test accuracy, macro-F1, parameters, FLOPs per token, file size and model-only p50 latency at batch 1 in
ONNX Runtime on 2 threads, with the targets of the distill/train and prune/quantize issues; then the fused
engines `build` made, the `benchmark` stage's full table with the targets of those issues, and the version
`publish` added with the time `flows.lineage verify` takes to re-hash it. `--reuse DIR`
takes a folder a previous `--keep` left and runs only the stages whose outputs are missing there (its code
is refreshed from this checkout first; its data and params are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stages.records import BenchmarkResults, BenchmarkTimings  # noqa: E402
from tests.conftest import copy_project  # noqa: E402  (one way to copy the project, shared with the tests)

DATA = ROOT.parent / "shared" / "datasets" / "banking77"
STAGES = (
    "fingerprint",
    "ingest",
    "clean",
    "augment",
    "distill",
    "train",
    "prune",
    "quantize",
    "build",
    "benchmark",
    "publish",
)
DONE_WHEN = {  # a stage counts as done in a reused folder when this output exists
    "fingerprint": "data/00_fingerprint/fingerprint.json",
    "ingest": "data/01_ingest/train.parquet",
    "clean": "data/02_clean/train.parquet",
    "augment": "data/03_augment/train.parquet",
    "distill": "data/04_distill/metrics.json",
    "train": "data/05_train/metrics.json",
    "prune": "data/06_prune/metrics.json",
    "quantize": "data/07_quantize/tokenizer/labels.json",
    "build": "data/08_build/manifest.json",
    "benchmark": "data/09_benchmark/metrics.json",
    "publish": "data/10_publish/receipt.json",
}


def configure(root: Path, distill_epochs: int, train_epochs: int) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"].update(source=str(DATA / "train.csv"), test_source=str(DATA / "test.csv"), label_column="category")
    params["distill"]["optim"]["epochs"] = distill_epochs
    params["train"]["optim"]["epochs"] = train_epochs
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage(root: Path, stage: str) -> float:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "--single-item", stage],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench: stage {stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = [ln for ln in proc.stdout.splitlines() if ln.startswith(f"{stage}:")]
    print(f"bench: {stage} {elapsed:.0f} s {summary[-1] if summary else ''}", file=sys.stderr, flush=True)
    return elapsed


def onnx_row(path: Path, texts, test, labels, reference: np.ndarray | None = None) -> tuple[dict, object]:
    """Test accuracy and size of an ONNX model and its agreement with `reference`; and its session, for
    `measure`'s latencies."""
    from stages.model.evaluation import accuracy, macro_f1
    from stages.runtime.onnx import ort_logits, size_mb
    from stages.runtime.sessions import session

    sess = session(path, threads=2)
    logits = ort_logits(sess, texts)
    truth = [labels[x] for x in test["label"]]
    pred = logits.argmax(1)
    row = {
        "test": {"accuracy": accuracy(truth, pred.tolist()), "macro_f1": macro_f1(truth, pred.tolist(), len(labels))},
        "size_mb": size_mb(path),
        "pred": pred,
    }
    if reference is not None:
        row["agreement"] = float((pred == reference).mean())
    return row, sess


def measure(root: Path) -> dict:
    """ONNX rows for the student (exported here), the pruned student and the INT8 student. Their model-only
    batch-1 p50s are timed side by side in interleaved rounds over the same test queries, so the ratios the
    targets use are not skewed by a drift in machine load between separate measurements."""
    import polars as pl

    from stages.model.encoder import TokenizedTexts, load
    from stages.runtime.onnx import export_onnx, latency_side_by_side

    test = pl.read_parquet(root / "data/02_clean/test.parquet")
    student, tok, labels = load(root / "data/05_train/student")
    export_onnx(student, tok, root / "student.onnx", 18)
    # prune removes heads and neurons, never tokens: one tokenization feeds all three
    texts = TokenizedTexts(tok, test["text"].to_list(), 64)
    rows, sessions = {}, {}
    for name, path in (
        ("student", root / "student.onnx"),
        ("pruned", root / "data/07_quantize/model.onnx"),
        ("int8", root / "data/07_quantize/model.int8.onnx"),
    ):
        reference = rows["pruned"]["pred"] if name == "int8" else None
        rows[name], sessions[name] = onnx_row(path, texts, test, labels, reference)
    timed = latency_side_by_side(sessions, texts, runs=2000, rounds=8, warmup=50)
    for name, row in rows.items():
        row["p50_ms"] = timed[name]["p50"]
    return rows


def refresh_code(root: Path) -> None:
    for name in ("stages", "flows", "bench", "tests"):
        shutil.rmtree(root / name, ignore_errors=True)
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(ROOT / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((root / "params.yaml").read_text())
    fresh = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, value in fresh.items():  # new sections from this checkout; the run's own kept
        params.setdefault(section, value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_args(description: str) -> argparse.ArgumentParser:
    """The options of a bench that runs the pipeline on Banking77 (this one and bench/oos_banking77.py)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    ap.add_argument("--reuse", type=Path, help="a folder an earlier --keep left: run only the missing stages")
    ap.add_argument("--distill-epochs", type=int, default=5)
    ap.add_argument("--train-epochs", type=int, default=6)
    return ap


def project(args: argparse.Namespace, tmp: str) -> Path:
    """The project to run in: `--reuse` (its code refreshed from this checkout), else a fresh copy (in `--keep`
    or `tmp`) pointed at Banking77."""
    if not (DATA / "train.csv").is_file():
        raise SystemExit(f"bench: {DATA} not found (../shared/datasets/banking77 beside the checkout)")
    if args.reuse:
        refresh_code(args.reuse)
        return args.reuse
    root = copy_project(args.keep or Path(tmp) / "project")
    configure(root, args.distill_epochs, args.train_epochs)
    return root


def main() -> int:
    args = run_args(__doc__.splitlines()[0]).parse_args()
    with tempfile.TemporaryDirectory(prefix="distillery-b77-") as tmp:
        root = project(args, tmp)
        times_file = root / "bench_times.json"
        previous = json.loads(times_file.read_text()) if args.reuse and times_file.exists() else {}
        times = dict(previous)
        for stage in STAGES:
            if stage in times and (root / DONE_WHEN[stage]).exists():
                continue
            times[stage] = run_stage(root, stage)
            (root / "bench_times.json").write_text(json.dumps(times))
        m = {s: json.loads((root / DONE_WHEN[s]).read_text()) for s in ("distill", "train", "prune")}
        m["quantize"] = json.loads((root / "data/07_quantize/metrics.json").read_text())
        onnx = measure(root)
        build = json.loads((root / DONE_WHEN["build"]).read_text())
        for name, timing in json.loads((root / "data/08_build/timings.json").read_text())["engines"].items():
            build["engines"][name].update(timing)  # the manifest's results with the build's timings
        results = BenchmarkResults.read(root / DONE_WHEN["benchmark"])
        timings = BenchmarkTimings.read(root / "data/09_benchmark/timings.json")
        bench = {"variants": {n: {**r.to_dict(), **timings.variants[n].to_dict()} for n, r in results.variants.items()}}
        table = (root / "data/09_benchmark/report.md").read_text()
        audit = audit_published(root)
    report(m, onnx, times)
    report_engines(build, bench, table)
    print(audit)
    return 0


def audit_published(root: Path) -> str:
    """What publish wrote, and the lineage audit of it (`verify`), timed."""
    receipt = json.loads((root / DONE_WHEN["publish"]).read_text())
    spec = f"{receipt['model']}@{receipt['version']}"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.lineage", "verify", spec], cwd=root, capture_output=True, text=True
    )
    took = time.perf_counter() - start
    return (
        f"\npublish: {spec} ({receipt['variant']}) -> {receipt['path']}, "
        f"{len(receipt['files'])} files; verify {'OK' if proc.returncode == 0 else 'FAILED'} in {took:.1f} s: "
        f"{(proc.stdout + proc.stderr).strip()}"
    )


def report_engines(build: dict, bench: dict, table: str) -> None:
    """The build issue's fused engines and the benchmark issue's full table, with their targets."""
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    print("\nbuild (ONNX Runtime engines, model-only p50 at batch 1, measured side by side with the unfused model):")
    for name in ("onnxruntime_fp32", "onnxruntime_int8"):
        e = build["engines"][name]
        print(
            f"  {name}: fused {e['fused_operators']}; p50 {e['latency_ms']['p50']:.3f} ms vs unfused "
            f"{e['unfused_latency_ms']['p50']:.3f} ms = {e['speedup_vs_unfused']:.2f}x; parity {e['parity']}"
        )
    fused = build["engines"]["onnxruntime_int8"]["speedup_vs_unfused"]
    print(f"build target: fusions make the INT8 student >= 1.2x faster: {fused:.2f}x {met(fused >= 1.2)}")
    gpu = {k: v.get("reason") for k, v in build["engines"].items() if v["status"] != "built"}
    print(f"GPU engines: {gpu}")
    print("\n" + table)
    v = bench["variants"]
    s8, t8, tf, t32 = v["student_int8"], v["teacher_int8"], v["tfidf_logreg"], v["teacher_fp32"]
    speed = t8["latency_ms"]["model"]["p50"] / s8["latency_ms"]["model"]["p50"]
    size = s8["size_mb"] / t8["size_mb"]
    gap = 100 * (t32["accuracy"] - s8["accuracy"])
    print(
        f"benchmark targets: student_int8 {s8['accuracy']:.4f} > tfidf_logreg {tf['accuracy']:.4f}: "
        f"{met(s8['accuracy'] > tf['accuracy'])}; within 1.0 point of teacher_fp32 ({gap:.2f}): {met(gap <= 1.0)}; "
        f"model p50 {speed:.2f}x lower than teacher_int8 (>= 3x): {met(speed >= 3)}; "
        f"size {size:.1%} of teacher_int8 (<= 25%): {met(size <= 0.25)}"
    )


def report(m: dict, onnx: dict, times: dict) -> None:
    teacher, student, pruned, quant = m["distill"], m["train"], m["prune"], m["quantize"]
    t_flops = student["teacher_flops_per_token"]
    p_after = pruned["after"]
    rows = [
        (
            "teacher (all-MiniLM-L6-v2, fine-tuned)",
            teacher["test"],
            teacher["parameters"],
            t_flops,
            None,
            None,
            "distill",
        ),
    ]
    for label, key, params, flops, stage in (
        ("student (distilled), ONNX fp32", "student", student["parameters"], student["flops_per_token"], "train"),
        ("student pruned, ONNX fp32", "pruned", p_after["parameters"], p_after["flops_per_token"], "prune"),
        (
            f"student pruned INT8 ({quant['chosen']})",
            "int8",
            p_after["parameters"],
            p_after["flops_per_token"],
            "quantize",
        ),
    ):
        rows.append((label, onnx[key]["test"], params, flops, onnx[key]["size_mb"], onnx[key]["p50_ms"], stage))
    print(
        f"{'model':<40} {'test acc':>8} {'macro-F1':>8} {'params':>11} {'MFLOP/tok':>9} {'MB':>7} "
        f"{'p50 ms':>7} {'stage s':>8}"
    )
    for name, test, params, flops, size, p50, stage in rows:
        size_s = f"{size:>7.2f}" if size is not None else f"{'-':>7}"
        p50_s = f"{p50:>7.3f}" if p50 is not None else f"{'-':>7}"
        print(
            f"{name:<40} {test['accuracy']:>8.4f} {test['macro_f1']:>8.4f} {params:>11,} {flops / 1e6:>9.2f} "
            f"{size_s} {p50_s} {times.get(stage, 0):>8.0f}"
        )
    through_train = sum(times.get(s, 0) for s in STAGES[: STAGES.index("train") + 1])
    print(
        f"whole run through train: {through_train / 60:.1f} min; stages: "
        + ", ".join(f"{s} {t:.0f}s" for s, t in times.items())
    )
    ratio = student["flops_per_token"] / t_flops
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    print(
        f"train targets: teacher >= 0.928: {met(teacher['test']['accuracy'] >= 0.928)}; student >= 0.920 at <= 1/3 "
        f"teacher FLOPs ({ratio:.2f}x): {met(student['test']['accuracy'] >= 0.92 and ratio <= 1 / 3 + 1e-9)}; "
        f"run <= 25 min: {met(through_train <= 25 * 60)}"
    )
    cut = 1 - p_after["flops_per_token"] / student["flops_per_token"]
    drop = 100 * (onnx["student"]["test"]["accuracy"] - onnx["pruned"]["test"]["accuracy"])
    speed = onnx["student"]["p50_ms"] / onnx["pruned"]["p50_ms"]
    print(
        f"prune targets: FLOPs -{cut:.1%} (>= 30%): {met(cut >= 0.3)}; test drop {drop:.2f} points (<= 0.5): "
        f"{met(drop <= 0.5)}; {speed:.2f}x faster at batch 1 (>= 1.2x): {met(speed >= 1.2)}"
    )
    agree = onnx["int8"]["agreement"]
    qdrop = 100 * (onnx["pruned"]["test"]["accuracy"] - onnx["int8"]["test"]["accuracy"])
    size = onnx["int8"]["size_mb"] / onnx["pruned"]["size_mb"]
    qspeed = onnx["pruned"]["p50_ms"] / onnx["int8"]["p50_ms"]
    print(
        f"INT8 targets: agrees with fp32 on {agree:.2%} of test (>= 99.5%): {met(agree >= 0.995)}; drop {qdrop:.2f} "
        f"points (<= 0.5): {met(qdrop <= 0.5)}; size {size:.0%} of fp32 (<= 30%): {met(size <= 0.3)}; "
        f"{qspeed:.2f}x faster (>= 2x): {met(qspeed >= 2.0)}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
