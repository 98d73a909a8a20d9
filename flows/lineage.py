"""The lineage audit of a published model: `show` the chain back to the raw source, `verify` the bytes.

    python -m flows.lineage show <model>[@<version> | #<stage>]
    python -m flows.lineage verify <model>[@<version> | #<stage>] [--public-key PEM] [--rebuild]
    python -m flows.lineage assign <model>@<version> --stage production [--tag]

Without `@<version>` the latest version in the registry is used; `#production` is the version assigned to
that stage. The registry is `publish.registry` of params.yaml (or `--registry`).

`assign` points a named stage (production, staging, ...) at a published version: the registry's
`<model>/stages.json` records it with the history of earlier assignments, and `--tag` also writes GTO's
annotated git tag `<model>#<stage>#<n>`, so `gto show` reads the same assignment. Serving and `show` read
the stages file. Publishing never assigns a stage: promotion is a decision someone makes.

`show` prints, from the published files back to the raw source, each stage on the way: its command, the
params it tracks, each input with its hash and the stage that made it, and its outputs' hashes (all from
the version's `lineage.json`, i.e. dvc.lock as it was at publish time).

`verify` checks a version against what vouches for it inside and outside its folder, and exits 1 naming
the first mismatch:
- every published file against `SHA256SUMS` (a file missing, changed, not listed or a symlink is a
  mismatch), and no JSON file in the version may name a path outside it;
- the payload against the digests `lineage.json` recorded at publish;
- the model's append-only `index.jsonl` (a hash chain): the version must be listed with this `SHA256SUMS`
  and `lineage.json`, no line edited, no listed version gone. A folder the index does not list is not a
  version (hand-made, or copied in);
- the publish receipt that the git-tracked `dvc.lock` recorded for this version (the workspace's and its
  git history, read from the DVC cache): same content digest and files;
- the signature (`signature.sig`, OpenSSF model-signing) with `publish.signing.public_key` or
  `--public-key`, when the version is signed;
- then every upstream output and input named in `lineage.json`: from the DVC cache where it holds it (a file
  object must hash to its recorded MD5, a folder's listing object too, and each file the listing names; a
  cached output whose object is gone is a mismatch), else from the lineage's git commit (code, committed
  data) unless the file was uncommitted then.
What could not be checked is said: an unsigned version, a model without an index (published before it), a
version no receipt in dvc.lock names, run records (`cache: false`) never in the cache.

`verify --rebuild` then rebuilds the version from its git commit in a scratch clone (beside the project,
removed afterwards) on this machine: every stage up to the one that made the published model file runs
again, each output is compared with the hash `lineage.json` records, and the published model, tokenizer
and labels with the rebuilt files (`flows.reproduce.rebuild`). It prints the stage table and exits 1 if
any byte differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

from flows.reproduce import ReproduceError, cache_dir, rebuild, table
from stages.registry import (
    INDEX,
    SIGNATURE,
    SUMS,
    Forged,
    Lineage,
    RegistryError,
    assign,
    folders,
    paths_outside,
    payload_digest,
    payload_sums,
    read_index,
    read_lineage,
    read_sums,
    resolve,
    stages_of,
    verify_signature,
)
from stages.storage.hashing import md5_file, sha256_file


class Mismatch(Exception):
    """A hash that does not match its record; exit code 1."""


def registry_of(root: Path, registry: str | None) -> Path:
    if registry is None:
        params = root / "params.yaml"
        doc = yaml.safe_load(params.read_text(encoding="utf-8")) if params.is_file() else {}
        registry = ((doc or {}).get("publish") or {}).get("registry") or "registry"
    return root / registry


# ---- show ---------------------------------------------------------------------------------------------


def producers(lineage: Lineage) -> list[tuple[str, str]]:
    """(out path, stage) for every output in the lineage, folders included."""
    return [(o["path"], s["name"]) for s in lineage.stages for o in s.get("outs") or []]


def producer_of(outs: list[tuple[str, str]], path: str) -> str | None:
    for out, stage in outs:
        if path == out or path.startswith(out.rstrip("/") + "/"):
            return stage
    return None


def flat_params(params: dict[str, Any]) -> list[str]:
    """`section.key=value` for every tracked param of a lock entry."""
    found = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            found.append(f"{prefix}={json.dumps(value)}")

    for _file, values in (params or {}).items():
        walk("", values)
    return found


def short(md5: str | None) -> str:
    return "-" if not md5 else (md5[:12] + (".dir" if md5.endswith(".dir") else ""))


def show_stage(name: str, entry: dict[str, Any], outs: list[tuple[str, str]]) -> list[str]:
    """One stage of `show`: command, params, inputs (with the stage that made each), code, outputs."""
    lines = ["", name, f"  cmd      {entry.get('cmd', '')}"]
    params = flat_params(entry.get("params") or {})
    if params:
        wrapped = textwrap.wrap(", ".join(params), 100)
        lines += [f"  params   {wrapped[0]}", *(f"           {w}" for w in wrapped[1:])]
    code = [d for d in entry.get("deps") or [] if d["path"].endswith(".py")]
    for dep in entry.get("deps") or []:
        if not dep["path"].endswith(".py"):
            up = producer_of(outs, dep["path"])
            lines.append(f"  input    {dep['path']}  md5 {short(dep.get('md5'))}  {f'<- {up}' if up else '(source)'}")
    if code:
        lines.append(f"  code     {len(code)} files: " + ", ".join(f"{d['path']} {short(d['md5'])[:8]}" for d in code))
    for out in entry.get("outs") or []:
        extra = f" ({out['nfiles']} files)" if out.get("nfiles") else ""
        lines.append(f"  output   {out['path']}  md5 {short(out.get('md5'))}{extra}")
    return lines


def show(folder: Path) -> str:
    lineage = read_lineage(folder)
    outs = producers(lineage)
    stages = {s["name"]: s for s in lineage.stages}
    git, machine = lineage.git, lineage.fingerprint
    lines = [
        f"{lineage.model}@{lineage.version}  {folder}",
        f"  variant {lineage.variant}, content sha256 {lineage.content_digest}",
        f"  stages: {', '.join(stages_of(folder.parent, folder.name)) or 'none assigned'}"
        + (f"; published by experiment {lineage.publish['experiment']}" if lineage.publish.get("experiment") else ""),
        f"  published from git {git.get('commit') or 'none'}"
        + (f" (uncommitted: {', '.join(git.get('modified') or [])})" if git.get("modified") else ""),
        f"  machine {machine.get('cpu', {}).get('model', '?')}, fingerprint {str(machine.get('digest', '?'))[:12]}",
        "  files:",
        *[f"    {name}  sha256 {digest[:16]}" for name, digest in sorted(lineage.files.items())],
        "",
        "publish",
        "  params   " + ", ".join(flat_params({"params.yaml": {"publish": lineage.publish["params"]}})),
        f"  model    {lineage.published_from['file']}  sha256 {lineage.published_from['sha256'][:16]}",
    ]
    queue: list[str] = []
    for r in lineage.publish["reads"]:
        within = "" if r["path"] == r["out"] else f" (in {r['out']})"
        lines.append(f"  reads    {r['path']}{within}  md5 {short(r['md5'])}  <- {r['stage']}")
        if r["stage"] not in queue:
            queue.append(r["stage"])
    # The chain: every stage the published files come from, directly or not; printed from the last stage
    # back to the first, in the pipeline's order (lineage.json lists stages as dvc.yaml orders them).
    chain: set[str] = set()
    while queue:
        name = queue.pop(0)
        if name in chain or name not in stages:
            continue
        chain.add(name)
        for dep in stages[name].get("deps") or []:
            up = producer_of(outs, dep["path"])
            if up and up not in chain:
                queue.append(up)
    seen = [s["name"] for s in reversed(lineage.stages) if s["name"] in chain]
    for name in seen:
        lines += show_stage(name, stages[name], outs)
    rest = [s for s in stages if s not in seen]
    if rest:
        lines += ["", "not on the chain of the published files: " + ", ".join(rest)]
    lines += ["", "raw source"]
    for s in lineage.sources:
        lines.append(f"  {s.get('role')}  {s.get('uri')}  sha256 {s.get('sha256')}  ({s.get('rows')} rows)")
    return "\n".join(lines)


# ---- verify -------------------------------------------------------------------------------------------


def verify_published(folder: Path) -> int:
    if not (folder / SUMS).is_file():
        raise Mismatch(f"{folder / SUMS}: missing")
    listed = read_sums(folder)
    for name, digest in sorted(listed.items()):
        path = folder / name
        if not path.is_file():
            raise Mismatch(f"{path}: listed in {SUMS} but missing")
        actual = sha256_file(path)
        if actual != digest:
            raise Mismatch(f"{path}: sha256 {actual}, {SUMS} records {digest}")
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise Mismatch(f"{path}: a symlink inside a version (to {os.readlink(path)})")
        if path.is_file() and name not in (SUMS, SIGNATURE) and name not in listed:
            raise Mismatch(f"{path}: not listed in {SUMS}")
    outside = paths_outside(folder)
    if outside:
        raise Mismatch(f"{folder}: a file points outside the version: {outside[0]}")
    return len(listed)


def verify_record(folder: Path, lineage: Lineage) -> None:
    """lineage.json must describe this folder: its name, and the payload digests it recorded at publish."""
    if (lineage.model, lineage.version) != (folder.parent.name, folder.name):
        raise Mismatch(f"{folder / 'lineage.json'}: describes {lineage.model}@{lineage.version}, not this folder")
    payload = payload_sums(read_sums(folder))
    for name in sorted(set(payload) | set(lineage.files)):
        if payload.get(name) != lineage.files.get(name):
            raise Mismatch(
                f"{folder / name}: sha256 {payload.get(name)}, lineage.json records {lineage.files.get(name)}"
            )
    if payload_digest(payload) != lineage.content_digest:
        raise Mismatch(
            f"{folder}: content digest {payload_digest(payload)}, lineage.json records {lineage.content_digest}"
        )


def verify_index(folder: Path) -> str | None:
    """The model's index must list this version with this SHA256SUMS and lineage.json, and every version it
    lists must still be there. Returns a warning when the model has no index."""
    model_dir = folder.parent
    try:
        index = read_index(model_dir)
    except Forged as exc:
        raise Mismatch(str(exc)) from exc
    if index is None:
        return f"no {INDEX}: nothing outside the folder vouches for its versions (published before the index)"
    entry = index.get(folder.name)
    if entry is None:
        raise Mismatch(f"{folder}: not in {model_dir / INDEX}; not a published version")
    checks = {
        "sums_sha256": (SUMS, sha256_file(folder / SUMS)),
        "lineage_sha256": ("lineage.json", sha256_file(folder / "lineage.json")),
        "content_digest": ("the payload", payload_digest(read_sums(folder))),
    }
    for key, (what, actual) in checks.items():
        if entry.get(key) != actual:
            raise Mismatch(f"{folder}: {what} hashes to {actual}, {INDEX} recorded {entry.get(key)} at publish")
    gone = [v for v in index if v not in folders(model_dir)]
    if gone:
        raise Mismatch(f"{model_dir}: version(s) {', '.join(gone)} listed in {INDEX} are gone")
    return None


def recorded_receipts(root: Path, cache: Path, most: int = 200) -> dict[str, tuple[str, dict[str, Any]]]:
    """Publish receipts that dvc.lock records (the workspace's and up to `most` commits of it), read from the DVC
    cache: registry path of the version -> (where it was recorded, the receipt)."""
    texts = []
    if (root / "dvc.lock").is_file():
        texts.append(("dvc.lock", (root / "dvc.lock").read_text(encoding="utf-8")))
    log = subprocess.run(["git", "log", f"-n{most}", "--format=%H", "--", "dvc.lock"], cwd=root,
                         capture_output=True, text=True)  # fmt: skip
    for commit in log.stdout.split() if log.returncode == 0 else []:
        shown = subprocess.run(["git", "show", f"{commit}:dvc.lock"], cwd=root, capture_output=True, text=True)
        if shown.returncode == 0:
            texts.append((f"dvc.lock at {commit[:12]}", shown.stdout))
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for where, text in texts:
        try:
            outs = ((yaml.safe_load(text) or {}).get("stages") or {}).get("publish", {}).get("outs") or []
        except (yaml.YAMLError, AttributeError):
            continue
        for out in outs:
            md5 = str(out.get("md5") or "")
            obj = cache / md5[:2] / md5[2:]
            if not out.get("path", "").endswith("receipt.json") or not md5 or not obj.is_file():
                continue
            try:
                receipt = json.loads(obj.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                continue
            if md5_file(obj) == md5 and isinstance(receipt, dict) and receipt.get("path"):
                found.setdefault(str(receipt["path"]), (where, receipt))
    return found


def verify_receipt(root: Path, folder: Path) -> str | None:
    """The receipt git-tracked dvc.lock recorded for this version must name the same content; a note if none."""
    key = os.path.relpath(folder, root)
    recorded = recorded_receipts(root, cache_dir(root)).get(Path(key).as_posix())
    if recorded is None:
        return "no publish receipt in dvc.lock or its git history names this version"
    where, receipt = recorded
    actual = payload_sums(read_sums(folder))
    if receipt.get("content_digest") != payload_digest(actual) or receipt.get("files") != actual:
        raise Mismatch(f"{folder}: content {payload_digest(actual)}, the publish receipt in {where} records "
                       f"{receipt.get('content_digest')}")  # fmt: skip
    return None


def verify_signed(folder: Path, public_key: Path | None) -> str | None:
    if not (folder / SIGNATURE).is_file():
        return (f"unsigned (publish.signing.method: none): a person who can rewrite {folder.parent} and dvc.lock's "
                "history could forge this version undetected")  # fmt: skip
    if public_key is None:
        return f"{SIGNATURE} not checked: no public key (publish.signing.public_key or --public-key)"
    try:
        verify_signature(folder, public_key)
    except Forged as exc:
        raise Mismatch(str(exc)) from exc
    return None


def git_blob_md5(root: Path, commit: str, path: str) -> str | None:
    """MD5 of `path` as committed in `commit`, or None when git does not have it there."""
    proc = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=root, capture_output=True)
    return hashlib.md5(proc.stdout).hexdigest() if proc.returncode == 0 else None


def uncached_outs(root: Path, commit: str | None) -> set[str]:
    """Outputs declared `cache: false` in dvc.yaml (at `commit` when git has it): run records, never in the cache."""
    shown = (
        subprocess.run(["git", "show", f"{commit}:dvc.yaml"], cwd=root, capture_output=True, text=True)
        if commit
        else None
    )
    text = shown.stdout if shown is not None and shown.returncode == 0 else None
    if text is None:
        text = (root / "dvc.yaml").read_text(encoding="utf-8") if (root / "dvc.yaml").is_file() else ""
    stages = (yaml.safe_load(text) or {}).get("stages") or {}
    return {
        path
        for entry in stages.values()
        for kind in ("outs", "metrics", "plots")
        for item in entry.get(kind) or []
        if isinstance(item, dict)
        for path, opts in item.items()
        if isinstance(opts, dict) and opts.get("cache") is False
    }


def verify_upstream(lineage: Lineage, cache: Path, root: Path) -> dict[str, Any]:
    """Re-hash every recorded output and input: from the DVC cache where it holds them, else from the git
    commit of the lineage (code, the demo data) unless the file was uncommitted at publish time. A cached stage
    output whose object (or a file object its folder listing names) is gone from the cache is a mismatch: the
    version can no longer be traced to those bytes."""
    counts: dict[str, Any] = {"cache": 0, "git": 0, "absent": []}
    git = lineage.git
    uncommitted = set(git.get("modified") or [])
    outs = {o["path"] for s in lineage.stages for o in s.get("outs") or []} - uncached_outs(root, git.get("commit"))
    done = set()
    records = [
        (item, s["name"])
        for s in lineage.stages
        for item in (s.get("outs") or []) + (s.get("deps") or [])
        if item.get("md5")
    ]
    for item, stage in records:
        key = (item["path"], item["md5"])
        if key in done:
            continue
        done.add(key)
        md5 = item["md5"]
        where = f"{item['path']} (stage {stage})"
        obj = cache / md5[:2] / md5[2:]
        if not obj.is_file():
            if item["path"] in outs:
                raise Mismatch(f"{where}: DVC cache object {obj} (md5 {md5}) is missing")
            committed = (
                git_blob_md5(root, git["commit"], item["path"])
                if git.get("commit") and item["path"] not in uncommitted and not md5.endswith(".dir")
                else None
            )
            if committed is None:
                counts["absent"].append(item["path"])
            elif committed != md5:
                raise Mismatch(
                    f"{where}: at git commit {git['commit'][:12]} hashes to {committed}, lineage records {md5}"
                )
            else:
                counts["git"] += 1
            continue
        counts["cache"] += verify_object(obj, md5, stage, item["path"], cache)
    counts["absent"] = sorted(set(counts["absent"]))
    return counts


def verify_object(obj: Path, md5: str, stage: str, path: str, cache: Path) -> int:
    """Re-hash one cache object (and for a folder, every file object its listing names); returns the count."""
    where = f"{path} (stage {stage})"
    actual = md5_file(obj)
    if actual != md5.removesuffix(".dir"):
        raise Mismatch(f"{where}: DVC cache object {obj} hashes to {actual}, lineage records {md5}")
    if not md5.endswith(".dir"):
        return 1
    try:
        listing = json.loads(obj.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise Mismatch(f"{where}: DVC cache object {obj} is not a folder listing") from exc
    for entry in listing:
        part = cache / entry["md5"][:2] / entry["md5"][2:]
        if not part.is_file():
            raise Mismatch(f"{path}/{entry['relpath']} (stage {stage}): DVC cache object {part} (md5 {entry['md5']}) "
                           "is missing")  # fmt: skip
        got = md5_file(part)
        if got != entry["md5"]:
            raise Mismatch(
                f"{path}/{entry['relpath']} (stage {stage}): DVC cache object {part} hashes to {got}, the listing "
                f"of {md5} records "
                f"{entry['md5']}"
            )
    return 1 + len(listing)


def verify(root: Path, folder: Path, public_key: Path | None = None) -> str:
    try:  # a SHA256SUMS or lineage.json that cannot be read is a failed verification, named
        published = verify_published(folder)
        lineage = read_lineage(folder)  # intact as far as SHA256SUMS goes; the checks below anchor it outside
        verify_record(folder, lineage)
        checks = (verify_index(folder), verify_receipt(root, folder), verify_signed(folder, public_key))
    except RegistryError as exc:
        raise Mismatch(str(exc)) from exc
    warnings = [w for w in checks if w]
    counts = verify_upstream(lineage, cache_dir(root), root)
    absent = counts["absent"]
    note = f"; not checked (neither in the DVC cache nor committed): {', '.join(absent)}" if absent else ""
    for warning in warnings:
        print(f"verify: warning: {warning}", file=sys.stderr)
    anchors = ["index"] if not warnings or not warnings[0].startswith("no ") else []
    return (
        f"verify: {lineage.model}@{lineage.version} OK: {published} published files match {SUMS} and lineage.json"
        f"{' and ' + ', '.join(anchors) if anchors else ''}; "
        f"{counts['cache']} DVC cache objects and {counts['git']} committed files of the upstream stages match "
        f"lineage.json{note}"
    )


def public_key_of(root: Path, given: Path | None) -> Path | None:
    if given is not None:
        return given
    params = root / "params.yaml"
    doc = yaml.safe_load(params.read_text(encoding="utf-8")) if params.is_file() else {}
    key = (((doc or {}).get("publish") or {}).get("signing") or {}).get("public_key")
    return Path(key).expanduser() if key else None


def promote(root: Path, registry: Path, spec: str, stage: str | None, tag: bool) -> str:
    """`assign`: point `stage` at the version `spec` names (`model@x.y.z`, explicit)."""
    model, _, version = spec.partition("@")
    if not stage or not version:
        raise RegistryError("assign needs <model>@<version> and --stage NAME, e.g. model@2.0.0 --stage production")
    folder = resolve(registry, spec)
    number = assign(folder.parent, stage, folder.name)
    line = f"assign: {model}#{stage} -> {folder.name} (assignment {number}; {folder.parent / 'stages.json'})"
    if tag:
        name = f"{model}#{stage}#{number}"
        message = f"Assign {stage} to {model}@v{folder.name}"
        proc = subprocess.run(["git", "tag", "-a", name, "-m", message], cwd=root, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RegistryError(f"git tag {name}: {proc.stderr.strip() or proc.stdout.strip()}")
        line += f"; git tag {name}"
    return line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.lineage", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("show", "verify", "assign"))
    ap.add_argument("model", help="<model>, <model>@<version> or <model>#<stage> (latest version with neither)")
    ap.add_argument("--root", type=Path, default=Path("."), help="the repository (default: current folder)")
    ap.add_argument("--registry", help="the registry folder (default: publish.registry of params.yaml)")
    ap.add_argument(
        "--public-key", type=Path, help="verify: the signing public key (default: publish.signing.public_key)"
    )
    ap.add_argument("--rebuild", action="store_true", help="verify: also rebuild it from its commit and compare")
    ap.add_argument("--scratch", type=Path, help="--rebuild: where the scratch clone goes (default: beside --root)")
    ap.add_argument("--stage", help="assign: the stage to point at the version (production, staging, ...)")
    ap.add_argument("--tag", action="store_true", help="assign: also the git tag <model>#<stage>#<n> (GTO)")
    args = ap.parse_args(argv)
    try:
        if args.command == "assign":
            print(promote(args.root, registry_of(args.root, args.registry), args.model, args.stage, args.tag))
            return 0
        folder = resolve(registry_of(args.root, args.registry), args.model)
        if args.command == "show":
            print(show(folder))
        else:
            print(verify(args.root, folder, public_key_of(args.root, args.public_key)))
        if args.command == "verify" and args.rebuild:
            checks = rebuild(args.root, read_lineage(folder).to_dict(), args.scratch)
            print(table(checks))
            bad = [c for c in checks if not c.ok]
            if bad:
                raise Mismatch(f"rebuild differs: {', '.join(f'{c.stage} ({c.differ[0][1]})' for c in bad)}")
            print(f"verify: rebuilt {len(checks) - 1} stages from the commit: the published bytes come out again")
    except ReproduceError as exc:
        print(f"lineage: error: {exc}", file=sys.stderr)
        return 2
    except Forged as exc:  # a version the registry does not vouch for: a failed verification, not a usage error
        print(f"verify: FAILED: {exc}", file=sys.stderr)
        return 1
    except RegistryError as exc:
        print(f"lineage: error: {exc}", file=sys.stderr)
        return 2
    except Mismatch as exc:
        print(f"verify: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
