"""Shadow mode: a second version classifies the primary's texts off the answer path, and
`python -m deploy.shadow report <log>` says how the two compare.

The shadow never slows the primary:
- its own thread, at the lowest CPU priority (nice 19), with its ONNX Runtime session created inside that thread
  so the session's worker threads inherit the priority, and one intra-op thread;
- it runs only while the primary has nothing queued or running, so under load it waits;
- its queue is bounded (`serve.shadow_queue` texts): when full, new texts are dropped, and counted.

Each compared text adds a line to a JSONL log (`serve.shadow_log`, rolled over to `<log>.1` at
`serve.shadow_log_mb`): both versions' labels and scores, whether they agree, and the model time of the batch
each ran in. The texts themselves are never written. Agreement, dropped texts and disagreeing label pairs also go
to the metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deploy import metrics


class RollingLog:
    """Append JSON lines to `path`; past `max_bytes` it becomes `<path>.1` (replacing the older one)."""

    def __init__(self, path: Path, max_bytes: int):
        self.path, self.max_bytes = path, max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the server's life

    def write(self, lines: list[dict[str, Any]]) -> None:
        self.fh.write("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
        self.fh.flush()
        if self.fh.tell() >= self.max_bytes:
            self.fh.close()
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self.fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        self.fh.close()


class Shadow:
    """`offer(texts, primary_predictions, primary_seconds)` from the primary's batcher; never blocks."""

    def __init__(self, load: Callable[[], Any], log: RollingLog, capacity: int, primary_busy: Callable[[], bool],
                 max_batch: int = 32):  # fmt: skip
        self.load, self.log, self.capacity, self.primary_busy = load, log, capacity, primary_busy
        self.max_batch = max_batch
        self.items: queue.Queue[tuple[str, Any, float, int] | None] = queue.Queue()
        self.queued = 0
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.classifier: Any = None
        self.thread = threading.Thread(target=self.main, name="shadow", daemon=True)

    def start(self, timeout_s: float = 300.0) -> Any:
        """Start the thread, load the shadow version in it and return it (or raise its load error)."""
        self.thread.start()
        self.ready.wait(timeout_s)
        if self.error is not None:
            raise self.error
        return self.classifier

    def offer(self, texts: list[str], predictions: list[Any], seconds: float) -> None:
        with self.lock:
            room = self.capacity - self.queued
            take = min(room, len(texts))
            self.queued += take
        if take < len(texts):
            metrics.SHADOW.labels("dropped").inc(len(texts) - take)
        for text, pred in zip(texts[:take], predictions[:take], strict=True):
            self.items.put((text, pred, seconds, len(texts)))
        metrics.QUEUE_DEPTH.labels("shadow").set(self.queued)

    def main(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread, and threads it creates
        except OSError:
            pass
        try:
            self.classifier = self.load()
        except BaseException as exc:  # noqa: BLE001 - handed to start(), which raises it in the main thread
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        while True:
            first = self.items.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self.items.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.items.put(None)
                    break
                batch.append(item)
            while self.primary_busy():
                time.sleep(0.002)
            self.compare(batch)

    def compare(self, batch: list[tuple[str, Any, float, int]]) -> None:
        start = time.monotonic()
        shadow = self.classifier.classify([text for text, *_ in batch], 1)
        seconds = time.monotonic() - start
        metrics.MODEL_SECONDS.labels("shadow").observe(seconds)
        lines = []
        for (_, pred, primary_s, primary_n), other in zip(batch, shadow, strict=True):
            agree = pred.label == other.label
            metrics.SHADOW.labels("agree" if agree else "disagree").inc()
            if not agree:
                metrics.SHADOW_PAIRS.labels(pred.label, other.label).inc()
            lines.append({
                "agree": agree,
                "primary": {"label": pred.label, "score": round(pred.score, 6), "batch_ms": round(primary_s * 1e3, 3),
                            "batch": primary_n},
                "shadow": {"label": other.label, "score": round(other.score, 6), "batch_ms": round(seconds * 1e3, 3),
                           "batch": len(batch)},
            })  # fmt: skip
        self.log.write(lines)
        with self.lock:
            self.queued -= len(batch)
        metrics.QUEUE_DEPTH.labels("shadow").set(self.queued)

    def close(self, timeout_s: float = 5.0) -> None:
        """Finish what is queued within `timeout_s` (the rest is dropped with the process), close the log."""
        self.items.put(None)
        self.thread.join(timeout_s)
        self.log.close()


# ---- the report ----------------------------------------------------------------------------------------


def read_log(paths: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        with path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                try:
                    row = json.loads(line)
                    row["primary"]["label"], row["shadow"]["label"]  # noqa: B018 - the keys the report reads
                except (ValueError, KeyError, TypeError):
                    raise SystemExit(f"shadow report: {path}:{number}: not a shadow log line: {line[:80]!r}") from None
                rows.append(row)
    return rows


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def report(rows: list[dict[str, Any]], top: int = 15) -> str:
    """Agreement, the label pairs the versions disagree on, per-label agreement and both latencies."""
    if not rows:
        return "no compared texts in the log"
    agree = sum(1 for r in rows if r["agree"])
    pairs = Counter((r["primary"]["label"], r["shadow"]["label"]) for r in rows if not r["agree"])
    per_label = Counter(r["primary"]["label"] for r in rows)
    per_label_agree = Counter(r["primary"]["label"] for r in rows if r["agree"])
    out = [f"compared texts: {len(rows)}", f"agreement: {agree / len(rows):.2%} ({agree}/{len(rows)})", ""]
    out += ["| primary label | shadow label | texts | share of the primary label's |", "|---|---|---:|---:|"]
    for (p, s), n in pairs.most_common(top):
        out.append(f"| {p} | {s} | {n} | {n / per_label[p]:.1%} |")
    if not pairs:
        out.append("| (none) | | 0 | |")
    worst = sorted(per_label, key=lambda lab: (per_label_agree[lab] / per_label[lab], lab))[:top]
    out += ["", "| label (primary) | texts | agreement |", "|---|---:|---:|"]
    out += [f"| {lab} | {per_label[lab]} | {per_label_agree[lab] / per_label[lab]:.1%} |" for lab in worst]
    out += ["", "| model time per batch | p50 ms | p99 ms | mean texts per batch |", "|---|---:|---:|---:|"]
    for role in ("primary", "shadow"):
        ms = [r[role]["batch_ms"] for r in rows]
        sizes = [r[role]["batch"] for r in rows]
        out.append(f"| {role} | {percentile(ms, 50):.3f} | {percentile(ms, 99):.3f} | {np.mean(sizes):.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.shadow", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="agreement, confusion and latencies of a shadow log")
    rep.add_argument("logs", nargs="+", type=Path, help="the shadow log (and its rolled-over .1, if wanted)")
    rep.add_argument("--top", type=int, default=15, help="label pairs and labels listed (default 15)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.logs if not p.is_file()]
    if missing:
        print(f"shadow report: no such log: {', '.join(missing)}", file=sys.stderr)
        return 2
    print(report(read_log(args.logs), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
