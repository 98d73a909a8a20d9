"""Stage `augment`: synonym replacement, EDA edits, optional back-translation, class balancing.

Reads only the cleaned training rows (validation and test rows are never augmented, only read so that no
new row repeats them). Every new row names the row it came from (`origin_id`) and the operation (`op`);
originals carry `op = original`. Deterministic: each new row draws from a generator seeded by
(seed, origin id, slot), so the same input and params give the same bytes.
"""

from __future__ import annotations

import hashlib
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from stages.data.dataset import conform
from stages.data.synonyms import STOP_WORDS, build_synonyms, describe_source, load_embeddings
from stages.data.text import dedup_text_key
from stages.runner.cli import read_frames, stage_args, stage_entrypoint
from stages.runner.errors import ParamError, StageError
from stages.runner.params import from_dict, read_params
from stages.storage.atomic import outputs

OPS = ("synonym", "swap", "delete", "insert", "back_translation")
CORE = re.compile(r"^(\W*)(\w(?:[\w'’-]*\w)?)(\W*)$")
ATTEMPTS = 3  # tries per new row before giving up on that slot (an edit can repeat an existing text)


@dataclass(frozen=True)
class SynonymParams:
    model: str | None = None  # folder with vocab.txt + model.safetensors; null = the offline teacher package
    min_similarity: float = 0.5  # cosine floor; below it neighbours drift to related-but-different words
    max_neighbours: int = 5

    def __post_init__(self) -> None:
        if not 0.0 < self.min_similarity < 1.0:
            raise ParamError(f"augment.synonyms.min_similarity must be in (0, 1), got {self.min_similarity}")
        if not isinstance(self.max_neighbours, int) or self.max_neighbours < 1:
            raise ParamError(f"augment.synonyms.max_neighbours must be a positive integer, got {self.max_neighbours!r}")


@dataclass(frozen=True)
class BackTranslationParams:
    forward: str | None = None  # en->x model (path or Hugging Face id), e.g. Helsinki-NLP/opus-mt-en-de
    backward: str | None = None  # x->en model, e.g. Helsinki-NLP/opus-mt-de-en
    allow_download: bool = False  # models load from local files only unless this is true
    batch_size: int = 16
    max_length: int = 128


@dataclass(frozen=True)
class AugmentParams:
    # Weight of each operation when a new row is made; 0 switches it off.
    ops: dict[str, float] = field(
        default_factory=lambda: {op: (0.0 if op == "back_translation" else 1.0) for op in OPS}
    )
    synonym_rate: float = 0.15  # share of eligible words replaced by a synonym
    swap_rate: float = 0.1  # swaps per word
    delete_rate: float = 0.1  # chance each word is dropped
    insert_rate: float = 0.1  # synonyms inserted per word
    per_row: int = 1  # most new rows made from one original
    balance_to: int | str | None = (
        None  # null: per_row new rows for every original; N, max, median: top labels up to it
    )
    protected: tuple[str, ...] = ()  # words never changed, moved or dropped (product names, ...)
    synonyms: SynonymParams = field(default_factory=SynonymParams)
    back_translation: BackTranslationParams = field(default_factory=BackTranslationParams)
    seed: int = 0

    def __post_init__(self) -> None:
        for name, cls in (("synonyms", SynonymParams), ("back_translation", BackTranslationParams)):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, from_dict(cls, value, f"augment.{name}"))
        object.__setattr__(self, "protected", tuple(self.protected or ()))
        ops = dict(self.ops or {})
        unknown = sorted(set(ops) - set(OPS))
        if unknown:
            raise ParamError(f"augment.ops: unknown operation(s) {', '.join(unknown)}; known: {', '.join(OPS)}")
        for op in OPS:
            ops.setdefault(op, 0.0)
            if not isinstance(ops[op], (int, float)) or ops[op] < 0:
                raise ParamError(f"augment.ops.{op} must be a weight >= 0, got {ops[op]!r}")
        object.__setattr__(self, "ops", ops)
        for rate in ("synonym_rate", "swap_rate", "delete_rate", "insert_rate"):
            if not 0.0 <= getattr(self, rate) <= 1.0:
                raise ParamError(f"augment.{rate} must be in [0, 1], got {getattr(self, rate)}")
        if not isinstance(self.per_row, int) or self.per_row < 0:
            raise ParamError(f"augment.per_row must be an integer >= 0, got {self.per_row!r}")
        if self.per_row > 0 and sum(ops.values()) <= 0:
            raise ParamError(
                "augment.ops: every weight is 0 but augment.per_row > 0; set per_row to 0 to turn augmentation off"
            )
        b = self.balance_to
        if not (b is None or b in ("max", "median") or (isinstance(b, int) and not isinstance(b, bool) and b > 0)):
            raise ParamError(f"augment.balance_to must be null, a positive count, 'max' or 'median', got {b!r}")

    @property
    def active_ops(self) -> dict[str, float]:
        return {op: w for op, w in self.ops.items() if w > 0}


