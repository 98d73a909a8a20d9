"""OpenLineage run events for every stage run under DVC: START, then COMPLETE or FAIL.

A stage run is a job `<namespace>.<stage>` (namespace from `lineage.namespace`). Its input datasets are
the stage's data dependencies in dvc.yaml and its outputs the stage's outs, metrics and plots (code files
are left out: they are in the lock entry, not data). Each dataset is named by its path in the repository
and versioned by the hash DVC gives it (the `md5` of dvc.lock; a folder's ends in `.dir`), so an
OpenLineage backend and `dvc.lock` name the same bytes the same way.

Events are emitted only when the stage runs under DVC (`dvc repro`, and so the Prefect flow), which sets
`DVC_ROOT` and `DVC_STAGE`, and when params.yaml has `lineage.openlineage: true`. The transport is a JSON
lines file (`lineage.file`, relative to the repository) or an HTTP backend such as Marquez
(`lineage.url`, or the standard `OPENLINEAGE_URL` variable, which takes precedence). An event that
cannot be delivered is a warning on stderr: observability never fails a stage that succeeded.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from stages.runner.errors import ParamError
from stages.runner.params import from_dict
from stages.storage.hashing import dvc_md5

PRODUCER = "https://github.com/distillery/distillery"


@dataclass(frozen=True)
class LineageParams:
    openlineage: bool = True  # emit START and COMPLETE/FAIL events for every stage run under DVC
    namespace: str = "distillery"  # OpenLineage namespace of the jobs and datasets
    transport: str = "file"  # file | http
    file: str = "lineage/openlineage.jsonl"  # file transport: JSON lines, appended, relative to the repo
    url: str = ""  # http transport: the backend's base URL (e.g. Marquez http://localhost:5000)
    endpoint: str = "api/v1/lineage"  # http transport: the path events are posted to
    retries: int = 2  # http transport: retries of an event the backend did not take (with backoff)

    def __post_init__(self) -> None:
        if self.transport not in ("file", "http"):
            raise ParamError(f"lineage.transport must be 'file' or 'http', got {self.transport!r}")
        if self.transport == "http" and not self.url:
            raise ParamError("lineage.url is required with lineage.transport: http")
        if not self.namespace:
            raise ParamError("lineage.namespace must not be empty")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ParamError(f"lineage.retries must be an integer >= 0, got {self.retries!r}")


def read_settings(root: Path) -> LineageParams | None:
    """The `lineage` section of `root/params.yaml`, or None when events are off or the section is absent."""
    path = root / "params.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    section = (doc or {}).get("lineage")
    if not isinstance(section, dict):
        return None
    settings = from_dict(LineageParams, section, "lineage")
    return settings if settings.openlineage else None


def stage_paths(root: Path, stage: str) -> tuple[list[str], list[str]]:
    """A stage's data dependencies and outputs as dvc.yaml declares them (code files left out)."""
    doc = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    entry = (doc.get("stages") or {}).get(stage) or {}

    def paths(items: list[Any]) -> list[str]:
        return [item if isinstance(item, str) else next(iter(item)) for item in items or []]

    deps = [d for d in paths(entry.get("deps")) if not d.endswith(".py")]
    outs = paths(entry.get("outs")) + paths(entry.get("metrics")) + paths(entry.get("plots"))
    return deps, outs


def datasets(root: Path, paths: list[str], namespace: str, kind: str) -> list[Any]:
    """Input or output datasets, each versioned by its DVC hash (absent files get no version)."""
    from openlineage.client.event_v2 import InputDataset, OutputDataset
    from openlineage.client.generated.dataset_version_dataset import DatasetVersionDatasetFacet

    cls = InputDataset if kind == "input" else OutputDataset
    found = []
    for rel in paths:
        target = root / rel
        facets = {}
        if target.exists():
            facets["version"] = DatasetVersionDatasetFacet(datasetVersion=dvc_md5(target))
        found.append(cls(namespace=namespace, name=rel, facets=facets))
    return found


class StageRun:
    """One stage run's events. `finish(error)` sends COMPLETE, or FAIL with the error message."""

    def __init__(self, root: Path, stage: str, settings: LineageParams) -> None:
        from openlineage.client import OpenLineageClient
        from openlineage.client.uuid import generate_new_uuid

        self.root, self.stage, self.settings = root, stage, settings
        self.run_id = str(generate_new_uuid())
        url = os.environ.get("OPENLINEAGE_URL")
        if url or settings.transport == "http":
            n = settings.retries
            retry = {"total": n, "connect": n, "read": n, "backoff_factor": 0.3, "allowed_methods": ["POST"]}
            retry["status_forcelist"] = [500, 502, 503, 504]
            transport = {"type": "http", "url": url or settings.url, "endpoint": settings.endpoint, "retry": retry}
        else:
            log = root / settings.file
            log.parent.mkdir(parents=True, exist_ok=True)
            transport = {"type": "file", "log_file_path": str(log), "append": True}
        self.client = OpenLineageClient(config={"transport": transport})
        self.deps, self.outs = stage_paths(root, stage)
        self.finished = False

    def emit(self, event_type: str, error: str | None = None) -> None:
        from openlineage.client.event_v2 import Job, Run, RunEvent, RunState
        from openlineage.client.generated.error_message_run import ErrorMessageRunFacet
        from openlineage.client.generated.job_type_job import JobTypeJobFacet

        ns = self.settings.namespace
        run_facets = {}
        if error is not None:
            run_facets["errorMessage"] = ErrorMessageRunFacet(message=error, programmingLanguage="python")
        job_facets = {"jobType": JobTypeJobFacet(processingType="BATCH", integration="DVC", jobType="STAGE")}
        outputs = datasets(self.root, self.outs, ns, "output") if event_type == "COMPLETE" else []
        event = RunEvent(
            eventType=getattr(RunState, event_type),
            eventTime=datetime.now(UTC).isoformat(),
            run=Run(runId=self.run_id, facets=run_facets),
            job=Job(namespace=ns, name=self.stage, facets=job_facets),
            inputs=datasets(self.root, self.deps, ns, "input"),
            outputs=outputs,
            producer=PRODUCER,
        )
        try:
            self.client.emit(event)
        except Exception as exc:  # noqa: BLE001 - a lineage backend being down must not fail the stage
            print(f"{self.stage}: warning: OpenLineage {event_type} event not delivered: {exc}", file=sys.stderr)

    def finish(self, error: str | None = None) -> None:
        if not self.finished:
            self.finished = True
            self.emit("COMPLETE" if error is None else "FAIL", error)


@contextmanager
def stage_run(stage: str) -> Iterator[StageRun | None]:
    """Wrap one stage run: START now; FAIL if an exception escapes; COMPLETE unless `finish` said
    otherwise. Yields None (and emits nothing) outside DVC or with events turned off."""
    root, name = os.environ.get("DVC_ROOT"), os.environ.get("DVC_STAGE")
    settings = read_settings(Path(root)) if root and name == stage else None
    if settings is None:
        yield None
        return
    run = StageRun(Path(root), stage, settings)
    run.emit("START")
    try:
        yield run
    except BaseException as exc:
        run.finish("".join(traceback.format_exception_only(type(exc), exc)).strip() or type(exc).__name__)
        raise
    run.finish()
