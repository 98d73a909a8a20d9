"""What the Prefect flow costs on top of DVC: no-op runs and a rerun after one `clean` param change.

    python bench/pipeline_overhead.py [--repeats 5]

Runs on a scratch copy of the project with the demo data, against a Prefect server started here on
loopback (warm: the flow runs do not pay for a server start), and without one (cold: each run starts
Prefect's embedded server, as `python -m flows.pipeline` does with no PREFECT_API_URL). Prints one table.
Target: the no-op flow with a warm server takes at most 2x a no-op `dvc repro`; the cold figure is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import copy_project  # noqa: E402  (one way to copy the project, shared with the tests)

ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return elapsed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**ENV, "PREFECT_HOME": str(home)}
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return server, url
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise SystemExit("bench: the Prefect server did not start within 120 s")


# Times the flow call alone, in an interpreter that has imported Prefect and DVC and run the flow once:
# what a long-lived process (a worker serving deployments, a notebook) pays per no-op run.
IN_PROCESS = """
import json, sys, time
from flows.pipeline import pipeline
pipeline(root=sys.argv[1])
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter(); pipeline(root=sys.argv[1]); times.append(time.perf_counter() - start)
print("TIMES", json.dumps(times))
"""


def in_process(root: Path, repeats: int, env: dict[str, str]) -> list[float]:
    proc = subprocess.run(
        [sys.executable, "-c", IN_PROCESS, str(root), str(repeats)], cwd=root, env=env, capture_output=True, text=True
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("TIMES ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"bench: in-process flow runs failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(line.removeprefix("TIMES "))


def set_threshold(root: Path, value: float) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["clean"]["near_dup_threshold"] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="distillery-bench-") as tmp:
        root = copy_project(Path(tmp) / "project")
        dvc = [sys.executable, "-m", "dvc", "repro"]
        flow = [sys.executable, "-m", "flows.pipeline", "--root", str(root)]
        print("bench: first dvc repro (builds the outputs) ...", file=sys.stderr)
        timed(dvc, root, ENV)
        server, url = start_server(Path(tmp) / "prefect-home")
        env = {
            **ENV,
            "PREFECT_API_URL": url,
            "PREFECT_HOME": str(Path(tmp) / "prefect-home"),
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        }
        try:
            timed(flow, root, env)  # warm the server's first flow registration
            rows = []
            noop_dvc = [timed(dvc, root, env) for _ in range(args.repeats)]
            noop_flow = [timed(flow, root, env) for _ in range(args.repeats)]
            noop_warm = in_process(root, args.repeats, env)
            embedded = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
            noop_cold = [timed(flow, root, embedded) for _ in range(args.repeats)]
            # The change scenario stops at `clean` (dvc repro clean / --stage clean): it measures the
            # rerun of the changed stage, not the model training downstream of it.
            change_dvc, change_flow = [], []
            for i in range(args.repeats):
                set_threshold(root, 0.80 + 0.01 * i)
                change_dvc.append(timed([*dvc, "clean"], root, env))
                set_threshold(root, 0.85 + 0.01 * i)
                change_flow.append(timed([*flow, "--stage", "clean"], root, env))
            base = statistics.median(noop_dvc)
            for name, samples in (
                ("no-op dvc repro", noop_dvc),
                ("no-op flow, in a warm process (server warm)", noop_warm),
                ("no-op flow, python -m flows.pipeline (server warm)", noop_flow),
                ("no-op flow, python -m flows.pipeline (embedded server, cold)", noop_cold),
                ("dvc repro clean, after a clean param change", change_dvc),
                ("flow --stage clean, after a clean param change", change_flow),
            ):
                rows.append((name, statistics.median(samples), min(samples), statistics.median(samples) / base))
        finally:
            server.terminate()
            server.wait(timeout=30)
    width = max(len(r[0]) for r in rows)
    print(f"{'scenario':<{width}}  {'median s':>9}  {'min s':>7}  {'x no-op dvc':>11}")
    for name, med, low, ratio in rows:
        print(f"{name:<{width}}  {med:9.2f}  {low:7.2f}  {ratio:11.2f}")
    warm, cli, cold = rows[1][3], rows[2][3], rows[3][3]
    print(
        f"target: no-op flow <= 2.00x no-op dvc repro with a warm server: in a warm process "
        f"{'met' if warm <= 2.0 else 'MISSED'} ({warm:.2f}x), fresh CLI process {'met' if cli <= 2.0 else 'MISSED'} "
        f"({cli:.2f}x; it pays Python, Prefect's import and its engine start); cold embedded server {cold:.2f}x "
        f"(reported, no target); {args.repeats} repeats, {os.cpu_count()} CPUs"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
