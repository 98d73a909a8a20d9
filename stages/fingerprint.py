"""Stage `fingerprint`: the machine that engines are built for, as a file `build` depends on.

Inference engines belong to a machine: a TensorRT plan does not move across GPU models or TensorRT
versions, and ONNX Runtime's CPU kernels depend on the instruction set. This stage records what decides
that: CPU model, architecture and the instruction-set extensions kernels dispatch on (AVX2, AVX-512,
VNNI, AMX, ...), each GPU's name, compute capability and memory, the driver, CUDA, cuDNN, TensorRT,
ONNX Runtime (version and execution providers), torch and Python versions. Nothing that changes from run
to run (host name, time, load) goes in, so the same machine writes the same bytes: DVC runs this stage
every time (`always_changed`) yet reruns `build` and what follows only when the file really changed.
The file is also copied into the lineage of every published version.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.runner.cli import stage_args, stage_entrypoint
from stages.runner.errors import StageError
from stages.runner.params import read_params
from stages.storage.atomic import outputs

# Instruction-set extensions that change which CPU kernels ONNX Runtime, torch and MLAS pick.
CPU_FEATURES = (
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
    "amx_tile", "amx_int8", "amx_bf16", "amx_fp16",
    "asimd", "asimddp", "asimdhp", "sve", "sve2", "i8mm", "bf16",
)  # fmt: skip


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """CPU model, architecture and the kernel-relevant features present (sorted), from /proc/cpuinfo
    where it exists (`cpuinfo` overrides it, for tests)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return {
        "model": model or platform.processor() or "unknown",
        "arch": platform.machine(),
        "features": sorted(flags & set(CPU_FEATURES)),
    }


def _nvidia_smi(query: str) -> list[str]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def gpu_info() -> dict[str, Any]:
    """Each visible CUDA device (name, compute capability, memory in GiB) and the driver, CUDA and cuDNN
    versions; `devices` is empty on a machine without a usable GPU.

    The devices come from `nvidia-smi`, so a machine without one answers at once: torch (seconds to import)
    is imported only where a GPU exists, for the CUDA and cuDNN versions it was built with, and for the
    device list when the driver's `nvidia-smi` is too old to report compute capability."""
    devices = []
    for line in _nvidia_smi("name,compute_cap,memory.total"):
        name, cap, mib = (part.strip() for part in line.rsplit(",", 2))
        if not cap.replace(".", "").isdigit():
            devices = _torch_devices()
            break
        devices.append({"name": name, "compute_capability": cap, "memory_gib": round(float(mib) / 1024)})
    drivers = sorted(set(_nvidia_smi("driver_version")))
    cuda = cudnn = None
    if devices:
        try:
            import torch

            cuda = torch.version.cuda
            cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        except ImportError:
            pass
    return {"devices": devices, "driver": drivers[0] if drivers else None, "cuda": cuda, "cudnn": cudnn}


def _torch_devices() -> list[dict[str, Any]]:
    import torch

    devices = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        devices.append(
            {
                "name": props.name,
                "compute_capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30),
            }
        )
    return devices


def _installed(*distributions: str) -> str | None:
    """The version of the first of `distributions` installed (package metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    for name in distributions:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def software_info() -> dict[str, Any]:
    """Versions from package metadata; ONNX Runtime's execution providers from ONNX Runtime itself (a
    fraction of a second to import, unlike torch)."""
    import onnxruntime

    return {
        "python": ".".join(platform.python_version_tuple()[:2]),
        "torch": _installed("torch"),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": sorted(onnxruntime.get_available_providers()),
        "tensorrt": _installed("tensorrt", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-libs"),
    }


@dataclass(frozen=True)
class FingerprintParams:
    # Dotted fields left out of the fingerprint, e.g. software.torch when a torch patch release should not
    # rebuild the engines. Every field is in by default.
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ignore", tuple(self.ignore))


def fingerprint(ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """The machine's fingerprint with `digest`, a SHA-256 over the rest (the short form lineage shows).
    Fields named in `ignore` (dotted, e.g. `software.torch`) are left out; an unknown name is an error."""
    body = {"cpu": cpu_info(), "gpu": gpu_info(), "software": software_info()}
    for dotted in ignore:
        section, _, key = dotted.partition(".")
        if section not in body or key not in body[section]:
            known = sorted(f"{s}.{k}" for s, fields in body.items() for k in fields)
            raise StageError(f"fingerprint.ignore: unknown field {dotted!r}; fields: {', '.join(known)}")
        del body[section][key]
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return {**body, "digest": digest, **({"ignored": sorted(ignore)} if ignore else {})}


@stage_entrypoint("fingerprint")
def main(argv: list[str] | None = None) -> int:
    """`python -m stages.fingerprint --out data/00_fingerprint`."""
    args = stage_args("fingerprint", __doc__, argv, upstream=None)
    p = read_params(FingerprintParams, "fingerprint", args.params)
    found = fingerprint(p.ignore)
    with outputs() as w:
        w.json(args.out / "fingerprint.json", found)
    gpus = ", ".join(d["name"] for d in found["gpu"]["devices"]) or "no GPU"
    print(f"fingerprint: {found['cpu']['model']} ({len(found['cpu']['features'])} ISA features), {gpus}; "
          f"{found['digest'][:12]} -> {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
