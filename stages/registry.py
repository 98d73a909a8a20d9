"""The model registry's format, for everything that writes or reads it: publish, the lineage audit
(flows.lineage) and the server (deploy/).

    <registry>/<model>/<version>/      version: x.y.z; complete versions only (a draft is a dot-folder)
        model.onnx | model.plan        the payload: model, runtime.json, tokenizer/, labels.json
        runtime.json                   RuntimeRecord: how to run it
        tokenizer/  labels.json
        model_card.md  lineage.json    Lineage: where it came from
        SHA256SUMS                     `sha256sum -c` format, over every other file
    <registry>/<model>/stages.json     which version each named stage (production, staging, ...) serves

The payload defines a version's content (`payload_digest`); a version is written in a draft folder beside
the others, synced, frozen read-only and renamed into place, and is never overwritten. Stages are the one
mutable part, as in GTO's convention (`gto assign`): `assign` moves a stage to a version, keeping the
history of assignments; `resolve("model#production")` finds the version a stage points at.
Light: no torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from stages.records import Record, optional
from stages.runner.errors import ParamError, StageError
from stages.storage.atomic import dumps_json, fsync_dir, fsync_tree
from stages.storage.hashing import sha256_bytes, sha256_file

MODEL_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
VERSION = re.compile(r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$")
PAYLOAD = ("model.", "runtime.json", "tokenizer/", "labels.json")  # what defines a version's content
SUMS = "SHA256SUMS"
STAGES = "stages.json"
STAGE_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")  # production, staging, ...


class RegistryError(StageError):
    """A version that is not there, a malformed name, or a version folder that cannot be read."""


@dataclasses.dataclass(frozen=True)
class RuntimeRecord(Record):
    """runtime.json: how to run a version's model, as benchmark measured it."""

    variant: str  # benchmark's name of the published variant
    file: str  # model.onnx or model.plan
    backend: str  # onnxruntime | tensorrt
    device: str
    providers: list[str]
    inputs: list[str]
    outputs: list[str]
    session_options: dict[str, Any] | None = optional()  # ONNX Runtime only


@dataclasses.dataclass(frozen=True)
class Lineage(Record):
    """lineage.json: which data, params, code and machine made a version."""

    model: str
    version: str
    variant: str
    content_digest: str
    git: dict[str, Any]  # commit, dirty, modified
    files: dict[str, str]  # the payload's SHA-256 by path
    published_from: dict[str, str]  # file, sha256
    publish: dict[str, Any]  # params, reads, margin_used
    stages: list[dict[str, Any]]  # each stage's dvc.lock entry, in pipeline order
    sources: list[dict[str, Any]]
    fingerprint: dict[str, Any]
    benchmark: dict[str, Any]  # the published variant's row and its gates
    published_utc: str | None = optional()  # versions published before 2026-12 carry their clock time


def check_model_name(name: Any, key: str = "publish.model") -> str:
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):  # fullmatch: `$` would let 'name\n' by
        raise ParamError(f"{key}: {name!r} must be lowercase letters, digits and dashes")
    return name


def check_version(version: Any, key: str = "publish.version") -> str:
    """A version name that is safe as one folder name: `x.y.z` only (no `..`, no `/`)."""
    if not isinstance(version, str) or ".." in version or "/" in version or "\\" in version:
        raise ParamError(f"{key}: {version!r} is not a version name (a path separator or '..' is refused)")
    if not isinstance(version, str) or not VERSION.fullmatch(version):
        raise ParamError(f"{key}: {version!r} is not a version x.y.z (e.g. 1.0.0)")
    return version


def version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


# ---- checksums -----------------------------------------------------------------------------------------


def read_sums(folder: Path) -> dict[str, str]:
    """`SHA256SUMS` of a version: relative path -> digest; a file that is not one is a RegistryError."""
    path = folder / SUMS
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: cannot be read as a SHA256SUMS file ({exc.__class__.__name__})") from exc
    sums = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or not name:
            raise RegistryError(f"{path}: line {number} is not '<sha256>  <path>': {line[:80]!r}")
        sums[name] = digest
    return sums


def sums_text(sums: dict[str, str]) -> str:
    return "".join(f"{h}  {n}\n" for n, h in sums.items())


