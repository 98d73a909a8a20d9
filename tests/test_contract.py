"""dvc.yaml, params.yaml and the code agree: one name everywhere, deps cover what each stage imports, params
tracked are the params read; and the layers hold: no stage imports a stage, no import circle, flows/ import
only the light library, no function in stages/ over 60 lines."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT

PROJECT_PACKAGES = ("stages", "flows", "distillery_kernels")
# where a package's files live when not at the root of the same name; a stage that imports the compiled
# operators also depends on their C++ sources (the install builds them into the package)
PACKAGE_DIRS = {"distillery_kernels": "kernels/distillery_kernels"}
COMPILED_FROM = {"kernels/distillery_kernels/__init__.py": "kernels/csrc"}


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(module: str) -> Path | None:
    head, *rest = module.split(".")
    base = ROOT.joinpath(*PACKAGE_DIRS.get(head, head).split("/"), *rest)
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


def test_every_stage_has_its_test_module():
    missing = [n for n in dvc_stages() if not (ROOT / "tests" / "stages" / f"test_{n}.py").is_file()]
    assert not missing, f"no tests/stages/test_<stage>.py for {missing}"


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
        needed |= {COMPILED_FROM[f] for f in needed if f in COMPILED_FROM}
        missing = sorted(
            f for f in needed if f not in deps and not any(f.startswith(d.rstrip("/") + "/") for d in deps)
        )
        assert not missing, f"stage {name}: deps miss {missing}"
        # And nothing listed that the stage does not use (a stale dep reruns it for nothing).
        stale = sorted(d for d in deps if d.endswith(".py") and d not in needed)
        assert not stale, f"stage {name}: deps list modules it does not import: {stale}"


def test_import_walk_sees_transitive_imports():
    files = project_files_of("stages.clean")
    assert {"stages/__init__.py", "stages/data/__init__.py", "stages/data/validation.py"} <= files


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (not counting parent packages)."""
    graph = {}
    for path in sorted([*(ROOT / "stages").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]):
        graph[module_name(path)] = {
            module_name(module_file(m))
            for m in imported_modules(path)
            if module_name(module_file(m)) != module_name(path)
        }
    return graph


STAGES = set(dvc_stages())


ABOVE_THE_STAGES = {"stages.check"}  # tools that load every stage, as the flow runs them (never imported by one)


def test_no_stage_imports_a_stage_and_the_library_imports_no_stage():
    for module, imports in import_graph().items():
        if module in ABOVE_THE_STAGES:
            assert not any(module in i for i in import_graph().values()), f"{module} is imported by the pipeline"
            continue
        stage_imports = sorted(m for m in imports if m.removeprefix("stages.") in STAGES)
        assert not stage_imports, f"{module} imports stage module(s) {stage_imports}: move what they share below"


def test_the_import_graph_has_no_circle():
    graph, state, path = import_graph(), {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != "open", f"import circle: {' -> '.join(path[path.index(dep) :] + [dep])}"
            if dep not in state:
                visit(dep)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_flows_import_only_the_light_library():
    """flows/ (and deploy/) may use the registry and records, never what pulls in torch: checked by import."""
    code = (
        "import sys, flows.lineage, flows.pipeline, flows.reproduce, flows.dag, flows.search, stages.runtime.sessions, "
        "stages.runtime.timing; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    light = {"stages.runtime.sessions", "stages.runtime.timing"}  # torch-free, as the import above shows
    for path in (ROOT / "flows").glob("*.py"):
        heavy = sorted(m for m in imported_modules(path) - light if m.startswith(("stages.model", "stages.runtime")))
        assert not heavy, f"{path.name} imports {heavy}"


def test_the_server_never_imports_torch():
    """deploy/ serves ONNX versions with ONNX Runtime and tokenizers alone (a TensorRT version is the exception,
    imported only when one is loaded): every module, imported and run on a published layout, leaves torch out."""
    modules = sorted(f"deploy.{p.stem}" for p in (ROOT / "deploy").glob("*.py") if p.stem != "__init__")
    code = f"import sys, {', '.join(modules)}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False" and len(modules) >= 8


def test_every_params_read_is_tracked_and_every_tracked_section_is_read():
    """Each stage reads params only through `read_params(Class, "section", ...)` in its module; dvc.yaml's
    `params:` must list exactly those sections, whole (never key by key)."""
    for path in (ROOT / "stages").rglob("*.py"):
        if path.name != "params.py":
            assert "load_section(" not in path.read_text(), f"{path}: read params with read_params"
    for name, stage in dvc_stages().items():
        source = (ROOT / "stages" / f"{name}.py").read_text()
        read = set(re.findall(r'read_params\(\s*\w+,\s*"(\w+)"', source))
        tracked = stage.get("params", [])
        assert all(isinstance(t, str) and "." not in t for t in tracked), f"stage {name}: track whole sections"
        assert set(tracked) == read, f"stage {name}: dvc.yaml tracks {sorted(tracked)}, the code reads {sorted(read)}"


def test_no_function_in_stages_is_over_60_lines():
    long = []
    for path in (ROOT / "stages").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, f"split these: {long}"
