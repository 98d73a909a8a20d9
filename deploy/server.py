"""The Open Inference Protocol (KServe v2) server around a `Service`, built on the `kserve` package.

KServe's `Model` and its REST and gRPC servers give the protocol: `/v2/health/live`, `/v2/health/ready`,
`/v2/models/<name>[/versions/<v>]/ready`, model metadata, `/v2/models/<name>/infer`, and the gRPC
`GRPCInferenceService`. This module adds:
- `IntentModel`: input `text` (BYTES, shape [n] or [n, 1]); outputs `label` (BYTES [n]), `score` (FP32 [n]),
  `top_k_labels` (BYTES [n, k]), `top_k_scores` (FP32 [n, k]) and `out_of_scope` (BOOL [n]: the version's
  reject.json rule turned the text away, and `label` is that rule's label, e.g. out_of_scope);
  `parameters.top_k` chooses k;
- `POST /v1/classify {"texts": [...], "top_k": 3}` for clients that do not speak v2;
- `Guard`, the outermost ASGI layer: request counts and latency by route and status, the body limit (413 from
  Content-Length, or after reading at most `max_body_bytes`), invalid UTF-8 (400), and versioned v2 paths
  (the served version, else 404);
- the lifecycle: listening first with readiness false, ready once the model (and shadow) are loaded and warmed;
  SIGTERM or SIGINT: readiness false, no new connections, what is queued and in flight answered within
  `drain_seconds`, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs

import orjson

from deploy import metrics
from deploy.errors import Rejected
from deploy.service import Service, bad, check_texts, check_top_k
from deploy.settings import ServeParams

log = logging.getLogger("distillery.serve")

ASGI = Callable[..., Awaitable[None]]
# KServe's v1 protocol (`/v1/models/<name>:predict`, a different body) and its model repository extension
# (`/v2/repository/models/<name>/load|unload`, which would let any client unload the served model).
NOT_SERVED = ("/v1/models", "/v2/repository")
VERSIONED = re.compile(r"^/v2/models/([^/]+)/versions/([^/]+)(/infer|/ready)?$")


def kserve_model_class() -> type:
    """`IntentModel`, defined on first use so that importing this module does not import kserve (whose import
    parses sys.argv)."""
    from kserve import Model
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    class IntentModel(Model):
        def __init__(self, service: Service):
            super().__init__(service.name)
            self.service = service
            self.ready = False

        def get_input_types(self) -> list[dict[str, Any]]:
            return [{"name": "text", "datatype": "BYTES", "shape": [-1]}]

        def get_output_types(self) -> list[dict[str, Any]]:
            return [
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "score", "datatype": "FP32", "shape": [-1]},
                {"name": "top_k_labels", "datatype": "BYTES", "shape": [-1, -1]},
                {"name": "top_k_scores", "datatype": "FP32", "shape": [-1, -1]},
                {"name": "out_of_scope", "datatype": "BOOL", "shape": [-1]},
            ]

        async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
            texts, top_k = v2_texts(payload, self.service)
            preds = await self.service.classify(texts, top_k, headers)
            n = len(preds)
            outputs = [
                InferOutput("label", [n], "BYTES", [p.label for p in preds]),
                InferOutput("score", [n], "FP32", [p.score for p in preds]),
                InferOutput("top_k_labels", [n, top_k], "BYTES", [lab for p in preds for lab, _ in p.top[:top_k]]),
                InferOutput("top_k_scores", [n, top_k], "FP32", [s for p in preds for _, s in p.top[:top_k]]),
                InferOutput("out_of_scope", [n], "BOOL", [p.out_of_scope for p in preds]),
            ]
            return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs,
                                 use_binary_outputs=False, model_version=self.service.version)  # fmt: skip

    return IntentModel


def v2_texts(payload: Any, service: Service) -> tuple[list[str], int]:
    """The texts and top-k of a v2 request: one BYTES input holding n texts, shape [n] or [n, 1]."""
    inputs = payload.inputs or []
    if len(inputs) != 1:
        raise bad(422, f"inputs must hold exactly one input (BYTES texts), got {len(inputs)}")
    inp = inputs[0]
    if inp.datatype != "BYTES":
        raise bad(422, f"inputs[0].datatype must be BYTES (texts), got {inp.datatype!r}")
    shape = list(inp.shape or [])
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or any(d < 0 for d in shape):
        raise bad(422, f"inputs[0].shape must be [n] or [n, 1], got {shape}")
    try:
        values = inp.as_numpy().reshape(-1).tolist()
    except Exception as exc:  # noqa: BLE001 - numpy/kserve raise ValueError, TypeError, InvalidInput...
        raise bad(422, f"inputs[0].data does not match shape {shape}: {str(exc)[:120]}") from None
    texts = check_texts(values, "inputs[0].data", service.params)
    params = payload.parameters or {}
    try:
        top_k = params["top_k"] if "top_k" in params else None
    except TypeError:
        raise bad(422, f"parameters must be an object, got {type(params).__name__}") from None
    if hasattr(top_k, "WhichOneof"):  # gRPC's InferParameter: int64_param, or another kind (refused below)
        kind = top_k.WhichOneof("parameter_choice")
        top_k = getattr(top_k, kind) if kind else None
    return texts, check_top_k(top_k, "parameters.top_k", service.labels, service.params.top_k)


# ---- /v1/classify --------------------------------------------------------------------------------------


async def v1_classify(service: Service, body: bytes, headers: dict[str, str]) -> bytes:
    """`{"texts": [...], "top_k": k}` -> `{"model", "version", "predictions": [{"label", "score", "out_of_scope",
    "scope_score", "top_k"}]}`.
    Served by `Guard` itself, in plain ASGI: the lean route, without FastAPI's routing and validation."""
    if service.classifier is None:  # before checking top_k against the model's labels
        raise Rejected(503, "the model is still loading; retry shortly", "loading")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad(400, f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise bad(422, f'the body must be a JSON object {{"texts": [...], "top_k": k}}, got {type(doc).__name__}')
    unknown = sorted(set(doc) - {"texts", "top_k"})
    if unknown:
        raise bad(422, f"unknown field(s) {', '.join(map(repr, unknown))}; the body holds texts and top_k")
    if "texts" not in doc:
        raise bad(422, "texts is missing")
    texts = check_texts(doc["texts"], "texts", service.params)
    top_k = check_top_k(doc.get("top_k"), "top_k", service.labels, service.params.top_k)
    preds = await service.classify(texts, top_k, headers)
    return orjson.dumps({
        "model": service.name,
        "version": service.version,
        "predictions": [
            {"label": p.label, "score": p.score, "out_of_scope": p.out_of_scope, "scope_score": p.scope_score,
             "top_k": [{"label": lab, "score": s} for lab, s in p.top[:top_k]]}
            for p in preds
        ],
    })  # fmt: skip


async def rejected_handler(_: Any, exc: Rejected) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": str(exc)}, status_code=exc.http_status, headers=exc.headers)


def add_client_error_handlers(app: Any) -> None:
    """KServe answers a client's mistake (bad input, unknown model) after logging it as an error with a traceback:
    a fuzzer or a broken client would fill the log. The same statuses here, logged at debug level."""
    from fastapi.responses import JSONResponse
    from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady, ServerNotLive, ServerNotReady

    def handler(status: int) -> Callable[[Any, Exception], Awaitable[Any]]:
        async def answer(_: Any, exc: Exception) -> Any:
            log.debug("%s: %s", status, exc)
            return JSONResponse({"error": str(exc)}, status_code=status)

        return answer

    for error, status in ((InvalidInput, 400), (ModelNotFound, 404), (ModelNotReady, 503), (ServerNotReady, 503),
                          (ServerNotLive, 503)):  # fmt: skip
        app.add_exception_handler(error, handler(status))
    app.add_exception_handler(Rejected, rejected_handler)


# ---- the outermost ASGI layer --------------------------------------------------------------------------


async def send_json(send: ASGI, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: ASGI, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    await send_json(send, status, orjson.dumps({"error": message}), headers)


MAX_NESTING = 32  # a v2 request nests 4 levels (body, inputs, input, data)


def nesting(body: bytes) -> int:
    """How deep JSON arrays and objects nest in `body` (strings skipped); cheap unless brackets abound."""
    if body.count(b"[") + body.count(b"{") <= MAX_NESTING:
        return 0
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def versioned_target(scope: dict[str, Any]) -> tuple[str, str, str] | None:
    """(model, version, suffix) of a request naming a version: `/v2/models/<m>/versions/<v>[/infer|/ready]`, or
    `/v2/models/<m>[/infer|/ready]?model_version=<v>` (KServe's handlers read that query too)."""
    match = VERSIONED.match(scope["path"])
    if match:
        return match.group(1), match.group(2), match.group(3) or ""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    plain = re.match(r"^/v2/models/([^/]+)(/infer|/ready)?$", scope["path"])
    if plain and "model_version" in query:
        return plain.group(1), query["model_version"][0], plain.group(2) or ""
    return None


class Guard:
    """Metrics, body limit, UTF-8 and versioned paths, before FastAPI sees a request."""

    def __init__(self, app: ASGI, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope: dict[str, Any], receive: ASGI, send: ASGI) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, route, status = time.perf_counter(), metrics.route_of(scope["path"]), [500]

        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.handle(scope, receive, counted)
        finally:
            metrics.REQUESTS.labels(route, str(status[0])).inc()
            metrics.LATENCY.labels(route, str(status[0])).observe(time.perf_counter() - start)

    async def handle(self, scope: dict[str, Any], receive: ASGI, send: ASGI) -> None:
        if scope["path"].startswith(NOT_SERVED):
            metrics.REJECTS.labels("not_found").inc()
            return await send_error(
                send,
                404,
                f"{scope['path']}: not served here: KServe's v1 protocol and model "
                "repository control are off (use /v2/models/<name>/infer or /v1/classify)",
            )
        versioned = versioned_target(scope)
        if versioned is not None:
            name, version, suffix = versioned
            if name != self.service.name or version != self.service.version:
                metrics.REJECTS.labels("not_found").inc()
                return await send_error(send, 404, f"no model {name} version {version} here (serving "
                                        f"{self.service.name} {self.service.version})")  # fmt: skip
            path = f"/v2/models/{name}{suffix}"
            scope = {**scope, "path": path, "raw_path": path.encode(), "query_string": b""}
        classify = scope["path"] == "/v1/classify"
        if classify and scope["method"] != "POST":
            return await send_error(send, 405, "/v1/classify takes POST", {"Allow": "POST"})
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body = await self.read_body(scope, receive, send)
        if body is None:
            return None
        if classify:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
            try:
                return await send_json(send, 200, await v1_classify(self.service, body, headers))
            except Rejected as exc:
                return await send_error(send, exc.http_status, str(exc), exc.headers)
        sent = [False]

        async def replay() -> dict[str, Any]:
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def read_body(self, scope: dict[str, Any], receive: ASGI, send: ASGI) -> bytes | None:
        """The whole body, or None after answering 413 (too big) or 400 (not UTF-8 where JSON is expected)."""
        limit = self.service.params.max_body_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1").strip()
        if declared.isdigit() and int(declared) > limit:
            metrics.REJECTS.labels("too_large").inc()
            await send_error(send, 413, f"the body has {declared} bytes; at most {limit} (serve.max_body_bytes)")
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                metrics.REJECTS.labels("too_large").inc()
                await send_error(send, 413, f"the body is over {limit} bytes (serve.max_body_bytes)")
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if b"inference-header-content-length" not in headers:  # v2's binary extension carries raw bytes
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as exc:
                metrics.REJECTS.labels("bad_input").inc()
                await send_error(send, 400, f"the body is not valid UTF-8 (byte {exc.start})")
                return None
            depth = nesting(body)
            if depth > MAX_NESTING:  # FastAPI would echo it back in a 422 and fail to encode it (RecursionError)
                metrics.REJECTS.labels("bad_input").inc()
                await send_error(send, 400, f"the body nests JSON {depth} levels deep; at most {MAX_NESTING}")
                return None
        return body


# ---- running -------------------------------------------------------------------------------------------


CLASSIFY_SCHEMA = {
    "post": {
        "summary": "Classify texts (a convenience for clients that do not speak v2)",
        "operationId": "v1_classify",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {
                "type": "object",
                "required": ["texts"],
                "additionalProperties": False,
                "properties": {
                    "texts": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                    "top_k": {"type": "integer", "minimum": 1},
                },
            }}},
        },
        "responses": {"200": {"description": "label, score, out_of_scope, scope_score and top-k labels per text"}},
    }
}  # fmt: skip


