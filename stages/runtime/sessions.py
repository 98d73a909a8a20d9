"""ONNX Runtime sessions as every stage and the server build them, without importing torch (a memory probe or a
server loads only this). The options are recorded next to built engines (`session_options_record`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

INPUTS = ("input_ids", "attention_mask")
OUTPUTS = ("logits", "pooled")  # pooled: the masked-mean sentence embedding the head reads (Mahalanobis rejection)
# Slower than what it fuses on CPU with ONNX Runtime 1.31-1.32: see `stages.runtime.onnx`'s docstring.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def session_options_record(threads: int) -> dict[str, Any]:
    """The CPU session options `session` uses, as saved next to built engines (load them the same way:
    `disabled_optimizers` is an argument of `InferenceSession`, the rest are `SessionOptions` fields)."""
    return {
        "intra_op_num_threads": threads,
        "inter_op_num_threads": 1,
        "execution_mode": "ORT_SEQUENTIAL",
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "disabled_optimizers": list(CPU_DISABLED_OPTIMIZERS),
        "providers": ["CPUExecutionProvider"],
    }


def session(
    path: Path | str | bytes, threads: int = 2, providers: list[Any] | None = None, spinning: bool = True
) -> Any:
    """An ONNX Runtime session (on a model file, or a serialized model) with the options of
    `session_options_record(threads)` (CPU unless
    `providers` says otherwise: callers check `get_providers()` for a silent fallback). The CPU-only
    `disabled_optimizers` apply only when every provider is the CPU one. `spinning=False` stops idle intra-op
    threads from busy-waiting for the next run (a server sharing its cores with the HTTP loop wants that; results
    are the same)."""
    import onnxruntime as ort

    record = session_options_record(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = record["intra_op_num_threads"]
    options.inter_op_num_threads = record["inter_op_num_threads"]
    options.execution_mode = getattr(ort.ExecutionMode, record["execution_mode"])
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, record["graph_optimization_level"])
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = providers or record["providers"]
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    cpu_only = all(name == "CPUExecutionProvider" for name in names)
    disabled = record["disabled_optimizers"] if cpu_only else []
    if not isinstance(path, bytes):
        check_external_data(Path(path))
    model = path if isinstance(path, bytes) else str(path)
    try:
        return ort.InferenceSession(model, options, providers=providers, disabled_optimizers=disabled)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph/...: name the file, no traceback
        from stages.runner.errors import StageError

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(f"{model if isinstance(model, str) else 'serialized model'}: ONNX Runtime cannot load it: "
                         f"{first}") from exc  # fmt: skip


def check_external_data(path: Path) -> None:
    """An ONNX file may keep tensors in other files ("external data"); each must be a plain file inside the
    model's own folder. A location that is absolute, climbs out with `..` or goes through a symlink would make a
    session read whatever file it names: refused, naming the tensor."""
    import onnx

    from stages.runner.errors import StageError

    if not path.is_file():
        raise StageError(f"{path}: not found")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - a damaged protobuf raises DecodeError and others
        raise StageError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from exc
    folder = path.parent.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = path.parent / location
        inside = not Path(location).is_absolute() and ".." not in Path(location).parts
        if not location or not inside or target.is_symlink() or folder not in target.resolve().parents:
            raise StageError(f"{path}: tensor {tensor.name!r} keeps its data at {location!r}, outside the model's "
                             "folder; refused")  # fmt: skip
        if not target.is_file():
            raise StageError(f"{path}: tensor {tensor.name!r} keeps its data in {location!r}, which is missing")
