from __future__ import annotations

import json

import polars as pl
import pytest
import yaml

from stages.clean import CleanParams, clean, main
from stages.runner.errors import ParamError
from tests.conftest import frame

LABELS = ("refund", "cancel", "track")
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"]


def base_rows(per_label: int = 12) -> list[tuple]:
    """Distinct texts, far from each other under word shingles."""
    rows = []
    for li, lab in enumerate(LABELS):
        for i in range(per_label):
            rows.append(
                (f"src-{li:02d}{i:04d}", f"{lab} {WORDS[i % 12]} {WORDS[(i * 5 + li) % 12]} number {li * 100 + i}", lab)
            )
    return rows


TEST = frame([(f"tst-{i:06d}", f"held out {lab} question {i}", lab) for i, lab in enumerate(LABELS * 2)])


def test_normalization_nfkc_controls_whitespace():
    train = frame(base_rows() + [("src-900000", "  Ｒefund\u200b my\tmoney\x07 now  ", "refund")])
    out = clean(train, TEST, CleanParams(val_size=0.1))
    texts = pl.concat([out.train, out.val])["text"].to_list()
    assert "Refund my money now" in texts


def test_quarantine_holds_exactly_the_injected_rows():
    bad = [
        ("src-900001", None, "refund"),
        ("src-900002", "label is missing", None),
        ("src-900003", " \t\u200b ", "cancel"),
        ("src-900004", "x" * 600, "track"),
        ("src-900005", "Same words, two labels", "refund"),
        ("src-900006", "same words,  two labels", "cancel"),
    ]
    out = clean(frame(base_rows() + bad), TEST, CleanParams(max_chars=512, max_quarantine_fraction=0.5))
    q = {r["id"]: r["rule"] for r in out.quarantine.iter_rows(named=True)}
    assert q == {
        "src-900001": "null_text",
        "src-900002": "null_label",
        "src-900003": "empty_text",
        "src-900004": "too_long",
        # one spelling each and no word evidence either way: the earliest row keeps its label
        "src-900006": "conflicting_labels",
    }
    kept = set(out.train["id"]) | set(out.val["id"])
    assert kept.isdisjoint(q) and len(kept) == len(base_rows()) + 1 and "src-900005" in kept
    assert out.report["quarantined"]["conflicting_labels"] == 1


def test_duplicates_near_duplicates_and_leakage_are_removed():
    rows = base_rows() + [
        ("src-910001", "refund alpha bravo number 0", "refund"),
        ("src-910002", "REFUND  alpha bravo number 0", "refund"),  # the row above, once normalized and case-folded
        ("src-910003", "please tell me how I can get a refund for the broken kettle I bought", "refund"),
        ("src-910004", "please tell me how I can get a refund for the broken kettle I bought today", "refund"),
        ("src-910005", "held out refund question 0", "refund"),  # exact copy of a test text
        ("src-910006", "where can I see the delivery status of the parcel I ordered last week from you", "track"),
    ]
    test = pl.concat(
        [
            TEST,
            frame(
                [
                    (
                        "tst-900000",
                        "where can I see the delivery status of the parcel I ordered last week from you please",
                        "track",
                    )
                ]
            ),
        ]
    )
    out = clean(frame(rows), test, CleanParams(near_dup_threshold=0.8))
    kept = set(out.train["id"]) | set(out.val["id"])
    assert "src-910001" in kept and "src-910002" not in kept
    assert "src-910003" in kept and "src-910004" not in kept
    assert "src-910005" not in kept and "src-910006" not in kept
    r = out.report
    assert r["exact_duplicates"]["train"] == 1
    assert r["near_duplicates"] == 1
    assert r["leakage"] == {"exact": 1, "near": 1}


def test_validation_split_is_stratified_and_disjoint():
    out = clean(frame(base_rows(20)), TEST, CleanParams(val_size=0.2, seed=3))
    assert set(out.train["id"]).isdisjoint(set(out.val["id"]))
    assert sorted(out.val.group_by("label").len()["len"].to_list()) == [4, 4, 4]
    assert out.labels == {"cancel": 0, "refund": 1, "track": 2}


