"""Stage `clean`: normalize, filter, deduplicate, remove leakage, split off validation, validate with GE.

Rows that break a row-level rule go to `quarantine.parquet` with the rule's name (RULES), and so do the rows
removed as copies, with why (REMOVED: duplicate, near_duplicate, leakage, near_leakage): every input row is
either in a clean split or in the quarantine. Only the first kind counts toward `max_quarantine_fraction`.
When a dataset-level expectation fails, or too many rows are quarantined, the stage exits non-zero and writes
no clean split; the validation report (and the quarantine) are still written for inspection.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from stages.data.dataset import conform, split
from stages.data.neardup import WORD, near_duplicate_pairs, typo_pairs
from stages.data.text import dedup_key, normalize
from stages.data.validation import (
    Check,
    ValidationReport,
    dataset_expectations,
    run_checks,
    split_expectations,
)
from stages.runner.cli import read_frames, stage_args, stage_entrypoint
from stages.runner.errors import ParamError, StageError
from stages.runner.params import read_params
from stages.storage.atomic import outputs

CLEAN_OUTPUTS = (
    "train.parquet",
    "val.parquet",
    "test.parquet",
    "val_oos.parquet",
    "test_oos.parquet",
    "labels.json",
    "clean.json",
)
RULES = (
    "null_text",
    "null_label",
    "empty_text",
    "bad_label",
    "invalid_utf8",
    "control_chars",
    "too_long",
    "markup",
    "no_letters",
    "conflicting_labels",
    "rare_label",
)
# HTML/XML tags (`<script>`, `</div>`, `<!-- -->`, `<img onerror=...>`) and script URLs: pasted page source or an
# injection attempt, never a user's query. A bare `<` ("< 5 euros") does not count.
MARKUP = r"(?i)<\s*/?\s*[a-z!][^<>]*>|javascript\s*:|\{\{.*\}\}|\$\{.*\}"
CONTROL = r"[\x00-\x1f\x7f\u200b-\u200f\u2028-\u202e\u2060-\u2064\ufeff]"


@dataclass(frozen=True)
class CleanParams:
    lowercase: bool = False  # the teacher's tokenizer is uncased anyway; keep case for people reading the data
    max_chars: int = 512  # longer rows are almost always pasted logs or emails, not queries
    near_dup_threshold: float = 0.9  # word-shingle Jaccard; 1.0 keeps near-duplicates (exact ones still go)
    shingle_size: int = 2  # words per shingle; 2 separates "cancel my card" from "cancel my order"
    val_size: float = 0.1  # share of cleaned train rows held out for early stopping and model selection
    seed: int = 0
    min_per_label: int = 5  # fewer training rows than this for a label fails validation
    max_quarantine_fraction: float = 0.05  # more bad rows than this means the source is broken: fail closed
    max_label_chars: int = 64  # a longer label is a text pasted into the label column, not a class name
    typo_min_chars: int = 12  # texts this long that differ by one typo are near-duplicates; 0 = off
    oos_label: str | None = None  # a label that means "no known intent": never a class, it evaluates rejection
    holdout_labels: float = 0.0  # share of intents held out as unknown (seeded by `seed`); 0 = off

    def __post_init__(self) -> None:
        if not isinstance(self.max_chars, int) or self.max_chars < 1:
            raise ParamError(f"clean.max_chars must be a positive integer, got {self.max_chars!r}")
        if not 0.0 < float(self.near_dup_threshold) <= 1.0:
            raise ParamError(f"clean.near_dup_threshold must be in (0, 1], got {self.near_dup_threshold}")
        if not isinstance(self.shingle_size, int) or self.shingle_size < 1:
            raise ParamError(f"clean.shingle_size must be a positive integer, got {self.shingle_size!r}")
        if not 0.0 < float(self.val_size) < 1.0:
            raise ParamError(f"clean.val_size must be in (0, 1), got {self.val_size}")
        if not isinstance(self.min_per_label, int) or self.min_per_label < 1:
            raise ParamError(f"clean.min_per_label must be a positive integer, got {self.min_per_label!r}")
        for key in ("max_label_chars", "typo_min_chars"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "max_label_chars" else 0):
                raise ParamError(
                    f"clean.{key} must be an integer >= {1 if key == 'max_label_chars' else 0}, got {value!r}"
                )
        if not 0.0 <= float(self.max_quarantine_fraction) <= 1.0:
            raise ParamError(f"clean.max_quarantine_fraction must be in [0, 1], got {self.max_quarantine_fraction}")
        if not 0.0 <= float(self.holdout_labels) < 1.0:
            raise ParamError(f"clean.holdout_labels must be a share in [0, 1), got {self.holdout_labels}")
        if self.oos_label is not None and (not isinstance(self.oos_label, str) or not self.oos_label.strip()):
            raise ParamError(f"clean.oos_label must be a label name or null, got {self.oos_label!r}")


@dataclass(frozen=True)
class Cleaned:
    train: pl.DataFrame
    val: pl.DataFrame
    test: pl.DataFrame
    quarantine: pl.DataFrame  # id, text, label, group, split, rule
    labels: dict[str, int]
    report: dict[str, Any]
    val_oos: pl.DataFrame  # rows of no known intent (`oos_label`, held-out intents): never trained on
    test_oos: pl.DataFrame


def apply_rules(frame: pl.DataFrame, p: CleanParams) -> pl.DataFrame:
    """Normalize text and name the first row-level rule each row breaks (null `rule` when none)."""
    norm = normalize(pl.col("text"), p.lowercase)
    frame = frame.with_columns(pl.col("text").alias("raw_text"), norm.alias("text"))
    label = pl.col("label")
    rule = (
        pl.when(pl.col("raw_text").is_null())
        .then(pl.lit("null_text"))
        .when(label.is_null())
        .then(pl.lit("null_label"))
        .when(pl.col("text").str.len_chars() == 0)
        .then(pl.lit("empty_text"))
        .when(
            (label.str.strip_chars().str.len_chars() == 0)
            | (label.str.len_chars() > p.max_label_chars)
            | label.str.contains(CONTROL)
            | label.str.contains("\ufffd", literal=True)
        )
        .then(pl.lit("bad_label"))
        .when(pl.col("raw_text").str.contains("\ufffd", literal=True))
        .then(pl.lit("invalid_utf8"))
        # NUL or ESC: binary or terminal output (`\x1b[0m`), not typed text; other controls become spaces
        .when(pl.col("raw_text").str.contains(r"[\x00\x1b]"))
        .then(pl.lit("control_chars"))
        .when(pl.col("text").str.len_chars() > p.max_chars)
        .then(pl.lit("too_long"))
        .when(pl.col("text").str.contains(MARKUP))
        .then(pl.lit("markup"))
        .when(~pl.col("text").str.contains(r"\p{L}"))
        .then(pl.lit("no_letters"))
        .otherwise(pl.lit(None, pl.String))
    )
    frame = frame.with_columns(rule.alias("rule"), dedup_key(pl.col("text")).alias("key"))
    return frame.with_columns(conflict_rule(frame).alias("rule"))


def conflict_rule(frame: pl.DataFrame) -> pl.Series:
    """The same text under different labels: no model can get both right, so one label is kept and the rows
    with the others are quarantined as conflicting_labels. The label is, in this order: the one the text's words
    point to in the rest of the data (a naive Bayes vote, by a clear margin); the one most distinct spellings of
    the text carry (exact copies add no vote: a pasted row repeated is still one claim); the label of the
    earliest row (datasets grow by appending, so the first label a text got is the original)."""
    ok = frame.filter(pl.col("rule").is_null())
    groups = ok.group_by("key").agg(pl.col("label").unique().alias("labels")).filter(pl.col("labels").list.len() > 1)
    if groups.height == 0:
        return frame["rule"]
    conflicted = set(groups["key"].to_list())
    words = WordVotes(ok.filter(~pl.col("key").is_in(list(conflicted))))
    losers: set[tuple[str, str]] = set()
    for key, rows in ok.filter(pl.col("key").is_in(list(conflicted))).sort("id").group_by("key", maintain_order=True):
        spellings = Counter(label for label, _ in set(zip(rows["label"], rows["raw_text"], strict=True)))
        ranked = spellings.most_common()
        winner = words.decide(key[0], [label for label, _ in ranked])
        if winner is None:
            winner = ranked[0][0] if ranked[0][1] > ranked[1][1] else rows["label"][0]
        losers.update((key[0], label) for label in spellings if label != winner)
    lost = pl.struct("key", "label").map_elements(
        lambda r: (r["key"], r["label"]) in losers, return_dtype=pl.Boolean, skip_nulls=False
    )
    return frame.select(
        pl.when(pl.col("rule").is_null() & pl.col("key").is_in(list(conflicted)) & lost)
        .then(pl.lit("conflicting_labels"))
        .otherwise(pl.col("rule"))
    ).to_series()


class WordVotes:
    """Which label a text's words point to in the other rows: naive Bayes with add-one smoothing."""

    MARGIN = math.log(4)  # the winner must be 4x as likely as the runner-up

    def __init__(self, rows: pl.DataFrame) -> None:
        self.by_label: dict[str, Counter[str]] = defaultdict(Counter)
        for text, label in rows.select("key", "label").iter_rows():
            self.by_label[label].update(WORD.findall(text))
        self.vocab = len({w for c in self.by_label.values() for w in c}) + 1
        self.rows = Counter(rows["label"].to_list())

    def decide(self, text: str, labels: list[str]) -> str | None:
        words = WORD.findall(text)
        scores = []
        for label in labels:
            counts, total = self.by_label.get(label, Counter()), sum(self.by_label.get(label, Counter()).values())
            prior = math.log(self.rows.get(label, 0) + 1)
            scores.append((prior + sum(math.log((counts[w] + 1) / (total + self.vocab)) for w in words), label))
        scores.sort(reverse=True)
        return scores[0][1] if scores[0][0] - scores[1][0] >= self.MARGIN else None


