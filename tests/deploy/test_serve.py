"""The server as users reach it: `python -m deploy.serve` on loopback, over REST (v2 and /v1/classify) and gRPC."""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from tests.deploy.conftest import MAX_LENGTH, MODEL, ROOT, Server, publish_tiny, sample

pytestmark = pytest.mark.serve


def v2_body(texts: list, **parameters) -> dict:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    return {**body, "parameters": parameters} if parameters else body


def benchmark_predictions(registry, version: str, texts: list[str]) -> list[tuple[int, np.ndarray]]:
    """What `benchmark` measures for each text at batch 1: its OrtVariant on the version's model and tokenizer."""
    from stages.benchmark import OrtVariant
    from stages.model.encoder import load_tokenizer
    from stages.runtime.settings import RuntimeParams

    folder = registry / MODEL / version
    variant = OrtVariant("v", folder / "model.onnx", load_tokenizer(folder / "tokenizer"),
                         RuntimeParams(threads=2, max_length=MAX_LENGTH))  # fmt: skip
    return [(variant.label(t), variant.run_batch(variant.batch([t]))[0]) for t in texts]


def test_answers_equal_benchmarks_prediction_for_the_same_texts(server, registry, texts):
    expected = benchmark_predictions(registry, "2.0.0", texts)
    names = json.loads((registry / MODEL / "2.0.0" / "labels.json").read_text())
    by_id = {i: n for n, i in names.items()}
    for text, (label_id, logits) in zip(texts, expected, strict=True):
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        v1 = httpx.post(f"{server.url}/v1/classify", json={"texts": [text], "top_k": 2}).json()
        pred = v1["predictions"][0]
        assert (v1["model"], v1["version"]) == (MODEL, "2.0.0")  # the latest version by default
        assert pred["label"] == by_id[label_id], text
        assert pred["score"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert [t["label"] for t in pred["top_k"]] == [by_id[i] for i in np.argsort(-probs, kind="stable")[:2]]
        v2 = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=v2_body([text])).json()
        outputs = {o["name"]: o for o in v2["outputs"]}
        assert outputs["label"]["data"] == [by_id[label_id]] and v2["model_version"] == "2.0.0"


def test_kserve_rest_and_grpc_clients_talk_to_it_unchanged(server, texts):
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

    async def both() -> tuple[list, list, bool]:
        request = InferRequest(model_name=MODEL, infer_inputs=[InferInput("text", [3], "BYTES", texts[:3])],
                               parameters={"top_k": 2})  # fmt: skip
        rest = InferenceRESTClient(RESTConfig(protocol="v2"))
        try:
            r = await rest.infer(server.url, request, model_name=MODEL)
            ready = await rest.is_model_ready(server.url, MODEL)
        finally:
            await rest.close()
        grpc = InferenceGRPCClient(server.grpc)
        try:
            g = await grpc.infer(request)
        finally:
            await grpc.close()
        rest_out = {o.name: o.data for o in r.outputs}
        grpc_out = {o.name: o.as_numpy().tolist() for o in g.outputs}
        return (
            rest_out["label"],
            [x.decode() for x in grpc_out["label"]],
            ready and len(grpc_out["top_k_labels"][0]) == 2,
        )

    rest_labels, grpc_labels, ok = asyncio.run(both())
    direct = httpx.post(f"{server.url}/v1/classify", json={"texts": texts[:3]}).json()["predictions"]
    assert rest_labels == grpc_labels == [p["label"] for p in direct] and ok


