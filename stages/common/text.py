"""Text normalization shared by every stage that compares texts (clean, and augment's leakage check)."""

from __future__ import annotations

import polars as pl


def normalize(expr: pl.Expr, lowercase: bool = False) -> pl.Expr:
    """NFKC, control characters to spaces, format characters (zero-width etc.) removed, whitespace collapsed."""
    out = (
        expr.str.normalize("NFKC")
        .str.replace_all(r"\p{Cc}", " ")
        .str.replace_all(r"\p{Cf}", "")
        .str.replace_all(r"\s+", " ")
        .str.strip_chars()
    )
    return out.str.to_lowercase() if lowercase else out


def dedup_key(expr: pl.Expr) -> pl.Expr:
    """The key under which two texts count as the same: normalized and case-folded."""
    return normalize(expr).str.to_lowercase()
