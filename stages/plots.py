"""The benchmark's pictures, drawn by `benchmark` (every variant) and `publish` (the same, with the published
variant marked). Run records: they show timings, so they differ from run to run and are never compared.

Variants are numbered on the plot and named in a key beside it, so names never overlap however close the
points lie.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_png(path: Path, rows: dict[str, dict[str, Any]], front: list[str], title: str,
               candidate: str | None = None) -> None:  # fmt: skip
    """Test accuracy against end-to-end p50 latency at batch 1 (log scale), the Pareto front joined, each
    point numbered with a key of names; `candidate`, if given, circled and named in the title."""
    plt = _pyplot()
    fig, (ax, key) = plt.subplots(1, 2, figsize=(10, 4.8), gridspec_kw={"width_ratios": [3, 1.4]})
    names = list(rows)
    for i, name in enumerate(names, start=1):
        r = rows[name]
        x, y = r["latency_ms"]["end_to_end"]["p50"], 100 * r["accuracy"]
        marker = "s" if r.get("publishable") else "o"
        ax.scatter([x], [y], color="tab:red" if name in front else "tab:gray", marker=marker, zorder=3)
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(5, 3), fontsize=8)
        if name == candidate:
            ax.scatter([x], [y], s=260, facecolors="none", edgecolors="tab:green", linewidths=2, zorder=4,
                       label=f"published: {name}")  # fmt: skip
    pts = sorted((rows[n]["latency_ms"]["end_to_end"]["p50"], 100 * rows[n]["accuracy"]) for n in front)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:red", linewidth=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end p50 latency at batch 1 (ms, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, alpha=0.3)
    key.axis("off")
    lines = [
        f"{i:>2}  {n}  {100 * rows[n]['accuracy']:.1f}%  {rows[n]['latency_ms']['end_to_end']['p50']:.2f} ms"
        for i, n in enumerate(names, start=1)
    ]
    key.text(0, 1, "\n".join(["squares: publishable", "red: Pareto front", "", *lines]), va="top",
             family="monospace", fontsize=8, transform=key.transAxes)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def latency_png(path: Path, samples: dict[str, list[float]], title: str) -> None:
    """Box plot of each variant's model-only batch-1 latency samples (log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(samples) + 1.8))
    names = list(samples)
    ax.boxplot([samples[n] for n in names], orientation="horizontal", showfliers=False, tick_labels=names)
    ax.set_xscale("log")
    ax.set_xlabel("model-only latency at batch 1 (ms, log scale; whiskers 1.5 IQR)")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
