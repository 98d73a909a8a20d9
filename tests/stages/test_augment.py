from __future__ import annotations

import json

import polars as pl
import pytest
import yaml

from stages.augment import AugmentParams, augment, main, targets
from stages.runner.errors import StageError
from tests.conftest import frame

SYN = {"money": ["funds", "cash"], "quickly": ["rapidly", "swiftly"], "broken": ["shattered"], "phone": ["telephone"]}

TRAIN = frame(
    [
        (f"src-{i:06d}", text, lab)
        for i, (text, lab) in enumerate(
            [
                ("I want my money back quickly", "refund"),
                ("Send the money to my account quickly", "refund"),
                ("My phone arrived broken", "damaged"),
                ("The Acme phone screen is broken", "damaged"),
                ("Where is my Acme parcel today", "track"),
                ("Track the parcel for order 12345", "track"),
                ("Has my phone parcel shipped", "track"),
            ],
            start=1,
        )
    ]
)
VAL = frame([("src-000100", "the phone is broken", "damaged")])
TEST = frame([("tst-000001", "quickly back I want my money", "refund")])


def run(p: AugmentParams, train=TRAIN, val=VAL, test=TEST, paraphrases=None):
    return augment(train, val, test, p, SYN, paraphrases)


def test_provenance_columns_and_only_train_rows_are_augmented():
    out, report = run(AugmentParams(per_row=2))
    assert out.columns == ["id", "text", "label", "group", "origin_id", "op"]
    originals = out.filter(pl.col("op") == "original")
    assert originals["id"].to_list() == originals["origin_id"].to_list() == sorted(TRAIN["id"].to_list())
    new = out.filter(pl.col("op") != "original")
    assert new.height == report["rows"]["new"] > 0
    assert set(new["origin_id"]) <= set(TRAIN["id"])  # val and test rows are never a source
    assert set(new["op"]) <= {"synonym", "swap", "delete", "insert"}
    origin_label = dict(zip(TRAIN["id"], TRAIN["label"], strict=True))
    assert all(origin_label[o] == lab for o, lab in zip(new["origin_id"], new["label"], strict=True))
    assert (new.group_by("origin_id").len()["len"] <= 2).all()
    assert new["id"].str.contains(r"\+a[12]$").all()


def test_no_new_row_repeats_a_test_val_or_train_text():
    # Swapping only: "I want my money back quickly" can become the test text; it must be dropped.
    p = AugmentParams(ops={"swap": 1.0, "synonym": 0, "delete": 0, "insert": 0}, per_row=3, swap_rate=0.5)
    out, report = run(p)
    keys = [" ".join(t.lower().split()) for t in out["text"]]
    assert len(keys) == len(set(keys))
    assert "quickly back i want my money" not in keys
    assert "the phone is broken" not in keys
    total_dropped = sum(report["dropped"].values())
    assert total_dropped == sum(report["dropped"][r] for r in ("no_change", "duplicate", "equals_val_or_test"))


def test_leak_of_a_test_text_is_counted():
    train = frame([("src-000001", "alpha beta", "x"), ("src-000002", "gamma delta", "x")])
    test = frame([("tst-000001", "beta alpha", "x"), ("tst-000002", "delta gamma", "x")])
    p = AugmentParams(ops={"swap": 1.0, "synonym": 0, "delete": 0, "insert": 0}, per_row=1)
    out, report = augment(train, frame([]), test, p, {})
    assert out.height == 2  # the only possible edit of each row is a test text
    assert report["dropped"]["equals_val_or_test"] == 2 * 3


def test_same_input_same_output():
    a, ra = run(AugmentParams(per_row=2, seed=7))
    b, rb = run(AugmentParams(per_row=2, seed=7))
    assert a.equals(b) and ra == rb
    c, _ = run(AugmentParams(per_row=2, seed=8))
    assert not a.equals(c)


