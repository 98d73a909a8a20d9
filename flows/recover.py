"""After a crash: put DVC's own state back so that the next run can start.

    python -m flows.recover        # then dvc repro (the Prefect flow does this by itself before it starts)

DVC rewrites two files in place (it truncates, then writes), so a `kill -9` of a `dvc` process at that moment
leaves them empty or cut, and every later `dvc` command stops:
- its stage lock file `.dvc/tmp/rwlock` ("Unable to read RWLock-file ... JSON structure is corrupted"; DVC's
  advice is to remove it by hand): `recover` removes it;
- `dvc.lock` ("'./dvc.lock' validation failed", or, when the cut fell on a line boundary, a lock that parses
  but lacks the stages after the cut, so a stage finds its inputs made by nobody): `recover` puts back the
  copy the last stage run took when it started (`.dvc/tmp/distillery-dvc.lock.json`, saved by
  `stages/runner/guard.py`; `stages/runner/lockfile.py` tells a cut lock from one changed on purpose), else
  git's HEAD version. Entries written since are lost, which only makes `dvc status` report those stages
  changed: the next `dvc repro` runs them again.
Both only when the file is damaged and no DVC process holds the repository (`recover` takes DVC's
repository lock `.dvc/tmp/lock` while it works; a running `dvc` keeps that lock for its whole run), so a live
run's files are never touched. The leftovers of killed stage runs (temporary files, scratch folders)
need no command: the next stage run removes them (`stages/runner/guard.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stages.runner import lockfile


class Busy(Exception):
    """A DVC process holds the repository."""


def sound_rwlock(path: Path) -> bool:
    json.loads(path.read_text(encoding="utf-8"))
    return True


def sound_lockfile(path: Path) -> bool:
    """dvc.lock parses and passes DVC's own schema (else an exception)."""
    return schema_ok(path.read_text(encoding="utf-8"))


def schema_ok(text: str) -> bool:
    import yaml
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA

    COMPILED_LOCKFILE_SCHEMA(yaml.safe_load(text) or {})
    return True


def damaged(path: Path, check: Any) -> bool:
    try:
        return not check(path)
    except FileNotFoundError:
        return False
    except Exception:  # noqa: BLE001 - any parse or schema error: the file is damaged
        return True


@contextmanager
def dvc_idle(root: Path, what: Path) -> Iterator[None]:
    """Hold DVC's repository lock: no `dvc` command runs here meanwhile."""
    import zc.lockfile  # DVC's own lock backend: the same lock `dvc repro` holds

    try:
        lock = zc.lockfile.LockFile(str(root / ".dvc" / "tmp" / "lock"))
    except zc.lockfile.LockError as exc:
        raise Busy(f"{what} is damaged, but a DVC process holds this repository; run again when it ends") from exc
    try:
        yield
    finally:
        lock.close()


def repair_rwlock(root: str | Path) -> str | None:
    """Remove a corrupted `.dvc/tmp/rwlock` when no DVC process holds the repository; what was done, or None."""
    root = Path(root)
    path = root / ".dvc" / "tmp" / "rwlock"
    if not damaged(path, sound_rwlock):
        return None
    with dvc_idle(root, path):
        size = path.stat().st_size
        path.unlink()
    return f"removed {path} ({size} bytes, not valid JSON: a dvc process was killed while writing it)"


def repair_lockfile(root: str | Path) -> str | None:
    """Put back a sound dvc.lock when DVC left it cut (unparseable, or a prefix that parses: see
    `stages/runner/lockfile.py`); what was done, or None."""
    root = Path(root)
    path = root / "dvc.lock"
    why = "does not parse" if damaged(path, sound_lockfile) else lockfile.check(root)
    if not why:
        return None
    with dvc_idle(root, path):
        saved = lockfile.load(root)
        if saved is not None and sound_text(saved[0]):
            text, source = saved[0], f"the copy the last stage run took (.dvc/tmp/{lockfile.BACKUP})"
        else:
            shown = subprocess.run(["git", "show", "HEAD:dvc.lock"], cwd=root, capture_output=True, text=True)
            if shown.returncode != 0:
                raise Busy(f"{path} is damaged ({why}) and neither .dvc/tmp/{lockfile.BACKUP} nor git HEAD holds "
                           "a sound copy; remove it (every stage then reruns)")  # fmt: skip
            text, source = shown.stdout, "git HEAD"
        tmp = path.with_name(".dvc.lock.recover.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return (f"restored {path} from {source}: {why}, a dvc process was killed while writing it; the stages it ran "
            "since rerun")  # fmt: skip


def sound_text(text: str) -> bool:
    """A saved copy that passes DVC's lock schema, every entry whole."""
    try:
        schema_ok(text)
    except Exception:  # noqa: BLE001 - any parse or schema error
        return False
    return all(lockfile.entry_complete(e) for e in lockfile.stages_of(text).values())


def repair(root: str | Path) -> list[str]:
    return [done for done in (repair_rwlock(root), repair_lockfile(root)) if done]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.recover", description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="the repository (default: current folder)")
    args = ap.parse_args(argv)
    try:
        done = repair(args.root)
    except Busy as exc:
        print(f"recover: {exc}", file=sys.stderr)
        return 3
    for line in done or ["DVC's lock files are sound; nothing to do"]:
        print(f"recover: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
