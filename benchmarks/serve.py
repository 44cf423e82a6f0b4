"""Benchmark POST /search of the real service against a naive baseline, in the same run.

Starts `bentoml serve bentos.service:Vitrine` on the current champion (the state of `make run`),
then drives /search from this (separate) process at each --concurrency with --requests real
catalogue photos per level, every photo distinct (the sha256 cache never helps: these are
cold-path figures). Then it does the same against benchmarks/naive_server.py (one request →
one model call, no batching, no cache, exact numpy search) and prints p50/p95/p99 latency,
throughput and errors for both, and the ratios.

    python benchmarks/serve.py --requests 1000 --json bench-serve.json
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components.config import configure_environment, load_params, state_paths  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], url: str, log: Path, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{command[0]} exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise SystemExit(f"{command[0]} not ready after 180 s: {log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def multipart(photo: bytes, k: int) -> tuple[bytes, str]:
    """A multipart/form-data body (field `image` + field `k`), built once per photo."""
    boundary = "vitrine-bench-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="photo.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + photo
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def drive(url: str, photos: list[bytes], concurrency: int, k: int) -> dict:
    """len(photos) POST /search at `concurrency` in flight; latency percentiles, rps, errors.

    The client shares the machine's cores with the server, so it is kept light: bodies are
    encoded before the clock starts, and each worker thread holds one keep-alive
    http.client connection (a full client such as httpx costs ~1 ms of CPU per request)."""
    host, port = url.removeprefix("http://").split(":")
    bodies = [multipart(photo, k) for photo in photos]
    latencies: list[float] = []
    errors = [0]
    counter = itertools.count()
    lock = threading.Lock()

    def worker() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        while (i := next(counter)) < len(bodies):
            body, ctype = bodies[i]
            start = time.perf_counter()
            try:
                conn.request("POST", "/search", body, {"Content-Type": ctype})
                response = conn.getresponse()
                ok = response.status == 200 and b'"results"' in response.read()
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                errors[0] += not ok
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "rps": round(len(latencies) / wall, 1),
        "errors": errors[0],
        "requests": len(latencies),
    }


def run_side(name: str, command: list[str], port: int, photos: list[bytes], args, env) -> dict:
    url = f"http://127.0.0.1:{port}"
    log = Path(args.log_dir) / f"{name}.log"
    proc = start(command, url, log, env)
    try:
        drive(url, photos[: args.warmup], 4, args.k)  # warm up (these photos are not reused)
        used, out = args.warmup, {}
        for c in args.concurrency:
            out[str(c)] = drive(url, photos[used : used + args.requests], c, args.k)
            used += args.requests
            print(f"  {name:<9} c={c:<3} {out[str(c)]}", flush=True)
        return out
    finally:
        stop(proc)


def load_photos(n: int) -> list[bytes]:
    params = load_params()
    catalogue = params.data.catalogue_path(ROOT)
    manifest = pd.read_parquet(catalogue / "manifest.parquet")
    rows = manifest.sort_values(["split", "product_id"], ascending=[True, True])  # test first
    if len(rows) < n:
        raise SystemExit(f"need {n} distinct photos, the catalogue has {len(rows)}")
    return [(catalogue / p).read_bytes() for p in rows["path"][:n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000, help="per concurrency level")
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16]
    )
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--log-dir", default="/tmp")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    configure_environment(state_paths())
    photos = load_photos(args.warmup + args.requests * len(args.concurrency))
    env = {
        **os.environ,
        "VITRINE_POLL_SECONDS": "0",
        "BENTOML_HOME": str(Path(args.log_dir) / "bentoml"),
    }
    bin_dir = Path(sys.executable).parent
    port = free_port()
    service_cmd = [
        str(bin_dir / "bentoml"),
        "serve",
        "bentos.service:Vitrine",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    print(f"vitrine service (bentoml, micro-batching, cache, FAISS) on :{port}")
    service = run_side("vitrine", service_cmd, port, photos, args, env)
    port = free_port()
    naive_cmd = [sys.executable, str(ROOT / "benchmarks" / "naive_server.py"), "--port", str(port)]
    print(f"naive baseline (uvicorn, one call per request, numpy exact search) on :{port}")
    baseline = run_side("baseline", naive_cmd, port, photos, args, env)

    top = str(max(args.concurrency))
    result = {
        "concurrency": service,
        "baseline": baseline,
        f"rps_ratio_{top}": round(service[top]["rps"] / baseline[top]["rps"], 2),
        "p50_ratio_1": round(baseline["1"]["p50_ms"] / service["1"]["p50_ms"], 2)
        if "1" in service
        else None,
        "requests_per_level": args.requests,
        "cpu_count": os.cpu_count(),
    }
    print(f"\n{'':<10}{'conc':>5}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'req/s':>9}{'errors':>8}")
    for name, side in (("vitrine", service), ("baseline", baseline)):
        for c, row in side.items():
            print(
                f"{name:<10}{c:>5}{row['p50_ms']:>9}{row['p95_ms']:>9}{row['p99_ms']:>9}"
                f"{row['rps']:>9}{row['errors']:>8}"
            )
    print(
        f"throughput at concurrency {top}: {result[f'rps_ratio_{top}']}× the baseline; "
        f"p50 at concurrency 1: {result['p50_ratio_1']}× faster"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
