"""The service's worker processes in step (bentos/peers.py) and their summed /metrics
(components/serving/metrics.py), with real processes: the reload relayed to another worker,
a failing worker reported, a worker that is gone ignored; counters summed across workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bentos import peers
from bentos.peers import Peers
from components.config import PROJECT_ROOT

WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from bentos.peers import Peers

    folder, outcome = Path(sys.argv[1]), json.loads(sys.argv[2])
    calls = folder / "calls-{}".format(__import__("os").getpid())

    def reload():
        with calls.open("a") as out:
            out.write("reload\\n")
        return outcome

    peers = Peers(folder, reload, watch_seconds=0.05)
    peers.start()
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    peers.close()
    """
)


def start_worker(folder: Path, outcome: dict) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(folder), json.dumps(outcome)],
        cwd=PROJECT_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def stop_worker(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=10)


def test_a_reload_is_relayed_to_every_worker_before_it_answers(tmp_path):
    loaded = {"reloaded": True, "model_version": "2", "previous_version": "1"}
    other = start_worker(tmp_path, loaded)
    try:
        here = Peers(tmp_path, lambda: loaded, pid=os.getpid(), watch_seconds=0.05)
        assert set(here.peers()) == {os.getpid(), other.pid}
        answer = here.reload_all(timeout=10)
        # the other worker reloaded before reload_all returned: its call is on disk already
        assert (tmp_path / f"calls-{other.pid}").read_text() == "reload\n"
        assert answer == {**loaded, "workers": 2}
        assert {s["generation"] for s in here.peers().values()} == {1}
        again = here.reload_all(timeout=10)
        assert again["workers"] == 2 and here.generation() == 2
        assert (tmp_path / f"calls-{other.pid}").read_text() == "reload\n" * 2
    finally:
        stop_worker(other)
    assert set(here.peers()) == {os.getpid()}  # a stopped worker removes itself


def test_a_worker_that_fails_to_reload_makes_the_admin_call_fail(tmp_path):
    broken = start_worker(tmp_path, {"reloaded": False, "model_version": "1", "error": "boom"})
    try:
        here = Peers(tmp_path, lambda: {"reloaded": True, "model_version": "2"}, watch_seconds=0.05)
        answer = here.reload_all(timeout=10)
        assert answer["model_version"] == "2" and answer["workers"] == 2
        assert answer["error"] == f"worker {broken.pid}: boom"
    finally:
        stop_worker(broken)


class FakeClock:
    """bentos.peers' clock: monotonic() reads it and sleep() moves it on, so a wait is measured
    without waiting (the seconds themselves: benchmarks/outage.py)."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert self.now < 60, "still waiting a minute after a 0.5 s timeout"
        self.now += seconds


def test_a_dead_worker_is_not_waited_for_and_a_silent_one_is_named(tmp_path, monkeypatch):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    (tmp_path / f"{dead_pid}.json").write_text(json.dumps({"generation": 0, "outcome": None}))
    # a live process that never watches the folder (this test's parent: the pytest runner's)
    silent = os.getppid()
    (tmp_path / f"{silent}.json").write_text(json.dumps({"generation": 0, "outcome": None}))
    here = Peers(tmp_path, lambda: {"reloaded": False, "model_version": "1"}, watch_seconds=0.05)
    clock = FakeClock()
    monkeypatch.setattr(peers, "time", clock)
    answer = here.reload_all(timeout=0.5)
    assert 0.5 < clock.now <= 0.5 + here.watch_seconds  # waited out the timeout, then stopped
    assert dead_pid not in here.peers()
    assert answer["workers"] == 2 and answer["error"] == f"worker {silent}: no answer after 0 s"


METRICS_WORKER = textwrap.dedent(
    """
    import sys
    from components.serving.metrics import ServingMetrics

    metrics = ServingMetrics()
    for _ in range(int(sys.argv[1])):
        metrics.observe_request("/search", 200, 0.01)
    metrics.set_model_version(sys.argv[2])
    sys.stdout.write(metrics.render().decode())
    """
)


def test_metrics_sum_every_workers_counts(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}

    def worker(requests: int, version: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", METRICS_WORKER, str(requests), version],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    worker(3, "1")
    text = worker(4, "1")  # what the second worker answers on /metrics
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("vitrine_requests_total", (("endpoint", "/search"), ("status", "200")))] == 7
    assert samples[("vitrine_request_latency_seconds_count", (("endpoint", "/search"),))] == 7
    assert all(name.startswith("vitrine_") for name, _ in samples)


def test_a_reload_requested_while_a_worker_still_loads_reaches_it(tmp_path):
    """A worker joins before its first load (bentos/service.py); another worker takes an
    /admin/reload meanwhile. The reload waits for it, and once its watcher starts (after the
    load) it reloads: it cannot keep serving what it loaded before the request."""
    import threading

    calls: list[str] = []
    loading = Peers(tmp_path, lambda: calls.append("reload") or {"version": "2"}, pid=1)
    taker = Peers(tmp_path, lambda: {"version": "2"}, watch_seconds=0.05)
    answer: dict = {}
    relay = threading.Thread(target=lambda: answer.update(taker.reload_all(timeout=10)))
    relay.start()
    relay.join(timeout=0.5)
    assert relay.is_alive()  # waiting for the worker that is still loading
    loading.watch_seconds = 0.05
    loading.start()  # its first load is done: the watcher catches up
    relay.join(timeout=10)
    assert calls == ["reload"]
    assert answer == {"version": "2", "workers": 2}
    loading.close()
    taker.close()
