"""TensorRT through its Python API: building a serialized engine from ONNX (the parser's errors logged one
per line), and running one on torch CUDA buffers. Everything here needs CUDA and the `tensorrt` package;
`gpu_unavailable()` and `tensorrt_unavailable()` say why not, for callers that record a skip."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.runner.errors import StageError
from stages.runtime.sessions import INPUTS


def gpu_unavailable() -> str | None:
    """Why GPU engines cannot be built here (None when a CUDA device is usable)."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def tensorrt_unavailable() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"TensorRT is not installed ({exc})"
    return None


@dataclass(frozen=True)
class TrtSettings:
    """How a TensorRT engine is built: one optimization profile, a workspace, a persisted timing cache."""

    profile: dict[str, dict[str, list[int]]]  # input name -> {"min", "opt", "max"} shapes
    workspace_mb: int
    timing_cache: str  # a file kept across builds


def trt_build(onnx_path: Path, precision: str, p: TrtSettings) -> tuple[bytes, list[str]]:
    """Parse `onnx_path` and build a serialized TensorRT engine ('fp16', or 'int8' from a QDQ graph).
    Returns (plan, parser errors); raises StageError when parsing or building fails, with the errors."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(onnx_path))
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    for line in errors:
        print(f"build: TensorRT parser: {line}", file=sys.stderr)
    if not parsed:
        raise StageError(f"TensorRT could not parse {onnx_path.name}: {errors[0] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, p.workspace_mb << 20)
    config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # scales come from the graph's Q/DQ nodes
    profile = builder.create_optimization_profile()
    for name, shapes in p.profile.items():
        profile.set_shape(name, tuple(shapes["min"]), tuple(shapes["opt"]), tuple(shapes["max"]))
    config.add_optimization_profile(profile)
    cache_path = Path(p.timing_cache)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise StageError(f"TensorRT failed to build the {precision} engine from {onnx_path.name}")
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    from stages.storage.atomic import outputs

    with outputs() as w:  # a temporary name of its own: builds may share one timing cache
        w.file(cache_path, lambda tmp: tmp.write_bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan)), errors


class TrtRunner:
    """Runs a serialized TensorRT engine on torch CUDA buffers, one batch at a time."""

    def __init__(self, plan: bytes):
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise StageError("TensorRT could not deserialize the engine it just built")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def run(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        torch, trt = self.torch, self.trt
        keep = []
        for name in INPUTS:
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            tensor = torch.from_numpy(np.ascontiguousarray(batch[name].astype(dtype))).cuda()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for i in range(self.engine.num_io_tensors):  # every output needs a buffer (logits, and pooled if exported)
            name = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                continue
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise StageError("TensorRT execution failed")
        self.stream.synchronize()
        return outputs["logits"].float().cpu().numpy()


def gpu_name() -> str:
    import torch

    return f"cuda: {torch.cuda.get_device_name(0)}"
