"""Wall-clock timing of single calls, as used by every latency figure (they vary from run to run)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def timed_calls(fn: Callable[[Any], Any], args: Sequence[Any]) -> list[float]:
    """Milliseconds of `fn(a)` for each `a`, one call at a time."""
    samples = []
    for a in args:
        start = time.perf_counter()
        fn(a)
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 of `samples` (milliseconds), rounded to 0.1 microsecond."""
    qs = statistics.quantiles(samples, n=100, method="inclusive") if len(samples) > 1 else [samples[0]] * 99
    return {"p50": round(statistics.median(samples), 4), "p95": round(qs[94], 4), "p99": round(qs[98], 4)}


def side_by_side(
    fns: dict[str, Callable[[Any], Any]], args: Sequence[Any], runs: int, rounds: int = 5, warmup: int = 10
) -> dict[str, list[float]]:
    """Samples of several callables over the same inputs (cycled), in interleaved rounds: a drift in
    machine load falls on all of them alike, so their ratios are far steadier than separate runs."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        timed_calls(fn, [args[i % len(args)] for i in range(warmup)])
    per_round = max(1, runs // rounds)
    for r in range(rounds):
        chunk = [args[i % len(args)] for i in range(r * per_round, (r + 1) * per_round)]
        for name, fn in fns.items():
            samples[name] += timed_calls(fn, chunk)
    return samples
