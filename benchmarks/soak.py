"""Soak the real service: mixed shopper traffic at --concurrency for --minutes, with a real
promotion (`vitrine promote`) a third of the way in and a `vitrine rollback` at two thirds,
both picked up by the service's own poll of the registry.

Traffic: /search 35%, /classify 20%, /tags 15%, /search_text 10%, /embed 5%, /recommend 5%,
GET /products/{id} 10%, over --photos distinct catalogue photos (test split first), so the
sha256 cache hits some repeats as it would in a shop. Every answer must be a 200 naming a
model version; anything else is an error. Per minute: requests, errors, p50 / p99 and which
versions answered. The server's process tree (bentoml serve + its workers, from /proc):
resident memory and open file descriptors after the warm-up and at the end; the baseline of
each figure is its own first measurement in the same run (first minute's p99, start RSS and
descriptors), and the run passes when errors are 0 and RSS and descriptors grew by at most
--max-growth.

    python benchmarks/soak.py --minutes 10 --json bench-soak.json
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serve import free_port, load_photos, multipart, start, stop  # noqa: E402
from components.config import configure_environment, load_params, state_paths  # noqa: E402

OWNER = "soak-owner"  # the model owner approving the mid-soak promotion (params promotion.owners)
MIX = [
    ("search", 35),
    ("classify", 20),
    ("tags", 15),
    ("search_text", 10),
    ("embed", 5),
    ("recommend", 5),
    ("product", 10),
]
QUERIES = ["white sneakers", "black dress", "warm coat", "summer shirt", "leather bag", "boots"]


def process_tree(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {pid}, {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - tree
        tree |= frontier
    return sorted(tree)


def footprint(pid: int) -> dict:
    """Resident memory (MiB) and open descriptors of the server's whole process tree."""
    rss_kb = fds = 0
    pids = process_tree(pid)
    for p in pids:
        try:
            status = Path(f"/proc/{p}/status").read_text()
            rss_kb += int(
                next(ln for ln in status.splitlines() if ln.startswith("VmRSS")).split()[1]
            )
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except (OSError, StopIteration):
            continue
    return {"rss_mib": round(rss_kb / 1024, 1), "fds": fds, "processes": len(pids)}


