"""Fault injection on a scratch copy of the project, shared by the `faults` tests (a quick subset) and
`bench/faults.py` (the full sweep, one table).

Each `sweep_*` function injects faults of one family and returns `Row`s: what was injected, how many times,
how many were detected or survived, corrupted artifacts, lost rows, and how many one rerun recovered.

- kill -9 (`sweep_kills`): `dvc repro -f --single-item <stage>` in its own process group, SIGKILL to the
  group after a seeded delay within the stage's measured run time. Each injection flips a seed of the stage
  between two values where it has one, so that the outputs of the killed run differ from the ones before it
  (a crash between two renames would then show as a mixed set). After the kill, every cached output must
  be missing or hold the complete bytes of one of the two values (else: corrupted), `dvc status` must
  report the stage (unless the run had finished), and one `dvc repro --single-item <stage>` must give the
  reference bytes of the current value, with no temporary file left anywhere under data/.
- damage (`sweep_damage`): flip, truncate, replace, add or delete bytes in a published version, its
  SHA256SUMS/lineage.json/index (also re-signing the checksums the way an attacker would), and the DVC
  cache objects of its upstream outputs: `lineage verify` must exit 1, every time; a damaged cache object
  checked out into the workspace must stop the next stage that reads it.
- params edited while a stage runs (`sweep_params`), concurrency (`sweep_concurrency`), resources
  (`sweep_resources`), crafted names and files (`sweep_names`), bad rows (`bad_rows`, `sweep_rows`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
DVC_ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
# A seed whose change changes the stage's outputs (so a mixed old/new set is visible); None: forced reruns.
FLIPS: dict[str, str | None] = {
    "fingerprint": None,
    "ingest": None,
    "clean": "clean.seed",
    "augment": "augment.seed",
    "distill": "distill.optim.seed",
    "train": "train.optim.seed",
    "prune": "prune.optim.seed",
    "quantize": "quantize.seed",
    "build": None,
    "benchmark": None,
    "publish": None,
}
STAGES = list(FLIPS)


@dataclass
class Row:
    kind: str
    injections: int = 0
    detected: int = 0  # detected (an error, a failed verify) or survived (nothing wrong afterwards)
    corrupted: int = 0  # artifacts left partial, unreadable or wrong without an error
    lost_rows: int | None = None
    recovered: int | None = None  # by one rerun
    notes: list[str] = field(default_factory=list)

    def add(self, ok: bool, note: str = "", corrupted: int = 0, recovered: bool | None = None) -> None:
        self.injections += 1
        self.detected += int(ok)
        self.corrupted += corrupted
        if recovered is not None:
            self.recovered = (self.recovered or 0) + int(recovered)
        if not ok and note and len(self.notes) < 5:
            self.notes.append(note)


def run(
    root: Path, *args: str, timeout: float = 1800, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=root, capture_output=True, text=True, timeout=timeout, env=env or DVC_ENV)


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(root, PY, "-m", "dvc", *args)


# ---- the project copy ------------------------------------------------------------------------------------


def fast_params(root: Path) -> None:
    """Fewer epochs: the sweep tests what a crash leaves, not how good the model gets."""
    path = root / "params.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["distill"]["optim"]["epochs"] = 1
    doc["train"]["optim"]["epochs"] = 2
    doc["prune"]["optim"]["epochs"] = 1
    doc["publish"]["gates"].update(min_accuracy=0.0, max_drop_vs_teacher=100.0)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def prepare(dest: Path) -> dict[str, float]:
    """A committed copy of the project run through publish, stage by stage; returns each stage's seconds."""
    from tests.conftest import copy_project

    copy_project(dest, quick_benchmark=True)
    fast_params(dest)
    run(dest, "git", "add", "-A")
    run(dest, "git", "-c", "user.name=faults", "-c", "user.email=faults@localhost", "commit", "-qm", "faults")
    seconds = {}
    for stage in STAGES:
        start = time.monotonic()
        proc = dvc(dest, "repro", "--single-item", stage)
        if proc.returncode != 0:
            raise RuntimeError(f"prepare: dvc repro {stage} failed:\n{proc.stdout}\n{proc.stderr}")
        seconds[stage] = time.monotonic() - start
    return seconds


def set_param(root: Path, dotted: str, value: Any) -> None:
    path = root / "params.yaml"
    doc = yaml.safe_load(path.read_text())
    node = doc
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def cached_outs(root: Path, stage: str) -> list[str]:
    entry = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]
    found = []
    for kind in ("outs", "metrics", "plots"):
        for item in entry.get(kind) or []:
            if isinstance(item, str):
                found.append(item)
            elif (next(iter(item.values())) or {}).get("cache", True) is not False:
                found.append(next(iter(item)))
    return found


def state(root: Path, outs: list[str]) -> dict[str, str | None]:
    from stages.storage.hashing import dvc_md5

    return {o: (dvc_md5(root / o) if (root / o).exists() else None) for o in outs}


