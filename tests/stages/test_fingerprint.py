"""fingerprint: the machine engines are built for, the same bytes on the same machine, any field counts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from stages import fingerprint

CPUINFO = """processor : 0
model name : Example CPU @ 2.0GHz
flags : fpu sse4_2 avx avx2 fma avx512f avx512_vnni hypervisor
"""


def run_fingerprint(out: Path, ignore: list[str] | None = None) -> int:
    params = out.parent / f"{out.name}.yaml"
    params.write_text(yaml.safe_dump({"fingerprint": {"ignore": ignore or []}}))
    return fingerprint.main(["--params", str(params), "--out", str(out)])


def test_fingerprint_same_machine_same_bytes(tmp_path):
    assert run_fingerprint(tmp_path / "a") == 0
    assert run_fingerprint(tmp_path / "b") == 0
    first = (tmp_path / "a/fingerprint.json").read_bytes()
    assert first == (tmp_path / "b/fingerprint.json").read_bytes()
    found = json.loads(first)
    assert {"cpu", "gpu", "software", "digest"} <= set(found)
    assert found["software"]["onnxruntime"] and found["software"]["torch"]


def test_fingerprint_changes_with_any_field(monkeypatch):
    cpu = fingerprint.cpu_info(CPUINFO)
    assert cpu["model"] == "Example CPU @ 2.0GHz"
    assert cpu["features"] == ["avx", "avx2", "avx512_vnni", "avx512f", "fma", "sse4_2"]  # not fpu/hypervisor
    base = fingerprint.fingerprint()["digest"]
    assert fingerprint.fingerprint()["digest"] == base
    real_cpu = fingerprint.cpu_info
    no_vnni = CPUINFO.replace(" avx512_vnni", "")
    monkeypatch.setattr(fingerprint, "cpu_info", lambda: real_cpu(no_vnni))
    other_cpu = fingerprint.fingerprint()["digest"]
    monkeypatch.setattr(fingerprint, "cpu_info", lambda: real_cpu(CPUINFO))
    with_cpu = fingerprint.fingerprint()["digest"]
    assert other_cpu != with_cpu
    real_gpu = fingerprint.gpu_info()
    monkeypatch.setattr(fingerprint, "gpu_info", lambda: {**real_gpu, "driver": "999.1"})
    assert fingerprint.fingerprint()["digest"] != with_cpu
    real_sw = fingerprint.software_info()
    monkeypatch.setattr(fingerprint, "gpu_info", lambda: real_gpu)
    monkeypatch.setattr(fingerprint, "software_info", lambda: {**real_sw, "tensorrt": "10.9.0"})
    assert fingerprint.fingerprint()["digest"] != with_cpu


def test_fingerprint_ignore_leaves_a_field_out_and_names_unknown_ones(tmp_path, capsys):
    assert run_fingerprint(tmp_path / "i", ["software.torch"]) == 0
    found = json.loads((tmp_path / "i/fingerprint.json").read_text())
    assert "torch" not in found["software"] and found["ignored"] == ["software.torch"]
    assert run_fingerprint(tmp_path / "u", ["software.tensorflow"]) == 1
    assert "fingerprint.ignore: unknown field 'software.tensorflow'" in capsys.readouterr().err


def test_fingerprint_imports_no_torch_and_reads_versions_from_metadata(tmp_path):
    """The stage runs on every `dvc repro`: it must not import the ML stack (seconds) to read versions."""
    import importlib.metadata
    import subprocess

    code = (
        "import sys; from stages.fingerprint import main; main(['--out', sys.argv[1]]); "
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', 'polars' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout.strip().splitlines()[-1] == "NO-TORCH False"
    found = json.loads((tmp_path / "fingerprint.json").read_text())
    assert found["software"]["torch"] == importlib.metadata.version("torch")


def test_gpu_devices_come_from_nvidia_smi(monkeypatch):
    answers = {
        "name,compute_cap,memory.total": ["NVIDIA H200, 9.0, 143771", "NVIDIA L4, 8.9, 23034"],
        "driver_version": ["570.86.15", "570.86.15"],
    }
    monkeypatch.setattr(fingerprint, "_nvidia_smi", lambda query: answers[query])
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed: versions are left unknown
    found = fingerprint.gpu_info()
    assert found["devices"] == [
        {"name": "NVIDIA H200", "compute_capability": "9.0", "memory_gib": 140},
        {"name": "NVIDIA L4", "compute_capability": "8.9", "memory_gib": 22},
    ]
    assert found["driver"] == "570.86.15" and found["cuda"] is None
