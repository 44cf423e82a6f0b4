"""Benchmark POST /search of the real service against a naive baseline, in the same run, on
champions of several catalogue sizes (default 6,000 and 70,000 products).

For each size, benchmarks/champion.py builds (or reuses, under --root) a champion of the default
architecture whose index holds that many products. The benchmark starts `bentoml serve
bentos.service:Vitrine` on it, then drives /search from this (separate) process at each
--concurrency with --requests real catalogue photos per level, every photo distinct (the
sha256 cache never helps: these are cold-path figures), and the same photos against
benchmarks/naive_server.py (one request -> one model call, no batching, no cache, exact numpy
search), the two taking turns in --rounds rounds per level so that both share the machine's
drift in speed. It prints p50/p95/p99 latency, throughput and errors for both, and the ratios. Last,
where the time of one request goes: decode, preprocess, model, search and logging timed in
this process with the service's own code on --profile photos (medians), and the rest of the
service's p50 at concurrency 1 (HTTP, multipart parsing, routing, thread hops: "framework").

    python benchmarks/serve.py --requests 1000 --json bench-serve.json
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Iterator
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


@contextlib.contextmanager
def serving(name: str, command: list[str], port: int, args, env) -> Iterator[str]:
    url = f"http://127.0.0.1:{port}"
    proc = start(command, url, Path(args.log_dir) / f"{name}.log", env)
    try:
        yield url
    finally:
        stop(proc)


def drive(url: str, photos: list[bytes], concurrency: int, k: int) -> dict:
    """len(photos) POST /search at `concurrency` in flight: every latency (s), the wall time
    and the error count.

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
    return {"latencies": latencies, "wall": time.perf_counter() - start, "errors": errors[0]}


def summarise(runs: list[dict]) -> dict:
    """Percentiles over every latency of the runs; throughput = requests / summed wall time."""
    ms = np.concatenate([r["latencies"] for r in runs]) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "rps": round(len(ms) / sum(r["wall"] for r in runs), 1),
        "errors": sum(r["errors"] for r in runs),
        "requests": len(ms),
    }


def compare(sides: dict[str, str], photos: list[bytes], args) -> dict[str, dict]:
    """Each concurrency level in --rounds rounds, the sides taking turns within a round: the
    machine's speed drifts over minutes (seen here: the same request 40% slower five minutes
    later), and alternating puts both sides under the same drift. Each side sees every photo
    once per level (its cache never helps)."""
    for url in sides.values():
        drive(url, photos[: args.warmup], 4, args.k)  # warm up (these photos are not reused)
    out: dict[str, dict] = {name: {} for name in sides}
    used = args.warmup
    for c in args.concurrency:
        level = photos[used : used + args.requests]
        used += args.requests
        runs: dict[str, list] = {name: [] for name in sides}
        for part in np.array_split(np.arange(len(level)), args.rounds):
            chunk = [level[i] for i in part]
            for name, url in sides.items():
                runs[name].append(drive(url, chunk, c, args.k))
        for name in sides:
            out[name][str(c)] = summarise(runs[name])
            print(f"  {name:<9} c={c:<3} {out[name][str(c)]}", flush=True)
    return out


def load_photos(n: int, params_path: str) -> list[bytes]:
    params = load_params(params_path)
    catalogue = params.data.catalogue_path(ROOT)
    manifest = pd.read_parquet(catalogue / "manifest.parquet")
    rows = manifest.sort_values(["split", "product_id"], ascending=[True, True])  # test first
    if len(rows) < n:
        raise SystemExit(f"need {n} distinct photos, the catalogue has {len(rows)}")
    return [(catalogue / p).read_bytes() for p in rows["path"][:n]]


def breakdown(env: dict[str, str], photos: list[bytes], k: int) -> dict[str, float]:
    """Median ms of each step of one /search, run here with the service's own code."""
    import tempfile

    from bentos.loader import ModelLoader
    from bentos.predictor import Predictor
    from components.model.transforms import model_input
    from components.serving.logs import RequestLog
    from components.serving.metrics import ServingMetrics
    from components.serving.runtime import set_call_threads
    from components.serving.uploads import UploadLimits, compute_image_stats, decode_upload

    paths, params = state_paths(env["VITRINE_HOME"]), load_params(env["VITRINE_PARAMS"])
    set_call_threads(params.serving.threads or os.cpu_count() or 1)
    loader = ModelLoader(paths, params, ServingMetrics(), "fp32", "off")
    registry = loader._open_registry()
    bundle = loader.load_bundle(registry, registry.alias_version("champion"))
    model, limits = bundle.model, UploadLimits(10 << 20, 36_000_000)
    steps: dict[str, list[float]] = {
        s: [] for s in ("decode", "preprocess", "model", "search", "log")
    }
    with tempfile.TemporaryDirectory() as tmp:
        log = RequestLog(Path(tmp))
        for data in photos:
            t0 = time.perf_counter()
            image = decode_upload(data, "image/png", limits)
            t1 = time.perf_counter()
            pixels = model_input(image, model)
            t2 = time.perf_counter()
            probs, emb = Predictor.predict_batch([(bundle, pixels)])[0]
            t3 = time.perf_counter()
            bundle.index.search(emb, k)
            t4 = time.perf_counter()
            log.write(
                "/search",
                bundle.version,
                emb,
                "x",
                float(probs.max()),
                compute_image_stats(image, pixels),
            )
            t5 = time.perf_counter()
            for name, a, b in zip(steps, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5), strict=True):
                steps[name].append((b - a) * 1000)
    return {name: round(float(np.median(v)), 3) for name, v in steps.items()}


