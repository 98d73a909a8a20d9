"""Fuzz the server through its own OpenAPI document with schemathesis: `python bench/serve_fuzz.py`.

Starts `python -m deploy.serve` on loopback (a published version from `--registry`/`--model`), draws requests
for every operation in /openapi.json (the v2 routes and /v1/classify), half of them valid by the schema and
half deliberately not (schemathesis' positive and negative modes), plus raw bodies (random bytes, invalid
UTF-8, truncated JSON), and sends them one by one. It prints a table: requests by status, responses >= 500
(the first few shown), whether the server is alive at the end, and its resident memory at the start, middle
and end of the run. Exit 1 on any 5xx or a dead server. Loopback only, bounded by --requests and --max-seconds.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return int(next(ln for ln in fh if ln.startswith("VmRSS:")).split()[1]) / 1e3


def raw_bodies(rng: random.Random) -> bytes:
    """Bodies no schema generator writes: random bytes, invalid UTF-8, truncated or deeply nested JSON."""
    kind = rng.randrange(5)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind == 1:
        return b'{"texts": ["' + bytes([0xC3, 0x28, 0xFF]) + b'"]}'
    if kind == 2:
        return b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}'[: rng.randrange(80)]
    if kind == 3:
        depth = rng.randrange(1, 5000)
        return b"[" * depth + b"]" * depth
    return b'{"texts": [' + b",".join(b'"x"' for _ in range(rng.randrange(1, 300))) + b"]}"


def fuzz(url: str, requests: int, seed: int, pid: int | None, max_seconds: float) -> dict[str, Any]:
    """Send `requests` generated requests to `url`; the statuses, 5xx examples, memory and liveness."""
    import httpx
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    strategy = schema.as_strategy(schemathesis.GenerationMode.POSITIVE) | schema.as_strategy(
        schemathesis.GenerationMode.NEGATIVE
    )
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    memory: list[float] = []
    rng, end = random.Random(seed), time.monotonic() + max_seconds
    paths = ["/v1/classify", f"/v2/models/{schema_model(url)}/infer", "/v2/models/x/versions/1.0.0/infer"]
    client = httpx.Client(base_url=url, timeout=30)

    def record(status: int, what: str) -> None:
        statuses[status] += 1
        if status >= 500 and len(errors) < 10:
            errors.append(f"{status}: {what[:200]}")
        total = sum(statuses.values())
        if total % 500 == 0:
            print(
                f"fuzz: {total} requests, {sum(n for k, n in statuses.items() if k >= 500)} >= 500",
                file=sys.stderr,
                flush=True,
            )
        if pid and total in (1, requests // 2, requests):
            memory.append(rss_mb(pid))

    @settings(max_examples=requests // 2, database=None, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=strategy)
    def schema_cases(case: Any) -> None:
        if time.monotonic() > end:
            return
        try:
            response = case.call(base_url=url, timeout=30)
            record(response.status_code, f"{case.method} {case.formatted_path} {str(case.body)[:120]}")
        except Exception as exc:  # noqa: BLE001 - a refused connection is a crash, counted as 599
            record(599, f"{case.method} {case.formatted_path}: {type(exc).__name__}: {exc}")

    schema_cases()
    while sum(statuses.values()) < requests and time.monotonic() < end:
        body = raw_bodies(rng)
        try:
            r = client.post(rng.choice(paths), content=body, headers={"content-type": "application/json"})
            record(r.status_code, f"raw body {body[:80]!r}")
        except httpx.HTTPError as exc:
            record(599, f"raw body {body[:80]!r}: {type(exc).__name__}")
    try:
        alive = client.get("/v2/health/live").status_code == 200
    except httpx.HTTPError:
        alive = False
    client.close()
    return {"statuses": statuses, "errors": errors, "memory": memory, "alive": alive}


def schema_model(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/v2/models", timeout=10).json()["models"][0]


def table(result: dict[str, Any]) -> str:
    s = result["statuses"]
    total = sum(s.values())
    rows = ["| requests | 2xx | 4xx | >= 500 | alive at the end | RSS start / middle / end (MB) |",
            "|---:|---:|---:|---:|---|---|"]  # fmt: skip
    band = lambda lo, hi: sum(n for k, n in s.items() if lo <= k < hi)  # noqa: E731
    mem = " / ".join(f"{m:.0f}" for m in result["memory"]) or "n/a"
    rows.append(f"| {total} | {band(200, 300)} | {band(400, 500)} | {band(500, 1000)} | {result['alive']} | {mem} |")
    rows += ["", "status counts: " + ", ".join(f"{k}: {n}" for k, n in sorted(s.items()))]
    rows += [f"5xx: {e}" for e in result["errors"]]
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--registry", default="registry")
    ap.add_argument("--model", default="distillery-intent")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--max-seconds", type=float, default=1800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=18090)
    ap.add_argument("--log", default="/tmp/distillery-serve-fuzz.log", help="the server's output")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "deploy.serve", "--registry", args.registry, "--model", args.model,
           "--http-port", str(args.port), "--grpc", "false", "--max-texts", "64"]  # fmt: skip
    log = open(Path(args.log), "w")  # noqa: SIM115 - the server's log, read after it stops (a pipe could fill and block it)
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_ready(url, server)
        result = fuzz(url, args.requests, args.seed, server.pid, args.max_seconds)
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    print(table(result))
    print(f"server exit code after SIGTERM: {server.returncode}")
    bad = sum(n for k, n in result["statuses"].items() if k >= 500)
    return 1 if bad or not result["alive"] or server.returncode != 0 else 0


def wait_ready(url: str, server: subprocess.Popen) -> None:
    import httpx

    for _ in range(600):
        if server.poll() is not None:
            raise SystemExit(f"the server exited {server.returncode}; its output is in its log file")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become ready in 120 s")


if __name__ == "__main__":
    sys.exit(main())