class Traffic:
    """--concurrency threads, each with one keep-alive connection, sending the mix until
    stopped; every result is (time since start, endpoint, latency s, ok, model_version)."""

    def __init__(self, url: str, photos: list[bytes], product_ids: list[str], seed: int):
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.bodies = [multipart(photo, 10) for photo in photos]
        self.product_ids = product_ids
        self.seed = seed
        self.results: list[tuple[float, str, float, bool, str | None]] = []
        self.failures: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = time.perf_counter()

    def request(self, rng: random.Random, counter) -> tuple[str, str, str, bytes, dict]:
        endpoint = rng.choices([e for e, _ in MIX], weights=[w for _, w in MIX])[0]
        if endpoint == "product":
            pid = rng.choice(self.product_ids)
            return endpoint, "GET", f"/products/{pid}", b"", {}
        if endpoint in ("search_text", "recommend"):
            body = (
                {"query": rng.choice(QUERIES), "k": 10}
                if endpoint == "search_text"
                else {"history": rng.sample(self.product_ids, 3), "k": 10, "diversify": True}
            )
            headers = {"Content-Type": "application/json"}
            return endpoint, "POST", f"/{endpoint}", json.dumps(body).encode(), headers
        body, ctype = self.bodies[next(counter) % len(self.bodies)]
        return endpoint, "POST", f"/{endpoint}", body, {"Content-Type": ctype}

    def worker(self, index: int, counter) -> None:
        rng = random.Random(self.seed * 1000 + index)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        while not self._stop.is_set():
            endpoint, method, path, body, headers = self.request(rng, counter)
            start = time.perf_counter()
            version, why = None, None
            try:
                conn.request(method, path, body, headers)
                response = conn.getresponse()
                payload = response.read()
                if response.status != 200:
                    why = f"{endpoint} {response.status}"
                elif endpoint != "product":
                    version = json.loads(payload).get("model_version")
                    why = None if version else f"{endpoint} without model_version"
            except (OSError, http.client.HTTPException, ValueError) as error:
                why = f"{endpoint} {type(error).__name__}"
                conn.close()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            elapsed = time.perf_counter() - start
            with self._lock:
                self.results.append((start - self.started, endpoint, elapsed, why is None, version))
                if why:
                    self.failures[why] = self.failures.get(why, 0) + 1
        conn.close()

    def start(self, concurrency: int) -> None:
        counter = itertools.count()
        self._threads = [
            threading.Thread(target=self.worker, args=(i, counter), daemon=True)
            for i in range(concurrency)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def per_minute(results: list[tuple], since: float) -> list[dict]:
    rows = []
    minutes = int(max((r[0] for r in results), default=since) - since) // 60 + 1
    for minute in range(minutes):
        lo, hi = since + minute * 60, since + (minute + 1) * 60
        part = [r for r in results if lo <= r[0] < hi]
        if not part:
            continue
        ms = np.array([r[2] for r in part]) * 1000
        versions: dict[str, int] = {}
        for r in part:
            if r[4]:
                versions[r[4]] = versions.get(r[4], 0) + 1
        rows.append(
            {
                "minute": minute + 1,
                "requests": len(part),
                "errors": sum(not r[3] for r in part),
                "p50_ms": round(float(np.percentile(ms, 50)), 1),
                "p99_ms": round(float(np.percentile(ms, 99)), 1),
                "versions": versions,
            }
        )
    return rows


def vitrine(args: list[str], env: dict) -> str:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "vitrine"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise SystemExit(f"vitrine {' '.join(args)} failed: {done.stdout}{done.stderr}")
    return done.stdout.strip()


def prepare(champion: dict[str, str]) -> tuple[str, str]:
    """(the serving champion, a second approved version of it to promote mid-soak)."""
    from components.release.registry import open_registry
    from components.stages import register
    from components.stages.context import RunContext

    params_path = Path(champion["VITRINE_PARAMS"])
    raw = yaml.safe_load(params_path.read_text())
    owners = raw.setdefault("promotion", {}).setdefault("owners", [])
    if OWNER not in owners:  # the benchmark's champion names its owner
        owners.append(OWNER)
        params_path.write_text(yaml.safe_dump(raw))
    params, paths = load_params(params_path), state_paths(champion["VITRINE_HOME"])
    registry = open_registry(paths, params)
    serving = registry.served_champion()[0]
    ctx = RunContext(params, paths, work=params_path.parent / "run", repo=params_path.parent)
    version = register.run(ctx, registry, cause="soak benchmark")["version"]
    registry.record_verdict(version, {"passed": True, "reasons": ["soak benchmark"]})
    registry.approve(version, by=OWNER)
    return serving, version


def timeline(traffic: Traffic, since: float, total: float, pid: int, promoted: str, env) -> list:
    """Until `total` s after `since`: `vitrine promote` at a third, `vitrine rollback` at two
    thirds, and the server's footprint at the end of each minute."""
    actions = [(total / 3, ["promote", promoted]), (2 * total / 3, ["rollback"])]
    events, next_sample = [], 60.0
    while (now := time.perf_counter() - traffic.started - since) < total:
        if actions and now >= actions[0][0]:
            action = actions.pop(0)[1]
            said = vitrine(action, env)
            at = round(time.perf_counter() - traffic.started - since, 1)
            events.append({"at_s": at, "action": " ".join(action), "said": said})
            print(f"  {at:>6} s  vitrine {' '.join(action)}: {said}", flush=True)
        elif now >= next_sample:
            events.append({"at_s": round(now, 1), "action": "sample", **footprint(pid)})
            next_sample += 60
        else:
            time.sleep(0.2)
    return events


def soak(args) -> dict:
    from benchmarks.champion import champion_env

    champion = champion_env(args.root.resolve(), args.size)
    serving, promoted = prepare(champion)
    photos = load_photos(args.photos, champion["VITRINE_PARAMS"])
    import pandas as pd

    index = Path(champion["VITRINE_PARAMS"]).parent / "run" / "evaluate" / "index"
    product_ids = pd.read_parquet(index / "products.parquet")["product_id"].astype(str).tolist()
    env = {
        **os.environ,
        **champion,
        "VITRINE_POLL_SECONDS": str(args.poll_seconds),
        "BENTOML_HOME": str(Path(args.log_dir) / "bentoml"),
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).parent / "bentoml"), "serve", "bentos.service:Vitrine"]
    proc = start(
        command + ["--host", "127.0.0.1", "--port", str(port)],
        url,
        Path(args.log_dir) / "soak-server.log",
        env,
    )
    traffic = Traffic(url, photos, product_ids, args.seed)
    try:
        traffic.start(args.concurrency)
        print(f"warm-up {args.warmup_seconds} s at concurrency {args.concurrency} on {url}")
        time.sleep(args.warmup_seconds)
        since = time.perf_counter() - traffic.started
        at_start = footprint(proc.pid)
        print(f"start: {at_start}; soaking {args.minutes} min", flush=True)
        total = args.minutes * 60
        events = timeline(traffic, since, total, proc.pid, promoted, env)
        at_end = footprint(proc.pid)
    finally:
        traffic.stop()
        stop(proc)
    measured = [r for r in traffic.results if since <= r[0] < since + args.minutes * 60]
    minutes = per_minute(measured, since)
    samples = [e for e in events if e["action"] == "sample"]
    for row, sample in zip(minutes, samples + [at_end] * len(minutes), strict=False):
        row.update(rss_mib=sample["rss_mib"], fds=sample["fds"])
        print(
            f"  minute {row['minute']:>2}: {row['requests']:>6} requests, {row['errors']} errors, "
            f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, RSS {row['rss_mib']} MiB, "
            f"{row['fds']} fds, versions {row['versions']}"
        )
    events = [e for e in events if e["action"] != "sample"]
    growth = {
        "rss": round(at_end["rss_mib"] / at_start["rss_mib"] - 1, 4),
        "fds": round(at_end["fds"] / at_start["fds"] - 1, 4),
    }
    errors = sum(not r[3] for r in measured)
    served = [version for row in minutes for version in row["versions"]]
    return {
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "products": args.size,
        "requests": len(measured),
        "errors": errors,
        "failures": traffic.failures,
        "per_minute": minutes,
        "p99_ratio_last_to_first_minute": round(minutes[-1]["p99_ms"] / minutes[0]["p99_ms"], 2),
        "start": at_start,
        "end": at_end,
        "growth": growth,
        "events": events,
        "versions": {"champion": serving, "promoted": promoted},
        "promotion_served": promoted in served,
        "passed": errors == 0
        and promoted in served
        and minutes[-1]["versions"].keys() == {serving}
        and max(growth.values()) <= args.max_growth,
        "cpu_count": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--size", type=int, default=6000, help="catalogue size of the champion")
    parser.add_argument("--root", type=Path, default=Path("/tmp/vitrine-bench"))
    parser.add_argument("--photos", type=int, default=3000)
    parser.add_argument("--warmup-seconds", type=float, default=30)
    parser.add_argument("--poll-seconds", type=float, default=5)
    parser.add_argument("--max-growth", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="/tmp")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    configure_environment(state_paths())
    result = soak(args)
    print(
        f"\n{result['requests']} requests in {args.minutes} min at concurrency {args.concurrency}: "
        f"{result['errors']} errors; p99 last/first minute {result['p99_ratio_last_to_first_minute']}x; "
        f"RSS {result['start']['rss_mib']} -> {result['end']['rss_mib']} MiB "
        f"({result['growth']['rss']:+.1%}), descriptors {result['start']['fds']} -> "
        f"{result['end']['fds']} ({result['growth']['fds']:+.1%}); "
        f"{'PASS' if result['passed'] else 'FAIL'}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
