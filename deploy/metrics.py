"""The server's Prometheus metrics (prometheus-client, default registry: `/metrics` serves them beside KServe's
own `request_*_seconds` histograms). Every name starts with `distillery_serve_`."""

from __future__ import annotations

import re

from prometheus_client import Counter, Gauge, Histogram, Info

MS_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128)

REQUESTS = Counter("distillery_serve_requests", "HTTP requests answered, by route and status", ["route", "status"])
LATENCY = Histogram("distillery_serve_request_seconds", "HTTP request latency in the server, by route and status",
                    ["route", "status"], buckets=MS_BUCKETS)  # fmt: skip
QUEUE_WAIT = Histogram("distillery_serve_queue_wait_seconds", "Time a request waited for its batch to start",
                       buckets=MS_BUCKETS)  # fmt: skip
BATCH_TEXTS = Histogram("distillery_serve_batch_texts", "Texts per model call", buckets=BATCH_BUCKETS)
MODEL_SECONDS = Histogram("distillery_serve_model_seconds", "Model time per batch (tokenizing included)",
                          ["role"], buckets=MS_BUCKETS)  # fmt: skip
QUEUE_DEPTH = Gauge("distillery_serve_queue_texts", "Texts waiting for the model", ["role"])
REJECTS = Counter("distillery_serve_rejects", "Requests refused before inference, by reason", ["reason"])
MODEL = Info("distillery_serve_model", "The served versions", ["role"])
ANSWERS = Counter("distillery_serve_texts", "Texts answered, by whether the rejection rule turned them away",
                  ["out_of_scope"])  # fmt: skip
SHADOW = Counter("distillery_serve_shadow_texts", "Texts compared with the shadow version, by outcome", ["outcome"])
SHADOW_PAIRS = Counter("distillery_serve_shadow_disagreements", "Disagreeing label pairs (primary, shadow)",
                       ["primary", "shadow"])  # fmt: skip

ROUTES = (
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$"), "v2_infer"),
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/ready$"), "v2_model_ready"),
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?$"), "v2_model_metadata"),
    (re.compile(r"^/v2/health/(live|ready)$"), "v2_health"),
    (re.compile(r"^/v2/?$"), "v2_metadata"),
    (re.compile(r"^/v1/classify$"), "v1_classify"),
    (re.compile(r"^/metrics$"), "metrics"),
)


def route_of(path: str) -> str:
    """A bounded route label: a fuzzer's million paths count as `other`, never as a million series."""
    for pattern, name in ROUTES:
        if pattern.match(path):
            return name
    return "other"
