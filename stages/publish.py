"""Stage `publish`: gate the benchmark's candidate, then add one immutable version to the model registry.

1. Gates. `publish.gates` are checked again on benchmark's measurements. The candidate is the fastest
   publishable variant (end-to-end p50 at batch 1) that passes all of them. When none passes the stage
   fails naming each variant's failed gates with the measured value and limit, and the registry is not
   touched.
2. Provenance. The files to publish must be the bytes benchmark measured (SHA-256 in its metrics) and the
   bytes dvc.lock records for their stages (DVC's MD5), or the stage fails: a lineage manifest that does
   not describe the published bytes would be worse than none.
3. A version `registry/<model>/<version>/` (`publish.registry`, `publish.model`):
   - `model.onnx` (or `model.plan` for a TensorRT engine) and `runtime.json` (backend, device, precision,
     session options);
   - `tokenizer/`, `labels.json` (label name -> logit index);
   - `model_card.md`: intended use, data and its hash, metrics against the baselines, gates, limitations,
     how to load it;
   - `lineage.json`: git commit and dirty files, each stage's dvc.lock entry (deps, params and outs with
     their hashes) in pipeline order, the source location and hash, the machine fingerprint, and the
     published files' digests;
   - `SHA256SUMS` (`sha256sum -c` reads it) over every other file.
   The version is written to a temporary folder beside it, synced, then renamed into place, and its files
   are made read-only. A version is never overwritten. The model files, tokenizer and labels (the
   payload) define a version's content: publishing content the registry already holds reports that
   version and writes nothing; new content gets a new version (`publish.version: auto`: the next major,
   1.0.0, 2.0.0, ...; or an explicit `x.y.z`, refused if it exists with other content).
4. `publish.tag: true` adds an annotated git tag `<model>@v<version>` on HEAD, the form GTO (DVC's model
   registry tooling) reads.
5. `data/10_publish/receipt.json` records what was published (or found), where, and its digests.

The registry is not a DVC output, so no `dvc repro` can delete a published version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.common.atomic import dumps_json, outputs
from stages.common.cli import stage_args, stage_params
from stages.common.errors import StageError, stage_entrypoint
from stages.common.gates import Gates, choose_candidate, e2e_speed, failed_gates, merged_rows
from stages.common.hashing import dvc_md5, sha256_bytes, sha256_file
from stages.common.params import from_dict

MODEL_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
VERSION = re.compile(r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$")
PAYLOAD = ("model.", "runtime.json", "tokenizer/", "labels.json")  # what defines a version's content
SUMS = "SHA256SUMS"


def check_version(version: str, key: str = "publish.version") -> str:
    """A version name that is safe as one folder name: `x.y.z` only (no `..`, no `/`)."""
    if not isinstance(version, str) or ".." in version or "/" in version or "\\" in version:
        raise ValueError(f"{key}: {version!r} is not a version name (a path separator or '..' is refused)")
    if not VERSION.match(version):
        raise ValueError(f"{key}: {version!r} is not a version x.y.z (e.g. 1.0.0)")
    return version


@dataclass(frozen=True)
class PublishParams:
    model: str = "distillery-intent"  # registry name: lowercase letters, digits and dashes
    registry: str = "registry"  # the registry folder (relative to the repository)
    version: str = "auto"  # auto: the next major version; or an explicit x.y.z
    tag: bool = False  # an annotated git tag <model>@v<version> (GTO's form)
    gates: dict[str, float] = field(default_factory=dict)  # see stages.common.gates.Gates
    # Variants within max(this, twice the noise benchmark measured) end to end count as equally fast (the
    # more accurate wins): timing noise cannot change what is published.
    latency_margin: float = 0.05

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not MODEL_NAME.match(self.model):
            raise ValueError(f"publish.model: {self.model!r} must be lowercase letters, digits and dashes")
        if not isinstance(self.registry, str) or not self.registry.strip():
            raise ValueError("publish.registry must be a folder path")
        if self.version != "auto":
            check_version(self.version)
        if not isinstance(self.tag, bool):
            raise ValueError(f"publish.tag must be true or false, got {self.tag!r}")
        if not isinstance(self.gates, dict):
            raise ValueError("publish.gates must be a mapping")
        from_dict(Gates, self.gates, "publish.gates")  # validates the gates now, naming a bad key
        if isinstance(self.latency_margin, bool) or not isinstance(self.latency_margin, (int, float)):
            raise ValueError(f"publish.latency_margin must be a number, got {self.latency_margin!r}")
        if not 0 <= self.latency_margin < 1:
            raise ValueError(f"publish.latency_margin must be in [0, 1), got {self.latency_margin}")

    @property
    def gate_limits(self) -> Gates:
        return from_dict(Gates, self.gates, "publish.gates")


# ---- choosing the candidate ---------------------------------------------------------------------------


def candidate_of(rows: dict[str, dict[str, Any]], gates: Gates, margin: float) -> tuple[str, dict[str, Any]]:
    """`choose_candidate` with its gate results; a StageError naming each variant's failed gates when none
    passes (the registry is then not touched)."""
    try:
        best, checked = choose_candidate(rows, gates, margin)
    except ValueError as exc:
        raise StageError(str(exc)) from exc
    if not checked:
        raise StageError("benchmark measured no publishable variant (no quantize file or engine)")
    if best is None:
        order = sorted(checked, key=lambda n: (e2e_speed(rows[n]), n))
        why = "; ".join(f"{n}: {', '.join(failed_gates(checked[n]))}" for n in order)
        raise StageError(f"no variant passes publish.gates, registry untouched: {why}")
    return best, checked[best]


# ---- provenance -------------------------------------------------------------------------------------


def read_lock(root: Path) -> dict[str, Any]:
    path = root / "dvc.lock"
    if not path.is_file():
        raise StageError(f"{path}: not found; publish records each stage's dvc.lock entry, run it with dvc repro")
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages") or {}


def stage_order(root: Path) -> list[str]:
    doc = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    return list(doc.get("stages") or {})


def rel(root: Path, path: Path) -> str:
    """`path` relative to the repository, as dvc.lock names it."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def owning_out(lock: dict[str, Any], path: str) -> tuple[str, dict[str, Any]]:
    """The stage and dvc.lock out entry that contain `path` (the out itself or a folder out above it)."""
    for stage, entry in lock.items():
        for out in entry.get("outs") or []:
            if path == out["path"] or path.startswith(out["path"].rstrip("/") + "/"):
                return stage, out
    raise StageError(f"{path}: no stage in dvc.lock outputs it; run the pipeline with dvc repro")


