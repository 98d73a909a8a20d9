"""What every stage run checks around its work, so that a crash, a damaged cache or an edit made while it
ran can never leave DVC believing something false.

At the start (`RunGuard.start`):
- **leftovers**: temporary names a killed run left beside any stage's outputs (`.<name>.*.tmp`,
  `.<name>.old`, written by `stages.storage.atomic`) are removed, and so are the scratch folders
  `.dvc/tmp/distillery/<stage>/`, where stages put their temporary files instead of `/tmp` (a `kill -9`
  cannot clean up after itself; the next stage run does: DVC runs one stage at a time in a workspace);
- **inputs**: every dependency that another stage outputs is hashed and compared with the hash `dvc.lock`
  records for that output. DVC trusts its cache: a damaged cache object is checked out without a word, and
  a crash between the renames of a stage's outputs leaves a mixed set. Either way the bytes differ from the
  lock, and the stage refuses to read them, naming the file and the stage that makes it;
- **params**: the sections of params.yaml the stage tracks (its `params:` in dvc.yaml) are hashed;
- **dvc.lock** is copied to `.dvc/tmp/distillery-dvc.lock.json` (DVC rewrites it in place after the run; a kill
  then can cut it, and `python -m flows.recover` puts the copy back). A lock that parses but was cut short
  (stages missing after the cut, see `stages/runner/lockfile.py`) is refused, naming `flows.recover`.

Before any output is renamed into place (`before_commit`, also before publish renames a version into the
registry) the sections are hashed again: if params.yaml changed while the stage ran, the stage fails and
writes nothing, because DVC would record the new values beside outputs made from the old ones.

The guard runs when DVC runs the stage (`dvc repro`, `dvc exp run`, the Prefect flow: DVC sets `DVC_STAGE`);
a stage started by hand with its own `--in`/`--out` folders (unit tests) is not checked against dvc.lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.runner import lockfile
from stages.runner.errors import StageError
from stages.storage import atomic
from stages.storage.hashing import dvc_md5


class DamagedInput(StageError):
    """An input whose bytes differ from what dvc.lock records for the stage that made it."""


class ParamsChanged(StageError):
    """params.yaml's tracked sections changed while the stage ran."""


def _names(items: list[Any] | None) -> list[str]:
    return [item if isinstance(item, str) else str(next(iter(item))) for item in items or []]


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise StageError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    return doc if isinstance(doc, dict) else {}


def params_digest(params_file: Path, sections: list[str]) -> str:
    """SHA-256 of the named sections of params.yaml, as parsed values (comments and layout do not count)."""
    doc = read_yaml(params_file)
    picked = {s: doc.get(s) for s in sorted(sections)}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()


