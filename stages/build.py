"""Stage `build`: inference engines for this machine, each checked against ONNX Runtime.

Always, on the CPU: ONNX Runtime engines. The transformer optimizer fuses the fp32 graph (Attention,
SkipLayerNormalization, BiasGelu, ...): `onnxruntime_fp32`. The INT8 engine `onnxruntime_int8` is that
fused graph quantized dynamically (INT8 weights, per channel as `quantize.per_channel`), since the
fusions match float MatMuls and not an already-quantized graph. Fusing first is the order ONNX Runtime
recommends. `engines/onnxruntime.json` holds the session options the engines were checked and timed with.
Each engine is compared with its unfused counterpart from `quantize` on validation rows: the fp32 engine
must stay within `fp32_tolerance` (max |logit difference|), an INT8 engine must agree on at least
`min_agreement` of the predictions. A miss fails the stage, naming the engine and the difference.

On GPU hosts (CUDA and TensorRT present), for each route in `build.gpu`:
- `tensorrt`: TensorRT engines built with its Python API. The ONNX parser's errors are logged one per
  line. An FP16 engine is built from `model.onnx`. An INT8 engine is built from the static QDQ variant
  (explicit quantization). One optimization profile covers batch 1..`max_batch` and sequence
  1..`max_len`. The timing cache is kept at `timing_cache`, outside DVC's outputs, so rebuilds reuse it.
- `onnxruntime_tensorrt` and `onnxruntime_cuda`: ONNX Runtime's TensorRT (FP16, engine cache on) and
  CUDA execution providers. `session.get_providers()` is checked: a silent CPU fallback is recorded as
  skipped, never reported as a GPU engine.

GPU engines are compared with ONNX Runtime on the CPU (`fp16_tolerance`, `min_agreement`). Where there is
no GPU or no TensorRT (or a route is not asked for), each GPU engine is recorded as skipped with the
reason. A GPU engine that fails to build is recorded as failed; `require_gpu: true` makes either case
fail the stage.

`manifest.json` lists every engine: backend, precision, device, file and size, profile, fused operators,
parity, or `skipped`/`failed` with the reason; it and the ONNX Runtime engine files are deterministic.
`timings.json` holds what is not: each engine's build seconds and model-only latency at batch 1
(p50/p95/p99), next to its unfused model's, timed side by side. TensorRT plans vary with tactic timing too.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.common.atomic import outputs
from stages.common.cli import read_frames, stage_args, stage_params
from stages.common.encoder import TokenizedTexts, load_tokenizer
from stages.common.errors import StageError, stage_entrypoint
from stages.common.onnx_runtime import (
    INPUTS,
    batched_logits,
    fuse_for_ort,
    latency_ms,
    latency_side_by_side,
    ort_logits,
    quantize_dynamic_int8,
    session,
    session_options_record,
    size_mb,
)
from stages.common.params import load_section

GPU_ROUTES = ("tensorrt", "onnxruntime_tensorrt", "onnxruntime_cuda")


@dataclass(frozen=True)
class BuildParams:
    gpu: tuple[str, ...] = GPU_ROUTES  # GPU routes to try where a GPU exists; [] = CPU engines only
    threads: int = 2  # ONNX Runtime intra-op threads (the CPU engines are checked and timed with these)
    parity_rows: int = 512  # validation rows each engine is compared on
    fp32_tolerance: float = 1e-4  # max |logit difference|: fused fp32 engine vs the unfused fp32 model
    fp16_tolerance: float = 5e-2  # max |logit difference|: FP16 GPU engines vs ONNX Runtime fp32 on CPU
    min_agreement: float = 0.99  # INT8 and FP16 engines: share of predictions equal to their reference
    max_batch: int = 64  # TensorRT optimization profile: batch 1..max_batch, sequence 1..max_len
    max_len: int = 64
    opt_batch: int = 1  # the shape TensorRT tunes for (serving latency at batch 1, typical query length)
    opt_len: int = 16
    workspace_mb: int = 2048
    timing_cache: str = ".cache/tensorrt/timing.cache"  # kept across runs, outside DVC outputs
    require_gpu: bool = False  # true: a GPU engine that is skipped or fails makes the stage fail
    latency_runs: int = 200
    max_length: int = 64  # tokens per text for parity and timing (as in quantize)

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpu", tuple(self.gpu))
        unknown = sorted(set(self.gpu) - set(GPU_ROUTES))
        if unknown:
            raise ValueError(f"build.gpu: unknown route(s) {unknown}; known: {list(GPU_ROUTES)}")
        for key in ("threads", "parity_rows", "max_batch", "max_len", "opt_batch", "opt_len", "workspace_mb",
                    "latency_runs", "max_length"):  # fmt: skip
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"build.{key} must be a positive integer, got {getattr(self, key)!r}")
        if not (self.opt_batch <= self.max_batch and self.opt_len <= self.max_len):
            raise ValueError(
                f"build.opt_batch/opt_len ({self.opt_batch}, {self.opt_len}) must not exceed "
                f"max_batch/max_len ({self.max_batch}, {self.max_len})"
            )
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"build.min_agreement must be within [0, 1], got {self.min_agreement}")

    def profile(self) -> dict[str, dict[str, list[int]]]:
        shapes = {"min": [1, 1], "opt": [self.opt_batch, self.opt_len], "max": [self.max_batch, self.max_len]}
        return {name: shapes for name in INPUTS}


def compare(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    return {
        "max_abs_logit_diff": float(np.abs(ours - ref).max()) if ours.size else 0.0,
        "agreement": round(float((ours.argmax(1) == ref.argmax(1)).mean()), 6) if ours.size else 1.0,
        "rows": int(ours.shape[0]),
    }


def judge(name: str, parity: dict[str, Any], tolerance: float | None, min_agreement: float | None) -> str | None:
    """Why `parity` fails its bounds (None when it passes)."""
    if tolerance is not None and not parity["max_abs_logit_diff"] <= tolerance:
        return f"{name}: max |logit difference| {parity['max_abs_logit_diff']:.3g} exceeds {tolerance:g}"
    if min_agreement is not None and not parity["agreement"] >= min_agreement:
        return f"{name}: agrees on {parity['agreement']:.2%} of predictions, below {min_agreement:.2%}"
    return None


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


# ---- TensorRT (Python API) -------------------------------------------------------------------------


def trt_build(onnx_path: Path, precision: str, p: BuildParams) -> tuple[bytes, list[str]]:
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
    for name, shapes in p.profile().items():
        profile.set_shape(name, tuple(shapes["min"]), tuple(shapes["opt"]), tuple(shapes["max"]))
    config.add_optimization_profile(profile)
    cache_path = Path(p.timing_cache)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise StageError(f"TensorRT failed to build the {precision} engine from {onnx_path.name}")
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_name(cache_path.name + ".tmp")
    tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    tmp.replace(cache_path)
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
        out = torch.empty(tuple(self.context.get_tensor_shape("logits")), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address("logits", out.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise StageError("TensorRT execution failed")
        self.stream.synchronize()
        return out.cpu().numpy()


# ---- the stage -------------------------------------------------------------------------------------


class Builder:
    """Builds the engines into `folder` and collects their manifest entries."""

    def __init__(self, quantized: Path, folder: Path, texts: TokenizedTexts, p: BuildParams, per_channel: bool):
        self.quantized, self.folder, self.texts, self.p = quantized, folder, texts, p
        self.per_channel = per_channel
        self.engines: dict[str, dict[str, Any]] = {}
        self.refs: dict[str, tuple[Any, np.ndarray]] = {}
        self.failures: list[str] = []

    def reference(self, path: Path) -> tuple[Any, np.ndarray]:
        """(ONNX Runtime CPU session, logits) of an unfused model from `quantize`, made once per file."""
        if path not in self.refs:
            sess = session(path, self.p.threads)
            self.refs[path] = (sess, ort_logits(sess, self.texts))
        return self.refs[path]

    def check(self, name: str, logits: np.ndarray, ref: Path, tolerance: float | None, agreement: float | None):
        """Parity of `logits` with ONNX Runtime on the CPU running `ref` (a file of quantize's); fails the
        stage naming the engine, the difference and the reference."""
        parity = compare(logits, self.reference(ref)[1])
        parity["reference"] = ref.relative_to(self.quantized).as_posix()
        failure = judge(name, parity, tolerance, agreement)
        parity["passed"] = failure is None
        if failure:
            raise StageError(f"parity: {failure} against {parity['reference']} on {parity['rows']} rows")
        return parity

    def cpu_engines(self) -> None:
        p = self.p
        fp32_src = self.quantized / "model.onnx"
        int8_ref = self.quantized / "variants" / "dynamic.onnx"
        if not int8_ref.is_file():
            int8_ref = self.quantized / "model.int8.onnx"
        specs = [("onnxruntime_fp32", "fp32", fp32_src), ("onnxruntime_int8", "int8", int8_ref)]
        for name, precision, ref in specs:
            path = self.folder / f"{name}.onnx"
            start = time.perf_counter()
            if precision == "fp32":
                fused = fuse_for_ort(fp32_src, path)
            else:
                quantize_dynamic_int8(self.folder / "onnxruntime_fp32.onnx", path, self.per_channel, contrib_ops=True)
                fused = self.engines["onnxruntime_fp32"]["fused_operators"]
            seconds = time.perf_counter() - start
            sess = session(path, p.threads)
            fp32 = precision == "fp32"
            bounds = (p.fp32_tolerance, None) if fp32 else (None, p.min_agreement)
            parity = self.check(name, ort_logits(sess, self.texts), ref, *bounds)
            timed = latency_side_by_side({"ours": sess, "ref": self.reference(ref)[0]}, self.texts, p.latency_runs)
            ours, theirs = timed["ours"], timed["ref"]
            self.engines[name] = {
                "status": "built",
                "backend": "onnxruntime",
                "device": "cpu",
                "precision": precision,
                "file": f"engines/{path.name}",
                "size_mb": size_mb(path),
                "fused_operators": fused,
                "build_seconds": round(seconds, 3),
                "parity": parity,
                "latency_ms": ours,
                "unfused_latency_ms": theirs,
                "speedup_vs_unfused": round(theirs["p50"] / ours["p50"], 3),
            }

    def skip(self, name: str, backend: str, precision: str, reason: str, asked: bool = True) -> None:
        self.engines[name] = {"status": "skipped", "backend": backend, "precision": precision, "reason": reason}
        if self.p.require_gpu and asked:
            self.failures.append(f"{name}: skipped: {reason}")

    def fail(self, name: str, backend: str, precision: str, reason: str) -> None:
        self.engines[name] = {"status": "failed", "backend": backend, "precision": precision, "reason": reason}
        print(f"build: {name} failed: {reason}", file=sys.stderr)
        if self.p.require_gpu:
            self.failures.append(f"{name}: {reason}")

    def gpu_engines(self) -> None:
        p = self.p
        wanted = {
            "tensorrt_fp16": ("tensorrt", "fp16"),
            "tensorrt_int8": ("tensorrt", "int8"),
            "onnxruntime_tensorrt_fp16": ("onnxruntime_tensorrt", "fp16"),
            "onnxruntime_cuda_fp32": ("onnxruntime_cuda", "fp32"),
        }
        no_gpu = gpu_unavailable()
        for name, (route, precision) in wanted.items():
            backend = "tensorrt" if route == "tensorrt" else "onnxruntime"
            if route not in p.gpu:
                self.skip(name, backend, precision, f"route {route!r} is not in build.gpu", asked=False)
            elif no_gpu:
                self.skip(name, backend, precision, no_gpu)
            elif route == "tensorrt" and (why := tensorrt_unavailable()):
                self.skip(name, backend, precision, why)
            else:
                try:
                    if route == "tensorrt":
                        self.tensorrt(name, precision)
                    else:
                        self.onnxruntime_gpu(name, route, precision)
                except StageError as exc:
                    self.fail(name, backend, precision, str(exc))

    def tensorrt(self, name: str, precision: str) -> None:
        p = self.p
        if precision == "int8":
            src = self.quantized / "variants" / "static.onnx"
            if not src.is_file():
                self.skip(name, "tensorrt", precision, "no static QDQ variant (quantize.variants lacks 'static')")
                return
        else:
            src = self.quantized / "model.onnx"
        start = time.perf_counter()
        plan, warnings = trt_build(src, precision, p)
        seconds = time.perf_counter() - start
        path = self.folder / f"{name}.plan"
        path.write_bytes(plan)
        runner = TrtRunner(plan)
        ref = self.quantized / "model.onnx" if precision == "fp16" else src
        tolerance = p.fp16_tolerance if precision == "fp16" else None
        parity = self.check(name, batched_logits(runner.run, self.texts), ref, tolerance, p.min_agreement)
        import tensorrt as trt

        self.engines[name] = {
            "status": "built",
            "backend": "tensorrt",
            "tensorrt": trt.__version__,
            "device": gpu_name(),
            "precision": precision,
            "source": f"{src.parent.name}/{src.name}" if src.parent != self.quantized else src.name,
            "file": f"engines/{path.name}",
            "size_mb": size_mb(path),
            "profile": p.profile(),
            "parser_messages": warnings,
            "timing_cache": p.timing_cache,
            "build_seconds": round(seconds, 3),
            "parity": parity,
            "latency_ms": latency_ms(runner.run, self.texts, p.latency_runs),
        }

    def onnxruntime_gpu(self, name: str, route: str, precision: str) -> None:
        import onnxruntime as ort

        p = self.p
        provider = "TensorrtExecutionProvider" if route == "onnxruntime_tensorrt" else "CUDAExecutionProvider"
        if provider not in ort.get_available_providers():
            self.skip(name, "onnxruntime", precision, f"{provider} is not in this onnxruntime build "
                      f"(available: {', '.join(ort.get_available_providers())})")  # fmt: skip
            return
        if route == "onnxruntime_tensorrt":
            cache = self.folder / "onnxruntime_tensorrt"
            cache.mkdir(exist_ok=True)
            shapes = {k: ",".join(f"{n}:{'x'.join(map(str, p.profile()[n][k]))}" for n in INPUTS)
                      for k in ("min", "opt", "max")}  # fmt: skip
            options = {
                "trt_fp16_enable": True,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(Path(p.timing_cache).parent),
                "trt_max_workspace_size": p.workspace_mb << 20,
                "trt_profile_min_shapes": shapes["min"],
                "trt_profile_opt_shapes": shapes["opt"],
                "trt_profile_max_shapes": shapes["max"],
            }
            src, providers = self.quantized / "model.onnx", [(provider, options), "CPUExecutionProvider"]
        else:
            src, providers = self.folder / "onnxruntime_fp32.onnx", [provider, "CPUExecutionProvider"]
        start = time.perf_counter()
        try:
            sess = session(src, p.threads, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise StageError(f"{provider}: {str(exc).strip().splitlines()[0]}") from exc
        got = sess.get_providers()
        if not got or got[0] != provider:
            self.skip(name, "onnxruntime", precision, f"{provider} fell back to {got}: a CPU run is not a GPU engine")
            return
        logits = ort_logits(sess, self.texts)  # the first runs build the TensorRT engines into the cache
        seconds = time.perf_counter() - start
        tolerance = p.fp16_tolerance if precision == "fp16" else 1e-3
        parity = self.check(name, logits, self.quantized / "model.onnx", tolerance, p.min_agreement)
        self.engines[name] = {
            "status": "built",
            "backend": "onnxruntime",
            "providers": got,
            "device": gpu_name(),
            "precision": precision,
            "source": src.name if src.parent == self.quantized else f"engines/{src.name}",
            "file": "engines/onnxruntime_tensorrt/" if route == "onnxruntime_tensorrt" else None,
            "profile": p.profile() if route == "onnxruntime_tensorrt" else None,
            "build_seconds": round(seconds, 3),
            "parity": parity,
            "latency_ms": latency_ms(sess, self.texts, p.latency_runs),
        }


def gpu_name() -> str:
    import torch

    return f"cuda: {torch.cuda.get_device_name(0)}"


TIMING_KEYS = ("build_seconds", "latency_ms", "unfused_latency_ms", "speedup_vs_unfused")


def split_timings(engines: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the manifest's engines, their timings): wall-clock figures go to their own file, so the manifest
    holds the same bytes on every run of the same inputs."""
    manifest = {n: {k: v for k, v in e.items() if k not in TIMING_KEYS} for n, e in engines.items()}
    timings = {n: {k: e[k] for k in TIMING_KEYS if k in e} for n, e in engines.items()}
    return manifest, {n: t for n, t in timings.items() if t}


@stage_entrypoint("build")
def main(argv: list[str] | None = None) -> int:
    """`python -m stages.build --in data/07_quantize --clean data/02_clean --fingerprint data/00_fingerprint
    --out data/08_build`."""
    args = stage_args("build", __doc__, argv, upstream="quantize", more=("clean", "fingerprint"))
    p = stage_params(BuildParams, "build", args.params)
    per_channel = bool(load_section("quantize", args.params).get("per_channel", True))
    machine_file = args.fingerprint / "fingerprint.json"
    if not machine_file.is_file():
        raise StageError(f"{machine_file}: not found; run the fingerprint stage first")
    machine = json.loads(machine_file.read_text(encoding="utf-8"))
    for name in ("model.onnx", "model.int8.onnx"):
        if not (args.inp / name).is_file():
            raise StageError(f"{args.inp / name}: not found; run the quantize stage first")
    texts = _validation_texts(args, p)
    with outputs() as w:
        folder = w.directory(args.out / "engines")
        builder = Builder(args.inp, folder, texts, p, per_channel)
        builder.cpu_engines()
        builder.gpu_engines()
        if builder.failures:
            raise StageError(f"build.require_gpu: {builder.failures[0]}")
        (folder / "onnxruntime.json").write_text(
            json.dumps(session_options_record(p.threads), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        engines, timings = split_timings(builder.engines)
        w.json(
            args.out / "manifest.json",
            {"engines": engines, "machine": machine["digest"], "session_options": "engines/onnxruntime.json"},
        )
        w.json(args.out / "timings.json", {"engines": timings, "threads": p.threads})
    built = [k for k, v in builder.engines.items() if v["status"] == "built"]
    int8 = builder.engines["onnxruntime_int8"]
    print(
        f"build: {len(built)} engine(s) built ({', '.join(built)}), "
        f"{sum(v['status'] == 'skipped' for v in builder.engines.values())} skipped; fused INT8 "
        f"{int8['speedup_vs_unfused']:.2f}x faster than unfused at batch 1 -> {args.out}"
    )
    return 0


def _validation_texts(args: Any, p: BuildParams) -> TokenizedTexts:
    """Validation rows tokenized with the tokenizer `quantize` saved next to the ONNX models."""
    held = read_frames(args.clean, ("val",), upstream="clean")["val"]
    tokenizer = load_tokenizer(args.inp / "tokenizer")
    return TokenizedTexts(tokenizer, held["text"].to_list()[: p.parity_rows], p.max_length)


if __name__ == "__main__":
    raise SystemExit(main())
