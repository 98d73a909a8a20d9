"""params.yaml `runtime:`: how every inference runtime session is set up. quantize, build and benchmark
track the whole section, so the models are scored, built and timed the same way (and a published version's
runtime.json carries the same settings to the server)."""

from __future__ import annotations

from dataclasses import dataclass

from stages.runner.errors import ParamError


@dataclass(frozen=True)
class RuntimeParams:
    threads: int = 2  # ONNX Runtime (and torch) intra-op threads for scoring and timing
    per_channel: bool = True  # INT8 weights with one scale per output channel (quantize and build's INT8 engine)
    max_length: int = 64  # tokens per text at inference; longer texts are truncated

    def __post_init__(self) -> None:
        for key in ("threads", "max_length"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParamError(f"runtime.{key} must be a positive integer, got {value!r}")
        if not isinstance(self.per_channel, bool):
            raise ParamError(f"runtime.per_channel must be true or false, got {self.per_channel!r}")
