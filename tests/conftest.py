"""Shared fixtures: offline settings, a scratch copy of the project, tiny frames."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

# What a copy of the project leaves behind: environments, caches, outputs of earlier runs.
COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "cache",
    "tmp",
    "00_*",
    "01_*",
    "02_*",
    "03_*",
    "04_*",
    "05_*",
    "06_*",
    "07_*",
    "08_*",
    "09_*",
    "10_*",
    "registry",
    "lineage",
    "out",
)


def copy_project(dest: Path, quick_benchmark: bool = False) -> Path:
    """Copy the project's sources, params, pipeline and demo data into `dest`, as a fresh git repo. With
    `quick_benchmark`, the benchmark stage times fewer runs and skips the memory probes (tests check what
    it measures, not how precisely), and publish counts speeds within 50% as equal, so that its choice
    falls to accuracy and order: a test that reruns or rebuilds a stage must not depend on how busy the
    machine is."""
    shutil.copytree(ROOT, dest, ignore=COPY_IGNORE)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    if quick_benchmark:
        import yaml

        params = yaml.safe_load((dest / "params.yaml").read_text())
        params["benchmark"].update(time_budget_s=3, rounds=4, throughput_batches=2, memory=False, gemm_square=256)
        params["build"].update(latency_runs=40)
        params["publish"].update(latency_margin=0.5)
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the dvc CLI of this interpreter's environment in `root`."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def pending(root: Path) -> dict:
    """`dvc status` of `root`, less the fingerprint stage, which DVC always reports (`always_changed`)."""
    import json

    status = json.loads(dvc(root, "status", "--json").stdout)
    if status.get("fingerprint") == ["always changed"]:
        del status["fingerprint"]
    return status


def frame(rows: list[tuple], columns: tuple[str, ...] = ("id", "text", "label", "group")) -> pl.DataFrame:
    """A frame in the pipeline schema from tuples; `group` defaults to the id."""
    data = {c: [r[i] if i < len(r) else None for r in rows] for i, c in enumerate(columns)}
    df = pl.DataFrame(data, schema={c: pl.String for c in columns})
    if "group" in columns:
        df = df.with_columns(pl.coalesce("group", "id").alias("group"))
    return df


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (starting one costs seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(
        server_startup_timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
    ):
        yield
