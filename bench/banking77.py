"""Banking77 through the pipeline: teacher and student side by side.

    python bench/banking77.py [--keep DIR] [--distill-epochs 5] [--train-epochs 6]

Runs `dvc repro` stage by stage on a scratch copy of the project with `ingest.source` pointed at
../shared/datasets/banking77 (label column `category`), times each stage, and prints one table: test
accuracy, macro-F1, parameters, FLOPs per token and training time for teacher and student, and the whole
run's time through `train`. Later stages add rows to this table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.conftest import copy_project  # noqa: E402  (one way to copy the project, shared with the tests)

DATA = ROOT.parent / "shared" / "datasets" / "banking77"
STAGES_THROUGH_TRAIN = ("ingest", "clean", "augment", "distill", "train")


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    ap.add_argument("--distill-epochs", type=int, default=5)
    ap.add_argument("--train-epochs", type=int, default=6)
    args = ap.parse_args()
    if not (DATA / "train.csv").is_file():
        raise SystemExit(f"bench: {DATA} not found (../shared/datasets/banking77 beside the checkout)")
    with tempfile.TemporaryDirectory(prefix="distillery-b77-") as tmp:
        root = copy_project(args.keep or Path(tmp) / "project")
        configure(root, args.distill_epochs, args.train_epochs)
        times = {stage: run_stage(root, stage) for stage in STAGES_THROUGH_TRAIN}
        teacher = json.loads((root / "data/04_distill/metrics.json").read_text())
        student = json.loads((root / "data/05_train/metrics.json").read_text())
    total = sum(times.values())
    rows = [
        (
            "teacher (all-MiniLM-L6-v2, fine-tuned)",
            teacher["test"],
            teacher["parameters"],
            student["teacher_flops_per_token"],
            times["distill"],
        ),
        ("student (distilled)", student["test"], student["parameters"], student["flops_per_token"], times["train"]),
    ]
    print(f"{'model':<40} {'test acc':>8} {'macro-F1':>8} {'params':>11} {'GFLOP/token':>11} {'stage s':>8}")
    for name, test, params, flops, secs in rows:
        print(
            f"{name:<40} {test['accuracy']:>8.4f} {test['macro_f1']:>8.4f} {params:>11,} {flops / 1e9:>11.4f} "
            f"{secs:>8.0f}"
        )
    ratio = student["flops_per_token"] / student["teacher_flops_per_token"]
    print(f"whole run through train: {total / 60:.1f} min ({', '.join(f'{s} {t:.0f}s' for s, t in times.items())})")
    print(
        "targets: teacher >= 0.928: {}; student >= 0.920 at <= 1/3 teacher FLOPs ({:.2f}x): {}; "
        "run <= 25 min: {}".format(
            "met" if teacher["test"]["accuracy"] >= 0.928 else "MISSED",
            ratio,
            "met" if student["test"]["accuracy"] >= 0.92 and ratio <= 1 / 3 + 1e-9 else "MISSED",
            "met" if total <= 25 * 60 else "MISSED",
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
