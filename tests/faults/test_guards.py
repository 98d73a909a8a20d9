"""The guards the fault sweep relies on, one by one (quick: no DVC run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from stages.registry import (
    Draft,
    Forged,
    RegistryError,
    Signing,
    check_registry_path,
    contained,
    paths_outside,
    read_index,
    resolve,
    verify_signature,
    versions,
)
from stages.runner.errors import ParamError, StageError
from stages.runner.guard import RunGuard
from stages.storage import atomic
from tests.conftest import ROOT


def publish_one(model_dir, version, payload=b"weights", sign=None):
    with Draft(model_dir) as draft:
        draft.add("model.onnx", payload)
        draft.add("labels.json", '{"a": 0}')
        return draft.commit(version, sign)


def test_the_index_is_a_hash_chain_and_only_what_it_lists_is_a_version(tmp_path):
    model_dir = tmp_path / "registry" / "m"
    publish_one(model_dir, "1.0.0")
    publish_one(model_dir, "2.0.0", b"other")
    index = read_index(model_dir)
    assert list(index) == ["1.0.0", "2.0.0"] and index["1.0.0"]["prev"] == "0" * 64
    # a hand-made folder (a copy of a real version) is not a version, and resolving it says so
    (model_dir / "3.0.0").mkdir()
    for f in (model_dir / "2.0.0").iterdir():
        (model_dir / "3.0.0" / f.name).write_bytes(f.read_bytes())
    assert versions(model_dir) == ["1.0.0", "2.0.0"]
    with pytest.raises(Forged, match="not in .*index.jsonl"):
        resolve(tmp_path / "registry", "m@3.0.0")
    # an edited line breaks the chain at the line after it
    lines = (model_dir / "index.jsonl").read_text().splitlines()
    entry = json.loads(lines[0])
    entry["content_digest"] = "0" * 64
    (model_dir / "index.jsonl").write_text("\n".join([json.dumps(entry, sort_keys=True), lines[1]]) + "\n")
    with pytest.raises(Forged, match="line 2 .* does not hold the hash of the line before it"):
        read_index(model_dir)


def test_registry_paths_stay_inside_the_project_and_never_go_through_a_symlink(tmp_path):
    for bad in ("../x", "/abs", "~/x", "a/../../x", "x\n", "a\x00b", ""):
        with pytest.raises(ParamError):
            check_registry_path(bad)
    assert check_registry_path("registry") == "registry"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "registry").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RegistryError, match="is a symlink"):
        contained(tmp_path, tmp_path / "registry" / "m")


def test_a_json_file_naming_a_path_outside_the_version_is_found(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"vocab_file": "/etc/passwd"}))
    (tmp_path / "runtime.json").write_text(json.dumps({"file": "model.onnx", "extra": ["../../x/y"]}))
    assert paths_outside(tmp_path) == [
        "runtime.json: extra[0] = '../../x/y'",
        "tokenizer/tokenizer_config.json: vocab_file = '/etc/passwd'",
    ]
    with Draft(tmp_path / "r" / "m") as draft:
        draft.add("runtime.json", json.dumps({"file": "/etc/shadow"}))
        with pytest.raises(StageError, match="point outside the version"):
            draft.commit("1.0.0")


def test_a_key_signed_version_verifies_and_a_changed_one_does_not(tmp_path):
    pytest.importorskip("model_signing")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = tmp_path / "sign.pem", tmp_path / "sign.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))  # fmt: skip
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    folder = publish_one(tmp_path / "registry" / "m", "1.0.0", sign=Signing(method="key", private_key=str(private)))
    assert (folder / "signature.sig").is_file()
    verify_signature(folder, public)
    (folder / "labels.json").chmod(0o644)
    (folder / "labels.json").write_text('{"a": 1}')
    with pytest.raises(Forged, match="does not hold"):
        verify_signature(folder, public)
    with pytest.raises(ParamError, match="private_key: required"):
        Signing(method="key")


def test_params_edited_while_a_stage_runs_discard_its_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {"cmd": "x", "params": ["s"],
                                                                         "outs": ["out/a.json"]}}}))  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"s": {"lr": 0.1}, "other": {"x": 1}}))
    RunGuard(tmp_path, "s", tmp_path / "params.yaml").start()
    try:
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"s": {"lr": 0.1}, "other": {"x": 2}}))  # untracked
        with atomic.outputs() as out:
            out.json(tmp_path / "out" / "a.json", {"ok": 1})
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"s": {"lr": 0.2}, "other": {"x": 2}}))
        with pytest.raises(StageError, match="changed while s ran"):
            with atomic.outputs() as out:
                out.json(tmp_path / "out" / "b.json", {"ok": 2})
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.json"]  # b discarded, no temporary
    finally:
        atomic.clear_commit_checks()


def test_leftovers_of_a_killed_run_are_swept_at_the_next_start(tmp_path):
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"s": {"cmd": "x", "outs": ["out/a.parquet", "out/d"]}}})
    )
    (tmp_path / "params.yaml").write_text("{}")
    (tmp_path / "out" / "d").mkdir(parents=True)
    for name in (".a.parquet.x1.tmp", ".d.old", ".d.abc.tmp", "keep.txt"):
        (tmp_path / "out" / name).write_text("x")
    (tmp_path / "out" / "d" / ".f.json.q.tmp").write_text("x")
    try:
        guard = RunGuard(tmp_path, "s", tmp_path / "params.yaml").start()
    finally:
        atomic.clear_commit_checks()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["d", "keep.txt"]
    assert len(guard.removed) == 4 and not list((tmp_path / "out" / "d").iterdir())


def test_a_second_flow_run_in_one_workspace_stops_at_once(tmp_path):
    from flows.pipeline import Busy, workspace_lock

    with workspace_lock(tmp_path):
        with pytest.raises(Busy, match=f"pid {os.getpid()}"):
            with workspace_lock(tmp_path):
                pass
    with workspace_lock(tmp_path):  # released
        pass


def test_a_pickled_teacher_folder_is_refused_by_name(tmp_path):
    from stages.model.encoder import refuse_pickles

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(StageError, match=r"pickled weights \(pytorch_model.bin\)"):
        refuse_pickles(str(tmp_path))


def test_a_null_label_splitting_test_off_the_source_is_no_traceback(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(20)) + "lost,\n")
    proc = subprocess.run([sys.executable, "-c", (
        "from stages.ingest import *; p = IngestParams(source='d.csv', test_source='d.csv');"
        "tr, te, _ = ingest(read_source('d.csv', 'auto'), None, p); print(tr.height, te.height)")],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["17", "4"]


def test_a_dvc_lock_file_cut_by_a_kill_is_removed_only_when_no_dvc_runs(tmp_path):
    import zc.lockfile

    from flows.recover import Busy, repair_rwlock

    tmp = tmp_path / ".dvc" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / "rwlock").write_text('{"read": {}, "wri')  # what a kill between truncate and write leaves
    held = zc.lockfile.LockFile(str(tmp / "lock"))  # a dvc process running in this repository
    try:
        with pytest.raises(Busy):
            repair_rwlock(tmp_path)
    finally:
        held.close()
    assert "not valid JSON" in repair_rwlock(tmp_path) and not (tmp / "rwlock").exists()
    (tmp / "rwlock").write_text('{"read": {}, "write": {}}')
    assert repair_rwlock(tmp_path) is None and (tmp / "rwlock").exists()  # a sound one is left alone


ENTRY = """  {name}:
    cmd: python -m stages.{name}
    deps:
    - path: data/{name}.in
      hash: md5
      md5: 0123456789abcdef0123456789abcdef
      size: 10
    params:
      params.yaml:
        {name}:
          seed: {seed}
    outs:
    - path: data/{name}
      hash: md5
      md5: 0123456789abcdef0123456789abcdef.dir
      size: 20
      nfiles: 2
