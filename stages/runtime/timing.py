"""Wall-clock timing of single calls, as used by every latency figure (they vary from run to run)."""

from __future__ import annotations

import math
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


def round_medians(samples: Sequence[float], rounds: int) -> list[float]:
    """Median of each round's samples, as `side_by_side` lays them out (rounds one after the other)."""
    per = max(1, len(samples) // max(1, rounds))
    chunks = [samples[i : i + per] for i in range(0, per * max(1, rounds), per)]
    return [statistics.median(chunk) for chunk in chunks if chunk]


def relative_speed(samples: dict[str, list[float]], reference: str, rounds: int) -> tuple[dict[str, float], float]:
    """(each callable's time relative to `reference`, noise) from `side_by_side` samples.

    Within each round a callable's median is divided by the reference's median of the same round, so a
    drift in machine load between rounds cancels; the estimate is the median of those ratios over rounds.
    The noise is the largest relative standard error of any such estimate (1.25 x the robust spread of the
    per-round ratios, IQR / 1.35, over the square root of the number of rounds): two callables whose
    times differ by less than about twice it cannot be told apart by this run."""
    ref = round_medians(samples[reference], rounds)
    out, noise = {}, 0.0
    for name, values in samples.items():
        ratios = [m / r for m, r in zip(round_medians(values, rounds), ref, strict=False) if r > 0]
        mid = statistics.median(ratios)
        out[name] = round(mid, 4)
        if name != reference and len(ratios) >= 4:
            q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
            noise = max(noise, 1.2533 * (q3 - q1) / 1.349 / math.sqrt(len(ratios)) / mid)
    return out, round(noise, 4)