def check_against_lock(root: Path, lock: dict[str, Any], paths: list[Path]) -> list[dict[str, str]]:
    """Each path's owning out must hold the bytes dvc.lock records; returns what was read, with hashes."""
    read = []
    for path in paths:
        stage, out = owning_out(lock, rel(root, path))
        actual = dvc_md5(root / out["path"])
        if actual != out.get("md5"):
            raise StageError(
                f"{out['path']} (stage {stage}): the workspace holds md5 {actual}, dvc.lock records "
                f"{out.get('md5')}; run dvc repro so that lineage describes these bytes"
            )
        entry = {"path": rel(root, path), "stage": stage, "out": out["path"], "md5": actual}
        if entry not in read:
            read.append(entry)
    return read


def git_state(root: Path) -> dict[str, Any]:
    """HEAD commit (null outside git or before the first commit) and the tracked files that differ from it."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)

    head = git("rev-parse", "--verify", "HEAD")
    commit = head.stdout.strip() if head.returncode == 0 else None
    status = git("status", "--porcelain", "--untracked-files=no")
    modified = sorted(line[3:] for line in status.stdout.splitlines() if line.strip()) if status.returncode == 0 else []
    return {"commit": commit, "dirty": bool(modified) or commit is None, "modified": modified}


# ---- the version folder ---------------------------------------------------------------------------------


def payload_digest(sums: dict[str, str]) -> str:
    """One digest of a version's content: its payload files' SHA-256, in path order."""
    lines = "".join(f"{h}  {p}\n" for p, h in sorted(sums.items()) if p.startswith(PAYLOAD))
    return sha256_bytes(lines.encode())


def read_sums(folder: Path) -> dict[str, str]:
    """`SHA256SUMS` of a version: relative path -> digest."""
    sums = {}
    for line in (folder / SUMS).read_text(encoding="utf-8").splitlines():
        digest, _, name = line.partition("  ")
        if name:
            sums[name] = digest
    return sums


def existing_versions(model_dir: Path) -> dict[str, str]:
    """version -> content digest for every complete version in the registry (temporaries are skipped)."""
    found = {}
    if model_dir.is_dir():
        for child in model_dir.iterdir():
            if VERSION.match(child.name) and (child / SUMS).is_file():
                found[child.name] = payload_digest(read_sums(child))
    return found


def version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def next_version(existing: dict[str, str], requested: str) -> str:
    if requested != "auto":
        return requested
    top = max((version_key(v) for v in existing), default=(0, 0, 0))
    return f"{top[0] + 1}.0.0"


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sums(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != SUMS
    }


def freeze(folder: Path) -> None:
    """Published files are read-only (folders stay writable so that a person can still remove a version)."""
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(0o444)


# ---- model card ---------------------------------------------------------------------------------------


def metrics_table(bench: dict[str, Any], candidate: str) -> str:
    rows = bench["variants"]
    order = [candidate] + [n for n in ("teacher_fp32", "teacher_int8", "tfidf_logreg") if n in rows]
    lines = [
        "| variant | accuracy | macro-F1 | worst label F1 | size MB | end-to-end p50 / p95 ms | model p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in order:
        r = rows[n]
        e, m = r["latency_ms"]["end_to_end"], r["latency_ms"]["model"]
        w = r["worst_label_f1"]
        lines.append(
            f"| {n}{' (published)' if n == candidate else ''} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
            f"{w['f1']:.3f} ({w['label']}) | {r['size_mb']:.2f} | {e['p50']:.3f} / {e['p95']:.3f} | {m['p50']:.3f} |"
        )
    return "\n".join(lines)


def model_card(ctx: dict[str, Any]) -> str:
    bench, cand, row = ctx["bench"], ctx["candidate"], ctx["row"]
    labels = sorted(ctx["labels"], key=ctx["labels"].get)
    sources = ctx["ingest"].get("sources", [])
    src_lines = [
        f"- `{s.get('uri')}` ({s.get('role')}, {s.get('format')}, {s.get('rows')} rows), sha256 `{s.get('sha256')}`"
        for s in sources
    ]
    rows = ctx["ingest"].get("rows", {})
    gates = "\n".join(
        f"| {k} | {g['limit']} | {g['measured']} | {'pass' if g['passed'] else 'FAIL'} |"
        for k, g in sorted(ctx["gates"].items())
    )
    cpu = (ctx["fingerprint"].get("cpu") or {}).get("model", "unknown CPU")
    runtime = ctx["runtime"]
    model_file = ctx["model_file"]
    git = ctx["git"]
    uncommitted = f" (with uncommitted changes: {', '.join(git['modified'])})" if git["modified"] else ""
    load = (
        [
            "```python",
            "import json, numpy as np, onnxruntime as ort",
            "from transformers import AutoTokenizer",
            "",
            f'folder = "{ctx["registry"]}/{ctx["model"]}/{ctx["version"]}"  # this folder',
            'tok = AutoTokenizer.from_pretrained(f"{folder}/tokenizer")',
            'names = {i: n for n, i in json.load(open(f"{folder}/labels.json")).items()}',
            'rt = json.load(open(f"{folder}/runtime.json"))  # the session options the benchmark measured',
            "opts = ort.SessionOptions()",
            'opts.intra_op_num_threads = rt["session_options"]["intra_op_num_threads"]',
            "sess = ort.InferenceSession(",
            f'    f"{{folder}}/{model_file}", opts, providers=rt["providers"],',
            '    disabled_optimizers=rt["session_options"].get("disabled_optimizers", []),',
            ")",
            f'enc = tok(["where is my order?"], truncation=True, max_length={ctx["max_length"]}, return_tensors="np")',
            "feeds = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}",
            'print(names[int(sess.run(["logits"], feeds)[0].argmax(-1)[0])])',
            "```",
        ]
        if runtime["backend"] == "onnxruntime"
        else [
            f"A TensorRT plan for {runtime.get('device')}: deserialize it with `tensorrt.Runtime(...)."
            "deserialize_cuda_engine(open(path, 'rb').read())` on the same GPU model and TensorRT version "
            "as in `lineage.json` (`fingerprint`); inputs `input_ids` and `attention_mask` (int64), output `logits`."
        ]
    )
    return "\n".join(
        [
            f"# {ctx['model']} {ctx['version']}",
            "",
            f"A text classifier for {len(labels)} intents, published by distillery from variant `{cand}` "
            f"({row.get('precision', 'fp32')}, {runtime['backend']} on {runtime['device']}). "
            f"Content digest `{ctx['content_digest']}`.",
            "",
            "## Intended use",
            "",
            "Routing short user messages to one of the intents below, in the language and domain of the "
            "training data. Each message gets exactly one label: there is no 'none of these' class, so text "
            "outside these intents still receives one (check the top score if that matters).",
            "",
            "Labels: " + ", ".join(f"`{n}`" for n in labels) + ".",
            "",
            "## Data",
            "",
            *src_lines,
            f"- After ingest: {rows.get('train', '?')} training and {rows.get('test', '?')} test rows; clean "
            "removes empties, duplicates and train/test leakage, and holds out validation rows from training.",
            "- The accuracy below is on the held-out test rows of the same source.",
            "",
            f"## Metrics ({bench.get('test_rows', '?')} test rows, batch 1, "
            f"{bench.get('threads', '?')} CPU threads, {cpu})",
            "",
            metrics_table(bench, cand),
            "",
            "Latencies and sizes come from the same benchmark run; latencies are timings on the machine above "
            "and vary between runs and machines. The full table with every variant is `data/09_benchmark/report.md` "
            "of the commit below.",
            "",
            "## Gates (`publish.gates`)",
            "",
            "| gate | limit | measured | result |",
            "|---|---|---|---|",
            gates,
            "",
            "## Limitations",
            "",
            f"- Inputs longer than {ctx['max_length']} tokens are truncated.",
            f"- Weakest label: `{row['worst_label_f1']['label']}` (F1 {row['worst_label_f1']['f1']:.3f}); "
            "confusions concentrate there.",
            "- Trained on one dataset; accuracy on other domains, languages or phrasing is not measured.",
            *(
                ["- INT8 weights: predictions can differ from the fp32 model on a small share of inputs."]
                if row.get("precision") == "int8"
                else []
            ),
            "",
            "## How to load it",
            "",
            *load,
            "",
            "## Lineage",
            "",
            f"Git commit `{git['commit'] or 'none'}`{uncommitted}. "
            "`lineage.json` holds each stage's dvc.lock entry, the source hashes and the machine fingerprint; "
            f"`python -m flows.lineage show {ctx['model']}@{ctx['version']}` prints the chain and "
            f"`python -m flows.lineage verify {ctx['model']}@{ctx['version']}` re-hashes it.",
            "",
        ]
    )


# ---- the stage ----------------------------------------------------------------------------------------


def runtime_record(
    engine: dict[str, Any] | None, session_options: Any, candidate: str, model_file: str
) -> dict[str, Any]:
    engine = engine or {"backend": "onnxruntime", "device": "cpu", "providers": ["CPUExecutionProvider"]}
    record = {
        "variant": candidate,
        "file": model_file,
        "backend": engine.get("backend", "onnxruntime"),
        "device": engine.get("device", "cpu"),
        "providers": engine.get("providers", ["CPUExecutionProvider"]),
        "inputs": ["input_ids", "attention_mask"],
        "outputs": ["logits"],
    }
    if record["backend"] == "onnxruntime":
        cpu_only = all(p == "CPUExecutionProvider" for p in record["providers"])
        # optimizers disabled for CPU kernels' sake do not apply to GPU sessions
        record["session_options"] = {k: v for k, v in session_options.items() if cpu_only or k != "disabled_optimizers"}
    return record


def tag_precheck(root: Path, tag: str) -> bool:
    """True if `tag` already exists; a StageError if git cannot tag here."""
    head = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        raise StageError(f"publish.tag: {root} is not a git repository with a commit to tag")
    found = subprocess.run(["git", "tag", "--list", tag], cwd=root, capture_output=True, text=True)
    return bool(found.stdout.strip())


@stage_entrypoint("publish")
def main(argv: list[str] | None = None) -> int:
    """`python -m stages.publish --in data/09_benchmark --ingest … --clean … --quantize … --build …
    --fingerprint … --out data/10_publish`."""
    args = stage_args(
        "publish", __doc__, argv, upstream="benchmark", more=("ingest", "clean", "quantize", "build", "fingerprint")
    )
    p = stage_params(PublishParams, "publish", args.params)
    root = Path.cwd()
    bench = json.loads((args.inp / "metrics.json").read_text(encoding="utf-8"))
    timings_file = args.inp / "timings.json"
    if not timings_file.is_file():
        raise StageError(f"{timings_file}: not found; run the benchmark stage (dvc repro benchmark)")
    timings = json.loads(timings_file.read_text(encoding="utf-8"))
    rows = merged_rows(bench, timings)
    bench = {**bench, "variants": rows}
    # however noisy the run, a 1.5x speed difference still decides
    margin = min(0.5, max(p.latency_margin, 2 * float(timings.get("noise") or 0.0)))
    candidate, gates = candidate_of(rows, p.gate_limits, margin)
    row = rows[candidate]
    source = root / row["file"]
    if not source.is_file():
        raise StageError(f"{row['file']}: the file of variant {candidate} is missing; run dvc repro")
    if sha256_file(source) != row["sha256"]:
        raise StageError(f"{row['file']}: differs from the file benchmark measured; run dvc repro")
    tokenizer = args.quantize / "tokenizer"
    labels_file = args.clean / "labels.json"
    lock = read_lock(root)
    read = check_against_lock(
        root,
        lock,
        [
            source,
            tokenizer,
            labels_file,
            args.inp / "metrics.json",
            timings_file,
            args.ingest / "ingest.json",
            args.fingerprint / "fingerprint.json",
            args.build / "manifest.json",
        ],
    )
    manifest = json.loads((args.build / "manifest.json").read_text(encoding="utf-8"))
    engine = manifest["engines"].get(candidate)
    model_file = "model" + (".plan" if (engine or {}).get("backend") == "tensorrt" else ".onnx")
    options_file = args.build / manifest["session_options"] if manifest.get("session_options") else None
    options = json.loads(options_file.read_text(encoding="utf-8")) if options_file and options_file.is_file() else None
    runtime = runtime_record(engine, options, candidate, model_file)
    labels = json.loads(labels_file.read_text(encoding="utf-8"))
    ingest = json.loads((args.ingest / "ingest.json").read_text(encoding="utf-8"))
    fingerprint = json.loads((args.fingerprint / "fingerprint.json").read_text(encoding="utf-8"))
    max_length = int(bench.get("max_length") or 64)

    registry = root / p.registry
    model_dir = registry / p.model
    model_dir.mkdir(parents=True, exist_ok=True)
    existing = existing_versions(model_dir)
    tag_name = None
    work = Path(tempfile.mkdtemp(prefix=".publish-", dir=model_dir))
    try:
        # The payload first: it decides whether this content is already published.
        shutil.copyfile(source, work / model_file)
        shutil.copytree(tokenizer, work / "tokenizer")
        shutil.copyfile(labels_file, work / "labels.json")
        (work / "runtime.json").write_text(dumps_json(runtime), encoding="utf-8")
        payload = file_sums(work)
        digest = payload_digest(payload)
        same = sorted((v for v, d in existing.items() if d == digest), key=version_key)
        if same:
            version, status = same[-1], "existing"
            if p.version not in ("auto", version):
                print(
                    f"publish: content already published as {version}; publish.version {p.version} not used",
                    file=sys.stderr,
                )
        else:
            version, status = next_version(existing, p.version), "published"
            if version in existing or (model_dir / version).exists():
                raise StageError(
                    f"publish.version: {model_dir / version} exists with other content; a version is never "
                    "overwritten (set publish.version: auto or a new x.y.z)"
                )
        if p.tag:
            tag_name = f"{p.model}@v{version}"
            tag_exists = tag_precheck(root, tag_name)
        git = git_state(root)
        target = model_dir / version
        if status == "published":
            order = stage_order(root)
            lineage = {
                "model": p.model,
                "version": version,
                "variant": candidate,
                "content_digest": digest,
                "git": git,
                "files": payload,
                "published_from": {"file": rel(root, source), "sha256": row["sha256"]},
                "publish": {
                    "params": {
                        "gates": p.gates,
                        "latency_margin": p.latency_margin,
                        "version": p.version,
                        "tag": p.tag,
                    },
                    "reads": read,
                    "margin_used": margin,  # max(latency_margin, twice benchmark's noise), at most 0.5
                },
                "stages": [{"name": s, **lock[s]} for s in order if s in lock and s != "publish"],
                "sources": ingest.get("sources", []),
                "fingerprint": fingerprint,
                "benchmark": {"variant": row, "gates": gates},
            }
            ctx = {
                "model": p.model,
                "version": version,
                "bench": bench,
                "candidate": candidate,
                "row": row,
                "labels": labels,
                "ingest": ingest,
                "gates": gates,
                "fingerprint": fingerprint,
                "runtime": runtime,
                "model_file": model_file,
                "git": git,
                "content_digest": digest,
                "max_length": max_length,
                "registry": p.registry,
            }
            (work / "lineage.json").write_text(dumps_json(lineage), encoding="utf-8")
            (work / "model_card.md").write_text(model_card(ctx), encoding="utf-8")
            sums = file_sums(work)
            (work / SUMS).write_text("".join(f"{h}  {n}\n" for n, h in sums.items()), encoding="utf-8")
            for f in work.rglob("*"):
                if f.is_file():
                    fsync_file(f)
            for d in [*sorted((x for x in work.rglob("*") if x.is_dir()), reverse=True), work]:
                fsync_dir(d)
            work.chmod(0o755)
            freeze(work)
            os.rename(work, target)  # fails rather than replace a folder that appeared meanwhile
            fsync_dir(model_dir)
            print(f"publish: {p.model} {version} <- {candidate} ({rel(root, source)})", file=sys.stderr)
        else:
            print(
                f"publish: {candidate} is already published as {p.model} {version}; registry unchanged", file=sys.stderr
            )
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    if tag_name is not None and not tag_exists:
        made = subprocess.run(
            ["git", "tag", "-a", tag_name, "-m", f"Registering artifact {p.model} version v{version}"],
            cwd=root,
            capture_output=True,
            text=True,
        )
        if made.returncode != 0:
            raise StageError(
                f"publish.tag: {p.model} {version} is published but git tag {tag_name} failed: {made.stderr.strip()}"
            )
    # Only what the same inputs always give: the payload's digests (not the model card's or lineage's, which
    # quote timings) and each gate's limit and outcome (the measured latencies are in lineage.json). Whether
    # this run wrote the version or found it is printed, not recorded, so a forced rerun changes nothing.
    receipt = {
        "model": p.model,
        "version": version,
        "path": rel(root, target),
        "variant": candidate,
        "content_digest": digest,
        "files": {n: h for n, h in read_sums(target).items() if n.startswith(PAYLOAD)},
        "gates": {k: {"limit": g["limit"], "passed": g["passed"]} for k, g in sorted(gates.items())},
        "tag": tag_name,
        "benchmark_report": rel(root, args.inp / "report.md"),
    }
    with outputs() as w:
        w.json(args.out / "receipt.json", receipt)
    print(f"publish: {status} {p.model}@{version} -> {rel(root, target)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