BAD = [
    # (what, method, path, body bytes or json, headers, status, words the error must name)
    ("not JSON", "/v1/classify", b"{texts: [", {}, 400, "not JSON"),
    ("texts not a list", "/v1/classify", {"texts": "hello"}, {}, 422, "texts must be a list"),
    ("a number as text", "/v1/classify", {"texts": ["ok", 3]}, {}, 422, "texts[1] must be a string"),
    ("an empty text", "/v1/classify", {"texts": ["ok", "  "]}, {}, 422, "texts[1] is empty"),
    ("no texts", "/v1/classify", {"texts": []}, {}, 422, "holds no texts"),
    ("too many texts", "/v1/classify", {"texts": ["a b"] * 9}, {}, 413, "at most 8"),
    ("a text too long", "/v1/classify", {"texts": ["x" * 201]}, {}, 422, "at most 200"),
    ("top_k zero", "/v1/classify", {"texts": ["a"], "top_k": 0}, {}, 422, "top_k must be an integer"),
    ("unknown field", "/v1/classify", {"texts": ["a"], "k": 1}, {}, 422, "unknown field"),
    ("invalid UTF-8", "/v1/classify", b'{"texts": ["caf\xe9"]}', {}, 400, "not valid UTF-8"),
    ("body too big", "/v1/classify", b'{"texts": ["' + b"a" * 5000 + b'"]}', {}, 413, "at most 4096"),
    ("bad deadline header", "/v1/classify", {"texts": ["a"]}, {"X-Request-Timeout-Ms": "soon"}, 400, "Timeout"),
    ("v2 malformed JSON", f"/v2/models/{MODEL}/infer", b'{"inputs": [', {}, 422, ""),
    (
        "v2 wrong datatype",
        f"/v2/models/{MODEL}/infer",
        {"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
        {},
        422,
        "datatype must be BYTES",
    ),
    (
        "v2 shape mismatch",
        f"/v2/models/{MODEL}/infer",
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a"]}]},
        {},
        422,
        "shape",
    ),
    (
        "v2 two inputs",
        f"/v2/models/{MODEL}/infer",
        {"inputs": [v2_body(["a"])["inputs"][0]] * 2},
        {},
        422,
        "exactly one input",
    ),
    ("v2 an empty text", f"/v2/models/{MODEL}/infer", v2_body(["a", ""]), {}, 422, "inputs[0].data[1] is empty"),
    ("v2 top_k text", f"/v2/models/{MODEL}/infer", v2_body(["a"], top_k="3"), {}, 422, "parameters.top_k"),
    ("v2 too many texts", f"/v2/models/{MODEL}/infer", v2_body(["a"] * 9), {}, 413, "at most 8"),
    ("v2 2,000-deep JSON", f"/v2/models/{MODEL}/infer", b"[" * 2000 + b"]" * 2000, {}, 400, "levels deep"),
    ("v1 nested texts", "/v1/classify", {"texts": [[["a"]]]}, {}, 422, "texts[0] must be a string"),
    ("unknown model", "/v2/models/nope/infer", v2_body(["a"]), {}, 404, "nope"),
    ("unknown version", f"/v2/models/{MODEL}/versions/9.9.9/infer", v2_body(["a"]), {}, 404, "9.9.9"),
]


@pytest.mark.parametrize("what,path,body,headers,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_naming_the_field_never_a_5xx(server, what, path, body, headers, status, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json", **headers})
    assert r.status_code == status, (what, r.status_code, r.text)
    assert words in r.text, (what, r.text)


def test_a_body_over_the_limit_is_refused_before_it_has_all_arrived(server):
    """Chunked, with no Content-Length: 5 kB sent of a body that never ends; the 413 comes anyway."""
    import socket

    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        chunks = (b"3e8\r\n" + b"a" * 1000 + b"\r\n") * 5  # 1000-byte chunks, and no last chunk
        # One write: bytes arriving after the server has answered and closed would reset the connection and
        # discard the answer before it is read.
        sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks)
        answer = b""
        while b"4096" not in answer:  # the head and the body may come in separate reads
            try:
                more = sock.recv(4096)
            except ConnectionResetError:
                break
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 413") and b"4096" in answer, answer
    assert httpx.post(f"{server.url}/v1/classify", json={"texts": ["still serving"]}).status_code == 200


def test_the_versioned_route_serves_its_own_version_and_metadata_describes_the_tensors(server):
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/versions/2.0.0/infer", json=v2_body(["refund my money"]))
    assert r.status_code == 200 and r.json()["model_version"] == "2.0.0"
    meta = httpx.get(f"{server.url}/v2/models/{MODEL}").json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "score", "top_k_labels", "top_k_scores", "out_of_scope"]
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/versions/2.0.0/ready").json()["ready"] is True
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200


def test_metrics_count_requests_by_route_and_status_and_name_the_version(server):
    before = server.metric("distillery_serve_requests_total", route="v1_classify", status="200")
    httpx.post(f"{server.url}/v1/classify", json={"texts": ["where is my parcel"]})
    httpx.post(f"{server.url}/v1/classify", json={"texts": []})
    after = server.metric("distillery_serve_requests_total", route="v1_classify", status="200")
    assert after == before + 1
    assert server.metric("distillery_serve_requests_total", route="v1_classify", status="422") >= 1
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("distillery_serve_queue_wait_seconds_bucket", "distillery_serve_batch_texts_bucket",
                 "distillery_serve_queue_texts", "distillery_serve_request_seconds_bucket"):  # fmt: skip
        assert name in text, name
    assert f'distillery_serve_model_info{{backend="onnxruntime",model="{MODEL}",role="primary"' in text
    assert 'version="2.0.0"' in text


