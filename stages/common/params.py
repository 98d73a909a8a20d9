"""Read one stage's section of params.yaml into its frozen, self-validating dataclass."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from stages.common.errors import StageError

T = TypeVar("T")


def load_section(section: str, path: str | Path = "params.yaml") -> dict[str, Any]:
    """Return `params.yaml[section]`, or raise a StageError naming the file and section."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: params file not found")
    with path.open(encoding="utf-8") as fh:
        doc = yaml.safe_load(fh) or {}
    if not isinstance(doc, dict) or section not in doc:
        raise StageError(f"{path}: no section '{section}'")
    value = doc[section]
    if not isinstance(value, dict):
        raise StageError(f"{path}: section '{section}' must be a mapping, got {type(value).__name__}")
    return value


def from_dict(cls: type[T], values: dict[str, Any], section: str) -> T:
    """Build a params dataclass from a mapping; unknown or missing keys are named in the error."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise StageError(f"params.yaml: unknown key(s) in '{section}': {', '.join(unknown)}")
    try:
        return cls(**values)
    except TypeError as exc:
        required = [
            f.name
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [n for n in required if n not in values]
        if missing:
            raise StageError(f"params.yaml: missing key(s) in '{section}': {', '.join(missing)}") from exc
        raise
