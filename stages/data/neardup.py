"""Near-duplicate detection: MinHash over word shingles, LSH banding for candidates, exact Jaccard to confirm.

All hashing is seeded and byte-based (never Python's salted `hash`), so results repeat across runs.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict

import numpy as np

WORD = re.compile(r"\w+")


def shingles(text: str, size: int) -> frozenset[str]:
    """Word n-grams of the case-folded text; a text shorter than `size` words is one shingle."""
    tokens = WORD.findall(text.lower())
    if not tokens:
        return frozenset()
    if len(tokens) <= size:
        return frozenset([" ".join(tokens)])
    return frozenset(" ".join(tokens[i : i + size]) for i in range(len(tokens) - size + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows): the most rows per band that still finds a pair at `threshold` with probability >= 0.995."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= 0.995:
            return bands, rows
    return num_perm, 1


def _hash64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little")


def near_duplicate_pairs(
    texts: list[str], threshold: float, shingle_size: int = 2, num_perm: int = 128, seed: int = 0
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, jaccard) with i < j whose shingle Jaccard similarity is >= threshold, sorted."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    sets = [shingles(t, shingle_size) for t in texts]
    rng = np.random.default_rng(seed)
    # Multiply-shift hashing on 64-bit words: (a*x + b) mod 2^64, top 32 bits; a is odd.
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    bands, rows = _bands(threshold, num_perm)
    buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(bands)]
    with np.errstate(over="ignore"):
        for idx, sh in enumerate(sets):
            if not sh:
                continue
            x = np.fromiter((_hash64(s) for s in sh), dtype=np.uint64, count=len(sh))
            sig = ((a[:, None] * x[None, :] + b[:, None]) >> np.uint64(32)).min(axis=1)
            for band in range(bands):
                buckets[band][sig[band * rows : (band + 1) * rows].tobytes()].append(idx)
    candidates: set[tuple[int, int]] = set()
    for table in buckets:
        for members in table.values():
            for pos, i in enumerate(members):
                for j in members[pos + 1 :]:
                    candidates.add((i, j))
    pairs = []
    for i, j in sorted(candidates):
        sim = jaccard(sets[i], sets[j])
        if sim >= threshold:
            pairs.append((i, j, sim))
    return pairs


def within_one_edit(a: str, b: str) -> bool:
    """True when `b` is `a` with one character inserted, deleted, replaced, or two neighbours swapped."""
    if a == b:
        return True
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        if len(diff) == 1:
            return True
        return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    i = next((k for k in range(len(short)) if short[k] != long_[k]), len(short))
    return short[i:] == long_[i + 1 :]


def typo_pairs(texts: list[str], min_chars: int) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of texts at least `min_chars` long that differ by one typo (`within_one_edit`).

    Candidates come from the one-deletion neighbourhood (SymSpell's trick: two strings one edit apart share a
    string made by deleting one character from each, or one of them is such a string of the other), so the
    cost grows with the total length of the texts, not with the number of pairs."""
    keys: dict[str, list[int]] = defaultdict(list)
    for idx, text in enumerate(texts):
        if len(text) < min_chars:
            continue
        keys[text].append(idx)
        for k in range(len(text)):
            keys[text[:k] + text[k + 1 :]].append(idx)
    pairs: set[tuple[int, int]] = set()
    for members in keys.values():
        if len(members) < 2:
            continue
        unique = sorted(set(members))
        for pos, i in enumerate(unique):
            for j in unique[pos + 1 :]:
                if texts[i] != texts[j] and within_one_edit(texts[i], texts[j]):
                    pairs.add((i, j))
    return sorted(pairs)
