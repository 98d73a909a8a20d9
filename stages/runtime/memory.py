"""Peak memory of one model variant, each in a fresh Python process, so one variant's memory never counts
towards another's.

A probe process measures its resident memory after importing what the variant needs (the baseline), then
loads the variant and runs it on the given texts at batch 64, and reports the peak (VmHWM) and the peak less
the baseline. ONNX variants are probed as a server runs them, with ONNX Runtime and the `tokenizers` library
only: the process never imports torch or transformers, which also keeps each probe to about a second. The
PyTorch variant loads the full stack, as it needs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from stages.runner.errors import StageError


def status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MB; unlike ru_maxrss, not inherited from the parent."""
    with open("/proc/self/status") as fh:
        line = next(ln for ln in fh if ln.startswith(field + ":"))
    return int(line.split()[1]) / 1e3  # kB


def _run_onnx(spec: dict[str, Any]) -> None:
    import numpy as np
    from tokenizers import Tokenizer

    if spec["kind"] == "kernels":  # the compiled operators of kernels/ on the same ONNX file
        from distillery_kernels.engine import EngineSession

        sess = EngineSession(Path(spec["path"]), spec["threads"], block=spec.get("block"))
    else:
        from stages.runtime.sessions import session

        sess = session(Path(spec["path"]), spec["threads"])
    tok = Tokenizer.from_file(str(Path(spec["tokenizer"]) / "tokenizer.json"))
    tok.enable_truncation(spec["max_length"])
    tok.enable_padding()
    texts = spec["texts"]
    for s in range(0, len(texts), 64):
        encoded = tok.encode_batch(texts[s : s + 64])
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})


def _run_torch(spec: dict[str, Any]) -> None:
    import torch

    from stages.model.encoder import TokenizedTexts, load

    model, tokenizer, _ = load(Path(spec["path"]))
    texts = TokenizedTexts(tokenizer, spec["texts"], spec["max_length"])
    with torch.no_grad():
        for s in range(0, len(texts), 64):
            model(**texts.batch(range(s, min(len(texts), s + 64))))


def probe(spec: dict[str, Any]) -> dict[str, float]:
    """In this (fresh) process: the variant of `spec` (`kind` onnx, kernels or torch; `path`, `tokenizer`, `threads`,
    `max_length`, `texts`) run at batch 64; its peak and the peak above the baseline, in MB."""
    if spec["kind"] == "torch":
        import torch
        import transformers  # noqa: F401  (imported before the baseline: what any torch process carries)

        torch.set_num_threads(spec["threads"])
        before, run = status_mb("VmRSS"), _run_torch
    else:
        import onnxruntime  # noqa: F401
        import tokenizers  # noqa: F401

        if spec["kind"] == "kernels":  # what the engine imports to read the model, before the baseline too
            import onnx  # noqa: F401

            import distillery_kernels  # noqa: F401

        before, run = status_mb("VmRSS"), _run_onnx
    run(spec)
    peak = status_mb("VmHWM")
    return {"peak_mb": round(peak, 1), "model_mb": round(max(0.0, peak - before), 1)}


class Probes:
    """Probes running in fresh processes: `start` launches one and returns at once, `results` waits for all.
    A probe may run while the parent does untimed work (exporting models); never while it times anything."""

    CODE = "import json, sys; from stages.runtime.memory import probe; print(json.dumps(probe(json.load(sys.stdin))))"

    def __init__(self) -> None:
        self.running: dict[str, subprocess.Popen[str]] = {}

    def start(self, name: str, spec: dict[str, Any]) -> None:
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        print(f"benchmark: peak memory of {name} (a fresh process)", file=sys.stderr, flush=True)
        proc = subprocess.Popen([sys.executable, "-c", self.CODE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(spec))  # the child reads all of it first, before it writes anything
        proc.stdin.close()
        proc.stdin = None  # written and closed: `communicate` reads the output only
        self.running[name] = proc

    def results(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, proc in self.running.items():
            stdout, stderr = proc.communicate()  # reads both pipes together: a chatty probe cannot block
            if proc.returncode != 0:
                tail = (stderr.strip().splitlines() or ["no output"])[-1]
                raise StageError(f"benchmark: memory probe of {name} failed: {tail}")
            out[name] = json.loads(stdout.strip().splitlines()[-1])
        self.running = {}
        return out


def peak_memory(specs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """`probe` of each spec, each in a fresh Python process, one after another."""
    out: dict[str, dict[str, float]] = {}
    for name, spec in specs.items():
        one = Probes()
        one.start(name, spec)
        out.update(one.results())
    return out