def add_classify_to_openapi(app: Any) -> None:
    """/v1/classify is served by `Guard`, outside FastAPI's routes: describe it in /openapi.json too, so clients
    and fuzzers see it."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        doc = generate()
        for path in [p for p in doc["paths"] if p.startswith(NOT_SERVED)]:
            del doc["paths"][path]
        doc["paths"].setdefault("/v1/classify", CLASSIFY_SCHEMA)
        return doc

    app.openapi = openapi


def install(service: Service, model: Any) -> Any:
    """Add this server's route, handlers and guard to KServe's FastAPI app, before KServe adds its own."""
    from kserve.model_server import app

    add_classify_to_openapi(app)
    app.add_exception_handler(Rejected, rejected_handler)
    app.add_middleware(Guard, service=service)
    return app


@contextmanager
def quiet_kserve_logs(access_log: bool) -> Any:
    """KServe logs a line per request (timings, gRPC methods) and a traceback per refused one: a loaded
    server would spend its time logging. Kept at WARNING unless access logging is on."""
    if not access_log:
        for name in ("kserve.trace", "kserve"):
            logging.getLogger(name).setLevel(logging.WARNING)
    yield


class Lifecycle:
    """Starts KServe's REST (and gRPC) servers, marks the model ready once `prepare` returns, and drains on
    SIGTERM/SIGINT."""

    def __init__(self, service: Service, model: Any, p: ServeParams):
        self.service, self.model, self.p = service, model, p
        self.rest: Any = None
        self.grpc: Any = None
        self.draining = False

    def servers(self) -> list[Awaitable[Any]]:
        import uvicorn
        from kserve import ModelServer
        from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
        from kserve.protocol.grpc.server import GRPCServer
        from kserve.protocol.rest.server import RESTServer

        grace = max(1, int(round(self.p.drain_seconds)))
        ms = ModelServer(http_port=self.p.http_port, grpc_port=self.p.grpc_port, enable_grpc=self.p.grpc,
                         enable_latency_logging=False, grace_period=grace)  # fmt: skip
        ms.register_model(self.model)
        model = self.model

        async def ready() -> bool:  # KServe's server readiness is always true; here it is the model's
            return bool(model.ready)

        ms.dataplane.ready = ready
        install(self.service, self.model)
        access_log = self.p.access_log

        class Rest(RESTServer):  # type: ignore[misc]
            def _add_middlewares(self, app: Any) -> None:
                if access_log:  # KServe's timing middleware only logs a line per request; Guard keeps the metrics
                    super()._add_middlewares(app)

            def _add_exception_handlers(self, app: Any) -> None:
                super()._add_exception_handlers(app)
                add_client_error_handlers(app)

        self.rest = Rest(FASTAPI_APP_IMPORT_STRING, ms.dataplane, ms.model_repository_extension, self.p.http_port,
                         grace_period=grace)  # fmt: skip
        self.rest.config.host = self.p.host
        self.rest.config.access_log = self.p.access_log

        class Server(type(self.rest._server)):  # type: ignore[misc]
            @contextmanager
            def capture_signals(self) -> Any:  # the lifecycle handles signals (drain, then exit 0)
                yield

        self.rest._server = Server(self.rest.config)
        assert isinstance(self.rest._server, uvicorn.Server)
        running = [self.rest.start()]
        if self.p.grpc:
            options = {
                "grpc_max_send_message_length": 16 * 2**20,
                "grpc_max_receive_message_length": self.p.max_body_bytes,
            }
            self.grpc = GRPCServer(self.p.grpc_port, ms.dataplane, ms.model_repository_extension, kwargs=options,
                                   grace_period=grace)  # fmt: skip
            running.append(self.grpc.start(4))
        return running

    def drain(self, sig: int) -> None:
        if self.draining:
            return
        self.draining = True
        log.warning("serve: %s: draining (readiness off; queued and in-flight requests answered within %.0f s)",
                    signal.Signals(sig).name, self.p.drain_seconds)  # fmt: skip
        self.model.ready = False
        self.rest._server.should_exit = True
        if self.grpc is not None:
            asyncio.get_running_loop().create_task(self.grpc.stop(sig))

    async def run(self, prepare: Callable[[], Any]) -> int:
        loop = asyncio.get_running_loop()
        with quiet_kserve_logs(self.p.access_log):
            running = self.servers()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.drain, sig)
            self.service.batcher.start()
            served = asyncio.gather(*running)
            try:
                await loop.run_in_executor(None, prepare)
            except BaseException:
                self.drain(signal.SIGTERM)
                await served
                raise
            if not self.draining:
                self.model.ready = True
                log.warning(
                    "serve: %s %s ready on http://%s:%d%s",
                    self.service.name,
                    self.service.version,
                    self.p.host,
                    self.p.http_port,
                    f" and gRPC :{self.p.grpc_port}" if self.p.grpc else "",
                )
            await served
            self.service.batcher.close()
            drained = await self.service.batcher.drained(self.p.drain_seconds)
            if self.service.shadow is not None:
                self.service.shadow.close()
            log.warning("serve: stopped%s", "" if drained else " (drain time over; queued requests dropped)")
            return 0