def lock_outs(root: Path, stage: str) -> dict[str, str]:
    entry = (yaml.safe_load((root / "dvc.lock").read_text()).get("stages") or {}).get(stage) or {}
    return {o["path"]: o.get("md5") for o in entry.get("outs") or []}


def leftovers(root: Path) -> list[str]:
    found = [p for p in (root / "data").rglob(".*") if p.name.endswith((".tmp", ".old"))]
    scratch = root / ".dvc" / "tmp" / "distillery"
    found += [p for p in scratch.rglob("*")] if scratch.is_dir() else []
    found += [p for p in (root / "registry").glob("*/.publish-*")]  # a draft version of a killed publish
    return sorted(p.relative_to(root).as_posix() for p in found)


def status_changed(root: Path, stage: str) -> bool:
    proc = dvc(root, "status", "--json", stage)
    try:
        return bool(json.loads(proc.stdout or "{}").get(stage))
    except ValueError:
        return True


# ---- kill -9 ---------------------------------------------------------------------------------------------


def kill_after(root: Path, args: list[str], delay: float) -> bool:
    """Start `args` in its own process group and SIGKILL the group after `delay` s; False if it ended first."""
    proc = subprocess.Popen(args, cwd=root, env=DVC_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def sweep_kills(root: Path, seconds: dict[str, float], per_stage: dict[str, int], seed: int = 0) -> Row:
    rng = random.Random(seed)
    row = Row("kill -9 inside a stage")
    row.recovered = 0
    for stage, count in per_stage.items():
        flip = FLIPS[stage]
        outs = cached_outs(root, stage)
        refs: dict[int, dict[str, str | None]] = {0: state(root, outs)}
        value = 0
        for _ in range(count):
            if flip:
                value = 1 - value
                set_param(root, flip, value)
            delay = rng.uniform(0.05, 1.0) * seconds[stage]
            killed = kill_after(root, [PY, "-m", "dvc", "repro", "-f", "--single-item", stage], delay)
            after = state(root, outs)
            changed = status_changed(root, stage)
            rerun = recover_and_rerun(root, stage)
            if any(m in rerun.stdout + rerun.stderr for m in ("is cached - skipping run", "didn't change, skipping")):
                # The stage did not run: restored from DVC's run cache, or unchanged because the kill came before
                # it wrote anything (the killed run was forced with -f, the rerun is not). Its leftovers (the
                # killed run's scratch folder) go at the next stage run, as flows/recover.py documents.
                dvc(root, "repro", "--single-item", "fingerprint")
            now = state(root, outs)
            refs.setdefault(value, now)
            good = [refs.get(0), refs.get(1), now]
            corrupt = [o for o in outs if after[o] is not None and all(after[o] != (g or {}).get(o) for g in good)]
            recovered = (
                rerun.returncode == 0
                and now == refs[value]
                and lock_outs(root, stage).items() >= {k: v for k, v in now.items() if v}.items()
                and not leftovers(root)
            )
            reported = changed or not killed or after == refs[value]
            note = f"{stage} at {delay:.1f}s: corrupt {corrupt}, status reported {reported}, rerun {rerun.returncode}"
            row.add(reported and not corrupt, note, corrupted=len(corrupt), recovered=recovered)
            if not recovered and len(row.notes) < 5:
                said = [ln for ln in rerun.stderr.splitlines() if "error" in ln.lower()] or [rerun.stderr.strip()]
                row.notes.append(f"{stage} at {delay:.1f}s: not recovered ({said[0][-300:]}; "
                                 f"leftovers {leftovers(root)[:3]})")  # fmt: skip
        if flip and value != 0:  # back to the reference, so the stages after it find the lock as they left it
            set_param(root, flip, 0)
            dvc(root, "repro", "--single-item", stage)
    return row


def recover_and_rerun(root: Path, stage: str) -> subprocess.CompletedProcess[str]:
    """The one rerun after a crash: `python -m flows.recover` (DVC's lock files, if a kill left one cut), then
    `dvc repro` of the stage."""
    recovered = run(root, PY, "-m", "flows.recover")
    rerun = dvc(root, "repro", "--single-item", stage)
    rerun.stderr = recovered.stdout + rerun.stderr
    return rerun


def sweep_flow_kills(root: Path, count: int, seconds: float, seed: int = 0) -> Row:
    """kill -9 of the Prefect flow while it runs build, benchmark and publish (a build param flipped each
    time); one flow rerun must leave the pipeline up to date with no leftovers."""
    rng = random.Random(seed)
    row = Row("kill -9 of the Prefect flow")
    row.recovered = 0
    for i in range(count):
        set_param(root, "build.latency_runs", 40 + (i % 2))
        killed = kill_after(root, [PY, "-m", "flows.pipeline"], rng.uniform(0.1, 1.0) * seconds)
        rerun = run(root, PY, "-m", "flows.pipeline")
        status = json.loads(dvc(root, "status", "--json").stdout or "{}")
        status.pop("fingerprint", None)
        ok = rerun.returncode == 0 and not status and not leftovers(root)
        row.add(ok or not killed, f"flow kill {i}: rerun {rerun.returncode}, status {status}", recovered=ok)
    set_param(root, "build.latency_runs", 40)
    dvc(root, "repro")
    return row


# ---- damage ----------------------------------------------------------------------------------------------


def verify(root: Path, spec: str = "distillery-intent") -> subprocess.CompletedProcess[str]:
    return run(root, PY, "-m", "flows.lineage", "verify", spec)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(0, path.stat().st_size // 2)])


def replace(path: Path) -> None:
    path.write_bytes(b"something else entirely\n")


def resum(folder: Path) -> None:
    """What an attacker does after changing a file: regenerate SHA256SUMS so that it matches again."""
    from stages.registry import SUMS, file_sums, sums_text

    (folder / SUMS).chmod(0o644)
    (folder / SUMS).write_text(sums_text(file_sums(folder)), encoding="utf-8")


class Restore:
    """Back up a folder tree (with modes) and put it back exactly after each damage."""

    def __init__(self, *paths: Path) -> None:
        self.saved = []
        for path in paths:
            copy = path.with_name(f".{path.name}.faults-backup")
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(path, copy, symlinks=True) if path.is_dir() else shutil.copy2(path, copy)
            self.saved.append((path, copy))

    def restore(self) -> None:
        for path, copy in self.saved:
            if path.is_dir() and not path.is_symlink():
                for p in path.rglob("*"):
                    if not p.is_symlink():
                        p.chmod(0o755 if p.is_dir() else 0o644)
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            shutil.copytree(copy, path, symlinks=True) if copy.is_dir() else shutil.copy2(copy, path)

    def drop(self) -> None:
        for _, copy in self.saved:
            shutil.rmtree(copy, ignore_errors=True) if copy.is_dir() else copy.unlink(missing_ok=True)


def writable(path: Path) -> Path:
    path.chmod(0o644)
    return path


def version_damages(folder: Path) -> list[tuple[str, Any]]:
    """(name, damage(folder)) pairs on a published version."""
    damages: list[tuple[str, Any]] = []
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    for name in files:
        for how, fn in (("flip", flip_byte), ("truncate", truncate), ("replace", replace)):
            damages.append((f"{how} {name}", lambda f, n=name, fn=fn: fn(writable(f / n))))
        if name not in ("SHA256SUMS",):
            damages.append(
                (f"flip {name} + regenerate SHA256SUMS", lambda f, n=name: (flip_byte(writable(f / n)), resum(f)))
            )
            damages.append((f"delete {name}", lambda f, n=name: (f / n).unlink()))

    def swap_labels(f: Path) -> None:
        labels = json.loads((f / "labels.json").read_text())
        names = sorted(labels)
        labels[names[0]], labels[names[1]] = labels[names[1]], labels[names[0]]
        writable(f / "labels.json").write_text(json.dumps(labels, indent=2, sort_keys=True) + "\n")
        resum(f)

    def zero_source(f: Path) -> None:
        lineage = json.loads((f / "lineage.json").read_text())
        lineage["sources"][0]["sha256"] = "0" * 64
        writable(f / "lineage.json").write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
        resum(f)

    damages += [
        ("swap two label indices + regenerate SHA256SUMS", swap_labels),
        ("zero the source hash in lineage.json + regenerate SHA256SUMS", zero_source),
        ("add a file", lambda f: (f / "extra.txt").write_text("x")),
        ("add a file + regenerate SHA256SUMS", lambda f: ((f / "extra.txt").write_text("x"), resum(f))),
        ("SHA256SUMS not UTF-8", lambda f: writable(f / "SHA256SUMS").write_bytes(b"\xff\xfe\x00garbage")),
        (
            "lineage.json not JSON + regenerate SHA256SUMS",
            lambda f: (writable(f / "lineage.json").write_text("{"), resum(f)),
        ),
        (
            "tokenizer config points outside + regenerate SHA256SUMS",
            lambda f: (
                writable(f / "tokenizer" / "tokenizer_config.json").write_text(
                    json.dumps({"vocab_file": "/etc/passwd"})
                ),
                resum(f),
            ),
        ),
    ]
    return damages


def index_damages(model_dir: Path) -> list[tuple[str, Any]]:
    index = model_dir / "index.jsonl"

    def edit_line(_: Path) -> None:
        lines = index.read_text().splitlines()
        entry = json.loads(lines[0])
        entry["sums_sha256"] = "0" * 64
        lines[0] = json.dumps(entry, sort_keys=True)
        index.write_text("\n".join(lines) + "\n")

    def forge_version(f: Path) -> None:  # the index rewritten to match a changed version: the chain breaks
        flip_byte(writable(f / "model.onnx"))
        resum(f)
        lines = index.read_text().splitlines()
        entry = json.loads(lines[-1])
        from stages.storage.hashing import sha256_file

        entry["sums_sha256"] = sha256_file(f / "SHA256SUMS")
        lines[-1] = json.dumps(entry, sort_keys=True)
        index.write_text("\n".join(lines) + "\n")

    return [
        ("index line edited", edit_line),
        ("index truncated to nothing", lambda _: index.write_text("")),
        ("index line deleted", lambda _: index.write_text("\n".join(index.read_text().splitlines()[1:]) + "\n")),
        ("the whole version folder deleted", lambda f: shutil.rmtree(f)),
        ("version changed + SHA256SUMS and index rewritten", forge_version),
    ]


def sweep_damage(root: Path, model: str = "distillery-intent") -> Row:
    """Damage the latest version, its index, and the cache of its upstream outputs; verify must exit 1."""
    row = Row("damaged registry, index or DVC cache")
    model_dir = root / "registry" / model
    folder = (
        model_dir
        / sorted(os.listdir(model_dir), key=lambda v: [int(x) for x in v.split(".")] if v[0].isdigit() else [-1])[-1]
    )
    assert verify(root).returncode == 0, verify(root).stderr
    backup = Restore(model_dir)
    try:
        for name, damage in [*version_damages(folder), *index_damages(model_dir)]:
            damage(folder)
            proc = verify(root)
            row.add(proc.returncode == 1 and "FAILED" in proc.stderr, f"{name}: verify exit {proc.returncode}")
            backup.restore()
        for name, damage in extra_versions(model_dir, folder):
            damage()
            proc = verify(root, f"{model}@9.0.0")
            row.add(
                proc.returncode in (1, 2) and "Traceback" not in proc.stderr, f"{name}: verify exit {proc.returncode}"
            )
            backup.restore()
    finally:
        backup.restore()
        backup.drop()
    for name, path, damage in cache_damages(root, folder):
        saved = path.read_bytes() if path.exists() else None
        mode = path.stat().st_mode if path.exists() else 0o444
        try:
            damage(path)
            proc = verify(root)
            row.add(proc.returncode == 1 and "FAILED" in proc.stderr, f"{name}: verify exit {proc.returncode}")
        finally:
            if path.exists():
                path.chmod(0o644)
            if saved is not None:
                path.write_bytes(saved)
                path.chmod(mode & 0o777)
    return row


def extra_versions(model_dir: Path, folder: Path) -> list[tuple[str, Any]]:
    """A hand-made version folder and a symlinked one: neither is a version."""
    return [
        ("hand-made version 9.0.0", lambda: shutil.copytree(folder, model_dir / "9.0.0")),
        ("symlinked version 9.0.0", lambda: (model_dir / "9.0.0").symlink_to(folder)),
        ("dangling version symlink 9.0.0", lambda: (model_dir / "9.0.0").symlink_to(model_dir / "nowhere")),
    ]


def cache_damages(root: Path, folder: Path) -> list[tuple[str, Path, Any]]:
    """Damage to the DVC cache objects of the version's upstream outputs (read-only ones made writable first,
    as a person with the rights would)."""
    lineage = json.loads((folder / "lineage.json").read_text())
    cache = root / ".dvc" / "cache" / "files" / "md5"
    picked = []
    for stage in lineage["stages"]:
        for out in stage.get("outs") or []:
            md5 = out.get("md5") or ""
            obj = cache / md5[:2] / md5[2:]
            if obj.is_file():
                picked.append((f"{out['path']} ({stage['name']})", obj))
                if md5.endswith(".dir"):
                    first = json.loads(obj.read_text())[0]
                    part = cache / first["md5"][:2] / first["md5"][2:]
                    picked.append((f"{out['path']}/{first['relpath']}", part))
    damages = []
    for i, (name, obj) in enumerate(picked):
        how, fn = [("flip", flip_byte), ("truncate", truncate), ("delete", lambda p: p.unlink())][i % 3]
        damages.append((f"cache object of {name}: {how}", obj, lambda p, fn=fn: fn(writable(p))))
    return damages


def sweep_checkout(root: Path) -> Row:
    """A damaged cache object that `dvc checkout` puts back into the workspace (DVC trusts its cache): the next
    stage that reads it must refuse, naming it, and publish must not ship it."""
    row = Row("damaged cache object checked out, then used")
    for path, reader in (("data/02_clean/train.parquet", "augment"), ("data/07_quantize/model.int8.onnx", "build"),
                         ("data/03_augment/train.parquet", "distill")):  # fmt: skip
        md5 = lock_outs(root, {"augment": "clean", "build": "quantize", "distill": "augment"}[reader])[path]
        obj = root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
        saved = obj.read_bytes()
        try:
            flip_byte(writable(obj))
            (root / path).unlink()
            dvc(root, "checkout", path)
            proc = dvc(root, "repro", "-f", "--single-item", reader)
            row.add(
                proc.returncode != 0 and "dvc.lock records" in proc.stderr, f"{path}: {reader} exit {proc.returncode}"
            )
        finally:
            obj.write_bytes(saved)
            obj.chmod(0o444)
            (root / path).unlink(missing_ok=True)
            dvc(root, "checkout", "--force", path)
            dvc(root, "repro", "--single-item", reader)
    return row


# ---- params edited while a stage runs ---------------------------------------------------------------------


def sweep_params(root: Path, seconds: dict[str, float], edits: list[tuple[str, str, Any]]) -> Row:
    """Edit a tracked param while the stage runs: the stage must fail and write nothing, DVC must not record the
    new value, and one rerun must run with it."""
    row = Row("params.yaml edited while the stage ran")
    row.recovered = 0
    for stage, key, value in edits:
        original = yaml.safe_load((root / "params.yaml").read_text())
        node: Any = original
        for part in key.split("."):
            node = node[part]
        before_lock = (root / "dvc.lock").read_text()
        proc = subprocess.Popen([PY, "-m", "dvc", "repro", "-f", "--single-item", stage], cwd=root, env=DVC_ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        time.sleep(min(max(2.5, 0.4 * seconds[stage]), seconds[stage] * 0.8))
        set_param(root, key, value)
        out, _ = proc.communicate()
        lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]
        recorded = lock["params"]["params.yaml"]
        for part in key.split("."):
            recorded = recorded[part] if isinstance(recorded, dict) and part in recorded else None
        refused = proc.returncode != 0 and "changed while" in out and (root / "dvc.lock").read_text() == before_lock
        rerun = dvc(root, "repro", "--single-item", stage)
        lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]["params"]["params.yaml"]
        for part in key.split("."):
            lock = lock[part]
        row.add(refused and recorded != value, f"{stage} {key}: exit {proc.returncode}, lock holds {recorded}",
                recovered=rerun.returncode == 0 and lock == value)  # fmt: skip
        set_param(root, key, node)
        dvc(root, "repro", "--single-item", stage)
    return row


# ---- concurrency -------------------------------------------------------------------------------------------


def sweep_concurrency(root: Path, flows: bool = True) -> list[Row]:
    rows = []
    row = Row("two dvc repro at once")
    first = subprocess.Popen([PY, "-m", "dvc", "repro", "-f", "--single-item", "train"], cwd=root, env=DVC_ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(3)
    start = time.monotonic()
    second = dvc(root, "repro", "--single-item", "clean")
    took = time.monotonic() - start
    first.wait()
    row.add(second.returncode != 0 and took < 5 and "lock" in (second.stdout + second.stderr).lower(),
            f"second dvc repro: exit {second.returncode} after {took:.1f}s")  # fmt: skip
    rows.append(row)
    if flows:
        row = Row("two flow runs at once")
        set_param(root, "build.latency_runs", 41)  # gives the first flow something to do
        first = subprocess.Popen([PY, "-m", "flows.pipeline"], cwd=root, env=DVC_ENV, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)  # fmt: skip
        time.sleep(8)
        start = time.monotonic()
        second = run(root, PY, "-m", "flows.pipeline")
        took = time.monotonic() - start
        out, _ = first.communicate()
        row.add(second.returncode == 3 and "another flow run holds this workspace" in second.stderr and took < 10
                and first.returncode == 0, f"second flow: exit {second.returncode} after {took:.1f}s; first "
                f"{first.returncode}: {out[-300:]}")  # fmt: skip
        set_param(root, "build.latency_runs", 40)
        dvc(root, "repro")
        rows.append(row)
    rows.append(race_publish(root))
    return rows


def publish_command(root: Path) -> list[str]:
    cmd = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["publish"]["cmd"]
    return [PY if part == "python" else part for part in cmd.split()]


def race_publish(root: Path, registry: str = "registry-race") -> Row:
    """Two publishes of the same release into an empty registry at once: one writes the version, the other
    reports it."""
    row = Row("two publishes racing for one version")
    set_param(root, "publish.registry", registry)
    try:
        procs = [subprocess.Popen(publish_command(root), cwd=root, env=DVC_ENV, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(2)]  # fmt: skip
        outs = [p.communicate()[0] for p in procs]
        model_dir = root / registry / "distillery-intent"
        versions = [d.name for d in model_dir.iterdir() if d.name[0].isdigit()] if model_dir.is_dir() else []
        said = [line for out in outs for line in out.splitlines() if line.startswith("publish: published") or
                line.startswith("publish: existing")]  # fmt: skip
        ok = (
            all(p.returncode == 0 for p in procs)
            and versions == ["1.0.0"]
            and len(said) == 2
            and sum("published" in s for s in said) == 1
            and all("@1.0.0" in s for s in said)
        )
        row.add(ok, f"race: exits {[p.returncode for p in procs]}, versions {versions}, said {said}")
    finally:
        set_param(root, "publish.registry", "registry")
        shutil.rmtree(root / registry, ignore_errors=True)
        dvc(root, "repro", "--single-item", "publish")
    return row


# ---- resources -------------------------------------------------------------------------------------------


def limited(fsize: int) -> Any:
    def preexec() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return preexec


def sweep_resources(root: Path) -> Row:
    """A full disk (RLIMIT_FSIZE), an output folder that cannot be made, a missing input: a clear error naming
    the path, no traceback, nothing partial, and one rerun recovers."""
    row = Row("disk full, unwritable output, missing input")
    row.recovered = 0
    outs = cached_outs(root, "clean")
    before = state(root, outs)
    for fsize in (1, 2_000, 20_000):
        proc = subprocess.run([PY, "-m", "dvc", "repro", "-f", "--single-item", "clean"], cwd=root, env=DVC_ENV,
                              capture_output=True, text=True, preexec_fn=limited(fsize))  # fmt: skip
        after = state(root, outs)
        partial = [o for o in outs if after[o] is not None and after[o] != before[o]]
        clear = proc.returncode != 0 and "Traceback" not in proc.stderr
        rerun = dvc(root, "repro", "--single-item", "clean")
        row.add(clear and not partial, f"fsize {fsize}: exit {proc.returncode} {proc.stderr[-300:]}",
                corrupted=len(partial), recovered=rerun.returncode == 0 and state(root, outs) == before)  # fmt: skip
    # an output folder that cannot be created: a file where the folder goes
    out = root / "data" / "02_clean"
    shutil.move(out, root / "data" / ".02_clean.saved")
    out.write_text("not a folder")
    proc = subprocess.run([PY, "-m", "stages.clean", "--in", "data/01_ingest", "--out", "data/02_clean/x"], cwd=root,
                          env=DVC_ENV, capture_output=True, text=True)  # fmt: skip
    out.unlink()
    shutil.move(root / "data" / ".02_clean.saved", out)
    row.add(proc.returncode == 1 and "data/02_clean" in proc.stderr and "Traceback" not in proc.stderr,
            f"unwritable output: {proc.stderr[-300:]}", recovered=True)  # fmt: skip
    # a missing input
    proc = subprocess.run([PY, "-m", "stages.clean", "--in", "data/nowhere", "--out", "data/.x"], cwd=root,
                          env=DVC_ENV, capture_output=True, text=True)  # fmt: skip
    named = "data/nowhere/train.parquet: not found" in proc.stderr
    row.add(proc.returncode == 1 and named and not (root / "data/.x").exists(),
            f"missing input: {proc.stderr[-300:]}", recovered=True)  # fmt: skip
    return row


# ---- crafted names and files ---------------------------------------------------------------------------------


def tree(path: Path) -> dict[str, int]:
    return (
        {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*") if p.is_file()}
        if path.exists()
        else {}
    )


def sweep_names(root: Path) -> Row:
    """Crafted model names, versions and registry paths, and symlinks planted in the registry: each refused with
    a clear message, nothing written outside `registry/` (a sentinel folder beside the project is watched)."""
    row = Row("crafted names, paths and symlinks")
    outside = root.parent / f".{root.name}-outside"
    outside.mkdir(exist_ok=True)
    watched = lambda: (tree(outside), tree(root / "registry"))  # noqa: E731
    cases: list[tuple[str, dict[str, Any], Any]] = [
        (f"publish.model {v!r}", {"model": v}, None)
        for v in ("../evil", "a/b", "/abs", "nul\x00x", "name\n", "UPPER", "..", "")
    ]
    cases += [(f"publish.version {v!r}", {"version": v}, None) for v in ("../1.0.0", "1.0.0/x", "/1.0.0", "1.0.0\n",
                                                                             "1.0.0\x00", "01.0.0", "1.0")]  # fmt: skip
    cases += [(f"publish.registry {v!r}", {"registry": v}, None) for v in ("../x", str(outside), "~/x", "a/../../x")]
    model_dir = root / "registry" / "distillery-intent"

    def plant_model_link() -> None:
        shutil.move(model_dir, root / "registry" / ".saved")
        model_dir.symlink_to(outside)

    def unplant_model_link() -> None:
        model_dir.unlink()
        shutil.move(root / "registry" / ".saved", model_dir)

    def plant_registry_link() -> None:
        shutil.move(root / "registry", root / ".registry-saved")
        (root / "registry").symlink_to(outside)

    def unplant_registry_link() -> None:
        (root / "registry").unlink()
        shutil.move(root / ".registry-saved", root / "registry")

    cases += [
        ("registry/<model> is a symlink", {"version": "7.0.0"}, (plant_model_link, unplant_model_link)),
        ("registry is a symlink", {"version": "7.0.0"}, (plant_registry_link, unplant_registry_link)),
    ]
    saved = (root / "params.yaml").read_text()
    try:
        for name, params, plant in cases:
            before = watched()
            for key, value in params.items():
                set_param(root, f"publish.{key}", value)
            if plant:
                plant[0]()
            proc = run(root, *publish_command(root))
            if plant:
                plant[1]()
            (root / "params.yaml").write_text(saved)
            clear = proc.returncode == 1 and "Traceback" not in proc.stderr and "error:" in proc.stderr
            row.add(clear and watched() == before, f"{name}: exit {proc.returncode}: {proc.stderr.strip()[-200:]}")
    finally:
        (root / "params.yaml").write_text(saved)
        shutil.rmtree(outside, ignore_errors=True)
    row.add(*onnx_outside(root))
    row.add(*output_symlink(root))
    return row


def output_symlink(root: Path) -> tuple[bool, str]:
    """A stage output replaced by a symlink to a file outside the project: the stage reading it refuses."""
    target = root / "data" / "02_clean" / "train.parquet"
    outside = root.parent / f".{root.name}-planted.parquet"
    outside.write_bytes(b"PAR1 not the real rows PAR1")
    saved = target.with_name(".train.parquet.saved")
    shutil.move(target, saved)
    target.symlink_to(outside)
    try:
        proc = dvc(root, "repro", "--single-item", "augment")
        ok = proc.returncode != 0 and "Traceback" not in proc.stderr and "train.parquet" in proc.stderr
        return ok, f"symlinked stage output: exit {proc.returncode}: {proc.stderr.strip()[-200:]}"
    finally:
        target.unlink()
        shutil.move(saved, target)
        outside.unlink()


def onnx_outside(root: Path) -> tuple[bool, str]:
    """An ONNX model whose external data names a file outside its folder: refused before a session opens."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from stages.runner.errors import StageError
    from stages.runtime.sessions import session

    folder = root / ".faults-onnx"
    folder.mkdir(exist_ok=True)
    weight = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    weight.data_location = TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    for key, value in (("location", "../../../../etc/hostname"), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], [weight])  # fmt: skip
    path = folder / "model.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    try:
        session(path)
        return False, "ONNX external data outside the folder: a session opened"
    except StageError as exc:
        return "outside the model's folder" in str(exc), f"ONNX external data: {exc}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- bad rows ------------------------------------------------------------------------------------------------

KINDS = ("null_text", "empty_text", "whitespace_text", "null_label", "overlong_text", "overlong_label",
         "control_chars", "zero_width_only", "invalid_utf8", "conflicting_label", "exact_duplicate",
         "near_duplicate_case", "near_duplicate_punct", "near_duplicate_typo", "leakage", "one_row_label",
         "markup", "script_url", "numeric_only")  # fmt: skip


def bad_rows(
    good: list[tuple[str, str]], test: list[tuple[str, str]], n: int, seed: int = 0
) -> list[tuple[Any, Any, str]]:
    """`n` bad rows (text, label, kind) of every kind in KINDS, made from the good rows. Text is str, bytes
    (invalid UTF-8) or None."""
    rng = random.Random(seed)
    rows: list[tuple[Any, Any, str]] = []
    while len(rows) < n:
        kind = KINDS[len(rows) % len(KINDS)]
        text, label = good[rng.randrange(len(good))]
        i = len(rows)
        other = sorted({lab for _, lab in good} - {label})[i % 3]
        made = {
            "null_text": (None, label),
            "empty_text": ("", label),
            "whitespace_text": ("   \t  ", label),
            "null_label": (f"{text} {i}", None),
            "overlong_text": (("please help me with my account " * 40) + str(i), label),
            "overlong_label": (f"{text} again {i}", "x" * 5000),
            "control_chars": ("\x00\x01\x02\x1b[0m", label),
            "zero_width_only": ("\u200b\u200c\u200d\ufeff", label),
            "invalid_utf8": (text.encode() + b" \xff\xfe " + str(i).encode(), label),
            "conflicting_label": (text, other),
            "exact_duplicate": (text, label),
            "near_duplicate_case": (text.upper(), label),
            "near_duplicate_punct": (text + "?!", label),
            "near_duplicate_typo": (typo(text, rng), label),
            "leakage": test[rng.randrange(len(test))],
            "one_row_label": (f"{text} {i}", f"lonely_label_{i}"),
            "markup": (f"<script>alert({i})</script> {text}", label),
            "script_url": (f"javascript:void({i}) {text}", label),
            "numeric_only": (f"{rng.randrange(10**9)} {i}", label),
        }[kind]
        rows.append((*made, kind))
    return rows


def typo(text: str, rng: random.Random) -> str:
    letters = [k for k, ch in enumerate(text) if ch.isalpha()]
    if len(text) < 12 or not letters:
        return text + "x"
    k = letters[rng.randrange(len(letters))]
    return text[:k] + ("q" if text[k] != "q" else "z") + text[k + 1 :]


def write_csv(path: Path, rows: list[tuple[Any, Any]]) -> None:
    """A CSV with raw bytes where a text is bytes (invalid UTF-8 survives)."""
    import csv
    import io

    buf = io.BytesIO()
    text_buf = io.StringIO()
    writer = csv.writer(text_buf, lineterminator="\n")
    writer.writerow(["text", "label"])
    buf.write(text_buf.getvalue().encode())
    for text, label in rows:
        text_buf = io.StringIO()
        writer = csv.writer(text_buf, lineterminator="\n")
        placeholder = "\x07BYTES\x07" if isinstance(text, bytes) else text
        writer.writerow(["" if placeholder is None else placeholder, "" if label is None else label])
        line = text_buf.getvalue().encode()
        if isinstance(text, bytes):
            line = line.replace(b"\x07BYTES\x07", b'"' + text.replace(b'"', b'""') + b'"' if b"," in text else text)
        buf.write(line)
    path.write_bytes(buf.getvalue())


def sweep_rows(train_csv: Path, test_csv: Path, n: int, scratch: Path, text_col: str = "text",
               label_col: str = "label", seed: int = 0) -> Row:  # fmt: skip
    """`n` bad rows mixed into a good dataset, through ingest and clean (their cores, as the stages run them):
    every bad row must end in the quarantine with a reason, and every good row clean keeps on its own must
    still be kept. Over `clean.max_quarantine_fraction` the stage must fail closed."""
    import polars as pl

    from stages.clean import CleanParams, clean
    from stages.ingest import IngestParams, ingest, read_source

    good = pl.read_csv(train_csv, infer_schema=False).select(text_col, label_col).rows()
    test = pl.read_csv(test_csv, infer_schema=False).select(text_col, label_col).rows()
    bad = bad_rows(good, test, n, seed)
    scratch.mkdir(parents=True, exist_ok=True)
    mixed = scratch / "mixed.csv"
    write_csv(mixed, [*good, *[(t, lab) for t, lab, _ in bad]])
    write_csv(scratch / "good.csv", good)
    write_csv(scratch / "test.csv", test)
    p = IngestParams(source=str(mixed), test_source=str(scratch / "test.csv"), invalid_utf8="quarantine")
    cp = CleanParams(max_quarantine_fraction=1.0)

    def kept(source: Path) -> tuple[Any, Any]:
        tr, te, _ = ingest(
            read_source(str(source), "csv", "quarantine"), read_source(str(scratch / "test.csv"), "csv"), p
        )
        result = clean(tr, te, cp)
        return result, set(result.train["id"]) | set(result.val["id"])

    base, base_ids = kept(scratch / "good.csv")
    result, ids = kept(mixed)
    quarantined = dict(zip(result.quarantine["id"], result.quarantine["rule"], strict=True))
    row = Row(f"bad rows ({len(KINDS)} kinds) mixed into {len(good)} good ones")
    by_kind: dict[str, list[int]] = {}
    for k, (_, _, kind) in enumerate(bad):
        rid = f"src-{len(good) + k + 1:06d}"
        caught = rid in quarantined and rid not in ids
        by_kind.setdefault(kind, [0, 0])[0] += 1
        by_kind[kind][1] += int(caught)
        row.add(caught, f"{kind} row {rid} reached the clean split")
    row.lost_rows = len(base_ids - ids)
    row.notes += [f"{kind}: {c}/{t}" for kind, (t, c) in sorted(by_kind.items()) if c < t]
    row.corrupted = 0
    return row, result, by_kind


def fails_closed(train_csv: Path, test_csv: Path, scratch: Path, n: int = 200) -> bool:
    """The same mix through `python -m stages.clean` with the default quarantine limit: exit 1, no clean split."""
    import polars as pl

    from stages.ingest import IngestParams, ingest, read_source

    good = pl.read_csv(train_csv, infer_schema=False).select("text", "label").rows()
    test = pl.read_csv(test_csv, infer_schema=False).select("text", "label").rows()
    scratch.mkdir(parents=True, exist_ok=True)
    write_csv(scratch / "mixed.csv", [*good, *[(t, lab) for t, lab, _ in bad_rows(good, test, n)]])
    p = IngestParams(source=str(scratch / "mixed.csv"), test_source=str(test_csv))
    tr, te, _ = ingest(read_source(p.source, "csv", "quarantine"), read_source(str(test_csv), "csv"), p)
    (scratch / "in").mkdir(exist_ok=True)
    tr.write_parquet(scratch / "in" / "train.parquet")
    te.write_parquet(scratch / "in" / "test.parquet")
    (scratch / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    proc = run(ROOT, PY, "-m", "stages.clean", "--params", str(scratch / "params.yaml"), "--in", str(scratch / "in"),
               "--out", str(scratch / "out"))  # fmt: skip
    return (
        proc.returncode == 1
        and "max_quarantine_fraction" in proc.stderr
        and not (scratch / "out" / "train.parquet").exists()
    )


# ---- pickles -------------------------------------------------------------------------------------------------

UNPICKLERS = (
    "import pickle",
    "from pickle",
    "pickle.load",
    "import joblib",
    "joblib.load",
    "allow_pickle=True",
    "import dill",
    "cloudpickle",
    "torch.load(",
    "np.load(",
    "numpy.load(",
    "read_pickle(",
)


def unpickling_calls(folders: tuple[str, ...] = ("stages", "flows", "deploy", "kernels", "bench")) -> list[str]:
    """Every line of project code that could unpickle: `torch.load` only passes with `weights_only=True`."""
    found = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")) if (ROOT / folder).is_dir() else []:
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                code = line.split("#")[0]
                for needle in UNPICKLERS:
                    if needle in code and not (needle == "torch.load(" and "weights_only=True" in code):
                        found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return found
