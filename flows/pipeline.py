"""The Prefect flow of the pipeline: one task per DVC stage, in the order of DVC's graph.

`python -m flows.pipeline [--force] [--stage NAME]`. DVC alone decides what is up to date: one status
call first; when anything is to run, `python -m stages.check` validates every params section (all errors at
once, before minutes of work); then `dvc repro --single-item <stage>` for each stage that changed or reads
an output that changed in this run (a stage that reran and wrote the same bytes, as the machine fingerprint
does every time, starts nothing downstream), its output streamed into the Prefect log line by line as the
stage prints it.
Prefect adds retries, logs, run history and a markdown artifact with the run's table.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

# The embedded Prefect server's first start on a fresh machine (database migrations) takes longer than
# Prefect's default wait: the project sets the wait, not each user. Set before Prefect reads its settings;
# a value in the environment wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.logging import get_run_logger  # noqa: E402

from flows.dag import GraphError, inspect_pipeline, plan  # noqa: E402
from flows.recover import Busy as DvcBusy  # noqa: E402
from flows.recover import repair  # noqa: E402
from flows.reproduce import hashes, read_lock  # noqa: E402

ARTIFACT_KEY = "distillery-pipeline"
PUBLISH_ARTIFACT_KEY = "distillery-publish"


class StageFailed(RuntimeError):
    pass


def flow_settings(root: Path) -> dict[str, Any]:
    """The `flow` section of params.yaml (retries), with defaults when absent."""
    path = root / "params.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    settings = {"retries": 1, "retry_delay_seconds": 5}
    settings.update((doc or {}).get("flow") or {})
    return settings


def failure_line(name: str, output: str, returncode: int) -> str:
    """The stage's own one-line error (`<name>: error: ...`) if it printed one, else DVC's last error."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    own = [ln for ln in lines if ln.startswith(f"{name}: error:")]
    if own:
        return own[-1].removeprefix(f"{name}: error:").strip()
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or [f"exit code {returncode}"])[-1]


def streamed(cmd: list[str], root: str, log: Any) -> tuple[int, str]:
    """Run `cmd` in `root`, passing each line of its output (stdout and stderr, in the order written) to
    `log(line)` as it comes, not when the command ends; returns (exit code, the whole output). The child's
    Python runs unbuffered, so a stage's prints arrive when printed."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    lines = []
    with subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          bufsize=1, errors="replace") as proc:  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.strip():
                log(line.rstrip())
    return proc.returncode, "".join(lines)


@task(cache_policy=NO_CACHE)
def run_stage(name: str, root: str, force: bool) -> dict[str, Any]:
    """Run one stage through DVC, streaming its output to the Prefect log line by line."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", name] + (["--force"] if force else [])
    start = time.perf_counter()
    code, output = streamed(cmd, root, lambda line: logger.info("%s | %s", name, line))
    duration = time.perf_counter() - start
    if code != 0:
        raise StageFailed(f"stage {name} failed: {failure_line(name, output, code)}")
    unchanged = "didn't change, skipping" in output
    return {"stage": name, "status": "unchanged" if unchanged else "ran", "duration_s": round(duration, 2)}


@task(cache_policy=NO_CACHE)
def check_params(root: str) -> None:
    """`python -m stages.check`: every section of params.yaml valid before any stage starts (in a process of
    its own: it imports the stages, and the flow never imports torch)."""
    logger = get_run_logger()
    code, output = streamed([sys.executable, "-m", "stages.check"], root, logger.info)
    if code != 0:
        errors = [ln.removeprefix("check: ") for ln in output.splitlines() if ln.startswith("check: ")]
        raise StageFailed("params.yaml: " + "; ".join(errors[:-1] or errors))


def lock_outs(root: Path) -> dict[str, Any]:
    """Each stage's outputs as dvc.lock records them (path -> hash): a stage whose entry is the same after
    it ran wrote the same bytes, and what depends only on it is up to date. Empty before the first run."""
    if not (root / "dvc.lock").is_file():
        return {}
    return {name: hashes(entry, "outs") for name, entry in read_lock(root).items()}


def read_metrics(root: Path, paths: tuple[str, ...]) -> str:
    """A short view of a stage's metrics files for the artifact table."""
    shown = []
    for rel in paths:
        path = root / rel
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                data = None
            flat = {}
            for key, value in (data if isinstance(data, dict) else {}).items():
                items = value.items() if isinstance(value, dict) else [(None, value)]
                for sub, v in items:
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        flat[key if sub is None else f"{key}.{sub}"] = v
            keys = ", ".join(f"{k}={v}" for k, v in flat.items())
            shown.append(f"`{rel}`" + (f" ({keys})" if keys else ""))
    return "; ".join(shown) or "-"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| stage | status | duration (s) | metrics |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['status']} | {r.get('duration_s', '-')} | {r.get('metrics', '-')} |")
    return "\n".join(lines)


def publish_markdown(root: Path, receipts: tuple[str, ...]) -> str | None:
    """The published version (publish's receipt) and the benchmark table it passed, as markdown; None
    before anything was published."""
    for rel in receipts:
        path = root / rel
        if not path.is_file():
            continue
        r = json.loads(path.read_text(encoding="utf-8"))
        checked = sorted(r.get("gates", {}).items())
        gates = ", ".join(f"{k} (limit {g['limit']}{'' if g['passed'] else ', FAILED'})" for k, g in checked)
        report = root / r.get("benchmark_report", "")
        table = report.read_text(encoding="utf-8") if report.is_file() else "(benchmark report not found)"
        return "\n".join(
            [
                f"# {r['model']} {r['version']}",
                "",
                f"- registry: `{r['path']}`; variant `{r['variant']}`; content sha256 `{r['content_digest']}`",
                f"- gates passed: {gates}",
                f"- git tag: `{r['tag']}`" if r.get("tag") else "- git tag: none (publish.tag: false)",
                f"- audit: `python -m flows.lineage show {r['model']}@{r['version']}` / `verify`",
                "",
                table.replace("# Benchmark", "## Benchmark", 1),
            ]
        )
    return None


