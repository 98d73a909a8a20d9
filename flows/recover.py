"""After a crash: put DVC's own state back so that the next run can start.

    python -m flows.recover        # then dvc repro (the Prefect flow does this by itself before it starts)

DVC rewrites its stage lock file `.dvc/tmp/rwlock` in place (it truncates the file, then writes JSON), so a
`kill -9` of a `dvc` process at that moment leaves it empty or cut, and every later `dvc` command stops with
"Unable to read RWLock-file ... JSON structure is corrupted". DVC's advice is to remove the file by hand.
`recover` removes it when it is not valid JSON and no DVC process holds the repository (it takes DVC's
repository lock `.dvc/tmp/lock` while it does; a running `dvc` keeps that lock for its whole run), so a
live run's locks are never dropped. The leftovers of killed stage runs (temporary files, scratch folders)
need no command: the next stage run removes them (`stages/runner/guard.py`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class Busy(Exception):
    """A DVC process holds the repository."""


def repair_rwlock(root: str | Path) -> str | None:
    """Remove a corrupted `.dvc/tmp/rwlock` when no DVC process holds the repository; what was done, or None."""
    import zc.lockfile  # DVC's own lock backend: the same lock `dvc repro` holds

    path = Path(root) / ".dvc" / "tmp" / "rwlock"
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return None
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        pass
    try:
        lock = zc.lockfile.LockFile(str(Path(root) / ".dvc" / "tmp" / "lock"))
    except zc.lockfile.LockError as exc:
        raise Busy(f"{path} is damaged, but a DVC process holds this repository; run again when it ends") from exc
    try:
        size = path.stat().st_size
        path.unlink()
    finally:
        lock.close()
    return f"removed {path} ({size} bytes, not valid JSON: a dvc process was killed while writing it)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.recover", description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="the repository (default: current folder)")
    args = ap.parse_args(argv)
    try:
        done = repair_rwlock(args.root)
    except Busy as exc:
        print(f"recover: {exc}", file=sys.stderr)
        return 3
    print(f"recover: {done}" if done else "recover: DVC's lock file is sound; nothing to do")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