def file_sums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` but SHA256SUMS, by relative path, in path order."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != SUMS
    }


def payload_digest(sums: dict[str, str]) -> str:
    """One digest of a version's content: its payload files' SHA-256, in path order."""
    lines = "".join(f"{h}  {p}\n" for p, h in sorted(sums.items()) if p.startswith(PAYLOAD))
    return sha256_bytes(lines.encode())


def payload_sums(sums: dict[str, str]) -> dict[str, str]:
    return {n: h for n, h in sums.items() if n.startswith(PAYLOAD)}


# ---- reading -------------------------------------------------------------------------------------------


def versions(model_dir: Path) -> list[str]:
    """Complete versions of one model (a folder named x.y.z holding SHA256SUMS), oldest first."""
    if not model_dir.is_dir():
        return []
    # A symlink is never a version: a version is a folder publish wrote in place, not a pointer elsewhere.
    found = [
        d.name
        for d in model_dir.iterdir()
        if VERSION.fullmatch(d.name) and not d.is_symlink() and d.is_dir() and (d / SUMS).is_file()
    ]
    return sorted(found, key=version_key)


def existing_versions(model_dir: Path) -> dict[str, str]:
    """version -> content digest for every complete version of one model."""
    return {v: payload_digest(read_sums(model_dir / v)) for v in versions(model_dir)}


def next_version(existing: dict[str, str], requested: str) -> str:
    """`requested`, or for `auto` the next major version (1.0.0, 2.0.0, ...)."""
    if requested != "auto":
        return requested
    top = max((version_key(v) for v in existing), default=(0, 0, 0))
    return f"{top[0] + 1}.0.0"


def read_stages(model_dir: Path) -> dict[str, str]:
    """Stage name -> version of a model (empty when none was assigned)."""
    path = model_dir / STAGES
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {name: entry["version"] for name, entry in sorted(data["stages"].items())}
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"{path}: not a stages file ({exc})") from exc


def stages_of(model_dir: Path, version: str) -> list[str]:
    return [name for name, v in read_stages(model_dir).items() if v == version]


def assign(model_dir: Path, stage: str, version: str, note: dict[str, Any] | None = None) -> int:
    """Point `stage` at `version` (which must exist), atomically; returns the assignment's number for this
    stage (1, 2, ...: GTO's `<model>#<stage>#<n>` tag number). `note` (who, why) goes into the history."""
    if not isinstance(stage, str) or not STAGE_NAME.fullmatch(stage):
        raise RegistryError(f"stage {stage!r}: lowercase letters, digits, '-' and '_', starting with a letter")
    check_version(version, "version")
    if version not in versions(model_dir):
        raise RegistryError(f"{model_dir.name}@{version}: not published (versions: {', '.join(versions(model_dir))})")
    path = model_dir / STAGES
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"stages": {}, "history": []}
    number = 1 + sum(1 for h in data["history"] if h["stage"] == stage)
    data["stages"][stage] = {"version": version}
    data["history"].append({"stage": stage, "version": version, "number": number, **(note or {})})
    tmp = path.with_name(f".{STAGES}.tmp")
    tmp.write_text(dumps_json(data), encoding="utf-8")
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(model_dir)
    return number


def resolve(registry: Path, spec: str) -> Path:
    """`model`, `model@version` (also `model@vX.Y.Z`, as git tags write it) or `model#stage` (GTO's form: the
    version that stage is assigned) to the version folder; the latest version with neither."""
    if "#" in spec:
        model, _, stage = spec.partition("#")
        assigned = read_stages(registry / model) if model and "/" not in model and ".." not in model else {}
        if stage not in assigned:
            known = ", ".join(f"{k} -> {v}" for k, v in assigned.items()) or "none assigned"
            raise RegistryError(f"{spec!r}: no version of {model} is assigned to stage {stage!r} ({known})")
        spec = f"{model}@{assigned[stage]}"
    model, _, version = spec.partition("@")
    version = version.removeprefix("v")
    if not model or "/" in model or ".." in model:
        raise RegistryError(f"{spec!r}: not a model name")
    if version and ("/" in version or ".." in version or not VERSION.fullmatch(version)):
        raise RegistryError(f"{spec!r}: {version!r} is not a version x.y.z (a path separator or '..' is refused)")
    found = versions(registry / model)
    if not found:
        raise RegistryError(f"{registry / model}: no published version of {model}")
    if version and version not in found:
        raise RegistryError(f"{model}@{version}: not in {registry / model} (versions: {', '.join(found)})")
    return registry / model / (version or found[-1])


def read_lineage(folder: Path) -> Lineage:
    try:
        return Lineage.read(folder / "lineage.json")
    except StageError as exc:
        raise RegistryError(str(exc)) from exc


def read_runtime(folder: Path) -> RuntimeRecord:
    try:
        return RuntimeRecord.read(folder / "runtime.json")
    except StageError as exc:
        raise RegistryError(str(exc)) from exc


# ---- writing -------------------------------------------------------------------------------------------


class Draft:
    """A version being written, in a dot-folder beside the versions of its model. `add` the payload,
    read its `digest`, `add` the rest, then `commit(version)`; `discard` (or leaving the `with` block
    without a commit) removes it."""

    def __init__(self, model_dir: Path):
        model_dir.mkdir(parents=True, exist_ok=True)
        self.model_dir = model_dir
        self.folder = Path(tempfile.mkdtemp(prefix=".publish-", dir=model_dir))

    def __enter__(self) -> Draft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def add(self, name: str, content: bytes | str | Path) -> None:
        """A file from bytes or text, or a copy of a file or folder."""
        target = self.folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            (shutil.copytree if content.is_dir() else shutil.copyfile)(content, target)
        else:
            target.write_bytes(content.encode() if isinstance(content, str) else content)

    def sums(self) -> dict[str, str]:
        return file_sums(self.folder)

    def digest(self) -> str:
        return payload_digest(self.sums())

    def commit(self, version: str) -> Path:
        """Write SHA256SUMS, sync, freeze and rename into `<model>/<version>`; never over an existing one."""
        target = self.model_dir / check_version(version)
        (self.folder / SUMS).write_text(sums_text(self.sums()), encoding="utf-8")
        fsync_tree(self.folder)
        self.folder.chmod(0o755)
        freeze(self.folder)
        if target.exists():
            raise StageError(f"{target} exists; a version is never overwritten")
        os.rename(self.folder, target)  # fails rather than replace a folder that appeared meanwhile
        fsync_dir(self.model_dir)
        return target

    def discard(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)


def freeze(folder: Path) -> None:
    """Published files are read-only (folders stay writable so that a person can still remove a version)."""
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(0o444)


def record_text(record: Record) -> str:
    """The bytes a record is stored as in a version (deterministic JSON)."""
    return dumps_json(record.to_dict())
