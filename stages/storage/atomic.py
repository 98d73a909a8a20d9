"""Atomic outputs: a stage writes every output under a temporary name and renames them all at the end.

A failed stage therefore leaves no half-written file: either all its outputs are replaced or none is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported by `Outputs.parquet` only: stages that write no frame never pay for polars
    import polars as pl


_COMMIT_CHECKS: list[Callable[[], None]] = []


def before_commit(check: Callable[[], None]) -> None:
    """Run `check()` before any output is renamed into place (the stage runner's params check); an exception
    it raises discards the outputs instead."""
    _COMMIT_CHECKS.append(check)


def clear_commit_checks() -> None:
    _COMMIT_CHECKS.clear()


def run_commit_checks() -> None:
    for check in _COMMIT_CHECKS:
        check()


def dumps_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, fixed indentation, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


class Outputs:
    """Collects outputs written to temporary names; `commit()` renames them into place."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def _tmp_for(self, target: Path, is_dir: bool = False) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            tmp = Path(name)
        self._pending.append((tmp, target))
        return tmp

    def file(self, target: str | Path, write: Callable[[Path], None]) -> None:
        """Call `write(tmp_path)`, to be renamed onto `target` at commit."""
        tmp = self._tmp_for(Path(target))
        try:
            write(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        except OSError as exc:  # disk full, file too large: name the output, not the temporary name
            exc.filename = str(target)
            raise

    def directory(self, target: str | Path) -> Path:
        """Return an empty temporary folder whose content replaces `target` at commit."""
        return self._tmp_for(Path(target), is_dir=True)

    def text(self, target: str | Path, content: str) -> None:
        self.file(target, lambda p: p.write_text(content, encoding="utf-8"))

    def json(self, target: str | Path, obj: Any) -> None:
        self.text(target, dumps_json(obj))

    def parquet(self, target: str | Path, frame: pl.DataFrame) -> None:
        # Fixed codec and level, so the same frame always gives the same bytes.
        self.file(target, lambda p: frame.write_parquet(p, compression="zstd", compression_level=3))

    def commit(self) -> None:
        run_commit_checks()
        # mkstemp/mkdtemp create private files; outputs get the usual permissions under the umask.
        umask = os.umask(0)
        os.umask(umask)
        for tmp, _ in self._pending:
            paths = [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]
            for path in paths:
                path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        for tmp, target in self._pending:
            if tmp.is_dir():
                old = None
                if target.exists():
                    old = target.with_name(f".{target.name}.old")
                    shutil.rmtree(old, ignore_errors=True)
                    os.replace(target, old)
                os.replace(tmp, target)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        self._pending.clear()

    def discard(self) -> None:
        for tmp, _ in self._pending:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        self._pending.clear()


@contextmanager
def outputs() -> Iterator[Outputs]:
    """`with outputs() as out: out.json(...)`: all renamed on success, all removed on error."""
    out = Outputs()
    try:
        yield out
        out.commit()
    except BaseException:
        out.discard()
        raise


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every folder bottom-up (so a rename of `folder` after this
    publishes complete bytes even across a power loss)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for path in [*sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True), folder]:
        fsync_dir(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
