"""Bad rows of every kind through ingest and clean; no code path that can unpickle an artifact (quick: no DVC)."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT
from tests.faults import inject

pytestmark = pytest.mark.faults
DEMO = ROOT / "data" / "sample"


def test_a_thousand_bad_rows_of_every_kind_are_quarantined_with_a_reason_and_no_good_row_is_lost(tmp_path):
    row, result, by_kind = inject.sweep_rows(DEMO / "train.csv", DEMO / "test.csv", 1000, tmp_path)
    assert len(by_kind) == len(inject.KINDS) >= 10
    assert row.detected == row.injections == 1000, row.notes
    assert row.lost_rows == 0
    reasons = set(result.quarantine["rule"])
    assert {"invalid_utf8", "control_chars", "markup", "no_letters", "bad_label", "rare_label"} <= reasons
    assert {"conflicting_labels", "duplicate", "near_duplicate", "leakage"} <= reasons


def test_over_the_quarantine_limit_clean_fails_closed(tmp_path):
    assert inject.fails_closed(DEMO / "train.csv", DEMO / "test.csv", tmp_path)


def test_no_code_path_can_unpickle_an_artifact():
    assert inject.unpickling_calls() == []
