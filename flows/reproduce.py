"""Do the same inputs give the same bytes? Runs stages again and compares every output, stage by stage.

    python -m flows.reproduce [--until STAGE]                 # rerun in this workspace, compare with dvc.lock
    python -m flows.reproduce --copies [--until STAGE]        # two clean copies, each runs dvc repro; compare

`rerun` (the default) needs an up-to-date workspace (`dvc repro` done). It reruns each stage in pipeline
order (`dvc repro --force --single-item --no-run-cache`) and compares the outputs' hashes with what
dvc.lock recorded before. Outputs that differ are left in place (dvc.lock then records them), so a
stage downstream of a difference reruns on other inputs: the table says so.

`--copies` copies the project's sources (what git tracks, plus untracked files it does not ignore) into two
scratch folders, each a sibling of the project (relative data paths such as `../shared/...` resolve the
same; `--scratch` elsewhere must keep that depth), runs
`dvc repro` in each, one after the other, and compares their dvc.lock files.

Outputs declared `cache: false` in dvc.yaml are run records (timings, Data Docs): listed, never
compared. A folder output that differs is opened (its DVC listing) to name the first file that differs.
Exit code 0 when every compared output is identical, 1 otherwise, 2 when the check could not run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ReproduceError(Exception):
    """The check cannot run (workspace not up to date, a stage failed); exit code 2."""


@dataclass
class StageCheck:
    stage: str
    identical: list[str] = field(default_factory=list)  # compared outputs with equal hashes
    differ: list[tuple[str, str]] = field(default_factory=list)  # (output, first differing file)
    records: list[str] = field(default_factory=list)  # `cache: false` outputs: run records, not compared
    same_inputs: bool = True  # every dependency hashed the same in both runs

    @property
    def ok(self) -> bool:
        return not self.differ


# ---- reading DVC's records ------------------------------------------------------------------------------


def read_lock(root: Path) -> dict[str, Any]:
    path = root / "dvc.lock"
    if not path.is_file():
        raise ReproduceError(f"{path}: not found; run `dvc repro` first")
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages") or {}


def hashes(entry: dict[str, Any], key: str) -> dict[str, str | None]:
    """path -> md5 of a lock entry's `outs` or `deps`."""
    return {item["path"]: item.get("md5") for item in entry.get(key) or []}


def uncached_outputs(root: Path) -> set[str]:
    """Outputs declared `cache: false` in dvc.yaml (outs, metrics, plots): the run records."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {out.def_path for stage in repo.index.stages for out in stage.outs if not out.use_cache}


def cache_dir(root: Path) -> Path:
    """Where a repository's DVC cache keeps MD5 objects (honours `cache.dir` in .dvc/config)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return Path(repo.cache.local.path)


def listing(cache: Path, md5: str) -> dict[str, str]:
    """relpath -> md5 of a folder output, from its `.dir` object in the DVC cache ({} when absent)."""
    obj = cache / md5[:2] / md5[2:]
    if not obj.is_file():
        return {}
    return {entry["relpath"]: entry["md5"] for entry in json.loads(obj.read_text(encoding="utf-8"))}


def first_difference(path: str, a: str | None, b: str | None, cache_a: Path, cache_b: Path) -> str:
    """The first file (in path order) of output `path` whose hash differs between two runs."""
    if not (a and b and a.endswith(".dir") and b.endswith(".dir")):
        return path
    left, right = listing(cache_a, a), listing(cache_b, b)
    if not left or not right:
        return f"{path}/ (listing not in the DVC cache)"
    for name in sorted(set(left) | set(right)):
        if left.get(name) != right.get(name):
            return f"{path}/{name}"
    return path


def compare_stage(
    stage: str, before: dict[str, Any], after: dict[str, Any], records: set[str], caches: tuple[Path, Path]
) -> StageCheck:
    """One stage's outputs and inputs, as two lock entries record them."""
    check = StageCheck(stage, same_inputs=hashes(before, "deps") == hashes(after, "deps"))
    old, new = hashes(before, "outs"), hashes(after, "outs")
    for path in sorted(set(old) | set(new)):
        if path in records:
            check.records.append(path)
        elif old.get(path) == new.get(path) and old.get(path):
            check.identical.append(path)
        else:
            check.differ.append((path, first_difference(path, old.get(path), new.get(path), *caches)))
    return check


# ---- running ----------------------------------------------------------------------------------------------


