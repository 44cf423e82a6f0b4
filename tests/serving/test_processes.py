"""Stopping a vitrine command stops what it started: SIGTERM or SIGINT to `vitrine serve` or
`vitrine ui` (what systemd, a container runtime or Ctrl-C sends) leaves no server answering
and no process behind (vitrine/children.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from components.config import PROJECT_ROOT
from tests.serving.conftest import free_port

pytestmark = pytest.mark.serving
VITRINE = str(PROJECT_ROOT / ".venv/bin/vitrine")


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc's parent links)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start(args: list[str], env: dict, ready: list[str], log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [VITRINE, *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, **env},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the test's own signal reaches vitrine only, as systemd's would
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if all(httpx.get(url, timeout=2).status_code == 200 for url in ready):
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"not ready: {log.read_text()[-3000:]}")


def stop_and_check(proc: subprocess.Popen, signum: int, ports: list[int]) -> None:
    children = descendants(proc.pid)
    assert len(children) >= 2, children  # the server(s) and their workers
    os.kill(proc.pid, signum)  # vitrine only, not its children
    assert proc.wait(timeout=60) == 0
    deadline = time.time() + 10
    while time.time() < deadline and (any(map(answers, ports)) or descendants_alive(children)):
        time.sleep(0.2)
    assert not [p for p in ports if answers(p)], "a server still answers"
    assert not descendants_alive(children), "orphans left running"


def descendants_alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_vitrine_serve_stops_its_bentoml_server(champion, tmp_path, signum):
    port = free_port()
    args = ["serve", "--port", str(port), "--workers", "2"]
    proc = start(args, champion.env, [f"http://127.0.0.1:{port}/healthz"], tmp_path / "serve.log")
    assert len(descendants(proc.pid)) >= 3  # bentoml serve and its two workers
    stop_and_check(proc, signum, [port])


def test_sigterm_to_vitrine_ui_stops_mlflow_and_prefect(tmp_path):
    mlflow_port, prefect_port = free_port(), free_port()
    env = {"VITRINE_HOME": str(tmp_path / "state")}
    args = ["ui", "--mlflow-port", str(mlflow_port), "--prefect-port", str(prefect_port)]
    ready = [
        f"http://127.0.0.1:{mlflow_port}/health",
        f"http://127.0.0.1:{prefect_port}/api/health",
    ]
    proc = start(args, env, ready, tmp_path / "ui.log")
    stop_and_check(proc, signal.SIGTERM, [mlflow_port, prefect_port])