async def burst(url: str, n: int, texts_per_request: int, headers: dict | None = None) -> list[tuple[int, float, dict]]:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=n), timeout=60) as client:

        async def one(i: int) -> tuple[int, float, dict]:
            start = time.perf_counter()
            body = {"texts": [f"where is my parcel number {i} {j}" for j in range(texts_per_request)]}
            r = await client.post(f"{url}/v1/classify", json=body, headers=headers or {})
            return r.status_code, time.perf_counter() - start, dict(r.headers)

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_overload_is_refused_at_once_with_429_and_retry_after(registry):
    """The queue (448 texts) filled by eight 64-text requests of long texts, run one text at a time by a bigger
    model; a request arriving then is refused in under 10 ms (the server's own measure, from its request
    histogram), never queued."""
    s = Server(registry, "--max-queue", "448", "--max-texts", "64", "--max-batch-size", "1",
               spec="slow-intent").wait_ready()  # fmt: skip
    long = "where is my parcel please track the delivery today " * 8

    async def scenario() -> tuple[list, httpx.Response | None]:
        async with httpx.AsyncClient(timeout=60) as client:
            await client.get(f"{s.url}/v2/health/live")  # the probe's connection is open before the queue fills
            fill = [asyncio.ensure_future(client.post(f"{s.url}/v1/classify", json={"texts": [long] * 64}))
                    for _ in range(8)]  # fmt: skip
            probe, end = None, time.monotonic() + 10
            while probe is None and time.monotonic() < end:
                exposition = (await client.get(f"{s.url}/metrics")).text
                if sample(exposition, "distillery_serve_queue_texts", role="primary") >= 448:
                    probe = await client.post(f"{s.url}/v1/classify", json={"texts": ["one more"]})
                else:
                    await asyncio.sleep(0.001)
            return [r.status_code for r in await asyncio.gather(*fill)], probe

    try:
        filled, probe = asyncio.run(scenario())
        fast = s.metric("distillery_serve_request_seconds_bucket", route="v1_classify", status="429", le="0.01")
        refused = s.metric("distillery_serve_requests_total", route="v1_classify", status="429")
    finally:
        code, _ = s.stop()
    assert probe is not None, "the queue never filled: the model ran faster than the test can observe"
    assert probe.status_code == 429 and probe.headers["retry-after"].isdigit(), probe.text
    assert "serve.max_queue" in probe.json()["error"]
    assert fast == refused == 1
    assert filled == [200] * 8 and code == 0


def test_requests_arriving_together_share_model_calls(server):
    before = server.metric("distillery_serve_batch_texts_count"), server.metric("distillery_serve_batch_texts_sum")
    results = asyncio.run(burst(server.url, 64, 1))
    calls = server.metric("distillery_serve_batch_texts_count") - before[0]
    texts = server.metric("distillery_serve_batch_texts_sum") - before[1]
    assert [status for status, _, _ in results] == [200] * 64
    assert texts == 64 and calls < 64


def test_a_request_still_queued_past_its_deadline_gets_504(server):
    r = httpx.post(f"{server.url}/v1/classify", json={"texts": ["a"]}, headers={"X-Request-Timeout-Ms": "0.000001"})
    assert r.status_code == 504 and "deadline" in r.json()["error"]
    assert server.metric("distillery_serve_rejects_total", reason="deadline") >= 1


def test_sigterm_answers_every_queued_and_in_flight_request_then_exits_0(registry):
    s = Server(registry, "--max-batch-size", "1", "--max-texts", "64", "--max-queue", "4096").wait_ready()

    async def scenario() -> list:
        task = asyncio.ensure_future(burst(s.url, 24, 64))
        while s.metric("distillery_serve_queue_texts", role="primary") < 64:  # requests are queued now
            await asyncio.sleep(0.005)
        s.proc.send_signal(15)
        return await task

    results = asyncio.run(scenario())
    code, out = s.stop()
    assert [status for status, _, _ in results] == [200] * 24, out
    assert code == 0 and "draining" in out


