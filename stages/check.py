"""`python -m stages.check [--params params.yaml]`: every section of params.yaml validated before anything runs.

A stage validates its own sections when it starts; a mistake in `publish.gates` would then surface only after
half an hour of training. This check builds every section through the class its stage reads it with (the
`read_params(Class, "section", ...)` calls of each stage module listed in dvc.yaml), plus the sections no
stage reads (`lineage`, `serve`, `tracking`, `search`), and reports every error at once, each naming
`section.key`, with a did-you-mean for an unknown key or section. `python -m flows.pipeline` runs it as its
first task. Exit 0: all valid; 1: errors, listed.

It sits above the stages, as the flow does: it imports every stage module (and so torch), which no stage
and no library module may do.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from deploy.settings import ServeParams  # light: a dataclass (the server itself needs the serve extra)
from flows.search import SearchParams  # noqa: E402  (the flow's params; check sits above the stages, as flows do)
from stages.runner.errors import ParamError
from stages.runner.openlineage import LineageParams
from stages.runner.params import from_dict
from stages.runner.tracking import TrackingParams

ROOT = Path(__file__).resolve().parents[1]
READS = re.compile(r'read_params\(\s*(\w+),\s*"(\w+)"')
# sections read outside any stage: run events, the server, per-epoch tracking, the student search
NOT_STAGES = {"lineage": LineageParams, "serve": ServeParams, "tracking": TrackingParams, "search": SearchParams}
OTHER_SECTIONS = ("flow",)  # read by flows/pipeline.py (retries), checked there


def section_classes(dvc_yaml: Path) -> dict[str, tuple[type, list[str]]]:
    """section -> (its params class, the stages that read it), from each stage module's `read_params` calls."""
    stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages", {})
    found: dict[str, tuple[type, list[str]]] = {}
    for stage in stages:
        source = (ROOT / "stages" / f"{stage}.py").read_text(encoding="utf-8")
        reads = READS.findall(source)
        if not reads:
            continue
        module = importlib.import_module(f"stages.{stage}")
        for class_name, section in reads:
            cls = getattr(module, class_name, None)
            if cls is None:  # imported from the library under this name
                raise RuntimeError(f"stages/{stage}.py reads {section} with {class_name}, which it does not define")
            found.setdefault(section, (cls, []))[1].append(stage)
    for section, cls in NOT_STAGES.items():
        found[section] = (cls, [])
    return found


def check(doc: dict[str, Any], classes: dict[str, tuple[type, list[str]]]) -> list[str]:
    """Every error in `doc` (params.yaml loaded), one line each."""
    errors = []
    known = [*classes, *OTHER_SECTIONS]
    for section in sorted(set(doc) - set(known)):
        close = difflib.get_close_matches(section, known, n=1)
        errors.append(f"{section}: unknown section{f' (did you mean {close[0]}?)' if close else ''}")
    for section, (cls, stages) in classes.items():
        value = doc.get(section)
        if value is None:
            if stages:
                errors.append(f"{section}: missing (read by {', '.join(stages)})")
            continue
        if not isinstance(value, dict):
            errors.append(f"{section}: must be a mapping, got {type(value).__name__}")
            continue
        try:
            from_dict(cls, value, section)
        except (ParamError, ValueError, TypeError) as exc:
            message = str(exc)
            named = message.startswith(section) or f"'{section}." in message or f"'{section}'" in message
            errors.append(message if named else f"{section}: {message}")
    return errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages.check", description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"))
    args = ap.parse_args(argv)
    try:
        doc = yaml.safe_load(args.params.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        print(f"check: {args.params}: {exc}", file=sys.stderr)
        return 1
    if not isinstance(doc, dict):
        print(f"check: {args.params}: not a mapping of sections", file=sys.stderr)
        return 1
    classes = section_classes(args.dvc_yaml)
    errors = check(doc, classes)
    for line in errors:
        print(f"check: {args.params}: {line}", file=sys.stderr)
    if errors:
        print(f"check: {len(errors)} error(s) in {args.params}; nothing was run", file=sys.stderr)
        return 1
    print(f"check: {args.params}: {len(classes)} sections valid")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
