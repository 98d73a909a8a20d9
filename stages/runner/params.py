"""Read a section of params.yaml into its frozen, self-validating dataclass.

Every params read in stages/ goes through `read_params(cls, "section", file)`: tests/test_contract.py finds
these calls and holds each stage's `params:` in dvc.yaml to exactly the sections its module reads.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from stages.runner.errors import ParamError

T = TypeVar("T")


def load_section(section: str, path: str | Path = "params.yaml") -> dict[str, Any]:
    """Return `params.yaml[section]`, or raise a ParamError naming the file and section."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path}: params file not found")
    with path.open(encoding="utf-8") as fh:
        doc = yaml.safe_load(fh) or {}
    if not isinstance(doc, dict) or section not in doc:
        raise ParamError(f"{path}: no section '{section}'")
    value = doc[section]
    if not isinstance(value, dict):
        raise ParamError(f"{path}: section '{section}' must be a mapping, got {type(value).__name__}")
    return value


def from_dict(cls: type[T], values: dict[str, Any], section: str) -> T:
    """Build a params dataclass from a mapping; unknown or missing keys are named in the error, and an
    error the class raises about one of its keys is prefixed with the section (`train.optim.lr ...`)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, names, 1)) else k for k in unknown]
        raise ParamError(f"params.yaml: unknown key(s) in '{section}': {', '.join(hints)}")
    check_types(cls, values, section)
    try:
        return cls(**values)
    except ParamError as exc:
        message = str(exc)
        if message.split(".")[0].split(" ")[0] in names:  # "lr must be > 0" -> "train.optim.lr must be > 0"
            raise ParamError(f"{section}.{message}") from exc
        raise
    except TypeError as exc:
        required = [
            f.name
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [n for n in required if n not in values]
        if missing:
            raise ParamError(f"params.yaml: missing key(s) in '{section}': {', '.join(missing)}") from exc
        raise


KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _plain_kind(hint: Any) -> type | None:
    """bool, int, float or str when `hint` is one of them (or it or None); else None (not checked here)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else None
    return hint if hint in KINDS else None


def check_types(cls: type, values: dict[str, Any], section: str) -> None:
    """A value of the wrong plain type (a word where a number goes) is named `section.key` before the class
    compares it with anything; null passes where the field allows it."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        return
    for name, value in values.items():
        kind = _plain_kind(hints.get(name))
        if kind is None or (value is None and kind is not hints.get(name)):
            continue
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ParamError(f"{section}.{name} must be {KINDS[kind]}, got {value!r}")


def read_params(cls: type[T], section: str, params_file: str | Path) -> T:
    """`params.yaml[section]` as its validated dataclass (the one way stages read params)."""
    return from_dict(cls, load_section(section, params_file), section)


def block_shape(value: Any, name: str) -> tuple[int, int] | None:
    """A block of the block-sparse INT8 kernels (kernels/), as params give it: null, or [block_k, block_n] with
    block_k a positive multiple of 4 and block_n 16, 32 or 64; a ParamError names `name` otherwise."""
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2 or not all(type(b) is int for b in value)
            or value[0] < 4 or value[0] % 4 or value[1] not in (16, 32, 64)):  # fmt: skip
        raise ParamError(
            f"{name} must be null or [block_k, block_n] with block_k a positive multiple of 4 and block_n 16, 32 "
            f"or 64, got {value!r}"
        )
    return int(value[0]), int(value[1])
