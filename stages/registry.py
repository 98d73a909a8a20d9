"""The model registry's format, for everything that writes or reads it: publish, the lineage audit
(flows.lineage) and the server (deploy/).

    <registry>/<model>/<version>/      version: x.y.z; complete versions only (a draft is a dot-folder)
        model.onnx | model.plan        the payload: model, runtime.json, tokenizer/, labels.json
        runtime.json                   RuntimeRecord: how to run it
        tokenizer/  labels.json
        model_card.md  lineage.json    Lineage: where it came from
        SHA256SUMS                     `sha256sum -c` format, over every other file
        signature.sig                  optional: an OpenSSF model-signing bundle over all the files above
    <registry>/<model>/index.jsonl     append-only: one line per version, each holding the previous line's hash
    <registry>/<model>/stages.json     which version each named stage (production, staging, ...) serves

The payload defines a version's content (`payload_digest`); a version is written in a draft folder beside
the others, synced, frozen read-only and renamed into place, and is never overwritten. Stages are the one
mutable part, as in GTO's convention (`gto assign`): `assign` moves a stage to a version, keeping the
history of assignments; `resolve("model#production")` finds the version a stage points at.

What vouches for a version from outside its folder: the index (a hash chain: a version folder missing from
it is not a version, a listed version that is gone is found, a rewritten line breaks the chain), the
signature when the user configured a key (`publish.signing`), and the receipt that the git-tracked
`dvc.lock` records (`flows.lineage verify` reads all three). The registry folder must lie inside the
project, and no part of a version's path may be a symlink: publish never writes anywhere else.
Light: no torch.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from stages.records import Record, optional
from stages.runner.errors import ParamError, StageError
from stages.storage.atomic import dumps_json, fsync_dir, fsync_tree, run_commit_checks
from stages.storage.hashing import sha256_bytes, sha256_file

MODEL_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
VERSION = re.compile(r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$")
PAYLOAD = ("model.", "runtime.json", "tokenizer/", "labels.json", "reject.")  # what defines a version's content
SUMS = "SHA256SUMS"
STAGES = "stages.json"
STAGE_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")  # production, staging, ...
INDEX = "index.jsonl"
SIGNATURE = "signature.sig"
NO_HASH = "0" * 64  # the `prev` of an index's first line


class RegistryError(StageError):
    """A version that is not there, a malformed name, or a version folder that cannot be read."""


class Forged(RegistryError):
    """A version folder or index line the registry's own records do not vouch for."""


@dataclasses.dataclass(frozen=True)
class RuntimeRecord(Record):
    """runtime.json: how to run a version's model, as benchmark measured it."""

    variant: str  # benchmark's name of the published variant
    file: str  # model.onnx or model.plan
    backend: str  # onnxruntime | tensorrt | kernels (distillery_kernels.engine on an INT8 ONNX model)
    device: str
    providers: list[str]
    inputs: list[str]
    outputs: list[str]
    session_options: dict[str, Any] | None = optional()  # ONNX Runtime only
    max_length: int | None = optional()  # tokens per text the model was measured with (versions from 2026-12-04)
    block: list[int] | None = optional()  # backend kernels: the block-sparse packing benchmark measured (None: dense)


@dataclasses.dataclass(frozen=True)
class RejectRecord(Record):
    """reject.json: the out-of-scope rule the server applies to a version's predictions
    (`stages.model.rejection`): a text whose score is under `threshold` is answered `label`."""

    method: str  # max_softmax | energy | none
    label: str  # what a rejected text is answered
    threshold: float | None = optional()  # accept when the method's score >= threshold
    in_scope_recall: float | None = optional()  # what the threshold was calibrated to keep on validation
    val_rows: int | None = optional()  # validation rows of known intents it was calibrated on
    test: dict[str, Any] | None = optional()  # benchmark's figures for this method and variant on the test rows
    stats: str | None = optional()  # mahalanobis: the version's file of class means and precision (safetensors)


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


