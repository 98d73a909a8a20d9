"""The whole pipeline on a dataset of a user's own making: small, odd-sized, uneven, other column names.

The demo's splits happen to be multiples of the batch sizes; a user's data is not. This dataset has 7
intents with 61 to 11 rows each (225 in all), `utterance`/`intent` columns, and the test set split off the
same file, so the validation split (and the calibration set drawn from it) is a multiple of no batch size.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_project, dvc, pending

INTENTS = {  # intent: (rows, phrasings, things)
    "check_balance": (61, ["how much is in my {}", "what is the balance of my {}", "show the money left in my {}"],
                      ["savings", "checking account", "joint account", "travel wallet", "business account"]),
    "card_lost": (47, ["i lost my {}", "my {} was stolen", "cannot find my {} anywhere"],
                  ["debit card", "credit card", "bank card", "virtual card", "metal card"]),
    "transfer_money": (37, ["send {} to my sister", "move {} to savings", "transfer {} abroad today"],
                       ["fifty euros", "100 dollars", "my rent", "twenty pounds", "the deposit"]),
    "open_account": (29, ["i want to open a {}", "how do i start a {}", "sign me up for a {}"],
                     ["savings account", "student account", "business account", "joint account"]),
    "exchange_rate": (23, ["what is the rate for {}", "how many {} do i get", "convert to {} please"],
                      ["yen", "swiss francs", "us dollars", "pesos", "kroner"]),
    "close_account": (17, ["please close my {}", "i want to shut down my {}", "cancel the {} for good"],
                      ["old account", "savings", "kids account", "second account"]),
    "speak_to_human": (11, ["let me talk to {}", "connect me with {}", "i need {} now"],
                       ["a person", "an agent", "someone real", "customer service"]),
}  # fmt: skip


def write_dataset(path: Path) -> int:
    rng, rows = random.Random(7), []
    for intent, (count, phrasings, things) in INTENTS.items():
        made = [p.format(t) for p in phrasings for t in things]
        extras = ["", " please", " asap", " thanks", " right now", " today", " again", " for me"]
        made = sorted({f"{m}{e}" for m in made for e in extras})
        rows += [(text, intent) for text in rng.sample(made, count)]
    rng.shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["utterance", "intent"])
        writer.writerows(rows)
    return len(rows)


@pytest.mark.slow
def test_the_pipeline_runs_end_to_end_on_small_odd_sized_data_of_seven_uneven_labels(tmp_path):
    root = copy_project(tmp_path / "project", quick_benchmark=True)
    assert write_dataset(root / "data/own/intents.csv") == 225
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"].update(source="data/own/intents.csv", test_source="data/own/intents.csv",
                            text_column="utterance", label_column="intent")  # fmt: skip
    params["distill"]["optim"].update(epochs=2)
    params["train"]["optim"].update(epochs=2)
    params["prune"]["optim"].update(epochs=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run = dvc(root, "repro")
    assert "Running stage 'publish'" in run.stdout and pending(root) == {}
    clean = json.loads((root / "data/02_clean/clean.json").read_text())
    assert clean["labels"] == 7
    val = clean["rows_out"]["val"]
    assert all(val % b for b in (16, 32, 64)), f"validation split of {val} rows is a multiple of a batch size"
    quantize = json.loads((root / "data/07_quantize/metrics.json").read_text())
    assert {"dynamic", "static"} <= set(quantize["frontier"])  # static calibration ran on the odd-sized split
    receipt = json.loads((root / "data/10_publish/receipt.json").read_text())
    card = (root / receipt["path"] / "model_card.md").read_text()
    assert "A text classifier for 7 intents" in card and "speak_to_human" in card
