"""Stage `ingest`: read the configured source (path or URL; CSV, Parquet, JSONL) into the fixed schema.

Writes `train.parquet`, `test.parquet` (columns id, text, label, group) and `ingest.json` (sources with
their SHA-256, row and label counts). Without a separate test source it makes a stratified split, or a
split by group when `ingest.group_column` is set, so no group crosses train and test.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import polars as pl

from stages.data.dataset import conform, split
from stages.runner.cli import stage_args, stage_entrypoint
from stages.runner.errors import ParamError, StageError
from stages.runner.params import read_params
from stages.storage.atomic import outputs
from stages.storage.hashing import sha256_bytes

FORMATS = ("auto", "csv", "parquet", "jsonl")
EXTENSIONS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True)
class IngestParams:
    source: str  # path or URL of the training data (the demo data by default)
    # Path or URL of a separate test file. Empty, null or equal to `source` means "split test off source";
    # dvc.yaml lists it as a dependency, so with DVC repeat the source path rather than leaving it empty.
    test_source: str | None = None
    format: str = "auto"  # auto picks by file extension
    text_column: str = "text"
    label_column: str = "label"
    group_column: str | None = None  # rows sharing a group (a document, a user) stay on one side
    test_size: float = 0.2  # share of rows held out when splitting
    seed: int = 0
    # Bytes that are not UTF-8 (CSV, JSONL): `quarantine` replaces them with U+FFFD and clean quarantines those
    # rows (rule invalid_utf8), so one bad row cannot sink a dataset; `error` refuses the file, naming the line.
    invalid_utf8: str = "quarantine"

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ParamError("ingest.source must be a path or URL, got nothing")
        if self.format not in FORMATS:
            raise ParamError(f"ingest.format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 0.0 < float(self.test_size) < 1.0:
            raise ParamError(f"ingest.test_size must be in (0, 1), got {self.test_size}")
        if self.invalid_utf8 not in ("quarantine", "error"):
            raise ParamError(f"ingest.invalid_utf8 must be quarantine or error, got {self.invalid_utf8!r}")
        for key in ("text_column", "label_column"):
            if not getattr(self, key):
                raise ParamError(f"ingest.{key} must name a column")

    @property
    def separate_test(self) -> bool:
        return bool(self.test_source) and self.test_source != self.source


@dataclass(frozen=True)
class Loaded:
    """One source file read into a frame, with what the report says about it."""

    uri: str
    format: str
    sha256: str
    size_bytes: int
    frame: pl.DataFrame


def detect_format(uri: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = Path(uri.split("?", 1)[0]).suffix.lower()
    if suffix not in EXTENSIONS:
        raise StageError(
            f"{uri}: unknown format {suffix or '(no extension)'!r}; set ingest.format to csv, parquet or jsonl"
        )
    return EXTENSIONS[suffix]


def decode_utf8(uri: str, data: bytes, invalid: str = "error") -> bytes:
    """Check the bytes are UTF-8 and drop a byte-order mark. A byte that is not: with `invalid="error"` an error
    naming its offset and line; with `"quarantine"` it becomes U+FFFD (clean quarantines the row), and the
    lines are named on stderr."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        where = f"{uri}: not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line})"
        if invalid == "error":
            raise StageError(where) from exc
        bad = [n for n, raw in enumerate(data.split(b"\n"), start=1) if not _is_utf8(raw)]
        lines = ", ".join(map(str, bad[:10]))
        print(f"ingest: {where}; {len(bad)} line(s) hold bytes that are not UTF-8 (lines {lines}"
              f"{' ...' if len(bad) > 10 else ''}): they read as U+FFFD and clean quarantines those rows "
              "(ingest.invalid_utf8: error refuses the file instead)", file=sys.stderr)  # fmt: skip
        data = data.decode("utf-8", errors="replace").encode("utf-8")
    return data.removeprefix(b"\xef\xbb\xbf")


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def parse(uri: str, data: bytes, fmt: str, invalid_utf8: str = "error") -> pl.DataFrame:
    """Parse bytes of a known format into a frame of strings (no type guessing of the text)."""
    try:
        if fmt == "csv":
            frame = pl.read_csv(io.BytesIO(decode_utf8(uri, data, invalid_utf8)), infer_schema=False)
        elif fmt == "jsonl":
            frame = pl.read_ndjson(io.BytesIO(decode_utf8(uri, data, invalid_utf8)))
        else:
            frame = pl.read_parquet(io.BytesIO(data))
    except (pl.exceptions.PolarsError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(f"{uri}: cannot read as {fmt}: {first}") from exc
    return frame


def read_source(uri: str, fmt: str, invalid_utf8: str = "error") -> Loaded:
    """Read a local path or URL through fsspec. The only I/O of this stage's inputs."""
    fmt = detect_format(uri, fmt)
    try:
        with fsspec.open(uri, "rb") as fh:
            data = fh.read()
    except FileNotFoundError as exc:
        raise StageError(f"{uri}: file not found") from exc
    except (OSError, ValueError) as exc:
        raise StageError(f"{uri}: cannot open: {exc}") from exc
    return Loaded(uri, fmt, sha256_bytes(data), len(data), parse(uri, data, fmt, invalid_utf8))


def to_schema(src: Loaded, tag: str, p: IngestParams) -> pl.DataFrame:
    """Map the configured columns to (id, text, label, group). Ids name the file and 1-based data row."""
    wanted = {"ingest.text_column": p.text_column, "ingest.label_column": p.label_column}
    if p.group_column:
        wanted["ingest.group_column"] = p.group_column
    for key, col in wanted.items():
        if col not in src.frame.columns:
            found = ", ".join(src.frame.columns) or "(none)"
            raise StageError(f"{src.uri}: missing column {col!r} ({key}); columns found: {found}")
    if src.frame.height == 0:
        raise StageError(f"{src.uri}: no data rows")
    ids = pl.Series("id", [f"{tag}-{i:06d}" for i in range(1, src.frame.height + 1)])
    frame = src.frame.select(
        pl.col(p.text_column).cast(pl.String).alias("text"),
        pl.col(p.label_column).cast(pl.String).alias("label"),
        (pl.col(p.group_column).cast(pl.String) if p.group_column else pl.lit(None, pl.String)).alias("group"),
    ).with_columns(ids)
    # A row without a group is its own group.
    frame = frame.with_columns(pl.coalesce(pl.col("group"), pl.col("id")).alias("group"))
    return conform(frame)


def label_counts(frame: pl.DataFrame) -> dict[str, int]:
    counts = frame.filter(pl.col("label").is_not_null()).group_by("label").len()
    return {row["label"]: row["len"] for row in counts.sort("label").iter_rows(named=True)}


def ingest(source: Loaded, test: Loaded | None, p: IngestParams) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """Pure core: schema-mapped train and test frames plus the report for `ingest.json`."""
    train = to_schema(source, "src", p)
    if test is not None:
        test_frame = to_schema(test, "tst", p)
        how = "files"
    else:
        train, test_frame = split(train, p.test_size, p.seed)
        how = "by_group" if p.group_column else "stratified"
        if test_frame.height == 0:
            raise StageError(f"{source.uri}: too few rows to split off a test set (ingest.test_size={p.test_size})")
    counts = {"train": label_counts(train), "test": label_counts(test_frame)}
    unseen = sorted(set(counts["test"]) - set(counts["train"]))
    if unseen:
        where = test.uri if test is not None else f"{source.uri} (test split)"
        raise StageError(f"{where}: label(s) in test but not in train: {', '.join(unseen)}")
    sources = [source] + ([test] if test is not None else [])
    report = {
        "sources": [
            {
                "role": role,
                "uri": s.uri,
                "format": s.format,
                "sha256": s.sha256,
                "bytes": s.size_bytes,
                "rows": s.frame.height,
            }
            for role, s in zip(("source", "test_source"), sources, strict=False)
        ],
        "split": how,
        "rows": {"train": train.height, "test": test_frame.height},
        "labels": counts,
    }
    return train.sort("id"), test_frame.sort("id"), report


@stage_entrypoint("ingest")
def main(argv: list[str] | None = None) -> int:
    """`python -m stages.ingest --out data/01_ingest`: reads params.yaml[ingest], writes the outputs atomically."""
    args = stage_args("ingest", __doc__, argv, upstream=None)
    p = read_params(IngestParams, "ingest", args.params)
    source = read_source(p.source, p.format, p.invalid_utf8)
    test = read_source(p.test_source, p.format, p.invalid_utf8) if p.separate_test else None
    train, test_frame, report = ingest(source, test, p)
    out = args.out
    with outputs() as w:
        w.parquet(out / "train.parquet", train)
        w.parquet(out / "test.parquet", test_frame)
        w.json(out / "ingest.json", report)
    print(
        f"ingest: {report['rows']['train']} train / {report['rows']['test']} test rows, "
        f"{len(report['labels']['train'])} labels ({report['split']}) -> {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