@flow(name="distillery-pipeline")
def pipeline(root: str = ".", force: bool = False, stage: str | None = None) -> list[dict[str, Any]]:
    """Run the DVC pipeline in `root` stage by stage; returns one row per stage (ran, unchanged,
    skipped, failed or not run)."""
    logger = get_run_logger()
    base = Path(root).resolve()
    graph, changed = inspect_pipeline(base, with_status=not force)
    to_run = plan(graph, changed, force=force, target=stage)
    settings = flow_settings(base)
    scope = graph.scope(stage)
    logger.info("stages: %s; to run: %s", ", ".join(scope), ", ".join(to_run) or "none")
    if force or set(changed) - set(graph.always_changed):  # else no params changed since the last run
        check_params(str(base))
    rows: dict[str, dict[str, Any]] = {}
    futures: dict[str, Any] = {}
    locked, moved = lock_outs(base), {}
    for name in scope:
        if name not in to_run:
            rows[name] = {"stage": name, "status": "skipped", "duration_s": 0.0}
            continue
        if any(rows.get(u, {}).get("status") in ("failed", "not run") for u in graph.upstream[name]):
            rows[name] = {"stage": name, "status": "not run", "reason": "upstream failed"}
            continue
        if not force and name not in changed and not any(moved.get(u) for u in graph.upstream[name]):
            # Downstream only of stages that reran and wrote the same bytes (the machine fingerprint, every
            # run): DVC would find this stage up to date, so no `dvc repro` is started for it.
            rows[name] = {"stage": name, "status": "unchanged", "duration_s": 0.0}
            continue
        runner = run_stage.with_options(
            name=f"{name}",
            task_run_name=name,
            retries=int(settings["retries"]),
            retry_delay_seconds=float(settings["retry_delay_seconds"]),
        )
        upstream = [futures[u] for u in graph.upstream[name] if u in futures]
        # One stage at a time: DVC's repository lock is not shown to hold under parallel `repro` here.
        futures[name] = runner.submit(name, str(base), force, wait_for=upstream)
        futures[name].wait()
        if futures[name].state.is_completed():
            rows[name] = futures[name].result()
            now = lock_outs(base)
            moved[name] = now.get(name) != locked.get(name)
            locked = now
        else:
            rows[name] = {"stage": name, "status": "failed", "error": str(futures[name].state.message)}
    result = []
    for name in scope:
        row = rows[name]
        # a stage's DVC metrics, else its metrics.json (an output kept out of `dvc exp show`'s columns)
        shown = graph.metrics.get(name) or tuple(o for o in graph.outs.get(name, ()) if o.endswith("metrics.json"))
        row["metrics"] = read_metrics(base, shown)
        result.append(row)
    table = markdown_table(result)
    logger.info("pipeline run:\n%s", table)
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        markdown="# distillery pipeline run\n\n" + table,
        description="Each stage of the DVC pipeline: ran, unchanged, skipped or failed.",
    )
    receipts = tuple(o for o in graph.outs.get("publish", ()) if o.endswith("receipt.json"))
    published = publish_markdown(base, receipts)
    if published is not None and "publish" in scope:
        create_markdown_artifact(
            key=PUBLISH_ARTIFACT_KEY,
            markdown=published,
            description="The published model version and the benchmark table it passed.",
        )
    failed = [r for r in result if r["status"] == "failed"]
    if failed:
        # Fail the flow run itself, so Prefect's run history and notifications show it.
        raise StageFailed(failed[0]["error"])
    return result


class Busy(Exception):
    """Another flow run holds this workspace."""


@contextmanager
def workspace_lock(root: str | Path) -> Iterator[None]:
    """One flow run per workspace: a second one stops at once, naming the first (its pid and start time), and
    changes nothing. (Two at once would race each other's `dvc repro` calls stage by stage, and two embedded
    Prefect servers starting on a fresh Prefect home race in its SQLite migration.)"""
    path = Path(root) / ".dvc" / "tmp" / "distillery-flow.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise Busy(f"another flow run holds this workspace ({holder}; lock {path}); nothing was run") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rerun every stage even if DVC finds it up to date")
    ap.add_argument("--stage", metavar="NAME", help="run up to this stage (it and its upstream stages)")
    ap.add_argument("--root", default=".", help="the repository to run (default: current folder)")
    args = ap.parse_args(argv)
    try:
        with workspace_lock(args.root):
            for repaired in repair(args.root):  # DVC's lock files, left cut by a dvc process killed mid-write
                print(f"pipeline: {repaired}", file=sys.stderr)
            rows = pipeline(root=args.root, force=args.force, stage=args.stage)
    except (Busy, DvcBusy) as exc:
        print(f"pipeline: error: {exc}", file=sys.stderr)
        return 3
    except (GraphError, StageFailed) as exc:
        print(f"pipeline: error: {exc}", file=sys.stderr)
        return 1
    print(markdown_table(rows))
    ran = sum(r["status"] == "ran" for r in rows)
    print(f"pipeline: {ran} stage(s) ran, {len(rows) - ran} up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
