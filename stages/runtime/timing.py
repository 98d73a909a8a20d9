"""Wall-clock timing of single calls, as used by every latency figure (they vary from run to run)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Query:
    """One variant's three steps from a text to a label: `prepare` (tokenize or vectorize), `run` (the model
    alone), `finish` (the label from the scores). Timing one call times all three, so the model-only part of
    a call can never exceed the call's end-to-end time."""

    prepare: Callable[[str], Any]
    run: Callable[[Any], Any]
    finish: Callable[[Any], Any]


@dataclass(frozen=True)
class Interleaved:
    """Batch-1 samples of several variants taken by `interleaved_queries` (milliseconds, round after round)."""

    model: dict[str, list[float]]
    end_to_end: dict[str, list[float]]
    rounds: int
    per_round: int
    seconds: float


def timed_query(q: Query, text: str) -> tuple[float, float]:
    """(model-only, end-to-end) milliseconds of one text through `q`."""
    t0 = time.perf_counter()
    batch = q.prepare(text)
    t1 = time.perf_counter()
    out = q.run(batch)
    t2 = time.perf_counter()
    q.finish(out)
    t3 = time.perf_counter()
    return (t2 - t1) * 1000.0, (t3 - t0) * 1000.0


def interleaved_queries(
    queries: dict[str, Query],
    texts: Sequence[str],
    budget_s: float,
    rounds: int,
    settle_s: float = 0.1,
    min_per_round: int = 5,
    on_chunk: Callable[[int, str], None] | None = None,
) -> Interleaved:
    """Every variant on the same texts (cycled) at batch 1, in `rounds` interleaved rounds, sized to take about
    `budget_s` seconds in all.

    A short calibration (2 warm-up calls, 5 timed) estimates each variant's time per query; each round then
    gives every variant the same `per_round` texts, so a drift in machine load falls on all variants alike.
    Each variant's chunk starts with untimed calls for `settle_s` seconds (at least 2 calls): for a while
    after a chunk of another runtime (PyTorch's thread pool above all) calls take up to 5-10x longer, and
    timing them would put the previous variant's wind-down into this one's tail. Measured on the demo (2
    cores), the INT8 student's p95 after the PyTorch teacher: 5.4 ms settling 2 calls, 5.1 ms settling 30 ms,
    0.85 ms settling 100 ms (p50 0.5-0.7 ms); the settling is paid out of the budget.
    At least `min_per_round` texts per round are timed, so a budget too small for the variants is
    exceeded rather than left meaningless; `seconds` says what was spent. `on_chunk(round, name)` is called
    before each chunk (progress)."""
    start = time.perf_counter()
    estimate = 0.0
    for q in queries.values():
        for i in range(2):
            timed_query(q, texts[i % len(texts)])
        estimate += statistics.median(timed_query(q, texts[i % len(texts)])[1] for i in range(5)) / 1000.0
    spare = max(0.0, budget_s - (time.perf_counter() - start))
    settle_share = settle_s * len(queries) * rounds
    per_round = max(min_per_round, int(max(0.0, spare - settle_share) / max(1, rounds) / max(estimate, 1e-6)))
    model: dict[str, list[float]] = {name: [] for name in queries}
    e2e: dict[str, list[float]] = {name: [] for name in queries}
    for r in range(rounds):
        chunk = [texts[(r * per_round + i) % len(texts)] for i in range(per_round)]
        for name, q in queries.items():
            if on_chunk is not None:
                on_chunk(r, name)
            settled, calls = time.perf_counter() + settle_s, 0
            while calls < 2 or time.perf_counter() < settled:
                timed_query(q, chunk[calls % len(chunk)])
                calls += 1
            for text in chunk:
                m, e = timed_query(q, text)
                model[name].append(m)
                e2e[name].append(e)
    return Interleaved(model, e2e, rounds, per_round, round(time.perf_counter() - start, 1))


def round_p95s(samples: Sequence[float], rounds: int) -> float:
    """The median over rounds of each round's p95 (`side_by_side`/`interleaved_queries` layout): a tail
    statistic that a few rounds disturbed by other load on the machine cannot move, unlike the p95 of all
    samples pooled. Gates on tail latency use it."""
    per = max(1, len(samples) // max(1, rounds))
    chunks = [sorted(samples[i : i + per]) for i in range(0, per * max(1, rounds), per)]
    p95s = [chunk[min(len(chunk) - 1, math.ceil(0.95 * len(chunk)) - 1)] for chunk in chunks if chunk]
    return round(statistics.median(p95s), 4)