def dvc(root: Path, *args: str) -> None:
    """A dvc command in `root`; its output is shown only when it fails."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ReproduceError(f"`dvc {' '.join(args)}` failed in {root}:\n{tail}")


def stages_until(root: Path, until: str | None) -> list[str]:
    from flows.dag import GraphError, read_graph

    try:
        graph = read_graph(root)
        if until is not None and until not in graph.upstream:
            raise ReproduceError(f"--until {until!r}: no such stage; stages: {', '.join(graph.order)}")
        return graph.scope(until)
    except GraphError as exc:
        raise ReproduceError(str(exc)) from exc


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rerun(root: Path, until: str | None = None) -> list[StageCheck]:
    """Rerun each stage (through `until`) in this workspace and compare with dvc.lock as it was."""
    from flows.dag import inspect_pipeline

    _, changed = inspect_pipeline(root)
    changed.discard("fingerprint")  # always_changed: DVC reports it whatever the machine
    stages = stages_until(root, until)
    if changed & set(stages):
        raise ReproduceError(
            f"not up to date: {', '.join(sorted(changed & set(stages)))}; run `dvc repro` first, so that "
            "dvc.lock records what these inputs gave"
        )
    before = read_lock(root)
    records, cache = uncached_outputs(root), cache_dir(root)
    checks = []
    for i, stage in enumerate(stages, 1):
        say(f"reproduce: rerunning {stage} ({i}/{len(stages)})")
        start = time.perf_counter()
        dvc(root, "repro", "--force", "--single-item", "--no-run-cache", stage)
        check = compare_stage(stage, before.get(stage, {}), read_lock(root).get(stage, {}), records, (cache, cache))
        verdict = "identical" if check.ok else f"DIFFERS at {check.differ[0][1]}"
        say(f"reproduce: {stage} {verdict} ({time.perf_counter() - start:.0f} s)")
        checks.append(check)
    return checks


def project_files(root: Path) -> list[str]:
    """What a clean clone holds: files git tracks, plus untracked files it does not ignore."""
    proc = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root, capture_output=True
    )
    if proc.returncode != 0:
        raise ReproduceError(f"{root}: not a git checkout (git ls-files failed); --copies copies what git tracks")
    return sorted({name for name in proc.stdout.decode().split("\0") if name and (root / name).is_file()})


def clean_copy(root: Path, dest: Path) -> Path:
    """The project's sources in `dest`, as a new git repository with its own DVC cache."""
    for name in project_files(root):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def copies(root: Path, until: str | None = None, scratch: Path | None = None, keep: bool = False) -> list[StageCheck]:
    """Two clean copies, `dvc repro` (through `until`) in each, one after the other; compare the locks."""
    root = root.resolve()
    stages = stages_until(root, until)
    made: list[Path] = []
    try:
        locks, caches = [], []
        for label in ("a", "b"):
            # each copy a sibling of the project, so `../shared/...` in params resolves to the same data
            copy = Path(tempfile.mkdtemp(prefix=f".{root.name}-reproduce-{label}-", dir=scratch or root.parent))
            made.append(clean_copy(root, copy))
            say(f"reproduce: copy {label}: dvc repro{' ' + until if until else ''} in {copy}")
            start = time.perf_counter()
            dvc(copy, "repro", *([until] if until else []))
            say(f"reproduce: copy {label} done ({time.perf_counter() - start:.0f} s)")
            locks.append(read_lock(copy))
            caches.append(cache_dir(copy))
        records = uncached_outputs(made[0])
        return [compare_stage(s, locks[0].get(s, {}), locks[1].get(s, {}), records, tuple(caches)) for s in stages]
    finally:
        for copy in made:
            if keep:
                say(f"reproduce: copy kept in {copy}")
            else:
                shutil.rmtree(copy, ignore_errors=True)


