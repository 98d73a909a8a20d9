from __future__ import annotations

import json

import polars as pl
import pytest

from stages.ingest import IngestParams, Loaded, ingest, main, parse, read_source
from stages.runner.errors import StageError


def csv_bytes(rows: list[tuple[str, str]], header: str = "text,label") -> bytes:
    return (header + "\n" + "\n".join(f"{t},{lab}" for t, lab in rows) + "\n").encode()


def loaded(data: bytes, uri: str = "mem.csv", fmt: str = "csv") -> Loaded:
    return Loaded(uri, fmt, "0" * 64, len(data), parse(uri, data, fmt))


ROWS = [(f"text {lab} {i}", lab) for lab in ("a", "b", "c") for i in range(10)]


def test_stratified_split_keeps_every_label_on_both_sides():
    train, test, report = ingest(loaded(csv_bytes(ROWS)), None, IngestParams(source="mem.csv", test_size=0.2))
    assert train.columns == ["id", "text", "label", "group"]
    assert report["split"] == "stratified"
    assert report["labels"]["test"] == {"a": 2, "b": 2, "c": 2}
    assert report["labels"]["train"] == {"a": 8, "b": 8, "c": 8}
    assert set(train["id"]).isdisjoint(set(test["id"]))
    assert train["id"][0] == "src-000001"


def test_group_split_never_splits_a_group():
    rows = [(f"t{i}", "ab"[i % 2], f"doc{i // 3}") for i in range(30)]
    data = ("text,label,doc\n" + "\n".join(",".join(r) for r in rows) + "\n").encode()
    p = IngestParams(source="mem.csv", group_column="doc", test_size=0.3, seed=1)
    train, test, report = ingest(loaded(data), None, p)
    assert report["split"] == "by_group"
    assert set(train["group"]).isdisjoint(set(test["group"]))
    assert test.height > 0 and train.height > 0


def test_separate_test_file_and_ids_name_the_file():
    train, test, report = ingest(
        loaded(csv_bytes(ROWS)),
        loaded(csv_bytes(ROWS[:3]), "t.csv"),
        IngestParams(source="mem.csv", test_source="t.csv"),
    )
    assert report["split"] == "files"
    assert (train.height, test.height) == (30, 3)
    assert test["id"].to_list() == ["tst-000001", "tst-000002", "tst-000003"]


def test_label_in_test_but_not_in_train_is_named():
    with pytest.raises(StageError, match=r"t\.csv: label\(s\) in test but not in train: zzz"):
        ingest(
            loaded(csv_bytes(ROWS)),
            loaded(csv_bytes([("x", "zzz")]), "t.csv"),
            IngestParams(source="mem.csv", test_source="t.csv"),
        )


def test_missing_column_lists_the_columns_found():
    with pytest.raises(
        StageError, match=r"missing column 'label' \(ingest.label_column\); columns found: text, intent"
    ):
        ingest(loaded(csv_bytes(ROWS, header="text,intent")), None, IngestParams(source="mem.csv"))


def test_empty_data_is_an_error():
    with pytest.raises(StageError, match="mem.csv: no data rows"):
        ingest(loaded(b"text,label\n"), None, IngestParams(source="mem.csv"))


def test_non_utf8_names_offset_and_line():
    data = b"text,label\nfine,a\ncaf\xe9,b\n"
    with pytest.raises(StageError, match=r"bad.csv: not UTF-8: byte 0xe9 at offset 21 \(line 3\)"):
        parse("bad.csv", data, "csv")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(StageError, match="nope.csv: file not found"):
        read_source(str(tmp_path / "nope.csv"), "auto")
    (tmp_path / "data.xlsx").write_bytes(b"x")
    with pytest.raises(StageError, match="unknown format '.xlsx'; set ingest.format"):
        read_source(str(tmp_path / "data.xlsx"), "auto")


def test_bad_param_is_named():
    with pytest.raises(ValueError, match="ingest.test_size"):
        IngestParams(source="x.csv", test_size=1.5)
    with pytest.raises(ValueError, match="ingest.format"):
        IngestParams(source="x.csv", format="xml")


def test_jsonl_parquet_and_fsspec_urls(tmp_path):
    import fsspec

    frame = pl.DataFrame({"text": ["a", "b"], "label": ["x", "y"]})
    frame.write_parquet(tmp_path / "d.parquet")
    assert read_source(str(tmp_path / "d.parquet"), "auto").frame.height == 2
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 2}\n')
    got = read_source(str(tmp_path / "d.jsonl"), "auto")
    assert got.format == "jsonl" and got.frame.height == 2
    # A URL goes through fsspec like a path does; memory:// needs no network.
    with fsspec.open("memory://bucket/train.csv", "wb") as fh:
        fh.write(csv_bytes(ROWS))
    assert read_source("memory://bucket/train.csv", "auto").frame.height == 30


def write_params(path, **ingest_params):
    import yaml

    path.write_text(yaml.safe_dump({"ingest": ingest_params}))


def test_main_writes_outputs_atomically_and_deterministically(tmp_path, capsys):
    (tmp_path / "src.csv").write_bytes(csv_bytes(ROWS))
    write_params(tmp_path / "params.yaml", source=str(tmp_path / "src.csv"), test_source=str(tmp_path / "src.csv"))
    for out in ("o1", "o2"):
        assert main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / out)]) == 0
    for name in ("train.parquet", "test.parquet", "ingest.json"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes()
    report = json.loads((tmp_path / "o1" / "ingest.json").read_text())
    assert report["sources"][0]["sha256"] == __import__("hashlib").sha256(csv_bytes(ROWS)).hexdigest()
    assert not [p for p in (tmp_path / "o1").iterdir() if p.name.endswith(".tmp")]


def test_main_error_is_one_line_and_writes_nothing(tmp_path, capsys):
    write_params(tmp_path / "params.yaml", source=str(tmp_path / "missing.csv"))
    assert main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ingest: error:") and "missing.csv: file not found" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_main_names_unknown_param(tmp_path, capsys):
    write_params(tmp_path / "params.yaml", source="x.csv", sorce="y.csv")
    assert main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out")]) == 1
    assert "unknown key(s) in 'ingest': sorce" in capsys.readouterr().err
