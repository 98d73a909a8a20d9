"""Shadow mode: a second version classifies the primary's texts off the answer path, and
`python -m deploy.shadow report <log>` says how the two compare.

The shadow never slows the primary:
- it runs in its own process (`python -m deploy.shadow worker`), so it shares no interpreter lock with the
  server's event loop, at the lowest CPU priority (nice 19) with one ONNX Runtime thread: when the primary keeps
  the cores busy, the kernel gives the shadow almost none of them;
- the server hands it each answered batch (texts, labels, scores) as one JSON line on a pipe, without ever
  waiting, and only while no request waits for the primary: under load, and beyond `serve.shadow_queue` texts not
  yet compared or a full pipe, the batch is dropped and counted. `serve.shadow_sample` below 1 compares only
  that share of batches (the CPU the shadow takes from the machine scales with it).

The worker compares, appends one line per text to a JSONL log (`serve.shadow_log`, rolled over to `<log>.1` at
`serve.shadow_log_mb`): both versions' labels and scores, whether they agree, and the model time of the batch
each ran in (the texts themselves are never written), and reports counts back on its stdout, which the server
turns into metrics: agreement, dropped texts, disagreeing label pairs, the shadow's model time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deploy import metrics

ROOT = Path(__file__).resolve().parents[1]


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
    """The server's side: starts the worker, `offer`s it batches (never blocks), reads its counts into metrics."""

    def __init__(self, folder: Path, log: Path, log_mb: float, capacity: int, max_batch: int = 32,
                 sample: float = 1.0, primary_busy: Callable[[], bool] = lambda: False):  # fmt: skip
        self.capacity, self.in_flight, self.pending = capacity, 0, b""
        self.sample, self.primary_busy, self.rng = sample, primary_busy, random.Random(0)
        self.lock = threading.Lock()
        cmd = [sys.executable, "-m", "deploy.shadow", "worker", "--version", str(folder), "--log", str(log),
               "--log-mb", str(log_mb), "--max-batch", str(max_batch)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.reader = threading.Thread(target=self.read_counts, name="shadow-counts", daemon=True)
        self.ready = threading.Event()
        self.info: dict[str, Any] = {}

    def start(self, timeout_s: float = 300.0) -> dict[str, str]:
        """Wait for the worker to load its version; its model info, or a RegistryError with the worker's reason."""
        from stages.registry import RegistryError

        self.reader.start()
        self.ready.wait(timeout_s)
        if "error" in self.info or not self.ready.is_set():
            self.proc.kill()
            raise RegistryError(f"shadow: {self.info.get('error', 'the worker did not start')}")
        os.set_blocking(self.proc.stdin.fileno(), False)
        return self.info

    def offer(self, texts: list[str], predictions: list[Any], seconds: float) -> None:
        """Hand a batch to the worker, unless it is not sampled, the primary has requests waiting (under load
        the shadow's work is what gives way), the worker holds `capacity` texts, or the pipe is full."""
        if self.sample < 1.0 and self.rng.random() >= self.sample:
            metrics.SHADOW.labels("not_sampled").inc(len(texts))
            return
        if self.primary_busy():
            metrics.SHADOW.labels("dropped").inc(len(texts))
            return
        with self.lock:
            if self.pending:
                self.flush()
            if self.pending or self.in_flight + len(texts) > self.capacity or self.proc.poll() is not None:
                metrics.SHADOW.labels("dropped").inc(len(texts))
                return
            self.in_flight += len(texts)
            line = {
                "texts": texts,
                "labels": [p.label for p in predictions],
                "scores": [round(p.score, 6) for p in predictions],
                "batch_ms": round(seconds * 1e3, 3),
            }
            self.pending = json.dumps(line).encode() + b"\n"
            self.flush()
        metrics.QUEUE_DEPTH.labels("shadow").set(self.in_flight)

    def flush(self) -> None:
        """Write what the pipe takes now; the rest waits for the next offer (call under the lock)."""
        try:
            written = os.write(self.proc.stdin.fileno(), self.pending)
        except BlockingIOError:
            return
        except (BrokenPipeError, OSError):
            written = len(self.pending)  # the worker is gone: nothing more reaches it
        self.pending = self.pending[written:]

    def read_counts(self) -> None:
        for raw in self.proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if "ready" in msg or "error" in msg:
                self.info = msg.get("ready") or {"error": msg["error"]}
                self.ready.set()
                continue
            metrics.SHADOW.labels("agree").inc(msg["agree"])
            metrics.SHADOW.labels("disagree").inc(msg["disagree"])
            for primary, shadow, n in msg["pairs"]:
                metrics.SHADOW_PAIRS.labels(primary, shadow).inc(n)
            metrics.MODEL_SECONDS.labels("shadow").observe(msg["batch_ms"] / 1e3)
            with self.lock:
                self.in_flight -= msg["agree"] + msg["disagree"]
            metrics.QUEUE_DEPTH.labels("shadow").set(self.in_flight)
        self.ready.set()

    def close(self, timeout_s: float = 5.0) -> None:
        """Let the worker finish what it holds (within `timeout_s`) and stop."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.reader.join(1.0)


# ---- the worker ----------------------------------------------------------------------------------------


def worker(folder: Path, log: RollingLog, max_batch: int) -> None:
    """Read batches on stdin, classify them with the shadow version, log each text, report counts on stdout."""
    from deploy.runtime import Classifier

    os.nice(19)
    try:
        shadow = Classifier(folder, threads=1, max_batch=max_batch, spinning=False)
    except Exception as exc:  # noqa: BLE001 - reported to the server, which refuses to start with it
        print(json.dumps({"error": str(exc).splitlines()[0]}), flush=True)
        return
    print(json.dumps({"ready": {"model": shadow.model, "version": shadow.version, "variant": shadow.record.variant,
                                "backend": shadow.record.backend}}), flush=True)  # fmt: skip
    for batch in batches(sys.stdin.buffer, max_batch):
        texts = [t for b in batch for t in b["texts"]]
        start = time.monotonic()
        preds = shadow.classify(texts, 1)
        ms = round((time.monotonic() - start) * 1e3, 3)
        lines, pairs = [], Counter()
        at = 0
        for b in batch:
            for label, score in zip(b["labels"], b["scores"], strict=True):
                other = preds[at]
                at += 1
                if label != other.label:
                    pairs[(label, other.label)] += 1
                lines.append({"agree": label == other.label,
                              "primary": {"label": label, "score": score, "batch_ms": b["batch_ms"],
                                          "batch": len(b["texts"])},
                              "shadow": {"label": other.label, "score": round(other.score, 6), "batch_ms": ms,
                                         "batch": len(texts)}})  # fmt: skip
        log.write(lines)
        disagree = sum(pairs.values())
        report = {"agree": len(texts) - disagree, "disagree": disagree, "batch_ms": ms,
                  "pairs": [[p, s, n] for (p, s), n in pairs.items()]}  # fmt: skip
        print(json.dumps(report), flush=True)
    log.close()


def batches(stream: Any, max_batch: int) -> Any:
    """Lists of decoded lines: each waits for one line, then takes what else is ready, up to `max_batch` texts."""
    while True:
        line = stream.readline()
        if not line:
            return
        batch, texts = [json.loads(line)], len(json.loads(line)["texts"])
        while texts < max_batch and select.select([stream], [], [], 0)[0]:
            more = stream.readline()
            if not more:
                break
            batch.append(json.loads(more))
            texts += len(batch[-1]["texts"])
        yield batch


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
    work = sub.add_parser("worker", help="(run by the server) compare batches read on stdin")
    work.add_argument("--version", type=Path, required=True, help="the shadow version's folder")
    work.add_argument("--log", type=Path, required=True)
    work.add_argument("--log-mb", type=float, default=64.0)
    work.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args(argv)
    if args.command == "worker":
        worker(args.version, RollingLog(args.log, int(args.log_mb * 1e6)), args.max_batch)
        return 0
    missing = [str(p) for p in args.logs if not p.is_file()]
    if missing:
        print(f"shadow report: no such log: {', '.join(missing)}", file=sys.stderr)
        return 2
    print(report(read_log(args.logs), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
