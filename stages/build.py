"""Stage `build`: inference engines for this machine, each checked against ONNX Runtime.

Always, on the CPU: ONNX Runtime engines. The transformer optimizer fuses the fp32 graph (Attention,
SkipLayerNormalization, BiasGelu, ...): `onnxruntime_fp32`. The INT8 engine `onnxruntime_int8` is that
fused graph quantized dynamically (INT8 weights, per channel as `runtime.per_channel`), since the
fusions match float MatMuls and not an already-quantized graph. Fusing first is the order ONNX Runtime
recommends. `engines/onnxruntime.json` holds the session options the engines were checked and timed with.
Each engine is compared with its unfused counterpart from `quantize` on validation rows: the fp32 engine
must stay within `fp32_tolerance` (max |logit difference|), an INT8 engine must agree on at least
`min_agreement` of the predictions. A miss fails the stage, naming the engine and the difference.

Also on the CPU, `kernels_int8` (`build.kernels`): quantize's INT8 model run by the compiled operators of
`kernels/` (distillery_kernels.engine, which reads the model's INT8 weights and scales), held to ONNX Runtime
on the same file: at least `kernels_min_agreement` of the predictions equal and no logit further than
`kernels_max_logit_share` of the reference's logit range, else the stage fails naming the engine. Where the
operators were not built (no compiler at install) or cannot read the model, it is recorded as skipped with
the reason, like a GPU engine without a GPU. Its manifest entry names quantize's file as its `source`.
`kernels_int8_sparse` is the same engine with the layers' weights packed block-sparse in
`build.kernels_sparse_block` blocks (set it to `prune.magnitude_block`, the blocks pruning zeroed): built and
checked the same way when at least `kernels_sparse_min_zero_blocks` of the blocks are zero (its entry records
the block and the zero share), else skipped with the share measured.

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

from stages.model.encoder import TokenizedTexts, load_tokenizer
from stages.records import BuildManifest, Engine
from stages.runner.cli import read_frames, require, stage_args, stage_entrypoint
from stages.runner.errors import ParamError, StageError
from stages.runner.params import block_shape, read_params
from stages.runtime.onnx import (
    batched_logits,
    fuse_for_ort,
    latency_ms,
    latency_side_by_side,
    ort_logits,
    quantize_dynamic_int8,
    size_mb,
)
from stages.runtime.sessions import INPUTS, session, session_options_record
from stages.runtime.settings import RuntimeParams
from stages.runtime.tensorrt import TrtRunner, TrtSettings, gpu_name, gpu_unavailable, tensorrt_unavailable, trt_build
from stages.storage.atomic import dumps_json, outputs

GPU_ROUTES = ("tensorrt", "onnxruntime_tensorrt", "onnxruntime_cuda")


@dataclass(frozen=True)
class BuildParams:
    gpu: tuple[str, ...] = GPU_ROUTES  # GPU routes to try where a GPU exists; [] = CPU engines only
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
    kernels: bool = True  # build `kernels_int8`: the student on the compiled operators of kernels/
    kernels_min_agreement: float = 0.97  # its share of predictions equal to ONNX Runtime's on the same INT8 model
    kernels_max_logit_share: float = 0.05  # its max |logit difference| over the reference's logit range
    # `kernels_int8_sparse`: the same engine with the layers packed block-sparse in blocks of this shape (set it
    # to prune.magnitude_block's); built when at least `kernels_sparse_min_zero_blocks` of the INT8 layers' blocks
    # are zero, else recorded as skipped with the share; None: not built
    kernels_sparse_block: tuple[int, int] | None = None
    kernels_sparse_min_zero_blocks: float = 0.3

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpu", tuple(self.gpu))
        unknown = sorted(set(self.gpu) - set(GPU_ROUTES))
        if unknown:
            raise ParamError(f"build.gpu: unknown route(s) {unknown}; known: {list(GPU_ROUTES)}")
        for key in ("parity_rows", "max_batch", "max_len", "opt_batch", "opt_len", "workspace_mb", "latency_runs"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ParamError(f"build.{key} must be a positive integer, got {getattr(self, key)!r}")
        object.__setattr__(
            self, "kernels_sparse_block", block_shape(self.kernels_sparse_block, "build.kernels_sparse_block")
        )
        for key in ("kernels_min_agreement", "kernels_max_logit_share", "kernels_sparse_min_zero_blocks"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ParamError(f"build.{key} must be in [0, 1], got {getattr(self, key)!r}")
        if not (self.opt_batch <= self.max_batch and self.opt_len <= self.max_len):
            raise ParamError(
                f"build.opt_batch/opt_len ({self.opt_batch}, {self.opt_len}) must not exceed "
                f"max_batch/max_len ({self.max_batch}, {self.max_len})"
            )
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ParamError(f"build.min_agreement must be within [0, 1], got {self.min_agreement}")

    def profile(self) -> dict[str, dict[str, list[int]]]:
        shapes = {"min": [1, 1], "opt": [self.opt_batch, self.opt_len], "max": [self.max_batch, self.max_len]}
        return {name: shapes for name in INPUTS}

    def trt(self) -> TrtSettings:
        return TrtSettings(self.profile(), self.workspace_mb, self.timing_cache)


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


# ---- the stage -------------------------------------------------------------------------------------


class Builder:
    """Builds the engines into `folder` and collects their manifest entries."""

    def __init__(self, quantized: Path, folder: Path, texts: TokenizedTexts, p: BuildParams, rt: RuntimeParams):
        self.quantized, self.folder, self.texts, self.p, self.rt = quantized, folder, texts, p, rt
        self.engines: dict[str, dict[str, Any]] = {}
        self.refs: dict[str, tuple[Any, np.ndarray]] = {}
        self.failures: list[str] = []

    def reference(self, path: Path) -> tuple[Any, np.ndarray]:
        """(ONNX Runtime CPU session, logits) of an unfused model from `quantize`, made once per file."""
        if path not in self.refs:
            sess = session(path, self.rt.threads)
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
                quantize_dynamic_int8(
                    self.folder / "onnxruntime_fp32.onnx", path, self.rt.per_channel, contrib_ops=True
                )
                fused = self.engines["onnxruntime_fp32"]["fused_operators"]
            seconds = time.perf_counter() - start
            sess = session(path, self.rt.threads)
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

    def kernels_engine(self, sparse_block: tuple[int, int] | None = None) -> None:
        """`kernels_int8`: quantize's INT8 model run by the compiled operators (distillery_kernels.engine), held to
        ONNX Runtime on the same file; skipped with the reason where the operators were not built or cannot read
        the model (a static QDQ variant, a non-BERT encoder). Then `kernels_int8_sparse`, the layers packed
        block-sparse in `sparse_block` blocks (build.kernels_sparse_block), when enough of them are zero."""
        self.kernels("kernels_int8", None)
        if sparse_block is None:
            why = "build.kernels_sparse_block is null (set it to prune.magnitude_block for a block-sparse student)"
            self.skip("kernels_int8_sparse", "kernels", "int8", why, asked=False)
        else:
            self.kernels("kernels_int8_sparse", sparse_block)

    def kernels(self, name: str, block: tuple[int, int] | None) -> None:
        import distillery_kernels

        if not self.p.kernels:
            return self.skip(name, "kernels", "int8", "build.kernels is false", asked=False)
        if not distillery_kernels.available():
            return self.skip(name, "kernels", "int8", distillery_kernels.unavailable_reason(), asked=False)
        from distillery_kernels.engine import EngineError, EngineSession

        start = time.perf_counter()
        # quantize's choice, or where that is the static QDQ variant (no INT8 weights the engine takes) the
        # dynamic variant quantize also wrote: a block-pruned student often gets the static one
        chosen, dynamic = self.quantized / "model.int8.onnx", self.quantized / "variants" / "dynamic.onnx"
        source, sess, why = None, None, ""
        for candidate in (chosen, dynamic) if dynamic.is_file() else (chosen,):
            try:
                source, sess = candidate, EngineSession(candidate, self.rt.threads, block=block)
                break
            except EngineError as exc:
                why += f"{'; ' if why else ''}cannot run {candidate.relative_to(self.quantized).as_posix()}: {exc}"
        if sess is None:
            return self.skip(name, "kernels", "int8", why, asked=False)
        seconds = time.perf_counter() - start
        sparse: dict[str, Any] = {}
        if block is not None:
            share, least = sess.engine.zero_blocks, self.p.kernels_sparse_min_zero_blocks
            if share < least:
                why = (f"{share:.1%} of the INT8 layers' {block[0]}x{block[1]} weight blocks are zero, under "
                       f"build.kernels_sparse_min_zero_blocks ({least:.0%}): not a block-sparse student")  # fmt: skip
                return self.skip(name, "kernels", "int8", why, asked=False)
            sparse = {"block": list(block), "zero_blocks": round(share, 6)}
        ref_sess, ref = self.reference(source)
        logits = ort_logits(sess, self.texts)
        spread = float(ref.max() - ref.min()) if ref.size else 0.0
        tolerance = self.p.kernels_max_logit_share * spread
        parity = self.check(name, logits, source, tolerance, self.p.kernels_min_agreement)
        parity["max_logit_share"] = round(parity["max_abs_logit_diff"] / spread, 6) if spread else 0.0
        timed = latency_side_by_side({"ours": sess, "ref": ref_sess}, self.texts, self.p.latency_runs)
        ours, theirs = timed["ours"], timed["ref"]
        self.engines[name] = {
            "status": "built",
            "backend": "kernels",
            "device": "cpu",
            "precision": "int8",
            "source": source.relative_to(self.quantized).as_posix(),
            **sparse,
            "providers": sess.get_providers(),
            "size_mb": size_mb(source),
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
        plan, warnings = trt_build(src, precision, p.trt())
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
            sess = session(src, self.rt.threads, providers=providers)
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


TIMING_KEYS = ("build_seconds", "latency_ms", "unfused_latency_ms", "speedup_vs_unfused")


def split_timings(engines: dict[str, dict[str, Any]]) -> tuple[dict[str, Engine], dict[str, Any]]:
    """(the manifest's engines, their timings): wall-clock figures go to their own file, so the manifest
    holds the same bytes on every run of the same inputs."""
    manifest = {
        n: Engine.from_dict({k: v for k, v in e.items() if k not in TIMING_KEYS}, n) for n, e in engines.items()
    }
    timings = {n: {k: e[k] for k in TIMING_KEYS if k in e} for n, e in engines.items()}
    return manifest, {n: t for n, t in timings.items() if t}


def build_engines(
    quantized: Path, folder: Path, texts: TokenizedTexts, p: BuildParams, rt: RuntimeParams, machine: str
) -> tuple[BuildManifest, dict[str, Any]]:
    """Build every engine from quantize's folder into `folder` (build's `engines/`), each checked on `texts`;
    returns the manifest and the timings. A parity miss fails (StageError), and with `build.require_gpu` a GPU
    engine that is skipped or fails."""
    builder = Builder(quantized, folder, texts, p, rt)
    builder.cpu_engines()
    builder.kernels_engine(p.kernels_sparse_block)
    builder.gpu_engines()
    if builder.failures:
        raise StageError(f"build.require_gpu: {builder.failures[0]}")
    (folder / "onnxruntime.json").write_text(dumps_json(session_options_record(rt.threads)), encoding="utf-8")
    engines, timings = split_timings(builder.engines)
    manifest = BuildManifest(engines=engines, machine=machine, session_options="engines/onnxruntime.json")
    return manifest, {"engines": timings, "threads": rt.threads}


@stage_entrypoint("build")
def main(argv: list[str] | None = None) -> int:
    """`python -m stages.build --in data/07_quantize --clean data/02_clean --fingerprint data/00_fingerprint
    --out data/08_build`."""
    args = stage_args("build", __doc__, argv, upstream="quantize", more=("clean", "fingerprint"))
    p = read_params(BuildParams, "build", args.params)
    rt = read_params(RuntimeParams, "runtime", args.params)
    machine = json.loads(require(args.fingerprint / "fingerprint.json", "fingerprint").read_text(encoding="utf-8"))
    for name in ("model.onnx", "model.int8.onnx", "tokenizer"):
        require(args.inp / name, "quantize")
    val = read_frames(args.clean, ("val",), upstream="clean")["val"]
    texts = TokenizedTexts(
        load_tokenizer(args.inp / "tokenizer"), val["text"].to_list()[: p.parity_rows], rt.max_length
    )
    with outputs() as w:
        folder = w.directory(args.out / "engines")
        manifest, timings = build_engines(args.inp, folder, texts, p, rt, machine["digest"])
        w.json(args.out / "manifest.json", manifest.to_dict())
        w.json(args.out / "timings.json", timings)
    built = [k for k, v in manifest.engines.items() if v.built]
    skipped = sum(v.status == "skipped" for v in manifest.engines.values())
    print(
        f"build: {len(built)} engine(s) built ({', '.join(built)}), {skipped} skipped; fused INT8 "
        f"{timings['engines']['onnxruntime_int8']['speedup_vs_unfused']:.2f}x faster than unfused at batch 1 "
        f"-> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