# --- the edits ---------------------------------------------------------------------------------------


def split_core(token: str) -> tuple[str, str, str] | None:
    """(leading punctuation, word, trailing punctuation) of a token, or None when it holds no word."""
    m = CORE.match(token)
    return (m.group(1), m.group(2), m.group(3)) if m else None


class Editor:
    """Word-level edits that leave protected words, stop words and numbers alone."""

    def __init__(self, synonyms: dict[str, list[str]], p: AugmentParams):
        self.synonyms = synonyms
        self.p = p
        self.protected = {w.lower() for w in p.protected}

    def is_protected(self, token: str) -> bool:
        core = split_core(token)
        return token.lower() in self.protected or (core is not None and core[1].lower() in self.protected)

    def replaceable(self, token: str) -> bool:
        """A content word with synonyms: not a stop word, not a number, not protected."""
        core = split_core(token)
        if core is None or self.is_protected(token):
            return False
        word = core[1]
        return word.isalpha() and word.lower() not in STOP_WORDS and word.lower() in self.synonyms

    def _synonym_for(self, token: str, rng: np.random.Generator) -> str:
        pre, word, post = split_core(token)
        choice = self.synonyms[word.lower()][rng.integers(len(self.synonyms[word.lower()]))]
        if word[0].isupper():
            choice = choice[0].upper() + choice[1:]
        return pre + choice + post

    def synonym(self, tokens: list[str], rng: np.random.Generator) -> list[str] | None:
        idx = [i for i, t in enumerate(tokens) if self.replaceable(t)]
        if not idx:
            return None
        n = max(1, round(self.p.synonym_rate * len(idx)))
        out = list(tokens)
        for i in rng.choice(idx, size=min(n, len(idx)), replace=False):
            out[i] = self._synonym_for(tokens[i], rng)
        return out

    def swap(self, tokens: list[str], rng: np.random.Generator) -> list[str] | None:
        movable = [i for i, t in enumerate(tokens) if not self.is_protected(t)]
        if len(movable) < 2:
            return None
        out = list(tokens)
        for _ in range(max(1, round(self.p.swap_rate * len(tokens)))):
            i, j = rng.choice(movable, size=2, replace=False)
            out[i], out[j] = out[j], out[i]
        return out

    def delete(self, tokens: list[str], rng: np.random.Generator) -> list[str] | None:
        # Numbers often carry the meaning (an order id, an amount): they stay, like protected words.
        deletable = [i for i, t in enumerate(tokens) if not self.is_protected(t) and not any(c.isdigit() for c in t)]
        if len(tokens) < 2 or not deletable:
            return None
        drop = {i for i in deletable if rng.random() < self.p.delete_rate}
        if not drop:
            drop = {int(rng.choice(deletable))}
        out = [t for i, t in enumerate(tokens) if i not in drop]
        return out or None

    def insert(self, tokens: list[str], rng: np.random.Generator) -> list[str] | None:
        idx = [i for i, t in enumerate(tokens) if self.replaceable(t)]
        if not idx:
            return None
        out = list(tokens)
        for _ in range(max(1, round(self.p.insert_rate * len(tokens)))):
            src = tokens[int(rng.choice(idx))]
            word = split_core(self._synonym_for(src, rng))[1].lower()
            out.insert(int(rng.integers(len(out) + 1)), word)
        return out


