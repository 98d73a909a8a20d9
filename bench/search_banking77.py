"""The student search on Banking77: a study of DVC experiments in a kept project folder, resumable.

    python bench/search_banking77.py --dir DIR [--trials N] [--report-only]

The first call copies the project into DIR, points it at ../shared/datasets/banking77 (5 teacher epochs, as
bench/banking77.py), commits it (trials are DVC experiments) and runs `dvc repro quantize`: today's defaults
are trial 0 and the timing reference, and the budget (`search.max_latency_ms: null`) is their INT8 student's
latency. The space below replaces the default one: `augment.per_row` is left out because a trial that
changes it reruns `distill` (the teacher's fine-tune, about 10 minutes here; DVC's run cache does not keep a
stage with uncached timing records). A later call with the same DIR refreshes the code from this checkout
(rebuilding through quantize if that changed the pipeline), then adds N trials to the same study. Prints the
study's table (trials.md): accuracy, latency, size, pruned or not, and the minutes the trials took.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.banking77 import DATA, configure, refresh_code  # noqa: E402
from tests.conftest import copy_project  # noqa: E402

STUDY = "banking77-student"
SPACE = {
    "train.teacher_layers": {"choice": ["0,5", "1,5", "0,3,5", "1,3,5"]},  # train.layers follows the length
    "kd.layer_hidden_weight": {"choice": [0.0, 1.0, 3.0]},
    "kd.layer_attention_weight": {"choice": [0.0, 1.0]},
    "kd.alpha": {"low": 0.5, "high": 0.9, "step": 0.1},
    "kd.temperature": {"choice": [1.0, 2.0, 4.0]},
    "train.optim.epochs": {"low": 4, "high": 8},
    "train.optim.lr": {"low": 1.0e-4, "high": 4.0e-4, "log": True},
    "prune.heads": {"choice": [0.0, 0.25, 0.5]},
    "prune.ffn": {"low": 0.2, "high": 0.7, "step": 0.1},
}


def run(cmd: list[str], root: Path) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed (exit {proc.returncode})")
    print(f"bench: {' '.join(cmd[2:])} took {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def commit(root: Path, message: str) -> None:
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    if subprocess.run([*git, "diff", "--cached", "--quiet"], cwd=root).returncode:
        subprocess.run([*git, "commit", "-qm", message], cwd=root, check=True)


def prepare(root: Path) -> None:
    """A Banking77 project in `root`, committed and built through quantize with today's defaults."""
    if not (DATA / "train.csv").is_file():
        raise SystemExit(f"bench: {DATA} not found (../shared/datasets/banking77 beside the checkout)")
    if (root / "dvc.yaml").is_file():
        refresh_code(root)
    else:
        copy_project(root)
        configure(root, distill_epochs=5, train_epochs=6)  # trial 0: params.yaml as it is
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["search"].update(study=STUDY, max_latency_ms=None, space=SPACE)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit(root, "banking77 search: project")
    run([sys.executable, "-m", "dvc", "repro", "quantize"], root)
    commit(root, "banking77 search: baseline through quantize")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="the project folder, kept between calls")
    ap.add_argument("--trials", type=int, default=20, help="trials this call adds")
    ap.add_argument("--report-only", action="store_true", help="print the table, run nothing")
    args = ap.parse_args()
    root = args.dir.resolve()
    if not args.report_only:
        prepare(root)
        run([sys.executable, "-m", "flows.search", "--trials", str(args.trials)], root)
    else:
        run([sys.executable, "-m", "flows.search", "--report-only"], root)
    print((root / "search" / STUDY / "trials.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