def leftovers(folder: Path, name: str) -> list[Path]:
    """Temporary names `stages.storage.atomic` uses for `folder/name` that a killed run left behind."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith((".tmp", ".old")))


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass
class RunGuard:
    root: Path
    stage: str
    params_file: Path
    sections: list[str] = field(default_factory=list)
    digest: str | None = None
    removed: list[str] = field(default_factory=list)

    @property
    def scratch(self) -> Path:
        return self.root / ".dvc" / "tmp" / "distillery" / self.stage

    def start(self) -> RunGuard:
        stages = read_yaml(self.root / "dvc.yaml").get("stages") or {}
        entry = stages.get(self.stage) or {}
        # Every stage's leftovers, not only this one's: DVC runs one stage at a time in a workspace (its lock),
        # and a stage DVC restores from its run cache never runs, so its own next run may be far off.
        outs = [
            name
            for other in stages.values()
            for kind in ("outs", "metrics", "plots")
            for name in _names((other or {}).get(kind))
        ]
        self.sweep(outs)
        if (self.root / ".dvc").is_dir():
            shutil.rmtree(self.scratch.parent, ignore_errors=True)
            self.scratch.mkdir(parents=True, exist_ok=True)
            tempfile.tempdir = str(self.scratch)  # this process's temporary files: cleaned by the next run
        self.save_lockfile()
        if entry:
            self.check_inputs([d for d in _names(entry.get("deps")) if "${" not in d and not d.endswith(".py")])
            self.sections = _names(entry.get("params"))
            self.digest = params_digest(self.params_file, self.sections)
            atomic.before_commit(self.check_params)
        return self

    def save_lockfile(self) -> None:
        """A copy of dvc.lock as DVC read it to start this run: DVC rewrites the file in place after the run, and
        `python -m flows.recover` puts this copy back if a kill cuts that write short. A lock already cut short
        (one that parses; DVC refuses the others itself) is refused, not copied over the copy that repairs it."""
        cut = lockfile.check(self.root)
        if cut:
            raise StageError(
                f"dvc.lock: {cut}: a dvc process was killed while rewriting it. Run `python -m flows.recover` (it "
                f"puts back .dvc/tmp/{lockfile.BACKUP}, the copy the last stage run took), then run again. If you "
                f"changed dvc.lock on purpose, remove that copy instead"
            )
        lockfile.save(self.root, self.stage)

    def sweep(self, outs: list[str]) -> None:
        for out in outs:
            target = self.root / out
            # the output and each folder above it in the project (data/05_train/dvclive/metrics.json is written
            # with its folder, staged as data/05_train/.dvclive.*.tmp)
            for level in [target, *target.relative_to(self.root).parents[:-1]]:
                level = self.root / level
                for path in leftovers(level.parent, level.name):
                    remove(path)
                    self.removed.append(path.relative_to(self.root).as_posix())
            if target.is_dir() and not target.is_symlink():  # a file output inside a folder output
                for path in target.rglob(".*.tmp"):
                    remove(path)
                    self.removed.append(path.relative_to(self.root).as_posix())
        if self.removed:
            shown = ", ".join(self.removed[:5]) + (" ..." if len(self.removed) > 5 else "")
            print(
                f"{self.stage}: removed {len(self.removed)} leftovers of an interrupted run: {shown}", file=sys.stderr
            )

    def check_inputs(self, deps: list[str]) -> None:
        lock = read_yaml(self.root / "dvc.lock").get("stages") or {}
        made_by = {
            out["path"]: (name, out.get("md5"))
            for name, entry in lock.items()
            if name != self.stage
            for out in (entry or {}).get("outs") or []
        }
        for dep in deps:
            if dep not in made_by or not (self.root / dep).exists():
                continue  # a source, or missing: DVC itself reports a missing dependency
            stage, recorded = made_by[dep]
            actual = dvc_md5(self.root / dep)
            if recorded and actual != recorded:
                raise DamagedInput(
                    f"{dep}: holds md5 {actual}, but dvc.lock records {recorded} for stage {stage}'s output; its "
                    f"bytes are not what {stage} wrote (a damaged DVC cache object or an interrupted run). Nothing "
                    f"was read. Run `dvc repro -f {stage}` to make it again"
                )

    def check_params(self) -> None:
        if self.digest is None:
            return
        now = params_digest(self.params_file, self.sections)
        if now != self.digest:
            raise ParamsChanged(
                f"{self.params_file}: section(s) {', '.join(self.sections)} changed while {self.stage} ran "
                f"(read sha256 {self.digest[:12]}, now {now[:12]}); nothing was written, so DVC cannot record "
                "params this run did not use. Run the stage again"
            )


def guard(stage: str, argv: list[str] | None) -> RunGuard | None:
    """The guard for one run of `stage` in the current folder (the repository), or None outside DVC."""
    if os.environ.get("DVC_STAGE") != stage:
        return None
    params = "params.yaml"
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        if arg == "--params" and i + 1 < len(args):
            params = args[i + 1]
        elif arg.startswith("--params="):
            params = arg.split("=", 1)[1]
    root = Path.cwd()
    return RunGuard(root, stage, root / params).start()


def finish(run: RunGuard | None) -> None:
    """Undo `start`: no more commit checks, temporary files back to the system's folder, scratch removed."""
    if run is None:
        return
    atomic.clear_commit_checks()
    if tempfile.tempdir == str(run.scratch):
        tempfile.tempdir = None
        shutil.rmtree(run.scratch, ignore_errors=True)
