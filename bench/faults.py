"""The fault-injection sweep: crashes, damage, bad input, races and crafted names on a scratch copy of the
project, counted in one table (`tests/faults/inject.py` does the injecting; the `faults` tests run a quick
subset of the same functions).

    python bench/faults.py                  # the full sweep (38 min on 2 cores): 203 kills, 96 damages, ...
    python bench/faults.py --scale 0.05 --rows 200 --no-flow   # one kill per stage: about 12 minutes

Columns: fault kind; injections; detected or survived (an error naming the problem, a failed verify, or
nothing wrong afterwards); corrupted artifacts (partial, unreadable or wrong bytes left without an error);
lost rows (good rows clean dropped only because bad ones were mixed in); recovered by one rerun.
The scratch copy goes beside the project (`--scratch` to choose) and is removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faults import inject  # noqa: E402

# kill -9 injections per stage: more where a run is short (a sweep costs about 1.5 runs of the stage per kill)
KILLS = {"fingerprint": 45, "ingest": 40, "clean": 20, "augment": 20, "distill": 2, "train": 5, "prune": 5,
         "quantize": 3, "build": 20, "benchmark": 3, "publish": 40}  # fmt: skip


def table(rows: list[inject.Row]) -> str:
    head = "| fault | injections | detected or survived | corrupted artifacts | lost rows | recovered by one rerun |"
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lost = "-" if r.lost_rows is None else str(r.lost_rows)
        rec = "-" if r.recovered is None else f"{r.recovered}/{r.injections}"
        lines.append(f"| {r.kind} | {r.injections} | {r.detected} | {r.corrupted} | {lost} | {rec} |")
    total = sum(r.injections for r in rows)
    lines.append(f"| **all** | {total} | {sum(r.detected for r in rows)} | {sum(r.corrupted for r in rows)} | "
                 f"{sum(r.lost_rows or 0 for r in rows)} | |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="kills per stage: KILLS times this (at least 1)")
    ap.add_argument("--flow-kills", type=int, default=2)
    ap.add_argument("--rows", type=int, default=2000, help="bad rows mixed into Banking77 (or the demo data)")
    ap.add_argument("--no-flow", action="store_true", help="skip the Prefect flow kills and the two-flows race")
    ap.add_argument(
        "--scratch", type=Path, default=None, help="where the scratch copy goes (default: beside the project)"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix=".faults-", dir=args.scratch or ROOT.parent))
    rows: list[inject.Row] = []
    began = time.monotonic()

    def step(what: str) -> None:
        print(f"faults: {what} ({time.monotonic() - began:.0f}s)", file=sys.stderr, flush=True)

    try:
        root = scratch / "project"
        step("preparing a committed copy of the project run through publish")
        seconds = inject.prepare(root)
        step("stage seconds: " + ", ".join(f"{s} {t:.1f}" for s, t in seconds.items()))
        per_stage = {s: max(1, round(KILLS[s] * args.scale)) for s in inject.STAGES}
        rows.append(inject.sweep_kills(root, seconds, per_stage, args.seed))
        step(f"kills: {rows[-1]}")
        if not args.no_flow and args.flow_kills:
            rows.append(inject.sweep_flow_kills(root, args.flow_kills, 60.0, args.seed))
            step(f"flow kills: {rows[-1]}")
        rows.append(inject.sweep_damage(root))
        step(f"damage: {rows[-1]}")
        rows.append(inject.sweep_checkout(root))
        rows.append(inject.sweep_params(root, seconds, [("clean", "clean.val_size", 0.15),
                                                        ("quantize", "quantize.seed", 3),
                                                        ("train", "train.optim.lr", 0.0001)]))  # fmt: skip
        step(f"params: {rows[-1]}")
        rows += inject.sweep_concurrency(root, flows=not args.no_flow)
        rows.append(inject.sweep_resources(root))
        rows.append(inject.sweep_names(root))
        step(f"names: {rows[-1]}")
        banking = ROOT.parent / "shared" / "datasets" / "banking77"
        if (banking / "train.csv").is_file():
            row, _, _ = inject.sweep_rows(banking / "train.csv", banking / "test.csv", args.rows, scratch / "rows",
                                          label_col="category", seed=args.seed)  # fmt: skip
        else:
            row, _, _ = inject.sweep_rows(ROOT / "data/sample/train.csv", ROOT / "data/sample/test.csv", args.rows,
                                          scratch / "rows", seed=args.seed)  # fmt: skip
        rows.append(row)
        closed = inject.Row("over the quarantine limit")
        closed.add(
            inject.fails_closed(ROOT / "data/sample/train.csv", ROOT / "data/sample/test.csv", scratch / "closed")
        )
        rows.append(closed)
        pickles = inject.Row("code paths that can unpickle an artifact")
        calls = inject.unpickling_calls()
        pickles.injections, pickles.detected = 1, int(not calls)
        pickles.notes = calls[:5]
        rows.append(pickles)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(table(rows))
    for r in rows:
        for note in r.notes:
            print(f"  {r.kind}: {note}")
    print(f"faults: {time.monotonic() - began:.0f}s")
    failed = [r for r in rows if r.detected < r.injections or r.corrupted or r.lost_rows]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
