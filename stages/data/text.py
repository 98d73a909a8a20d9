"""Text normalization shared by every stage that compares texts (clean, and augment's leakage check).

One Python implementation, applied to polars columns through `map_elements`, so the two stages can never
disagree on whether two texts are the same.
"""

from __future__ import annotations

import unicodedata

import polars as pl


def normalize_text(text: str, lowercase: bool = False) -> str:
    """NFKC, control characters to spaces, format characters (zero-width etc.) removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text)
    chars = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Cc":
            chars.append(" ")
        elif cat != "Cf":
            chars.append(ch)
    out = " ".join("".join(chars).split())
    return out.lower() if lowercase else out


def dedup_text_key(text: str) -> str:
    """The key under which two texts count as the same: normalized, case-folded, punctuation dropped ("Cancel
    my card!" and "cancel my card" are one text)."""
    folded = normalize_text(text).casefold()
    return " ".join("".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in folded).split())


def normalize(expr: pl.Expr, lowercase: bool = False) -> pl.Expr:
    """`normalize_text` on a string column (nulls stay null)."""
    return expr.map_elements(lambda s: normalize_text(s, lowercase), return_dtype=pl.String, skip_nulls=True)


def dedup_key(expr: pl.Expr) -> pl.Expr:
    """`dedup_text_key` on a string column (nulls stay null)."""
    return expr.map_elements(dedup_text_key, return_dtype=pl.String, skip_nulls=True)
