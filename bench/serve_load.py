"""Load test of `python -m deploy.serve` on loopback: `python bench/serve_load.py [--registry R --model M]`.

Each request carries one Banking77 test query (../shared/datasets/banking77/test.csv beside the checkout; the
demo's test.csv when it is absent), drawn in turn from 500 of them. wrk, a compiled HTTP load generator from
Debian (`apt-get install wrk`), sends them over keep-alive connections at concurrency 1, 8, 32 and 128, for
`--seconds` each, to both routes (`/v2/models/<m>/infer` and `/v1/classify`), against three servers in turn:
batching on (serve: defaults), batching off (`--max-batch-size 1`) and batching on with a shadow version
(`--shadow`, by default the same version again: the cost of shadowing, whatever the versions). wrk shares the
2 cores with the server: the table gives the CPU seconds each took per second of the run.

Printed tables (markdown): requests/s, p50/p99 latency and non-2xx answers per cell; the server overhead at
concurrency 1 (HTTP p50 minus the in-process end-to-end p50 of the same texts at batch 1, measured in this
run); ratios batching on/off at 128 and the primary's p99 with shadow on/off. Bounded: 3 servers x 2 routes x
4 concurrencies x `--seconds` (default 5) plus warm-ups, about 3 minutes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BANKING77 = ROOT.parent / "shared" / "datasets" / "banking77" / "test.csv"
CONCURRENCY = (1, 8, 32, 128)


def queries(n: int = 500) -> list[str]:
    path = BANKING77 if BANKING77.is_file() else ROOT / "data" / "sample" / "test.csv"
    with path.open(encoding="utf-8") as fh:
        return [row["text"] for row in csv.DictReader(fh)][:n]


def lua_script(route: str, model: str, texts: list[str]) -> str:
    """A wrk script posting one text per request, cycling through `texts`."""
    if route == "v2":
        bodies = [{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [t]}]} for t in texts]
        path = f"/v2/models/{model}/infer"
    else:
        bodies, path = [{"texts": [t]} for t in texts], "/v1/classify"
    lines = ",\n".join("  " + lua_string(json.dumps(b)) for b in bodies)
    return (f'wrk.method = "POST"\nwrk.path = "{path}"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"bodies = {{\n{lines}\n}}\ni = 0\n"
            "request = function()\n  i = i % #bodies + 1\n"
            "  return wrk.format(nil, nil, nil, bodies[i])\nend\n")  # fmt: skip


def lua_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(url: str, script: Path, concurrency: int, seconds: float, server_pid: int) -> dict[str, float]:
    before_server, before_children = cpu_seconds(server_pid), os.times()
    start = time.monotonic()
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    wall = time.monotonic() - start
    after = os.times()
    wrk_cpu = (after.children_user - before_children.children_user) + (
        after.children_system - before_children.children_system)  # fmt: skip
    row = {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": to_ms(re.search(r"\s50%\s+(\S+)", out).group(1)),
        "p99_ms": to_ms(re.search(r"\s99%\s+(\S+)", out).group(1)),
        "non_2xx": float(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0.0,
        "errors": float(sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))),
        "server_cpu": (cpu_seconds(server_pid) - before_server) / wall,
        "wrk_cpu": wrk_cpu / wall,
    }
    return row


class Server:
    def __init__(self, registry: str, model: str, port: int, flags: list[str], log: Path):
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "deploy.serve", "--registry", registry, "--model", model, "--http-port",
               str(port), "--grpc", "false", "--params", "/nonexistent", *flags]  # fmt: skip
        self.log = open(log, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        from serve_fuzz import wait_ready  # bench/ is the script's folder, on sys.path

        wait_ready(self.url, self.proc)

    def stop(self) -> int:
        self.proc.terminate()
        code = self.proc.wait(timeout=120)
        self.log.close()
        return code


def in_process_p50(registry: str, model: str, texts: list[str]) -> float:
    """End-to-end (text in, label out) p50 at batch 1 in this process, as the server runs the model."""
    import numpy as np

    from deploy.runtime import load

    c = load(Path(registry), model, max_batch=32, spinning=False)
    c.warm_up(0.5)
    times = []
    for text in texts * 2:
        start = time.perf_counter()
        c.classify([text], 3)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.percentile(times, 50))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--registry", default="registry")
    ap.add_argument("--model", default="distillery-intent")
    ap.add_argument("--shadow", default=None, help="the shadow version (default: --model again)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--port", type=int, default=18095)
    ap.add_argument("--log", default="/tmp/distillery-serve-load.log")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("bench: wrk not found; install it (apt-get install wrk): a Python load generator would take the CPU "
              "the server needs", file=sys.stderr)  # fmt: skip
        return 2
    texts = queries()
    e2e = in_process_p50(args.registry, args.model, texts)
    shadow_log = Path(tempfile.mkdtemp()) / "shadow.jsonl"
    configs = {
        "batching on": [],
        "batching off": ["--max-batch-size", "1"],
        "batching on, shadow": ["--shadow", args.shadow or args.model, "--shadow-log", str(shadow_log)],
        "batching on, shadow 10%": [
            "--shadow",
            args.shadow or args.model,
            "--shadow-log",
            str(shadow_log),
            "--shadow-sample",
            "0.1",
        ],
    }
    results: dict[tuple[str, str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        scripts = {route: Path(tmp) / f"{route}.lua" for route in ("v2", "v1")}
        for route, path in scripts.items():
            path.write_text(lua_script(route, args.model.split("@")[0].split("#")[0], texts))
        for name, flags in configs.items():
            server = Server(args.registry, args.model, args.port, flags, Path(args.log))
            try:
                for route, script in scripts.items():
                    run_wrk(server.url, script, 8, 1.0, server.proc.pid)  # warm-up
                    for c in CONCURRENCY:
                        results[(name, route, c)] = run_wrk(server.url, script, c, args.seconds, server.proc.pid)
                        r = results[(name, route, c)]
                        print(f"bench: {name:20s} {route} c={c:<3d} {r['rps']:8.0f} req/s p50 {r['p50_ms']:.2f} ms "
                              f"p99 {r['p99_ms']:.2f} ms", file=sys.stderr, flush=True)  # fmt: skip
            finally:
                code = server.stop()
            if code != 0:
                print(f"bench: the {name} server exited {code} after SIGTERM", file=sys.stderr)
    print(report(results, e2e, shadow_log))
    return 0


def p99_ratios(results: dict[tuple[str, str, int], dict[str, float]], name: str, route: str) -> str:
    """p99 of server `name` over batching on's, at each concurrency."""
    on = lambda c: results[("batching on", route, c)]["p99_ms"]  # noqa: E731
    return ", ".join(f"{results[(name, route, c)]['p99_ms'] / on(c):.2f}" for c in CONCURRENCY)