def test_a_tampered_or_unindexed_version_is_refused_at_start_naming_the_file(registry, tmp_path):
    copy = tmp_path / "registry"
    shutil.copytree(registry, copy)
    model = copy / MODEL / "1.0.0" / "model.onnx"
    model.chmod(stat.S_IWUSR | stat.S_IRUSR)
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF
    model.write_bytes(bytes(data))
    cmd = [sys.executable, "-m", "deploy.serve", "--registry", str(copy), "--model", f"{MODEL}@1.0.0"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "model.onnx" in out.stderr and "SHA256SUMS" in out.stderr, out.stderr
    shutil.copytree(copy / MODEL / "2.0.0", copy / MODEL / "3.0.0")  # a folder the index does not list
    out = subprocess.run([*cmd[:-1], f"{MODEL}@3.0.0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "index.jsonl" in out.stderr, out.stderr


def test_shadow_disagreements_are_counted_logged_and_reported(registry, texts, tmp_path):
    log = tmp_path / "shadow.jsonl"
    s = Server(registry, "--shadow", f"{MODEL}@1.0.0", "--shadow-log", str(log), spec=f"{MODEL}@2.0.0").wait_ready()
    try:
        for text in texts:
            assert httpx.post(f"{s.url}/v1/classify", json={"texts": [text]}).json()["version"] == "2.0.0"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            compared = sum(s.metric("distillery_serve_shadow_texts_total", outcome=o) for o in ("agree", "disagree"))
            if compared == len(texts):
                break
            time.sleep(0.1)
        disagree = s.metric("distillery_serve_shadow_texts_total", outcome="disagree")
    finally:
        code, _ = s.stop()
    primary = [p[0] for p in benchmark_predictions(registry, "2.0.0", texts)]
    shadow = [p[0] for p in benchmark_predictions(registry, "1.0.0", texts)]
    expected = sum(a != b for a, b in zip(primary, shadow, strict=True))
    assert expected > 0, "the two tiny versions should disagree somewhere"
    assert disagree == expected and code == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == len(texts) and sum(not r["agree"] for r in rows) == expected
    report = subprocess.run([sys.executable, "-m", "deploy.shadow", "report", str(log)], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    agreement = (len(texts) - expected) / len(texts)
    assert f"agreement: {agreement:.2%}" in report and "| primary |" in report and "| shadow |" in report


def test_generated_requests_from_the_openapi_document_never_get_a_5xx(server):
    """bench/serve_fuzz.py's fuzzer, bounded: schemathesis' valid and invalid requests for every operation in
    /openapi.json (/v1/classify included), then raw bodies; the full run sends 10,000."""
    sys.path.insert(0, str(ROOT / "bench"))
    from serve_fuzz import fuzz

    result = fuzz(server.url, 400, seed=1, pid=server.proc.pid, max_seconds=240)
    assert sum(result["statuses"].values()) >= 200
    assert not [s for s in result["statuses"] if s >= 500], result["errors"]
    assert result["alive"]
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert "/v1/classify" in paths and not [p for p in paths if p.startswith(("/v2/repository", "/v1/models"))]


def test_model_repository_control_and_the_v1_protocol_are_not_served(server):
    r = httpx.post(f"{server.url}/v2/repository/models/{MODEL}/unload")
    assert r.status_code == 404 and "not served" in r.json()["error"]
    assert httpx.post(f"{server.url}/v1/models/{MODEL}:predict", json={"instances": ["a"]}).status_code == 404
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/ready").json()["ready"] is True


def test_readiness_is_false_while_the_model_loads_and_warms(registry):
    """The server listens first (live), and is ready only after loading and a warm-up of at least 0.5 s."""
    s = Server(registry)
    seen: list[int] = []
    try:
        end = time.monotonic() + 90
        while time.monotonic() < end and 200 not in seen:
            try:
                if httpx.get(f"{s.url}/v2/health/live", timeout=1).status_code == 200:
                    seen.append(httpx.get(f"{s.url}/v2/health/ready", timeout=1).status_code)
                    r = httpx.post(f"{s.url}/v1/classify", json={"texts": ["a"]}, timeout=5)
                    assert r.status_code in (200, 503), r.text
            except httpx.TransportError:
                s.check()
                time.sleep(0.02)
    finally:
        code, _ = s.stop()
    assert seen and seen[0] == 503 and seen[-1] == 200 and code == 0, seen


def test_a_version_for_the_compiled_operators_serves_the_same_answers(registry, texts):
    """A version whose runtime.json says backend `kernels` (publish's kernels_int8) is served by the kernels
    engine on its INT8 model: the same labels as ONNX Runtime on the same file, over the v1 route."""
    from deploy.runtime import load

    publish_tiny(registry, "1.0.0", seed=0, model_name="kernels-intent", backend="kernels")
    on_ort = load(registry, f"{MODEL}@1.0.0").classify(texts, 1)
    on_kernels = load(registry, "kernels-intent@1.0.0").classify(texts, 1)
    assert [p.label for p in on_kernels] == [p.label for p in on_ort]
    # kernels_int8_sparse's version: runtime.json's block packs the layers block-sparse, with the same bytes out
    publish_tiny(registry, "1.0.0", seed=0, model_name="kernels-sparse", backend="kernels", block=[4, 16])
    sparse = load(registry, "kernels-sparse@1.0.0")
    assert sparse.record.block == [4, 16]
    assert sparse.logits(texts).tobytes() == load(registry, "kernels-intent@1.0.0").logits(texts).tobytes()
    s = Server(registry, spec="kernels-intent").wait_ready()
    try:
        r = httpx.post(f"{s.url}/v1/classify", json={"texts": texts}, timeout=30)
        assert r.status_code == 200, r.text
        assert [p["label"] for p in r.json()["predictions"]] == [p.label for p in on_kernels]
    finally:
        assert s.stop()[0] == 0


def test_a_version_with_a_rejection_rule_answers_out_of_scope_under_its_threshold(registry, texts):
    """reject.json travels in the version (under SHA256SUMS): texts scoring under its threshold get its label,
    flagged, over /v1/classify and v2; the others get the intent the model without a rule gives."""
    from deploy.runtime import load
    from stages.model import rejection
    from stages.registry import RejectRecord

    plain = load(registry, f"{MODEL}@1.0.0", max_batch=32)  # chunks as the server makes them (serve.max_batch_size)
    scope = rejection.scores("max_softmax", plain.logits(texts))
    threshold = float(np.median(scope))
    rule = RejectRecord(method="max_softmax", label="out_of_scope", threshold=threshold, in_scope_recall=0.5)
    publish_tiny(registry, "1.0.0", seed=0, model_name="reject-intent", reject=rule)  # the same model as 1.0.0
    expected = [p.label for p in plain.classify(texts, 1)]
    s = Server(registry, spec="reject-intent").wait_ready()
    try:
        got = httpx.post(f"{s.url}/v1/classify", json={"texts": texts, "top_k": 1}, timeout=30).json()["predictions"]
        body = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
        v2 = httpx.post(f"{s.url}/v2/models/reject-intent/infer", json=body, timeout=30).json()
        counted = s.metric("distillery_serve_texts_total", out_of_scope="true")
    finally:
        s.stop()
    flags = next(o["data"] for o in v2["outputs"] if o["name"] == "out_of_scope")
    for i, (p, score) in enumerate(zip(got, scope, strict=True)):
        rejected = score < threshold
        assert p["out_of_scope"] is bool(rejected) and flags[i] is bool(rejected)
        assert p["label"] == ("out_of_scope" if rejected else expected[i])
        assert p["scope_score"] == pytest.approx(score, rel=1e-5)
        assert p["top_k"][0]["label"] == expected[i]  # the ranking is still the model's
    assert 0 < sum(p["out_of_scope"] for p in got) < len(got)
    assert counted == 2 * sum(p["out_of_scope"] for p in got)  # both requests, counted on /metrics


def test_a_mahalanobis_rule_scores_the_models_pooled_output_with_the_versions_statistics(registry, texts):
    """The exported model outputs `pooled`; a mahalanobis rule's class means and precision travel as
    reject.safetensors (no pickle) and the server scores each text's pooled embedding with them."""
    import torch

    from deploy.runtime import load
    from stages.model import rejection
    from stages.registry import RejectRecord
    from tests.stages.tiny import LABELS, dataset, tiny_teacher

    model, tok = tiny_teacher(0, heads=2)  # the model of tiny-intent 1.0.0
    rows = dataset(12, seed=0)
    batch = tok(rows["text"].to_list(), padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = model(batch["input_ids"], batch["attention_mask"])[1].numpy()
    stats = rejection.MahalanobisStats.fit(pooled, rows["label"].replace_strict(LABELS).to_numpy(), len(LABELS))
    rule = lambda t: RejectRecord(method="mahalanobis", label="out_of_scope", threshold=t,  # noqa: E731
                                  stats="reject.safetensors")  # fmt: skip
    publish_tiny(registry, "1.0.0", seed=0, model_name="probe-intent", reject=rule(-1e30), stats=stats)
    probe = load(registry, "probe-intent", max_batch=32)
    scope = rejection.scores("mahalanobis", None, probe.forward(texts)[1], stats)
    assert all(not p.out_of_scope for p in probe.classify(texts, 1))
    threshold = float(np.median(scope))
    publish_tiny(registry, "1.0.0", seed=0, model_name="maha-intent", reject=rule(threshold), stats=stats)
    s = Server(registry, spec="maha-intent").wait_ready()
    try:
        got = httpx.post(f"{s.url}/v1/classify", json={"texts": texts, "top_k": 1}, timeout=30).json()["predictions"]
    finally:
        s.stop()
    assert [p["out_of_scope"] for p in got] == [bool(x < threshold) for x in scope]
    assert [p["scope_score"] for p in got] == pytest.approx(scope.tolist(), rel=1e-4)
