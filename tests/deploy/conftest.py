"""A registry of two tiny published versions (built here in seconds, nothing downloaded) and a way to run
`python -m deploy.serve` on them as a user does: a subprocess on loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.stages.tiny import LABELS, dataset, tiny_teacher

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-intent"
MAX_LENGTH = 16


def publish_tiny(registry: Path, version: str, seed: int, model_name: str = MODEL, bigger: bool = False,
                 reject: Any = None, stats: Any = None, backend: str = "onnxruntime",
                 block: list[int] | None = None) -> Path:  # fmt: skip
    """A version as publish writes it: INT8 model.onnx, runtime.json, tokenizer/, labels.json, SHA256SUMS, index.
    `bigger`: 4 layers of width 128 reading 64 tokens (a model slow enough to keep a queue full for a while);
    `reject`: a RejectRecord written as reject.json (`stats`: its MahalanobisStats, as reject.safetensors);
    `backend` "kernels": the same INT8 model, for the compiled operators of kernels/ (as publish ships kernels_int8;
    with `block`, packed block-sparse as kernels_int8_sparse)."""
    import json
    import tempfile

    from stages.registry import Draft, RuntimeRecord, locked, record_text
    from stages.runtime.onnx import export_onnx, quantize_dynamic_int8
    from stages.runtime.sessions import session_options_record

    model, tok = tiny_teacher(seed, heads=2) if not bigger else bigger_model(seed)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8, tok_dir = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx", Path(tmp) / "tokenizer"
        export_onnx(model, tok, fp32, 18)
        quantize_dynamic_int8(fp32, int8, per_channel=True)
        tok.save_pretrained(str(tok_dir))
        ort = backend == "onnxruntime"
        record = RuntimeRecord(variant="onnxruntime_int8" if ort else "kernels_int8", file="model.onnx",
                               backend=backend, device="cpu",
                               providers=["CPUExecutionProvider"] if ort else ["distillery_kernels:avx512_vnni"],
                               inputs=["input_ids", "attention_mask"], outputs=["logits"],
                               session_options=session_options_record(2) if ort else None,
                               max_length=64 if bigger else MAX_LENGTH, block=block)  # fmt: skip
        model_dir = registry / model_name
        with locked(model_dir), Draft(model_dir) as draft:
            draft.add("model.onnx", int8)
            draft.add("tokenizer", tok_dir)
            draft.add("labels.json", json.dumps(LABELS, indent=2, sort_keys=True) + "\n")
            draft.add("runtime.json", record_text(record))
            if reject is not None:
                draft.add("reject.json", record_text(reject))
            if stats is not None:
                from safetensors.numpy import save_file

                save_file(stats.tensors(), str(Path(tmp) / "stats.safetensors"))
                draft.add("reject.safetensors", Path(tmp) / "stats.safetensors")
            return draft.commit(version)


def bigger_model(seed: int):
    import torch
    from transformers import BertConfig, BertModel

    from stages.model.encoder import TextClassifier
    from tests.stages.tiny import tiny_tokenizer

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    cfg = BertConfig(vocab_size=len(tok.get_vocab()), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=512, max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    return TextClassifier(BertModel(cfg, add_pooling_layer=False), len(LABELS)), tok


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve") / "registry"
    publish_tiny(root, "1.0.0", seed=0)
    publish_tiny(root, "2.0.0", seed=1)
    publish_tiny(root, "1.0.0", seed=0, model_name="slow-intent", bigger=True)
    return root


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return dataset(6, seed=3)["text"].to_list()


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports free now (all held open together while chosen, so never one port twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def sample(exposition: str, name: str, **labels: str) -> float:
    """One sample's value in a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in exposition.splitlines():
        key, _, value = line.rpartition(" ")
        series, _, rest = key.partition("{")
        if series == name and ",".join(sorted(rest.rstrip("}").split(","))) == want:
            return float(value)
    return 0.0


class Server:
    """`python -m deploy.serve` in a subprocess; `url`, `grpc` (host:port); `stop()` sends SIGTERM.

    A port chosen free can be taken before the server binds it (an outgoing connection's ephemeral port):
    `check()` starts the server again on new ports when it exited for that reason, at most `RETRIES` times."""

    RETRIES = 3

    def __init__(self, registry: Path, *flags: str, spec: str = MODEL, cwd: Path | None = None):
        self.args, self.cwd, self.retries = (registry, flags, spec), cwd, self.RETRIES
        self._start()

    def _start(self) -> None:
        registry, flags, spec = self.args
        self.http_port, self.grpc_port = free_ports(2)
        self.url, self.grpc = f"http://127.0.0.1:{self.http_port}", f"127.0.0.1:{self.grpc_port}"
        cmd = [sys.executable, "-m", "deploy.serve", "--registry", str(registry), "--model", spec,
               "--params", str(ROOT / "params.yaml"), "--http-port", str(self.http_port),
               "--grpc-port", str(self.grpc_port), *flags]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, cwd=self.cwd or ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)  # fmt: skip

    def check(self) -> None:
        """Raise if the server has exited; start it again on new ports if it exited because one was taken."""
        if self.proc.poll() is None:
            return
        out = self.proc.stdout.read()
        if "address already in use" in out and self.retries > 0:
            self.retries -= 1
            self._start()
            return
        raise AssertionError(f"the server exited {self.proc.returncode}: {out}")

    def wait_ready(self, timeout: float = 90.0) -> Server:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.check()
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("the server did not become ready")

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on /metrics (0 when absent)."""
        return sample(httpx.get(f"{self.url}/metrics", timeout=5).text, name, **labels)

    def stop(self, timeout: float = 60.0) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out


@pytest.fixture(scope="module")
def server(registry):
    s = Server(registry, "--max-texts", "8", "--max-chars", "200", "--max-body-bytes", "4096").wait_ready()
    yield s
    s.stop()