def test_balancing_reaches_its_target():
    counts = {"refund": 2, "damaged": 2, "track": 3}
    assert targets(counts, AugmentParams(balance_to="max", per_row=5)) == {"refund": 3, "damaged": 3, "track": 3}
    assert targets(counts, AugmentParams(balance_to=6, per_row=1)) == {"refund": 4, "damaged": 4, "track": 6}
    out, report = run(AugmentParams(balance_to="max", per_row=3))
    assert out.group_by("label").len().sort("label")["len"].to_list() == [3, 3, 3]
    assert report["balance_targets_missed"] == []
    assert out.filter(pl.col("label") == "track", pl.col("op") != "original").height == 0


def test_protected_tokens_stop_words_and_numbers_untouched():
    p = AugmentParams(per_row=3, protected=("Acme",), synonym_rate=1.0, delete_rate=0.9, swap_rate=1.0)
    out, _ = run(p)
    for row in out.filter(pl.col("op") != "original").iter_rows(named=True):
        origin = TRAIN.filter(pl.col("id") == row["origin_id"])["text"][0]
        if "Acme" in origin.split():
            assert row["text"].split().count("Acme") == 1, row
            if row["op"] != "insert":  # protected words keep their place except where a word is inserted
                assert row["text"].split().index("Acme") == origin.split().index("Acme") or row["op"] == "delete"
        if "12345" in origin:
            assert "12345" in row["text"]
        assert "the" in row["text"].split() or "the" not in origin.split() or row["op"] == "delete"


def test_synonyms_replace_content_words_only():
    p = AugmentParams(ops={"synonym": 1.0, "swap": 0, "delete": 0, "insert": 0}, synonym_rate=1.0, per_row=1)
    out, _ = run(p)
    new = dict(
        zip(
            out.filter(pl.col("op") == "synonym")["origin_id"],
            out.filter(pl.col("op") == "synonym")["text"],
            strict=True,
        )
    )
    assert new["src-000001"] in {f"I want my {m} back {q}" for m in ("funds", "cash") for q in ("rapidly", "swiftly")}


def test_back_translation_on_without_model_is_a_clear_error(tmp_path, capsys):
    p = AugmentParams(ops={"back_translation": 1.0})
    with pytest.raises(StageError, match="no back-translations"):
        run(p)
    inp = tmp_path / "in"
    inp.mkdir()
    for name, f in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        f.write_parquet(inp / f"{name}.parquet")
    missing = str(tmp_path / "no-such-marian-model")
    params = {
        "augment": {
            "ops": {"back_translation": 1.0, "synonym": 0, "swap": 0, "delete": 0, "insert": 0},
            "back_translation": {"forward": missing, "backward": missing},
        }
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code = main(["--params", str(tmp_path / "params.yaml"), "--in", str(inp), "--out", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err
    assert "augment.back_translation.forward: cannot load" in err and "no-such-marian-model" in err
    assert not (tmp_path / "out").exists()


def test_bad_params_are_named():
    with pytest.raises(ValueError, match="augment.ops: unknown operation"):
        AugmentParams(ops={"paraphrase": 1.0})
    with pytest.raises(ValueError, match="augment.balance_to"):
        AugmentParams(balance_to="mean")
    with pytest.raises(ValueError, match="augment.synonyms.min_similarity"):
        AugmentParams(synonyms={"min_similarity": 2})


def test_main_same_bytes_twice_and_report(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for name, f in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        f.write_parquet(inp / f"{name}.parquet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"augment": {"per_row": 2}}))
    outs = []
    for out in ("o1", "o2"):
        assert main(["--params", str(tmp_path / "params.yaml"), "--in", str(inp), "--out", str(tmp_path / out)]) == 0
        outs.append({n: (tmp_path / out / n).read_bytes() for n in ("train.parquet", "augment.json")})
    assert outs[0] == outs[1]
    report = json.loads(outs[0]["augment.json"])
    assert report["back_translation"].startswith("off")
    assert report["rows"]["original"] == TRAIN.height