def check_registry_path(value: Any, key: str = "publish.registry") -> str:
    """A registry folder relative to the project and inside it: no absolute path, no `..`, no NUL/newline."""
    if not isinstance(value, str) or not value.strip():
        raise ParamError(f"{key} must be a folder path inside the project")
    if any(c in value for c in "\0\n\r") or value.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", value):
        raise ParamError(f"{key}: {value!r} must be a relative folder inside the project (no absolute path)")
    if ".." in PurePosixPath(value.replace("\\", "/")).parts:
        raise ParamError(f"{key}: {value!r} must not climb out of the project with '..'")
    return value


def contained(root: Path, path: Path) -> Path:
    """`path` (under `root`), refusing a symlink anywhere between them: a planted `registry -> /elsewhere`
    or `registry/<model> -> /elsewhere` would otherwise make publish write outside the project."""
    rel = path.relative_to(root) if path.is_absolute() else path
    here = root
    for part in rel.parts:
        here = here / part
        if here.is_symlink():
            raise RegistryError(f"{here}: is a symlink (to {os.readlink(here)}); the registry is never written "
                                "through a link, remove it")  # fmt: skip
    return root / rel


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
    """SHA-256 of every file under `folder` but SHA256SUMS and the signature (which covers SHA256SUMS), by
    relative path, in path order."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in (SUMS, SIGNATURE)
    }


def paths_outside(folder: Path) -> list[str]:
    """`file: key = value` for every string in a version's JSON files (tokenizer and model configs, runtime.json)
    that names a path outside the version: an absolute path or one climbing out with `..`. A loader following
    it would read a file the checksums never covered."""
    found = []

    def walk(name: str, key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(name, f"{key}.{k}" if key else str(k), v)
        elif isinstance(value, list):
            for i, v in enumerate(value[:1000]):
                walk(name, f"{key}[{i}]", v)
        elif isinstance(value, str) and len(value) < 4096 and ("/" in value or "\\" in value):
            if (
                value.startswith(("/", "~", "\\", "file:"))
                or re.match(r"^[A-Za-z]:[\\/]", value)
                or ".." in re.split(r"[\\/]", value)
            ):
                found.append(f"{name}: {key} = {value[:80]!r}")

    for path in sorted(folder.rglob("*.json")):
        if path.name == "lineage.json":  # provenance: quotes repository paths, never opened by a loader
            continue
        try:
            walk(path.relative_to(folder).as_posix(), "", json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, UnicodeDecodeError):
            found.append(f"{path.relative_to(folder).as_posix()}: not valid JSON")
    return found


def payload_digest(sums: dict[str, str]) -> str:
    """One digest of a version's content: its payload files' SHA-256, in path order."""
    lines = "".join(f"{h}  {p}\n" for p, h in sorted(sums.items()) if p.startswith(PAYLOAD))
    return sha256_bytes(lines.encode())


def payload_sums(sums: dict[str, str]) -> dict[str, str]:
    return {n: h for n, h in sums.items() if n.startswith(PAYLOAD)}


# ---- reading -------------------------------------------------------------------------------------------


def folders(model_dir: Path) -> list[str]:
    """Folders that look like versions (x.y.z holding SHA256SUMS), whether the index lists them or not."""
    if not model_dir.is_dir():
        return []
    # A symlink is never a version: a version is a folder publish wrote in place, not a pointer elsewhere.
    found = [
        d.name
        for d in model_dir.iterdir()
        if VERSION.fullmatch(d.name) and not d.is_symlink() and d.is_dir() and (d / SUMS).is_file()
    ]
    return sorted(found, key=version_key)


def versions(model_dir: Path) -> list[str]:
    """Published versions of one model, oldest first: the folders its index lists (a registry written before
    the index existed has none: then every version folder)."""
    found = folders(model_dir)
    index = read_index(model_dir)
    return found if index is None else [v for v in found if v in index]


# ---- the index -----------------------------------------------------------------------------------------


def line_hash(line: str) -> str:
    return sha256_bytes(line.encode())


def read_index(model_dir: Path) -> dict[str, dict[str, Any]] | None:
    """version -> its index entry, after checking the chain; None when the model has no index yet."""
    path = model_dir / INDEX
    if not path.is_file() or path.is_symlink():
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise Forged(f"{path}: cannot be read ({exc.__class__.__name__})") from exc
    entries: dict[str, dict[str, Any]] = {}
    prev = NO_HASH
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
            ok = isinstance(entry, dict) and isinstance(entry.get("version"), str)
        except ValueError:
            ok = False
        if not ok:
            raise Forged(f"{path}: line {number} is not an index entry: {line[:80]!r}")
        if entry.get("prev") != prev:
            raise Forged(f"{path}: line {number} ({entry['version']}) does not hold the hash of the line before it: "
                         "the index was edited")  # fmt: skip
        if entry["version"] in entries:
            raise Forged(f"{path}: line {number} lists {entry['version']} a second time")
        entries[entry["version"]] = entry
        prev = line_hash(line)
    return entries


def index_entry(folder: Path) -> dict[str, Any]:
    """What the index records of a version: its content, SHA256SUMS and lineage.json digests."""
    sums = read_sums(folder)
    lineage = folder / "lineage.json"
    return {
        "version": folder.name,
        "content_digest": payload_digest(sums),
        "sums_sha256": sha256_file(folder / SUMS),
        "lineage_sha256": sha256_file(lineage) if lineage.is_file() else None,
        "signed": (folder / SIGNATURE).is_file(),
    }


def append_index(model_dir: Path, entry: dict[str, Any]) -> None:
    """Append one line holding the hash of the line before it (call under `locked`)."""
    path = model_dir / INDEX
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    line = json.dumps({**entry, "prev": line_hash(lines[-1]) if lines else NO_HASH}, sort_keys=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(model_dir)


def start_index(model_dir: Path) -> None:
    """Create the index of a model published before it existed, adopting the version folders found (flagged
    `adopted`: the index vouches for them from now on, not for their past)."""
    if (model_dir / INDEX).exists():
        return
    (model_dir / INDEX).touch()
    for version in folders(model_dir):
        append_index(model_dir, {**index_entry(model_dir / version), "adopted": True})


@contextmanager
def locked(model_dir: Path) -> Iterator[None]:
    """One publisher of a model at a time (a second waits): choosing a version and adding it is one step."""
    model_dir.mkdir(parents=True, exist_ok=True)
    with open(model_dir / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
    if version and version not in found and version in folders(registry / model):
        raise Forged(f"{registry / model / version}: not in {registry / model / INDEX}, so not a published version "
                     "(hand-made, or left by a publish that crashed before indexing it)")  # fmt: skip
    if not found and folders(registry / model):
        raise Forged(f"{registry / model}: version folder(s) {', '.join(folders(registry / model))} exist but "
                     f"{INDEX} lists none of them (the index was emptied, or they were copied in)")  # fmt: skip
    index = read_index(registry / model) or {}
    gone = [v for v in index if v not in folders(registry / model)]
    if gone and (not found or version in gone):
        raise Forged(f"{registry / model}: version(s) {', '.join(gone)} listed in {INDEX} are gone")
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


def read_reject(folder: Path) -> RejectRecord | None:
    """reject.json, or None for a version published before versions carried one."""
    if not (folder / "reject.json").is_file():
        return None
    try:
        return RejectRecord.read(folder / "reject.json")
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

    def commit(self, version: str, sign: Signing | None = None) -> Path:
        """Write SHA256SUMS, sign (when configured), sync, freeze, rename into `<model>/<version>` and append it
        to the index; never over an existing version. Call under `locked(model_dir)`."""
        run_commit_checks()  # e.g. params.yaml edited while publish ran: nothing reaches the registry
        outside = paths_outside(self.folder)
        if outside:
            raise StageError(f"refusing to publish files that point outside the version: {'; '.join(outside[:3])}")
        target = self.model_dir / check_version(version)
        (self.folder / SUMS).write_text(sums_text(self.sums()), encoding="utf-8")
        if sign is not None and sign.method != "none":
            sign.sign(self.folder)
        fsync_tree(self.folder)
        self.folder.chmod(0o755)
        freeze(self.folder)
        if target.exists() or target.is_symlink():
            raise StageError(f"{target} exists; a version is never overwritten")
        start_index(self.model_dir)
        os.rename(self.folder, target)  # under the model's lock: nothing else can create `target` meanwhile
        fsync_dir(self.model_dir)
        append_index(self.model_dir, index_entry(target))
        return target

    def discard(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class Signing:
    """`publish.signing`: sign each version with the OpenSSF model-signing package.

    none      unsigned (verify warns that only the index and dvc.lock vouch for the files)
    key       an elliptic-curve private key in PEM (`private_key`, kept outside the project; `password_env`
              names the variable holding its password, if any); verify with its public key
    sigstore  keyless Sigstore signing (needs a network and an OIDC identity; verify with `identity`/`issuer`)
    """

    method: str = "none"
    private_key: str = ""
    password_env: str = ""
    public_key: str = ""  # what `flows.lineage verify` checks key signatures with

    def __post_init__(self) -> None:
        if self.method not in ("none", "key", "sigstore"):
            raise ParamError(f"publish.signing.method must be none, key or sigstore, got {self.method!r}")
        if self.method == "key" and not self.private_key:
            raise ParamError("publish.signing.private_key: required with method: key (a PEM file)")

    def sign(self, folder: Path) -> None:
        try:
            from model_signing import hashing, signing
        except ImportError as exc:
            raise StageError("publish.signing: the model-signing package is not installed (pip install "
                             "'distillery[sign]')") from exc  # fmt: skip
        config = signing.Config().set_hashing_config(signature_hashing(folder, hashing))
        if self.method == "key":
            key = Path(self.private_key).expanduser()
            if not key.is_file():
                raise StageError(f"publish.signing.private_key: {key} not found")
            password = os.environ.get(self.password_env) if self.password_env else None
            config = config.use_elliptic_key_signer(private_key=key, password=password)
        else:
            config = config.use_sigstore_signer()
        try:
            config.sign(folder, folder / SIGNATURE)
        except Exception as exc:  # noqa: BLE001 - a signer's failure (bad key, no network) is named, not a traceback
            raise StageError(f"publish.signing ({self.method}): signing failed: {exc}") from exc


def signature_hashing(folder: Path, hashing: Any) -> Any:
    """What a signature covers: every file of the version but the signature itself."""
    return hashing.Config().set_ignored_paths(paths=[folder / SIGNATURE], ignore_git_paths=False)


def verify_signature(folder: Path, public_key: Path) -> None:
    """A Forged error unless `folder/signature.sig` holds a valid signature over the version by `public_key`."""
    from model_signing import hashing, verifying

    if not public_key.is_file():
        raise RegistryError(f"{public_key}: public key not found")
    config = verifying.Config().set_hashing_config(signature_hashing(folder, hashing))
    try:
        config.use_elliptic_key_verifier(public_key=public_key).verify(folder, folder / SIGNATURE)
    except Exception as exc:  # noqa: BLE001 - model-signing raises ValueError and others for a bad signature
        raise Forged(f"{folder / SIGNATURE}: the signature does not hold for {public_key}: {exc}") from exc


def freeze(folder: Path) -> None:
    """Published files are read-only (folders stay writable so that a person can still remove a version)."""
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(0o444)


def record_text(record: Record) -> str:
    """The bytes a record is stored as in a version (deterministic JSON)."""
    return dumps_json(record.to_dict())
