"""dvc.lock as DVC rewrites it: the copy each stage run takes first, and telling a cut-short write from a sound one.

After every stage DVC rewrites dvc.lock in place (it truncates the file, then writes it), so a `kill -9` at that
moment leaves a prefix of the new file. Most prefixes do not parse; but a cut at a line boundary can parse and
pass DVC's schema (the key before the cut is left with no value), and then the stages after the cut are simply
gone from the lock: DVC believes they never ran, and a stage that checks its inputs against dvc.lock finds them
made by nobody. Such a prefix is told from a lock changed on purpose by comparing it with the copy the last
stage run took (`save`), knowing which stage that run was:

- its last entry stops part way: an item without its hash or size, an entry without its command, or without
  a section or an output the same stage's entry had in the copy;
- or its stages are the copy's in the same order with entries equal to the copy's (the stage that ran aside),
  but stages that dvc.yaml still declares are missing at the end.

A lock that differs from the copy elsewhere (a `git checkout`, a stage DVC restored from its run cache since)
is not treated as cut: it is left alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

BACKUP = "distillery-dvc.lock.json"  # under .dvc/tmp/: {"stage": the stage run that took it, "lock": the text}


def backup_path(root: Path) -> Path:
    return root / ".dvc" / "tmp" / BACKUP


def save(root: Path, stage: str) -> None:
    """Keep a copy of dvc.lock as DVC read it to start running `stage`."""
    lock, target = root / "dvc.lock", backup_path(root)
    if lock.is_file() and target.parent.is_dir():
        tmp = target.with_name(f".{BACKUP}.tmp")
        tmp.write_text(json.dumps({"stage": stage, "lock": lock.read_text(encoding="utf-8")}), encoding="utf-8")
        os.replace(tmp, target)


def load(root: Path) -> tuple[str, str | None] | None:
    """(the copied text, the stage whose run took it), or None if there is no readable copy."""
    try:
        saved = json.loads(backup_path(root).read_text(encoding="utf-8"))
        return str(saved["lock"]), saved.get("stage")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stages_of(text: str) -> dict[str, Any]:
    doc = yaml.safe_load(text)
    stages = doc.get("stages") if isinstance(doc, dict) else None
    return stages if isinstance(stages, dict) else {}


def _item_complete(item: Any) -> bool:
    if not isinstance(item, dict) or not item.get("path"):
        return False
    digest = next((item[k] for k in ("md5", "etag", "checksum") if item.get(k)), None)
    if digest is None or "size" not in item:
        return False
    return not (str(digest).endswith(".dir") and "nfiles" not in item)


def entry_complete(entry: Any, before: Any = None) -> bool:
    """An entry as DVC writes it whole; with `before` (the same stage's entry in the copy), also no section or
    output of `before` missing."""
    if not isinstance(entry, dict) or not entry.get("cmd"):
        return False
    if not all(_item_complete(i) for key in ("deps", "outs") for i in (entry.get(key) or [])):
        return False
    if isinstance(before, dict):
        if any(entry.get(key) is None for key, value in before.items() if value is not None):
            return False
        paths = {i.get("path") for i in entry.get("outs") or [] if isinstance(i, dict)}
        if any(isinstance(i, dict) and i.get("path") not in paths for i in before.get("outs") or []):
            return False
    return True


def cut_short(text: str, backup: str, stage: str | None, declared: list[str]) -> str | None:
    """Why `text` (a dvc.lock that parses) is a cut-short rewrite of `backup` after `stage` ran, or None.
    `declared`: the stage names in dvc.yaml now."""
    try:
        now, before = stages_of(text), stages_of(backup)
    except yaml.YAMLError:
        return None
    names = list(now)
    expected = list(before) + ([stage] if stage and stage not in before else [])
    last = names[-1] if names else None
    if last is not None and not entry_complete(now[last]):
        return f"its last entry ({last}) stops part way"
    if names != expected[: len(names)] or any(now[n] != before[n] for n in names[:-1] if n != stage):
        return None  # another history than the copy's: not a cut of the write that followed it
    if last is not None and last != stage and now[last] != before[last]:
        return f"its last entry ({last}) stops part way"
    if last is not None and last == stage and not entry_complete(now[last], before.get(last)):
        return f"its last entry ({last}) stops part way"
    missing = [n for n in expected[len(names) :] if n.split("@")[0] in declared]
    if missing:
        return f"it stops after {last or 'its header'}: {', '.join(missing)} missing"
    return None


def declared_stages(root: Path) -> list[str]:
    try:
        doc = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    stages = doc.get("stages") if isinstance(doc, dict) else None
    return list(stages) if isinstance(stages, dict) else []


def check(root: Path) -> str | None:
    """Why dvc.lock here is a cut-short rewrite of the copy the last stage run took, or None."""
    saved = load(root)
    lock = root / "dvc.lock"
    if saved is None or not lock.is_file():
        return None
    return cut_short(lock.read_text(encoding="utf-8"), saved[0], saved[1], declared_stages(root))
