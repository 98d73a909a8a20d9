"""params.yaml `serve:`: how `python -m deploy.serve` serves a published version. No stage tracks the section
(serving settings never change a model), and every key is also a command-line flag that overrides it."""

from __future__ import annotations

from dataclasses import dataclass

from stages.runner.errors import ParamError


@dataclass(frozen=True)
class ServeParams:
    host: str = "127.0.0.1"  # the container and the KServe manifest pass --host 0.0.0.0
    http_port: int = 8080
    grpc_port: int = 8081
    grpc: bool = True  # the Open Inference Protocol's gRPC service beside REST
    max_batch_size: int = 32  # texts run together in one model call
    max_wait_ms: float = 2.0  # longest a batch waits for more texts (only while requests are arriving together)
    max_queue: int = 512  # texts waiting for the model; one more is refused at once with 429 and Retry-After
    timeout_ms: float = 2000.0  # a request still queued after this gets 504 (an X-Request-Timeout-Ms header overrides)
    max_texts: int = 64  # texts in one request (more: 413)
    max_chars: int = 2048  # characters in one text (more: 422)
    max_body_bytes: int = 1_000_000  # a bigger body is refused (413) without being read whole
    top_k: int = 3  # labels returned per text when the request does not say
    threads: int | None = None  # inference threads; null: what the version's runtime.json says
    spinning: bool = False  # idle inference threads (ONNX Runtime's, the kernels pool's) busy-wait: slows the loop
    drain_seconds: float = 30.0  # on SIGTERM: time to answer what is queued and in flight, then exit 0
    shadow_queue: int = 256  # texts waiting for the shadow model; beyond it shadow work is dropped, never the primary's
    shadow_sample: float = 1.0  # share of answered batches the shadow compares (1: all, while the primary is idle)
    shadow_log: str = "shadow.jsonl"  # the rolling log of primary/shadow comparisons
    shadow_log_mb: float = 64.0  # the log rolls over to <log>.1 at this size
    access_log: bool = False  # one log line per request (costs throughput under load)

    def __post_init__(self) -> None:
        for key in ("http_port", "grpc_port"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
                raise ParamError(f"{key} must be a port number 0-65535, got {value!r}")
        for key in ("max_batch_size", "max_queue", "max_texts", "max_chars", "max_body_bytes", "top_k",
                    "shadow_queue"):  # fmt: skip
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParamError(f"{key} must be a positive integer, got {value!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):  # fmt: skip
            raise ParamError(f"threads must be a positive integer or null, got {self.threads!r}")
        for key in ("max_wait_ms", "drain_seconds"):
            if getattr(self, key) < 0:
                raise ParamError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        for key in ("timeout_ms", "shadow_log_mb"):
            if getattr(self, key) <= 0:
                raise ParamError(f"{key} must be > 0, got {getattr(self, key)!r}")
        if not 0 < self.shadow_sample <= 1:
            raise ParamError(f"shadow_sample must be in (0, 1], got {self.shadow_sample!r}")
        if self.max_queue < self.max_texts:
            raise ParamError(f"max_queue ({self.max_queue}) must hold at least one full request "
                             f"(max_texts: {self.max_texts})")  # fmt: skip
        if not isinstance(self.host, str) or not self.host:
            raise ParamError(f"host must be an address to listen on, got {self.host!r}")
