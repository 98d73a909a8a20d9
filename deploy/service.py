"""What a request goes through, apart from the protocol: its texts checked against the limits, then the
batcher, then (off the answer path) the shadow. Both routes (`/v2/.../infer` over REST and gRPC, and
`/v1/classify`) call `Service.classify` with texts and top-k they parsed; every refusal is a `Rejected` that
names the field or the limit."""

from __future__ import annotations

from typing import Any

from deploy import metrics
from deploy.batching import Batcher
from deploy.errors import Rejected
from deploy.runtime import Classifier, Prediction
from deploy.settings import ServeParams

TIMEOUT_HEADER = "x-request-timeout-ms"


def bad(status: int, details: str, reason: str = "bad_input") -> Rejected:
    metrics.REJECTS.labels(reason).inc()
    return Rejected(status, details, reason)


def check_texts(values: Any, field: str, p: ServeParams) -> list[str]:
    """The texts of a request, or a Rejected naming the field: a list of 1..max_texts non-empty strings of at
    most max_chars characters (bytes, as gRPC carries them, must be UTF-8)."""
    if not isinstance(values, list):
        raise bad(422, f"{field} must be a list of strings, got {type(values).__name__}")
    if not values:
        raise bad(422, f"{field} holds no texts")
    if len(values) > p.max_texts:
        raise bad(413, f"{field} holds {len(values)} texts; at most {p.max_texts} per request (serve.max_texts)",
                  "too_large")  # fmt: skip
    texts = []
    for i, value in enumerate(values):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise bad(400, f"{field}[{i}] is not valid UTF-8 (byte {exc.start})") from None
        if not isinstance(value, str):
            raise bad(422, f"{field}[{i}] must be a string, got {type(value).__name__}")
        if not value.strip():
            raise bad(422, f"{field}[{i}] is empty")
        if len(value) > p.max_chars:
            raise bad(422, f"{field}[{i}] has {len(value)} characters; at most {p.max_chars} (serve.max_chars)")
        if "\x00" in value:
            raise bad(422, f"{field}[{i}] contains a NUL character")
        texts.append(value)
    return texts


def check_top_k(value: Any, field: str, labels: int, default: int) -> int:
    if value is None:
        return min(default, labels)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= labels:
        raise bad(422, f"{field} must be an integer from 1 to {labels} (the model's labels), got {value!r}")
    return value


def timeout_of(headers: dict[str, str] | None, p: ServeParams) -> float:
    """Seconds a request may wait in the queue: the X-Request-Timeout-Ms header, else serve.timeout_ms."""
    raw = (headers or {}).get(TIMEOUT_HEADER)
    if raw is None:
        return p.timeout_ms / 1000.0
    try:
        ms = float(raw)
    except ValueError:
        ms = -1.0
    if not 0 < ms <= 3_600_000:
        raise bad(400, f"header X-Request-Timeout-Ms must be a number of milliseconds in (0, 3600000], got {raw!r}")
    return ms / 1000.0


class Service:
    """The served version, its batcher and (optionally) a shadow."""

    def __init__(self, name: str, version: str, p: ServeParams):
        self.name, self.version, self.params = name, version, p
        self.classifier: Classifier | None = None
        self.shadow: Any = None
        self.batcher = Batcher(self.run, p.max_batch_size, p.max_wait_ms, p.max_queue, on_batch=self.after_batch)

    @property
    def labels(self) -> int:
        return len(self.classifier.labels) if self.classifier else 1

    def run(self, texts: list[str], top_k: int) -> list[Prediction]:
        assert self.classifier is not None
        return self.classifier.classify(texts, top_k)

    def after_batch(self, texts: list[str], predictions: list[Prediction], seconds: float) -> None:
        rejected = sum(p.out_of_scope for p in predictions)
        if rejected:
            metrics.ANSWERS.labels(out_of_scope="true").inc(rejected)
        if len(predictions) > rejected:
            metrics.ANSWERS.labels(out_of_scope="false").inc(len(predictions) - rejected)
        if self.shadow is not None:
            self.shadow.offer(texts, predictions, seconds)

    async def classify(self, texts: list[str], top_k: int, headers: dict[str, str] | None) -> list[Prediction]:
        if self.classifier is None:
            raise Rejected(503, "the model is still loading; retry shortly", "loading")
        return await self.batcher.submit(texts, top_k, timeout_of(headers, self.params))
