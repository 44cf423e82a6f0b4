"""The serving tier: a tiny real champion in a temp VITRINE_HOME, and a real `bentoml serve`
on a free loopback port started in a subprocess with that environment."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from components.config import PROJECT_ROOT, load_params, state_paths
from components.data import catalogue
from components.release.registry import Registry, open_registry
from components.stages import evaluate, labels, register, train, validate
from components.stages.context import RunContext
from tests.conftest import shrunk_params, write_csv_catalogue, write_params

ADMIN_TOKEN = "test-admin-token"
POLL_SECONDS = 3


@dataclass
class Champion:
    ctx: RunContext
    registry: Registry
    version: str
    env: dict[str, str]  # VITRINE_HOME, VITRINE_PARAMS


def build_champion(root: Path, fmnist: dict, n_train: int = 400, n_test: int = 100) -> Champion:
    """Ingest a small real CSV catalogue, train a tiny CNN, register it with its index, promote."""
    csv = write_csv_catalogue(root / "shop", fmnist, n_train=n_train, n_test=n_test)
    params = shrunk_params(
        root / "catalogue",
        data={"source": str(csv)},
        train={"epochs": 2, "max_batches_per_epoch": 20},
        labels={"folds": 2},
    )
    params_path = write_params(root / "params.yaml", params)
    paths = state_paths(root / "state")
    ctx = RunContext(load_params(params_path), paths, work=root / "run", repo=root)
    catalogue.ingest_catalogue(
        str(csv),
        ctx.catalogue_dir,
        ctx.params.data.categories,
        fashion_mnist_dir=ctx.params.data.fashion_mnist_dir,
    )
    validate.run(ctx)
    labels.run(ctx)
    train.run(ctx)
    evaluate.run(ctx)
    registry = open_registry(ctx.paths, ctx.params)
    version = register.run(ctx, registry, cause="test")["version"]
    registry.promote(version, bootstrap_without_approval=True, floors_passed=True)
    env = {"VITRINE_HOME": str(paths.home), "VITRINE_PARAMS": str(params_path)}
    return Champion(ctx, registry, version, env)


def register_approved(champion: Champion) -> str:
    """Register the same trained run again as a new version that passed the gate and is approved."""
    version = register.run(champion.ctx, champion.registry, cause="test")["version"]
    champion.registry.record_verdict(version, {"passed": True, "reasons": []})
    champion.registry.approve(version, by="test")
    return version


def register_and_promote(champion: Champion) -> str:
    version = register_approved(champion)
    champion.registry.promote(version)
    return version


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path


def start_server(
    env: dict[str, str],
    log: Path,
    timeout: float = 90.0,
    target: str = "bentos.service:Vitrine",
    cwd: Path = PROJECT_ROOT,
) -> Server:
    """`bentoml serve TARGET` (the project's service, or a built bento's tag) on a free port."""
    port = free_port()
    full_env = {**os.environ, **env, "BENTOML_HOME": str(log.parent / "bentoml")}
    out = log.open("w")
    proc = subprocess.Popen(
        [
            str(Path(PROJECT_ROOT / ".venv/bin/bentoml")),
            "serve",
            target,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=cwd,
        env=full_env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"bentoml serve exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            )
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return Server(url, proc, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"service not ready after {timeout} s:\n{log.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def champion(tmp_path_factory, fmnist) -> Champion:
    """One small champion and one server for the tier's read-mostly modules (test_explain,
    test_page, test_service run in that order; only test_service's last tests move the alias).
    Modules that register or promote versions from their first test (test_ab, test_variant)
    override this fixture with a champion of their own."""
    return build_champion(tmp_path_factory.mktemp("serving"), fmnist)


@pytest.fixture(scope="session")
def server(champion, tmp_path_factory):
    env = {
        **champion.env,
        "VITRINE_ADMIN_TOKEN": ADMIN_TOKEN,
        "VITRINE_POLL_SECONDS": str(POLL_SECONDS),
        "VITRINE_SAMPLE_RATE": "1.0",
    }
    running = start_server(env, tmp_path_factory.mktemp("server") / "serve.log")
    yield running
    stop_server(running.proc)