def rebuild(root: Path, lineage: dict[str, Any], scratch: Path | None = None, keep: bool = False) -> list[StageCheck]:
    """Rebuild a published version from its git commit in a scratch clone and compare the bytes.

    The clone is checked out at `lineage.json`'s commit (refused when the version was published from
    uncommitted changes other than dvc.lock, which a run always rewrites), beside the project so relative
    data paths resolve the same, with an empty DVC cache. The machine must be the one recorded (engines are
    built for it). Every stage up to the one that made the published model file is rerun with `dvc repro
    --force`, each output compared with the hash `lineage.json` records, and the published payload (model
    file, tokenizer, labels) with the rebuilt files. A last row, `published files`, holds that comparison."""
    root = root.resolve()
    git = lineage.get("git") or {}
    if not git.get("commit"):
        raise ReproduceError("cannot rebuild: the version was published outside a git commit")
    uncommitted = [f for f in git.get("modified") or [] if f != "dvc.lock"]
    if uncommitted:
        raise ReproduceError(f"cannot rebuild: published from uncommitted changes to {', '.join(uncommitted)}")
    stages = {s["name"]: s for s in lineage["stages"]}
    source = lineage["published_from"]["file"]
    target = next(
        (
            n
            for n, s in stages.items()
            for o in s.get("outs") or []
            if source == o["path"] or source.startswith(o["path"] + "/")
        ),
        None,
    )
    if target is None:
        raise ReproduceError(f"cannot rebuild: no stage in lineage.json outputs {source}")
    # a sibling of the project (an empty folder git clones into), so relative data paths resolve the same
    copy = Path(tempfile.mkdtemp(prefix=f".{root.name}-rebuild-", dir=scratch or root.parent))
    try:
        for args in (
            ["clone", "-q", "--no-checkout", str(root), str(copy)],
            ["-C", str(copy), "checkout", "-q", git["commit"]],
        ):
            proc = subprocess.run(["git", *args], capture_output=True, text=True)
            if proc.returncode != 0:
                raise ReproduceError(f"cannot rebuild: git {args[0]} failed: {proc.stderr.strip()}")
        say(f"reproduce: rebuilding {lineage['model']}@{lineage['version']} at {git['commit'][:12]} in {copy}")
        dvc(copy, "repro", "fingerprint")
        machine = json.loads((copy / "data/00_fingerprint/fingerprint.json").read_text(encoding="utf-8"))
        recorded = (lineage.get("fingerprint") or {}).get("digest")
        if machine.get("digest") != recorded:
            raise ReproduceError(
                f"cannot rebuild here: this machine's fingerprint {str(machine.get('digest'))[:12]} is not the "
                f"recorded {str(recorded)[:12]} (engines are built for one machine; compare on that one)"
            )
        start = time.perf_counter()
        dvc(copy, "repro", "--force", target)
        say(f"reproduce: rebuilt through {target} ({time.perf_counter() - start:.0f} s)")
        records, rebuilt = uncached_outputs(copy), read_lock(copy)
        cache = cache_dir(copy)
        checks = [
            compare_stage(name, stages[name], rebuilt[name], records, (cache, cache))
            for name in stages_until(copy, target)
            if name in stages
        ]
        checks.append(compare_payload(copy, lineage))
        return checks
    finally:
        if keep:
            say(f"reproduce: rebuild kept in {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)


def compare_payload(copy: Path, lineage: dict[str, Any]) -> StageCheck:
    """The published payload against the rebuilt files it was copied from (runtime.json is publish's own
    record of build's session options, compared through build's outputs)."""
    import hashlib

    def sha256(path: Path) -> str | None:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None

    reads = {r["path"]: r for r in lineage["publish"]["reads"]}
    tokenizer = next((p for p in reads if p.endswith("/tokenizer")), None)
    labels = next((p for p in reads if p.endswith("/labels.json")), None)
    check = StageCheck("published files")
    for name, digest in sorted(lineage["files"].items()):
        if name.startswith("model."):
            rebuilt = copy / lineage["published_from"]["file"]
        elif name.startswith("tokenizer/") and tokenizer:
            rebuilt = copy / tokenizer / name.removeprefix("tokenizer/")
        elif name == "labels.json" and labels:
            rebuilt = copy / labels
        else:
            continue
        if sha256(rebuilt) == digest:
            check.identical.append(name)
        else:
            check.differ.append((name, name))
    return check


def table(checks: list[StageCheck]) -> str:
    """One row per stage: outputs compared, identical or not, the first differing file, run records."""
    rows = [("stage", "outputs", "identical", "first difference", "run records (not compared)")]
    for c in checks:
        compared = len(c.identical) + len(c.differ)
        verdict = "yes" if c.ok else "NO" + ("" if c.same_inputs else " (inputs differed)")
        rows.append(
            (
                c.stage,
                str(compared),
                verdict if compared else "-",
                c.differ[0][1] if c.differ else "-",
                ", ".join(Path(r).name for r in c.records) or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.reproduce", description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."), help="the project (default: current folder)")
    ap.add_argument("--until", help="check the stages up to and including this one (default: all)")
    ap.add_argument("--copies", action="store_true", help="two clean copies instead of a rerun in place")
    ap.add_argument("--scratch", type=Path, help="--copies: where the copies go (default: beside the project)")
    ap.add_argument("--keep", action="store_true", help="--copies: keep the copies for inspection")
    ap.add_argument("--json", type=Path, help="also write the result as JSON to this file")
    args = ap.parse_args(argv)
    try:
        if args.copies:
            checks = copies(args.root, args.until, args.scratch, args.keep)
        else:
            checks = rerun(args.root, args.until)
    except ReproduceError as exc:
        print(f"reproduce: error: {exc}", file=sys.stderr)
        return 2
    print(table(checks))
    if args.json:
        args.json.write_text(
            json.dumps([c.__dict__ | {"ok": c.ok} for c in checks], indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    bad = [c.stage for c in checks if not c.ok]
    differ = f"; differ: {', '.join(bad)}" if bad else ""
    print(f"reproduce: {len(checks) - len(bad)} of {len(checks)} stages identical{differ}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
