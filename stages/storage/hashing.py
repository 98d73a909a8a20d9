"""Content hashes used in reports and lineage: SHA-256 for published files, DVC's MD5 for stage outputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CHUNK = 1 << 20


def _digest(path: str | Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    return _digest(path, "sha256")


def md5_file(path: str | Path) -> str:
    return _digest(path, "md5")


def dvc_md5(path: str | Path) -> str:
    """The hash DVC 3 records for `path` in dvc.lock: the file's MD5, or for a folder the MD5 of its
    listing (`[{"md5", "relpath"}, ...]` sorted by path, as DVC serializes it) followed by `.dir`."""
    path = Path(path)
    if path.is_file():
        return md5_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not found")
    entries = sorted(
        ({"md5": md5_file(f), "relpath": f.relative_to(path).as_posix()} for f in path.rglob("*") if f.is_file()),
        key=lambda e: e["relpath"],
    )
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"