def run_size(size: int, args, bin_dir: Path) -> dict:
    from benchmarks.champion import champion_env

    champion = champion_env(args.root.resolve(), size)
    photos = load_photos(
        args.warmup + args.requests * len(args.concurrency), champion["VITRINE_PARAMS"]
    )
    env = {
        **os.environ,
        **champion,
        "VITRINE_POLL_SECONDS": "0",
        "BENTOML_HOME": str(Path(args.log_dir) / "bentoml"),
    }
    service_port, naive_port = free_port(), free_port()
    service_cmd = [str(bin_dir / "bentoml"), "serve", "bentos.service:Vitrine"]
    service_cmd += ["--host", "127.0.0.1", "--port", str(service_port)]
    naive_cmd = [sys.executable, str(ROOT / "benchmarks" / "naive_server.py")]
    naive_cmd += ["--port", str(naive_port)]
    print(f"[{size} products] vitrine (bentoml, micro-batching, cache, FAISS) on :{service_port}")
    print(
        f"[{size} products] naive baseline (uvicorn, one call per request, numpy search) on "
        f":{naive_port}; {args.rounds} alternating rounds per concurrency level"
    )
    with (
        serving(f"vitrine-{size}", service_cmd, service_port, args, env) as service_url,
        serving(f"baseline-{size}", naive_cmd, naive_port, args, env) as naive_url,
    ):
        measured = compare({"vitrine": service_url, "baseline": naive_url}, photos, args)
    service, baseline = measured["vitrine"], measured["baseline"]
    steps = breakdown(env, photos[: args.profile], args.k)
    top = str(max(args.concurrency))
    result = {
        "products": size,
        "concurrency": service,
        "baseline": baseline,
        f"rps_ratio_{top}": round(service[top]["rps"] / baseline[top]["rps"], 2),
        "p50_ratio_1": round(baseline["1"]["p50_ms"] / service["1"]["p50_ms"], 2)
        if "1" in service
        else None,
        "time_of_one_request_ms": steps,
    }
    if "1" in service:
        framework = service["1"]["p50_ms"] - sum(steps.values())
        steps["framework"] = round(framework, 3)
    return result


def report(result: dict) -> None:
    size, service, baseline = result["products"], result["concurrency"], result["baseline"]
    print(
        f"\n{size} products{'':<3}{'conc':>5}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'req/s':>9}{'errors':>8}"
    )
    for name, side in (("vitrine", service), ("baseline", baseline)):
        for c, row in side.items():
            print(
                f"{name:<17}{c:>5}{row['p50_ms']:>9}{row['p95_ms']:>9}{row['p99_ms']:>9}"
                f"{row['rps']:>9}{row['errors']:>8}"
            )
    top = str(max(int(c) for c in service))
    print(
        f"throughput at concurrency {top}: {result[f'rps_ratio_{top}']}x the baseline; "
        f"p50 at concurrency 1: {result['p50_ratio_1']}x the baseline's speed"
    )
    steps = result["time_of_one_request_ms"]
    print("one request (ms, medians): " + ", ".join(f"{k} {v}" for k, v in steps.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[6000, 70000]
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("/tmp/vitrine-bench"),
        help="where the champions are built once and reused",
    )
    parser.add_argument("--requests", type=int, default=1000, help="per concurrency level")
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16]
    )
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternations of the two sides per concurrency"
    )
    parser.add_argument("--profile", type=int, default=300, help="photos of the time breakdown")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--log-dir", default="/tmp")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    configure_environment(state_paths())
    bin_dir = Path(sys.executable).parent
    results = [run_size(size, args, bin_dir) for size in args.sizes]
    for result in results:
        report(result)
    out = {"sizes": results, "requests_per_level": args.requests, "cpu_count": os.cpu_count()}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