def _row_seed(seed: int, origin: str, slot: int, attempt: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"{origin}|{slot}|{attempt}".encode(), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


# --- the core ----------------------------------------------------------------------------------------


def targets(counts: dict[str, int], p: AugmentParams) -> dict[str, int]:
    """Rows each label should have after augmentation (never more than per_row new rows per original)."""
    if p.balance_to is None:
        return {lab: n * (1 + p.per_row) for lab, n in counts.items()}
    if p.balance_to == "max":
        goal = max(counts.values())
    elif p.balance_to == "median":
        goal = math.ceil(statistics.median(counts.values()))
    else:
        goal = int(p.balance_to)
    return {lab: min(max(n, goal), n * (1 + p.per_row)) for lab, n in counts.items()}


@dataclass
class _Maker:
    """Makes one new row from an original, refusing texts seen before or held out (counted in `dropped`)."""

    editor: Editor
    ops: list[str]
    weights: np.ndarray
    paraphrases: dict[str, str] | None
    held_out: set[str]
    seen: set[str]
    seed: int
    dropped: Counter[str] = field(default_factory=Counter)

    def make(self, row: dict[str, Any], slot: int, label: str) -> dict[str, str] | None:
        own_key = dedup_text_key(row["text"])
        for attempt in range(ATTEMPTS):
            rng = _row_seed(self.seed, row["id"], slot, attempt)
            op = self.ops[int(rng.choice(len(self.ops), p=self.weights))]
            if op == "back_translation":
                text = (self.paraphrases or {}).get(row["id"])
            else:
                edited = getattr(self.editor, op)(row["text"].split(" "), rng)
                text = " ".join(edited) if edited else None
            key = dedup_text_key(text) if text else None
            if not key or key == own_key:
                self.dropped["no_change"] += 1
            elif key in self.held_out:
                self.dropped["equals_val_or_test"] += 1
            elif key in self.seen:
                self.dropped["duplicate"] += 1
            else:
                self.seen.add(key)
                return {"id": f"{row['id']}+a{slot}", "text": text, "label": label, "group": row["group"],
                        "origin_id": row["id"], "op": op}  # fmt: skip
        return None


def augment(
    train: pl.DataFrame,
    val: pl.DataFrame,
    test: pl.DataFrame,
    p: AugmentParams,
    synonyms: dict[str, list[str]],
    paraphrases: dict[str, str] | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Pure core: the training rows plus new ones (with `origin_id`, `op`), and the report."""
    if p.ops["back_translation"] > 0 and paraphrases is None:
        raise StageError("augment.ops.back_translation > 0 but no back-translations were given")
    held_out = {dedup_text_key(t) for t in val["text"].to_list() + test["text"].to_list()}
    seen = {dedup_text_key(t) for t in train["text"].to_list()}
    counts = {lab: n for lab, n in train.group_by("label").len().sort("label").iter_rows()}
    goal = targets(counts, p)
    ops, weights = list(p.active_ops), np.array(list(p.active_ops.values()), dtype=float)
    weights = weights / weights.sum() if len(weights) else weights
    maker = _Maker(Editor(synonyms, p), ops, weights, paraphrases, held_out, seen, p.seed)
    new_rows: list[dict[str, str]] = []
    for label in sorted(counts):
        need = goal[label] - counts[label]
        originals = list(train.filter(pl.col("label") == label).sort("id").iter_rows(named=True))
        for slot in range(1, p.per_row + 1):
            order = _row_seed(p.seed, f"label:{label}", slot, 0).permutation(len(originals)) if need > 0 else []
            for k in order:
                if need <= 0:
                    break
                made = maker.make(originals[k], slot, label)
                if made is not None:
                    new_rows.append(made)
                    need -= 1
    return _with_report(train, new_rows, counts, goal, maker.dropped, p, len(synonyms))


def _with_report(
    train: pl.DataFrame,
    new_rows: list[dict[str, str]],
    counts: dict[str, int],
    goal: dict[str, int],
    dropped: Counter[str],
    p: AugmentParams,
    synonym_words: int,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The augmented frame (sorted by id) and augment.json's report."""
    base = conform(train).with_columns(pl.col("id").alias("origin_id"), pl.lit("original").alias("op"))
    extra = pl.DataFrame(new_rows, schema=base.schema)
    out = pl.concat([base, extra]).sort("id")
    after = {lab: n for lab, n in out.group_by("label").len().sort("label").iter_rows()}
    made_by_op = Counter(r["op"] for r in new_rows)
    report = {
        "rows": {"original": train.height, "new": extra.height, "total": out.height},
        "new_by_op": {op: made_by_op.get(op, 0) for op in OPS},
        "dropped": {r: dropped.get(r, 0) for r in ("no_change", "duplicate", "equals_val_or_test")},
        "labels": {lab: {"original": counts[lab], "target": goal[lab], "total": after[lab]} for lab in counts},
        # Only balancing promises a count; in uniform mode the target is a ceiling (some rows have no edit).
        "balance_targets_missed": sorted(lab for lab in counts if after[lab] < goal[lab]) if p.balance_to else [],
        "synonym_words": synonym_words,
        "back_translation": "on" if p.ops["back_translation"] > 0 else "off (augment.ops.back_translation is 0)",
    }
    return out, report


# --- back-translation (I/O: models) ------------------------------------------------------------------


def load_translator(name: str | None, role: str, allow_download: bool) -> Any:
    if not name:
        raise StageError(f"augment.ops.back_translation > 0 but augment.back_translation.{role} is not set")
    try:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name, local_files_only=not allow_download)
        model = AutoModelForSeq2SeqLM.from_pretrained(name, local_files_only=not allow_download).eval()
    except (OSError, ValueError, ImportError) as exc:
        where = "from local files (augment.back_translation.allow_download is false)" if not allow_download else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(f"augment.back_translation.{role}: cannot load {name!r} {where}: {first}") from exc
    return tok, model


def back_translate(texts: list[str], p: BackTranslationParams) -> list[str]:
    """en -> x -> en with greedy decoding (deterministic), in batches, with a progress bar."""
    import torch
    from rich.progress import track

    fwd = load_translator(p.forward, "forward", p.allow_download)
    bwd = load_translator(p.backward, "backward", p.allow_download)

    def run(pair: Any, batch: list[str]) -> list[str]:
        tok, model = pair
        enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=p.max_length)
        with torch.no_grad():
            ids = model.generate(**enc, num_beams=1, do_sample=False, max_length=p.max_length)
        return tok.batch_decode(ids, skip_special_tokens=True)

    out: list[str] = []
    batches = range(0, len(texts), p.batch_size)
    for start in track(batches, description="back-translating"):
        batch = texts[start : start + p.batch_size]
        out.extend(run(bwd, run(fwd, batch)))
    return out