def rare_labels(train: pl.DataFrame, p: CleanParams) -> set[str]:
    """Labels whose distinct clean training texts cannot leave `min_per_label` rows after the validation split:
    too few to learn or to check; their rows are quarantined (rare_label) rather than failing the stage."""
    counts = train.filter(pl.col("rule").is_null()).group_by("label").agg(pl.col("key").n_unique().alias("n"))
    rare = set()
    for label, n in counts.iter_rows():
        held = min(n - 1, max(1, round(n * p.val_size))) if n >= 2 else 0
        if n - held < p.min_per_label:
            rare.add(label)
    return rare


def mark_rare(frame: pl.DataFrame, rare: set[str]) -> pl.DataFrame:
    hit = pl.col("rule").is_null() & pl.col("label").is_in(sorted(rare))
    return frame.with_columns(pl.when(hit).then(pl.lit("rare_label")).otherwise(pl.col("rule")).alias("rule"))


def drop_exact_duplicates(frame: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Keep the first row (by id) of each normalized, case-folded text."""
    kept = frame.sort("id").unique(subset="key", keep="first", maintain_order=True)
    return kept, frame.height - kept.height


def near_duplicates(
    train: pl.DataFrame, test: pl.DataFrame, p: CleanParams
) -> tuple[set[str], set[str], list[list[str]]]:
    """Train ids to drop as near-duplicates of an earlier train row, as near-copies of a test row, and
    the near-duplicate train pairs that carry different labels (reported, kept)."""
    texts = train["key"].to_list() + test["key"].to_list()
    ids = train["id"].to_list() + test["id"].to_list()
    labels = train["label"].to_list() + test["label"].to_list()
    n_train = train.height
    dup, leak, label_conflicts = set(), set(), []
    pairs: set[tuple[int, int]] = set()
    if p.near_dup_threshold < 1.0:
        pairs = {(i, j) for i, j, _ in near_duplicate_pairs(texts, p.near_dup_threshold, p.shingle_size, seed=p.seed)}
    if p.typo_min_chars:
        pairs |= set(typo_pairs(texts, p.typo_min_chars))
    for i, j in sorted(pairs):
        if i < n_train <= j:
            leak.add(ids[i])
        elif j < n_train:
            if labels[i] != labels[j]:
                label_conflicts.append([ids[i], ids[j]])
            else:  # the later row goes, also when the earlier one went too: chains of copies keep their first
                dup.add(ids[j])
    return dup - leak, leak, label_conflicts


REMOVED = ("duplicate", "near_duplicate", "leakage", "near_leakage")  # rows dropped as copies, not as bad


def removed_rows(frame: pl.DataFrame, ids: set[str], split: str, reason: str) -> pl.DataFrame:
    return (
        frame.filter(pl.col("id").is_in(sorted(ids)))
        .with_columns(pl.lit(split).alias("split"), pl.lit(reason).alias("rule"))
        .select("id", pl.col("raw_text").alias("text"), "label", "group", "split", "rule")
    )


def clean(train_in: pl.DataFrame, test_in: pl.DataFrame, p: CleanParams) -> Cleaned:
    """Pure core: cleaned train/val/test, the quarantine (bad rows with the rule they break, and the copies
    removed with why), label ids and per-step counts."""
    train_r, test_r = apply_rules(train_in, p), apply_rules(test_in, p)
    rare = rare_labels(train_r, p)
    train_r, test_r = mark_rare(train_r, rare), mark_rare(test_r, rare)
    bad = pl.concat(
        [
            f.filter(pl.col("rule").is_not_null()).with_columns(pl.lit(s).alias("split"))
            for s, f in (("train", train_r), ("test", test_r))
        ]
    ).select("id", pl.col("raw_text").alias("text"), "label", "group", "split", "rule")
    train, test = train_r.filter(pl.col("rule").is_null()), test_r.filter(pl.col("rule").is_null())
    removed = []
    for split_name, rows in (("train", train), ("test", test)):
        kept, _ = drop_exact_duplicates(rows)
        removed.append(removed_rows(rows, set(rows["id"]) - set(kept["id"]), split_name, "duplicate"))
    train, train_dups = drop_exact_duplicates(train)
    test, test_dups = drop_exact_duplicates(test)
    leaked = train["key"].is_in(test["key"].implode())
    n_leak = int(leaked.sum())
    removed.append(removed_rows(train, set(train.filter(leaked)["id"]), "train", "leakage"))
    train = train.filter(~leaked)
    near_dup, near_leak, label_conflicts = near_duplicates(train, test, p)
    removed += [
        removed_rows(train, near_dup, "train", "near_duplicate"),
        removed_rows(train, near_leak, "train", "near_leakage"),
    ]
    train = train.filter(~pl.col("id").is_in(list(near_dup | near_leak)))
    train, val = split(conform(train), p.val_size, p.seed)
    test = conform(test).sort("id")
    unknown = out_of_scope_labels(train, p)
    unseen = pl.col("label").is_in(sorted(unknown))
    dropped = int(train.filter(unseen).height)
    train, val_oos, test_oos = train.filter(~unseen), val.filter(unseen), test.filter(unseen)
    val, test = val.filter(~unseen), test.filter(~unseen)
    labels = {name: i for i, name in enumerate(sorted(train["label"].unique().to_list()))}
    n_in = train_in.height + test_in.height
    rule_counts = {r: int((bad["rule"] == r).sum()) for r in RULES}
    report = {
        "rows_in": {"train": train_in.height, "test": test_in.height},
        "quarantined": rule_counts,
        "quarantine_fraction": round(bad.height / n_in, 6) if n_in else 0.0,
        "exact_duplicates": {"train": train_dups, "test": test_dups},
        "near_duplicates": len(near_dup),
        "near_duplicate_label_conflicts": len(label_conflicts),
        "near_duplicate_label_conflict_examples": label_conflicts[:10],
        "leakage": {"exact": n_leak, "near": len(near_leak)},
        "rows_out": {"train": train.height, "val": val.height, "test": test.height},
        "labels": len(labels),
        "out_of_scope": {
            "oos_label": p.oos_label,
            "held_out_labels": sorted(unknown - {p.oos_label}),
            "rows": {"train_dropped": dropped, "val": val_oos.height, "test": test_oos.height},
        },
    }
    quarantine = pl.concat([bad, *removed]).sort("split", "id")
    return Cleaned(train.sort("id"), val.sort("id"), test, quarantine, labels, report, val_oos.sort("id"),
                   test_oos.sort("id"))  # fmt: skip


def out_of_scope_labels(train: pl.DataFrame, p: CleanParams) -> set[str]:
    """`clean.oos_label` and a seeded `clean.holdout_labels` share of the other intents: labels no model is
    trained on, whose rows evaluate out-of-scope rejection (Banking77-OOS style when no such label exists)."""
    known = sorted(set(train["label"].to_list()) - {p.oos_label})
    k = round(float(p.holdout_labels) * len(known))
    if k and len(known) - k < 2:
        raise ParamError(f"clean.holdout_labels={p.holdout_labels} leaves {len(known) - k} of {len(known)} labels "
                         "to train on; at least 2 are needed")  # fmt: skip
    held = set(random.Random(p.seed).sample(known, k)) if k else set()
    return held | ({p.oos_label} if p.oos_label is not None else set())


def validate(result: Cleaned, p: CleanParams, docs_dir: Path | None) -> ValidationReport:
    """Row-level contract on each split and dataset-level contract on label counts and the quarantine share."""
    labels = sorted(result.labels)
    counts = result.train.group_by("label").len("train_rows")
    # Labels that lost every training row still need a row here, with zero, so the check sees them.
    all_labels = sorted(set(labels) | set(result.test["label"].to_list()) | set(result.val["label"].to_list()))
    counts = (
        pl.DataFrame({"label": all_labels}, schema={"label": pl.String})
        .join(counts, on="label", how="left")
        .with_columns(pl.col("train_rows").fill_null(0))
        .sort("label")
    )
    summary = pl.DataFrame({"quarantine_fraction": [result.report["quarantine_fraction"]]})
    dataset = dataset_expectations(p.min_per_label, p.max_quarantine_fraction)
    checks = [
        Check(name, frame, split_expectations(labels, p.max_chars))
        for name, frame in (("train", result.train), ("val", result.val), ("test", result.test))
    ]
    checks += [Check("label_counts", counts, dataset["label_counts"]), Check("summary", summary, dataset["summary"])]
    return run_checks(checks, docs_dir)


def failure_message(report: ValidationReport, result: Cleaned, p: CleanParams) -> str:
    parts = []
    for f in report.failures():
        what = f"{f['check']}: {f['expectation']}"
        if f.get("unexpected_count") is not None:
            what += f" ({f['unexpected_count']} of {f.get('element_count', '?')} rows unexpected)"
        if f["check"] == "label_counts":
            few = result.train.group_by("label").len().filter(pl.col("len") < p.min_per_label)["label"].to_list()
            missing = sorted(set(result.test["label"].to_list()) - set(result.labels))
            what += f"; labels under clean.min_per_label={p.min_per_label}: {', '.join(sorted(few) + missing)}"
        if f["check"] == "summary":
            what += (
                f"; quarantine_fraction={result.report['quarantine_fraction']} > "
                f"clean.max_quarantine_fraction={p.max_quarantine_fraction} ({result.report['quarantined']})"
            )
        parts.append(what)
    return "validation failed: " + "; ".join(parts)


@stage_entrypoint("clean")
def main(argv: list[str] | None = None) -> int:
    """`python -m stages.clean --in data/01_ingest --out data/02_clean`: reads params.yaml[clean]."""
    args = stage_args("clean", __doc__, argv, upstream="ingest")
    p = read_params(CleanParams, "clean", args.params)
    out = args.out
    frames = read_frames(args.inp, ("train", "test"), upstream="ingest")
    result = clean(frames["train"], frames["test"], p)
    with outputs() as w:
        # results.json is deterministic; the Data Docs HTML (docs/) carries Great Expectations' run timestamps,
        # so dvc.yaml declares it apart, uncached, as a run record.
        report = validate(result, p, w.directory(out / "validation" / "docs"))
        w.json(out / "validation" / "results.json", {"success": report.success, "results": report.results})
        w.parquet(out / "quarantine.parquet", result.quarantine)
        if report.success:
            w.parquet(out / "train.parquet", result.train)
            w.parquet(out / "val.parquet", result.val)
            w.parquet(out / "test.parquet", result.test)
            w.parquet(out / "val_oos.parquet", result.val_oos)
            w.parquet(out / "test_oos.parquet", result.test_oos)
            w.json(out / "labels.json", result.labels)
            w.json(out / "clean.json", result.report)
    if not report.success:
        # Fail closed: no clean split from an earlier run may stay behind looking current.
        for name in CLEAN_OUTPUTS:
            (out / name).unlink(missing_ok=True)
        raise StageError(f"{failure_message(report, result, p)}; report in {out / 'validation'}")
    r = result.report
    print(
        f"clean: {r['rows_out']['train']} train / {r['rows_out']['val']} val / {r['rows_out']['test']} test rows, "
        f"{r['labels']} labels; quarantined {sum(r['quarantined'].values())}, duplicates "
        f"{r['exact_duplicates']['train'] + r['exact_duplicates']['test']} exact + {r['near_duplicates']} near, "
        f"leakage {r['leakage']['exact']} exact + {r['leakage']['near']} near -> {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
