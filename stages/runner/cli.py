"""The command line every stage shares (`--params`, `--in`, `--out`), and the entrypoint its `main` runs in."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING

from stages.runner import guard
from stages.runner.errors import StageError
from stages.runner.openlineage import stage_run

if TYPE_CHECKING:  # polars is imported where frames are read: `fingerprint` (run every time) never pays for it
    import polars as pl

Main = Callable[[list[str] | None], int]
RESOURCE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}


def stage_args(
    stage: str, doc: str, argv: list[str] | None, upstream: str | None, more: tuple[str, ...] = ()
) -> argparse.Namespace:
    """Parse `python -m stages.<stage>` arguments; `--in` exists when the stage reads an upstream folder,
    and `--<name>` for each further upstream stage named in `more`."""
    ap = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=doc.strip().splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    if upstream is not None:
        ap.add_argument("--in", dest="inp", type=Path, required=True, help=f"{upstream}'s output folder")
    for name in more:
        ap.add_argument(f"--{name}", type=Path, required=True, help=f"{name}'s output folder")
    ap.add_argument("--out", type=Path, required=True, help="this stage's output folder (as in dvc.yaml)")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment instead.
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def read_frames(folder: Path, names: tuple[str, ...], upstream: str) -> dict[str, pl.DataFrame]:
    """Read `<name>.parquet` for each name; a missing file names the stage that makes it."""
    import polars as pl

    frames = {}
    for name in names:
        path = folder / f"{name}.parquet"
        if not path.is_file():
            raise StageError(f"{path}: not found; run the {upstream} stage first")
        frames[name] = pl.read_parquet(path)
    return frames


def require(path: Path, upstream: str) -> Path:
    """`path`, or a StageError naming the stage that makes it."""
    if not path.exists():
        raise StageError(f"{path}: not found; run the {upstream} stage first")
    return path


def stage_entrypoint(name: str) -> Callable[[Main], Main]:
    """Wrap a stage `main(argv)`: a StageError (ParamError included) becomes one line on stderr and exit
    code 1; any other exception is a bug and propagates with its traceback (non-zero exit, and the atomic
    outputs leave nothing written). Under DVC the run emits OpenLineage START and COMPLETE or FAIL events."""

    def wrap(main: Main) -> Main:
        @wraps(main)
        def run(argv: list[str] | None = None) -> int:
            run = None
            try:
                with stage_run(name) as events:
                    run = guard.guard(name, argv)  # leftovers, inputs against dvc.lock, params (under DVC)
                    code = main(argv)
                    if events is not None and code:
                        events.finish(f"exit code {code}")
                    return code
            except StageError as exc:  # the FAIL event was sent by stage_run as the exception left it
                print(f"{name}: error: {exc}", file=sys.stderr)
                return 1
            except OSError as exc:
                if exc.errno not in RESOURCE_ERRORS:
                    raise
                # disk full, file too large, no permission, read-only: the machine's fault, named; the atomic
                # outputs were discarded, so nothing half-written is left
                where = f"{exc.filename}: " if exc.filename else ""
                print(f"{name}: error: {where}{exc.strerror or exc}; nothing was written", file=sys.stderr)
                return 1
            finally:
                guard.finish(run)

        return run

    return wrap