def content_words(texts: list[str], editor: Editor) -> set[str]:
    words = set()
    for text in texts:
        for token in text.split(" "):
            core = split_core(token)
            if core and core[1].isalpha() and not editor.is_protected(token):
                words.add(core[1].lower())
    return words - STOP_WORDS


@stage_entrypoint("augment")
def main(argv: list[str] | None = None) -> int:
    """`python -m stages.augment --in data/02_clean --out data/03_augment`: reads params.yaml[augment]."""
    args = stage_args("augment", __doc__, argv, upstream="clean")
    p = read_params(AugmentParams, "augment", args.params)
    out = args.out
    frames = read_frames(args.inp, ("train", "val", "test"), upstream="clean")
    synonyms: dict[str, list[str]] = {}
    if p.per_row > 0 and (p.ops["synonym"] > 0 or p.ops["insert"] > 0):
        vocab, emb = load_embeddings(p.synonyms.model)
        words = content_words(frames["train"]["text"].to_list(), Editor({}, p))
        synonyms = build_synonyms(words, vocab, emb, p.synonyms.min_similarity, p.synonyms.max_neighbours)
    paraphrases = None
    if p.per_row > 0 and p.ops["back_translation"] > 0:
        train = frames["train"].sort("id")
        paraphrases = dict(
            zip(train["id"].to_list(), back_translate(train["text"].to_list(), p.back_translation), strict=True)
        )
    result, report = augment(frames["train"], frames["val"], frames["test"], p, synonyms, paraphrases)
    report["synonym_source"] = describe_source(p.synonyms.model) if synonyms else None
    with outputs() as w:
        w.parquet(out / "train.parquet", result)
        w.json(out / "augment.json", report)
    r = report
    print(
        f"augment: {r['rows']['original']} original + {r['rows']['new']} new rows "
        f"({', '.join(f'{k} {v}' for k, v in r['new_by_op'].items() if v)}); dropped "
        f"{sum(r['dropped'].values())} ({', '.join(f'{k} {v}' for k, v in r['dropped'].items() if v) or 'none'}); "
        f"back-translation {r['back_translation'].split(' ')[0]} -> {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