"""


def lock_text(*entries: tuple[str, int]) -> str:
    return "schema: '2.0'\nstages:\n" + "".join(ENTRY.format(name=n, seed=s) for n, s in entries)


def project_with_copy(root, stage: str, saved: str):
    from stages.runner import lockfile

    (root / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    (root / "dvc.yaml").write_text("stages:\n" + "".join(f"  {n}:\n    cmd: x\n" for n in ("a", "b", "c")))
    (root / "dvc.lock").write_text(saved)
    lockfile.save(root, stage)


def test_a_dvc_lock_cut_by_a_kill_is_restored_from_the_copy_the_last_stage_run_took(tmp_path):
    from flows.recover import repair_lockfile

    sound = lock_text(("a", 0), ("b", 0), ("c", 0))
    project_with_copy(tmp_path, "b", sound)
    assert repair_lockfile(tmp_path) is None  # sound: left alone
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  a:\n    cm")  # what a kill mid-write leaves
    assert "does not parse" in repair_lockfile(tmp_path)
    assert (tmp_path / "dvc.lock").read_text() == sound


def test_a_cut_dvc_lock_that_still_parses_is_told_from_one_changed_on_purpose(tmp_path):
    from flows.recover import repair_lockfile
    from stages.runner import lockfile

    before = lock_text(("a", 0), ("b", 0), ("c", 0))
    after = lock_text(("a", 0), ("b", 1), ("c", 0))  # what DVC writes after running b with a new seed
    project_with_copy(tmp_path, "b", before)
    lines = after.splitlines(keepends=True)
    cut_ok = 0
    for n in range(len(lines)):  # every cut at a line boundary that still parses must be caught
        text = "".join(lines[:n])
        try:
            lockfile.stages_of(text)
        except Exception:  # noqa: BLE001 - DVC refuses it itself; flows.recover's parse check restores it
            continue
        reason = lockfile.cut_short(text, before, "b", ["a", "b", "c"])
        assert reason, f"a cut after line {n} not caught:\n{text}"
        cut_ok += 1
    assert cut_ok > 20
    assert lockfile.cut_short(after, before, "b", ["a", "b", "c"]) is None  # the whole write
    # A lock changed on purpose is left alone: another history (a git checkout), or a stage dropped from dvc.yaml.
    assert lockfile.cut_short(lock_text(("a", 5), ("b", 0)), before, "b", ["a", "b", "c"]) is None
    assert lockfile.cut_short(lock_text(("a", 0), ("b", 1)), before, "b", ["a", "b"]) is None
    # The case the kill sweep found: cut inside a's params, after b ran; recover restores the copy.
    (tmp_path / "dvc.lock").write_text(after[: after.index("seed: 0")])
    assert "stops part way" in repair_lockfile(tmp_path)
    assert (tmp_path / "dvc.lock").read_text() == before
    # A stage run refuses to start on (and to copy) a cut lock, naming the command that repairs it.
    (tmp_path / "dvc.lock").write_text(lock_text(("a", 0)))
    with pytest.raises(StageError, match=r"b, c missing.*flows\.recover"):
        RunGuard(tmp_path, "c", tmp_path / "params.yaml").start()
    assert lockfile.load(tmp_path) == (before, "b")
