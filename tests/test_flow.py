"""The Prefect flow: its graph is DVC's, it runs what changed, and skips what did not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from flows.dag import GraphError, StageGraph, plan, read_graph
from tests.conftest import ROOT, copy_project

GRAPH = StageGraph(
    order=("ingest", "clean", "augment", "report"),
    upstream={"ingest": (), "clean": ("ingest",), "augment": ("clean",), "report": ("clean",)},
    metrics={},
)


def latest_artifact(key: str) -> str:
    """The newest artifact's markdown under `key`, read through Prefect's REST API (`Artifact.get` of
    prefect 3.8 sends nulls this server version rejects with a 422)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {"artifacts": {"key": {"any_": [key]}}, "sort": "UPDATED_DESC", "limit": 1, "offset": 0}
    found = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", json=body, timeout=30).raise_for_status().json()
    assert found, f"no artifact {key!r}"
    return found[0]["data"]


def test_plan_runs_changed_stages_and_everything_downstream():
    assert plan(GRAPH, set()) == []
    assert plan(GRAPH, {"clean"}) == ["clean", "augment", "report"]
    assert plan(GRAPH, {"augment"}) == ["augment"]
    assert plan(GRAPH, set(), force=True) == list(GRAPH.order)
    assert plan(GRAPH, {"ingest"}, target="clean") == ["ingest", "clean"]
    with pytest.raises(GraphError, match="unknown stage 'nope'"):
        plan(GRAPH, set(), target="nope")


def test_the_flow_waits_long_enough_for_a_cold_embedded_server():
    """A first run on a fresh machine used to time out starting Prefect's embedded server."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    code = (
        "import flows.pipeline\n"
        "from prefect.settings import get_current_settings\n"
        "print(get_current_settings().server.ephemeral.startup_timeout_seconds)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) >= 120


def test_stage_output_is_streamed_line_by_line_while_the_command_runs():
    import time

    from flows.pipeline import streamed

    code = "import sys, time; print('first'); sys.stderr.write('progress 50%\\n'); time.sleep(1.5); print('done')"
    seen: list[tuple[float, str]] = []
    start = time.monotonic()
    rc, output = streamed([sys.executable, "-c", code], str(ROOT), lambda line: seen.append((time.monotonic(), line)))
    end = time.monotonic()
    assert rc == 0 and [line for _, line in seen] == ["first", "progress 50%", "done"]
    assert seen[0][0] - start < end - start - 1.0  # logged before the command ended, not all at the end
    assert output.splitlines() == ["first", "progress 50%", "done"]


def test_graph_is_read_from_dvc_yaml():
    stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    graph = read_graph(ROOT)
    assert set(graph.order) == set(stages)
    assert list(graph.order) == stages  # dvc.yaml lists stages in flow order
    assert graph.upstream["ingest"] == ()
    assert graph.upstream["clean"] == ("ingest",)
    assert graph.metrics["clean"] == ("data/02_clean/clean.json",)


@pytest.mark.slow
def test_flow_runs_the_stages_then_skips_them_all(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client  # noqa: F401  (the harness is live)

    from flows.pipeline import pipeline

    stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    root = copy_project(tmp_path / "project", quick_benchmark=True)
    first = pipeline(root=str(root))
    assert [(r["stage"], r["status"]) for r in first] == [(s, "ran") for s in stages]
    assert (root / "registry/distillery-intent/1.0.0/SHA256SUMS").is_file()
    assert "# distillery-intent 1.0.0\n" in latest_artifact("distillery-publish")
    second = pipeline(root=str(root))
    # DVC always runs the machine fingerprint; it writes the same bytes, so what depends on it is unchanged.
    after = {"fingerprint": "ran", "build": "unchanged", "benchmark": "unchanged", "publish": "unchanged"}
    assert [(r["stage"], r["status"]) for r in second] == [(s, after.get(s, "skipped")) for s in stages]


@pytest.mark.slow
def test_failed_stage_fails_the_flow_with_the_stage_message(tmp_path, prefect_harness):
    from flows.pipeline import StageFailed, pipeline

    root = copy_project(tmp_path / "project", quick_benchmark=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["clean"]["min_per_label"] = 1000
    params["flow"]["retries"] = 0
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # every label under min_per_label is quarantined (rare_label), which takes the quarantine over its limit
    with pytest.raises(StageFailed, match="stage clean failed: validation failed: .*rare_label"):
        pipeline(root=str(root))
    assert not (root / "data/02_clean/train.parquet").exists()
    assert (root / "data/02_clean/validation/results.json").is_file()