def report(results: dict[tuple[str, str, int], dict[str, float]], e2e: float, shadow_log: Path) -> str:
    out = ["| server | route | concurrency | requests/s | p50 ms | p99 ms | non-2xx | server CPU | wrk CPU |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for (name, route, c), r in results.items():
        out.append(f"| {name} | {route} | {c} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                   f"{r['non_2xx'] + r['errors']:.0f} | {r['server_cpu']:.2f} | {r['wrk_cpu']:.2f} |")  # fmt: skip
    out += ["", "| route | best requests/s (batching on) | at concurrency | on/off at 128 | overhead at c=1 (ms) | "
            "p99 shadow on/off (c=1, 8, 32, 128; all; 10%) |", "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for route in ("v2", "v1"):
        on = {c: results[("batching on", route, c)] for c in CONCURRENCY}
        best = max(on, key=lambda c: on[c]["rps"])
        ratio = on[128]["rps"] / results[("batching off", route, 128)]["rps"]
        overhead = on[1]["p50_ms"] - e2e
        shadow = "; ".join(
            p99_ratios(results, name, route) for name in ("batching on, shadow", "batching on, shadow 10%")
        )
        out.append(f"| {route} | {on[best]['rps']:.0f} | {best} | {ratio:.2f}x | {overhead:.2f} | {shadow} |")
    out += ["", f"in-process end to end at batch 1 (text in, label out), p50: {e2e:.3f} ms"]
    if shadow_log.is_file():
        from deploy.shadow import read_log

        rows = read_log([shadow_log])
        out.append(f"shadow: {len(rows)} texts compared (the rest dropped under load, by design)")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
