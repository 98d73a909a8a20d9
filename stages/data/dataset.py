"""The row schema every data stage reads and writes, and the one split function (stratified or by group)."""

from __future__ import annotations

import numpy as np
import polars as pl

# Fixed schema of data/01_ingest and data/02_clean: later stages rely on these names and types.
SCHEMA: dict[str, pl.DataType] = {"id": pl.String(), "text": pl.String(), "label": pl.String(), "group": pl.String()}


def conform(frame: pl.DataFrame) -> pl.DataFrame:
    """Select the schema columns in order with their types."""
    return frame.select([pl.col(name).cast(dtype) for name, dtype in SCHEMA.items()])


def split(frame: pl.DataFrame, fraction: float, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split rows into (kept, held-out), with about `fraction` of rows held out.

    When every row is its own group, the split is stratified by label: each label with two or more
    rows gives at least one row to each side. When groups hold several rows, whole groups are
    assigned, so no group crosses the split (documents never leak between train and test).
    Deterministic for a given frame and seed.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
    frame = frame.sort("id")
    rng = np.random.default_rng(seed)
    held_ids: set[str] = set()
    if frame["group"].n_unique() == frame.height:
        # A row without a label stays on the kept side (clean quarantines it): null never sorts with names.
        for label in sorted(frame["label"].drop_nulls().unique().to_list()):
            ids = frame.filter(pl.col("label") == label)["id"].to_list()
            n = len(ids)
            if n < 2:
                continue
            n_held = min(n - 1, max(1, round(n * fraction)))
            order = rng.permutation(n)
            held_ids.update(ids[i] for i in order[:n_held])
    else:
        sizes = frame.group_by("group").len().sort("group")
        groups = sizes["group"].to_list()
        counts = sizes["len"].to_list()
        target = fraction * frame.height
        taken = 0
        held_groups = set()
        for i in rng.permutation(len(groups)):
            if taken >= target:
                break
            held_groups.add(groups[i])
            taken += counts[i]
        held_ids = set(frame.filter(pl.col("group").is_in(list(held_groups)))["id"].to_list())
    mask = pl.col("id").is_in(list(held_ids))
    return frame.filter(~mask), frame.filter(mask)