def test_an_oos_label_and_held_out_intents_are_never_a_class_and_go_to_the_oos_splits():
    rows = base_rows(20)
    oos = [(f"o{i:02d}", f"oos {WORDS[i % 12]} {WORDS[(i * 7 + 3) % 12]} number {900 + i}", "oos") for i in range(20)]
    test = pl.concat([TEST, frame([("to1", "tell me a joke about cats and dogs", "oos")])])
    out = clean(frame(rows + oos), test, CleanParams(val_size=0.2, seed=3, oos_label="oos"))
    assert "oos" not in out.labels and set(out.train["label"]) == {"cancel", "refund", "track"}
    assert set(out.val_oos["label"]) == {"oos"} and out.test_oos["id"].to_list() == ["to1"]
    assert "oos" not in set(out.val["label"]) | set(out.test["label"])
    r = out.report["out_of_scope"]
    assert r["oos_label"] == "oos" and r["rows"]["test"] == 1 and r["rows"]["val"] == out.val_oos.height > 0
    # a seeded third of the intents held out as unknown: none of their rows is trained on, the same ones each run
    held = [clean(frame(rows), TEST, CleanParams(val_size=0.2, seed=3, holdout_labels=0.34)) for _ in range(2)]
    assert held[0].report["out_of_scope"]["held_out_labels"] == held[1].report["out_of_scope"]["held_out_labels"]
    (name,) = held[0].report["out_of_scope"]["held_out_labels"]
    assert name not in held[0].labels and len(held[0].labels) == 2
    assert (
        set(held[0].test_oos["label"]) == {name}
        and held[0].test_oos.height == TEST.filter(pl.col("label") == name).height
    )
    with pytest.raises(ParamError, match="holdout_labels"):
        clean(frame(rows), TEST, CleanParams(holdout_labels=0.9))


def run_main(tmp_path, train, test, **params):
    inp = tmp_path / "in"
    inp.mkdir(exist_ok=True)
    train.write_parquet(inp / "train.parquet")
    test.write_parquet(inp / "test.parquet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"clean": params}))
    out = tmp_path / "out"
    return main(["--params", str(tmp_path / "params.yaml"), "--in", str(inp), "--out", str(out)]), out


def test_main_writes_all_outputs_and_same_bytes_twice(tmp_path):
    code, out = run_main(tmp_path, frame(base_rows()), TEST)
    assert code == 0
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert set(first) == {
        "train.parquet",
        "val.parquet",
        "test.parquet",
        "val_oos.parquet",
        "test_oos.parquet",
        "labels.json",
        "clean.json",
        "quarantine.parquet",
    }
    results = json.loads((out / "validation" / "results.json").read_text())
    assert results["success"] and len(results["results"]) >= 10
    assert (out / "validation" / "docs" / "index.html").is_file()
    code, out = run_main(tmp_path, frame(base_rows()), TEST)
    assert code == 0
    assert first == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def test_labels_too_rare_are_quarantined_and_too_many_fail_closed(tmp_path, capsys):
    code, out = run_main(tmp_path, frame(base_rows()), TEST)  # an earlier good run leaves outputs
    assert code == 0
    code, out = run_main(tmp_path, frame(base_rows()), TEST, min_per_label=50)
    assert code == 1
    err = capsys.readouterr().err
    assert "'rare_label': 42" in err and "clean.max_quarantine_fraction=0.05" in err
    q = pl.read_parquet(out / "quarantine.parquet")
    assert set(q["rule"]) == {"rare_label"}
    assert not (out / "train.parquet").exists() and not (out / "clean.json").exists()
    results = json.loads((out / "validation" / "results.json").read_text())
    assert results["success"] is False


def test_too_many_quarantined_rows_fails_naming_the_fraction(tmp_path, capsys):
    bad = [(f"src-95{i:04d}", None, "refund") for i in range(10)]
    code, out = run_main(tmp_path, frame(base_rows() + bad), TEST, max_quarantine_fraction=0.05)
    assert code == 1
    err = capsys.readouterr().err
    assert "summary: expect_column_values_to_be_between" in err and "clean.max_quarantine_fraction=0.05" in err
    q = pl.read_parquet(out / "quarantine.parquet")
    assert q.height == 10 and set(q["rule"]) == {"null_text"}
    assert not (out / "train.parquet").exists()


def test_bad_param_is_named():
    with pytest.raises(ValueError, match="clean.near_dup_threshold"):
        CleanParams(near_dup_threshold=0)
