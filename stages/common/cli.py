"""The command line every stage shares: `--params`, `--in` (the upstream stage's folder), `--out`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypeVar

import polars as pl

from stages.common.errors import StageError
from stages.common.params import from_dict, load_section

T = TypeVar("T")


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


def stage_params(cls: type[T], stage: str, params_file: str | Path) -> T:
    """The stage's section of the params file as its validated dataclass."""
    return from_dict(cls, load_section(stage, params_file), stage)


def read_frames(folder: Path, names: tuple[str, ...], upstream: str) -> dict[str, pl.DataFrame]:
    """Read `<name>.parquet` for each name; a missing file names the stage that makes it."""
    frames = {}
    for name in names:
        path = folder / f"{name}.parquet"
        if not path.is_file():
            raise StageError(f"{path}: not found; run the {upstream} stage first")
        frames[name] = pl.read_parquet(path)
    return frames
