"""OpenLineage events of a stage run: posted to an HTTP backend, versioned by DVC hashes, and never the
reason a stage fails."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from stages.runner.cli import stage_entrypoint
from stages.runner.errors import StageError
from stages.storage.hashing import dvc_md5


def tiny_repo(root: Path, lineage: dict) -> None:
    (root / "data/01_x").mkdir(parents=True)
    (root / "in.csv").write_text("a,b\n1,2\n")
    dvc = {"stages": {"x": {"cmd": "python -m stages.x", "deps": ["in.csv", "stages/x.py"], "outs": ["data/01_x/out"]}}}
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc))
    (root / "params.yaml").write_text(yaml.safe_dump({"lineage": lineage}))


def stage(root: Path, fail: bool = False):
    @stage_entrypoint("x")
    def main(argv=None) -> int:
        if fail:
            raise StageError("bad row 3")
        (root / "data/01_x/out").mkdir(exist_ok=True)
        (root / "data/01_x/out/part.txt").write_text("hello\n")
        return 0

    return main


@pytest.fixture
def backend():
    """A local HTTP endpoint that records every JSON body posted to it."""
    received: list[tuple[str, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the http.server API)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, json.loads(body)))
            self.send_response(201)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", received
    server.shutdown()


def test_events_go_to_an_http_backend_with_dvc_hashes(tmp_path, monkeypatch, backend):
    url, received = backend
    tiny_repo(tmp_path, {"transport": "http", "url": url})
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STAGE", "x")
    monkeypatch.delenv("OPENLINEAGE_URL", raising=False)
    assert stage(tmp_path)() == 0
    assert [p for p, _ in received] == ["/api/v1/lineage"] * 2
    start, done = (e for _, e in received)
    assert (start["eventType"], done["eventType"]) == ("START", "COMPLETE")
    assert start["run"]["runId"] == done["run"]["runId"] and done["job"] == {**done["job"], "name": "x"}
    assert [d["name"] for d in start["inputs"]] == ["in.csv"]  # code files are not datasets
    assert start["inputs"][0]["facets"]["version"]["datasetVersion"] == dvc_md5(tmp_path / "in.csv")
    out = done["outputs"][0]
    assert out["name"] == "data/01_x/out"
    assert out["facets"]["version"]["datasetVersion"] == dvc_md5(tmp_path / "data/01_x/out")
    assert out["facets"]["version"]["datasetVersion"].endswith(".dir")


def test_a_failed_stage_sends_fail_and_a_dead_backend_fails_nothing(tmp_path, monkeypatch, capsys):
    tiny_repo(tmp_path, {"transport": "file", "file": "lineage/events.jsonl"})
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STAGE", "x")
    monkeypatch.delenv("OPENLINEAGE_URL", raising=False)
    assert stage(tmp_path, fail=True)() == 1
    events = [json.loads(x) for x in (tmp_path / "lineage/events.jsonl").read_text().splitlines()]
    assert [e["eventType"] for e in events] == ["START", "FAIL"]
    assert "bad row 3" in events[1]["run"]["facets"]["errorMessage"]["message"]
    # A backend that is down: the stage still succeeds, with a warning.
    monkeypatch.setenv("OPENLINEAGE_URL", "http://127.0.0.1:9")
    assert stage(tmp_path)() == 0
    assert "OpenLineage START event not delivered" in capsys.readouterr().err


def test_no_events_outside_dvc_or_when_turned_off(tmp_path, monkeypatch):
    tiny_repo(tmp_path, {"openlineage": False})
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert stage(tmp_path)() == 0
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STAGE", "x")
    assert stage(tmp_path)() == 0
    assert not (tmp_path / "lineage").exists()
