"""dvc.yaml, params.yaml and the code agree: one name everywhere, deps cover what each stage imports."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tests.conftest import ROOT

PROJECT_PACKAGES = ("stages", "flows")


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Project modules imported by one file (absolute imports of stages.* / flows.*)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in PROJECT_PACKAGES and module_file(name):
                found.add(name)
    return found


def project_files_of(module: str) -> set[str]:
    """Every project file that importing `module` executes: transitive imports and parent packages."""
    seen: set[str] = set()
    todo = [module]
    files: set[str] = set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        parts = mod.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        path = module_file(mod)
        files.add(path.relative_to(ROOT).as_posix())
        todo.extend(imported_modules(path))
    return files


def test_every_stage_has_module_params_section_and_command():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in dvc_stages().items():
        assert (ROOT / "stages" / f"{name}.py").is_file(), f"stage {name}: no stages/{name}.py"
        assert name in params, f"stage {name}: no '{name}:' section in params.yaml"
        assert name in stage.get("params", []), f"stage {name}: must track its whole params section"
        assert stage["cmd"].startswith(f"python -m stages.{name} "), f"stage {name}: cmd must run stages.{name}"


def test_stage_outputs_live_in_their_numbered_folder():
    # 00 is the machine fingerprint (not a step of the data chain), then 01_ingest ... 10_publish.
    assert next(iter(dvc_stages())) == "fingerprint"
    for number, (name, stage) in enumerate(dvc_stages().items(), start=0):
        for out in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            path = out if isinstance(out, str) else next(iter(out))
            assert path.startswith(f"data/{number:02d}_{name}/"), f"stage {name}: output {path} outside its folder"


def test_deps_cover_every_imported_project_module():
    for name, stage in dvc_stages().items():
        deps = set(stage["deps"])
        needed = project_files_of(f"stages.{name}")
        missing = sorted(
            f for f in needed if f not in deps and not any(f.startswith(d.rstrip("/") + "/") for d in deps)
        )
        assert not missing, f"stage {name}: deps miss {missing}"
        # And nothing listed that the stage does not use (a stale dep reruns it for nothing).
        stale = sorted(d for d in deps if d.endswith(".py") and d not in needed)
        assert not stale, f"stage {name}: deps list modules it does not import: {stale}"


def test_import_walk_sees_transitive_imports():
    files = project_files_of("stages.clean")
    assert {"stages/__init__.py", "stages/common/__init__.py", "stages/common/validation.py"} <= files


def test_flows_import_nothing_from_stages():
    for path in (ROOT / "flows").glob("*.py"):
        mods = imported_modules(path)
        assert not [m for m in mods if m.startswith("stages")], f"{path.name} imports from stages"
