"""Outage benchmark: how long vitrine takes to report a tracking store it cannot reach, and how
long a reload waits for a worker that never answers.

The unit tests assert the behaviour without a clock (no retry sleep at all; the reload stops at
its timeout on a fake clock); this script measures the seconds:

- `Registry(...)` on an sqlite file in a folder that cannot exist, and on an HTTP tracking URI
  with nothing listening, with MLflow's retries off (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0) and with
  the one retry the service sets; the baseline is the sum of the sleeps MLflow's default retries
  would make first (recorded, not slept);
- `Peers.reload_all(timeout)` with a live worker that never answers, against its timeout.

    python benchmarks/outage.py [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from components.config import configure_environment, state_paths  # noqa: E402

DEAD_HTTP = "http://127.0.0.1:9"  # the discard port: nothing listens on loopback


def time_refusal(uri: str, env: dict[str, str], repeats: int) -> float:
    """Median seconds from Registry(...) to RegistryUnavailable (after one untimed call that
    imports MLflow's store code)."""
    from components.release.registry import Registry, RegistryUnavailable

    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    seconds = []
    try:
        for _ in range(repeats + 1):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                try:
                    Registry(uri, Path(tmp) / "a", "outage", Path(tmp) / "audit")
                except RegistryUnavailable:
                    seconds.append(time.perf_counter() - start)
                else:
                    raise SystemExit(f"{uri} answered: not an outage")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return statistics.median(seconds[1:])


def default_retry_sleeps(uri: str) -> float:
    """The seconds MLflow's default retries would sleep before the refusal (recorded, not
    slept): the baseline the retry settings avoid."""
    from components.release.registry import Registry, RegistryUnavailable

    planned: list[float] = []
    real_sleep = time.sleep
    time.sleep = planned.append  # type: ignore[assignment]
    saved = {k: os.environ.pop(k, None) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES",)}
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(RegistryUnavailable):
            Registry(uri, Path(tmp) / "a", "outage", Path(tmp) / "audit")
    finally:
        time.sleep = real_sleep  # type: ignore[assignment]
        for key, value in saved.items():
            if value is not None:
                os.environ[key] = value
    return float(sum(planned))


def time_silent_worker(timeout: float, repeats: int) -> float:
    """Median seconds reload_all takes with one live worker that never answers."""
    from bentos.peers import Peers

    seconds = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            silent = os.getppid()  # alive, and never watches the folder
            (folder / f"{silent}.json").write_text(json.dumps({"generation": 0, "outcome": None}))
            here = Peers(folder, lambda: {"reloaded": False}, watch_seconds=0.05)
            start = time.perf_counter()
            here.reload_all(timeout=timeout)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    configure_environment(state_paths())
    quick = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    results = {
        "sqlite_missing_folder_s": time_refusal("sqlite:////proc/nope/mlflow.db", {}, args.repeats),
        "http_no_retry_s": time_refusal(
            DEAD_HTTP, {**quick, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}, args.repeats
        ),
        "http_service_retry_s": time_refusal(
            DEAD_HTTP, {**quick, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}, args.repeats
        ),
        "http_default_retries_planned_sleep_s": default_retry_sleeps(DEAD_HTTP),
        "silent_worker_timeout_s": 0.5,
        "silent_worker_reload_s": time_silent_worker(0.5, args.repeats),
    }
    baseline = results["http_default_retries_planned_sleep_s"]
    print(
        f"sqlite store in a missing folder: refused in {results['sqlite_missing_folder_s']:.2f} s"
    )
    print(
        f"HTTP store, nothing listening: refused in {results['http_no_retry_s']:.2f} s with no "
        f"retry, {results['http_service_retry_s']:.2f} s with the service's one retry; MLflow's "
        f"default retries would first sleep {baseline:.0f} s "
        f"({baseline / max(results['http_no_retry_s'], 1e-3):.0f}x)"
    )
    print(
        f"reload with a silent worker: {results['silent_worker_reload_s']:.2f} s "
        f"(timeout {results['silent_worker_timeout_s']} s)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
