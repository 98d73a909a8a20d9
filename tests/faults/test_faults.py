"""The quick subset of the fault sweep (`bench/faults.py` runs the full one): on one copy of the project run
through publish, kill -9 inside stages, damage the registry and the DVC cache, edit params mid-stage, race two
runs and two publishes, fill the disk, craft names; every one detected or survived, nothing corrupted."""

from __future__ import annotations

import pytest

from tests.faults import inject

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "project"
    seconds = inject.prepare(root)
    return root, seconds


def assert_clean(row: inject.Row) -> None:
    assert row.injections > 0
    assert (row.detected, row.corrupted) == (row.injections, 0), f"{row.kind}: {row.notes}"
    if row.recovered is not None:
        assert row.recovered == row.injections, f"{row.kind}: not recovered: {row.notes}"


def test_kill_9_inside_stages_leaves_nothing_partial_and_one_rerun_recovers(demo):
    root, seconds = demo
    assert_clean(inject.sweep_kills(root, seconds, {"ingest": 2, "clean": 2, "train": 1, "publish": 2}, seed=1))


def test_damaged_versions_index_and_cache_fail_verify(demo):
    root, _ = demo
    row = inject.sweep_damage(root)
    assert row.injections >= 70
    assert_clean(row)


def test_a_damaged_cache_object_checked_out_is_refused_by_the_stage_that_reads_it(demo):
    assert_clean(inject.sweep_checkout(demo[0]))


def test_params_edited_while_a_stage_runs_are_never_recorded(demo):
    root, seconds = demo
    assert_clean(inject.sweep_params(root, seconds, [("clean", "clean.val_size", 0.15)]))


def test_two_runs_and_two_publishes_at_once(demo):
    for row in inject.sweep_concurrency(demo[0], flows=True):
        assert_clean(row)


def test_full_disk_unwritable_output_and_missing_input_are_named(demo):
    assert_clean(inject.sweep_resources(demo[0]))


def test_crafted_names_and_planted_symlinks_write_nothing_outside_the_registry(demo):
    assert_clean(inject.sweep_names(demo[0]))
