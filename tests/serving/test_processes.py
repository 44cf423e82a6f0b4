"""Stopping a vitrine command stops what it started: SIGTERM or SIGINT to `vitrine serve` or
`vitrine ui` (what systemd, a container runtime or Ctrl-C sends) leaves no server answering
and no process behind (vitrine/children.py), and a request the service is reading when the
signal comes is still answered. `vitrine worker`: tests/integration/test_schedules.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pandas as pd
import pytest

from components.config import PROJECT_ROOT
from tests.serving.conftest import free_port
from vitrine.children import alive, descendants

pytestmark = pytest.mark.serving
VITRINE = str(PROJECT_ROOT / ".venv/bin/vitrine")


def a_photo(champion) -> bytes:
    """A catalogue photo of the champion's own catalogue (its first test product)."""
    manifest = pd.read_parquet(champion.ctx.catalogue_dir / "manifest.parquet")
    row = manifest[manifest["split"] == "test"].iloc[0]
    return (champion.ctx.catalogue_dir / row["path"]).read_bytes()


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


def stop_and_check(
    proc: subprocess.Popen,
    signum: int,
    ports: list[int],
    during: Callable[[], None] | None = None,
) -> None:
    """Signal vitrine, run `during` (while the servers stop), check nothing is left."""
    children = descendants(proc.pid)
    assert len(children) >= 2, children  # the server(s) and their workers
    os.kill(proc.pid, signum)  # vitrine only, not its children
    if during is not None:
        during()
    assert proc.wait(timeout=60) == 0
    deadline = time.time() + 10
    while time.time() < deadline and (any(map(answers, ports)) or alive(children)):
        time.sleep(0.2)
    assert not [p for p in ports if answers(p)], "a server still answers"
    assert not alive(children), "orphans left running"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_vitrine_serve_stops_its_bentoml_server(champion, tmp_path, signum):
    port = free_port()
    args = ["serve", "--port", str(port), "--workers", "2"]
    proc = start(args, champion.env, [f"http://127.0.0.1:{port}/healthz"], tmp_path / "serve.log")
    assert len(descendants(proc.pid)) >= 3  # bentoml serve and its two workers
    photo = a_photo(champion)
    boundary = "in-flight"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + photo
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    in_flight = socket.create_connection(("127.0.0.1", port), timeout=30)
    in_flight.sendall(head + body[: len(body) // 2])  # a request the server is reading
    answer = []

    def finish_the_request() -> None:
        time.sleep(1.5)  # the servers are stopping by now
        in_flight.sendall(body[len(body) // 2 :])
        answer.append(in_flight.makefile("rb").read())

    stop_and_check(proc, signum, [port], during=finish_the_request)
    in_flight.close()
    status = answer[0].split(b"\r\n", 1)[0]
    assert status == b"HTTP/1.1 200 OK" and b'"category"' in answer[0], answer[0][:300]


def test_sigterm_to_vitrine_ui_stops_mlflow_prefect_and_evidently(tmp_path):
    mlflow_port, prefect_port, evidently_port = free_port(), free_port(), free_port()
    env = {"VITRINE_HOME": str(tmp_path / "state")}
    args = ["ui", "--mlflow-port", str(mlflow_port), "--prefect-port", str(prefect_port)]
    args += ["--evidently-port", str(evidently_port)]
    ready = [
        f"http://127.0.0.1:{mlflow_port}/health",
        f"http://127.0.0.1:{prefect_port}/api/health",
        f"http://127.0.0.1:{evidently_port}/api/version",
    ]
    proc = start(args, env, ready, tmp_path / "ui.log")
    stop_and_check(proc, signal.SIGTERM, [mlflow_port, prefect_port, evidently_port])


def test_vitrine_ui_whose_mlflow_server_dies_stops_prefect_and_fails(tmp_path):
    """MLflow's port is taken, so its server exits at start: `vitrine ui` says so, stops the
    Prefect server and Evidently's UI it started and exits non-zero, instead of serving half
    a UI."""
    prefect_port, evidently_port = free_port(), free_port()
    env = {**os.environ, "VITRINE_HOME": str(tmp_path / "state")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        mlflow_port = taken.getsockname()[1]
        args = ["ui", "--mlflow-port", str(mlflow_port), "--prefect-port", str(prefect_port)]
        args += ["--evidently-port", str(evidently_port)]
        done = subprocess.run(
            [str(PROJECT_ROOT / ".venv/bin/vitrine"), *args],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert done.returncode != 0
    assert "mlflow exited with" in done.stderr and "stopping the others" in done.stderr
    assert not answers(prefect_port) and not answers(evidently_port)
